"""The one training loop, for every method, schedule and executor.

``train_and_evaluate(config, workdir)`` builds the experiment (which validates everything and raises
``ConfigError`` before touching the disk), then trains and writes to ``workdir``:

    config.json     the resolved config (defaults, derived model options and step count filled in)
    metrics.jsonl   one line per record: {"step", "time", "split": "train"|"test", "loss": [...per
                    stage], "accuracy": [...]}; train records average the steps since the last one
    results.json    per-stage train/test loss and accuracy after training (eval mode; the train figures
                    on a seeded sample of the training split) and the final head's figures

Files from an earlier run in the same workdir are replaced.
"""

import os
import sys
import time

from tqdm import tqdm

from .config import build_experiment
from .errors import ConfigError
from .metrics_log import MetricsLog, mean_per_stage, write_json
from .report import describe, stage_table


def train_and_evaluate(config, workdir: str, *, progress: bool = True, verbose: bool = True) -> dict:
    """Train the configured experiment and return what ``results.json`` holds."""
    started = time.perf_counter()
    _check_workdir(workdir)
    experiment = build_experiment(config)
    trainer, data, cfg = experiment.trainer, experiment.dataset, experiment.config
    say = print if verbose else (lambda *a, **k: None)
    say(describe(experiment), flush=True)

    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create workdir {workdir!r}: {err.strerror}; choose another --workdir") from None
    write_json(os.path.join(workdir, "config.json"), cfg)
    num_steps, log_every, eval_every = experiment.num_steps, cfg["log_every"], cfg["eval_every"]
    batches = experiment.batches()
    pending = []  # Trainer.step results since the last train record, still on the device
    with MetricsLog(os.path.join(workdir, "metrics.jsonl")) as log, \
            tqdm(total=num_steps, unit="step", file=sys.stderr, dynamic_ncols=True, disable=not progress,
                 mininterval=0.1 if sys.stderr.isatty() else 10.0) as bar:  # a log file needs few updates
        loop_start = time.perf_counter()
        for step in range(1, num_steps + 1):
            x, y = next(batches)
            pending.append(trainer.step(x, y))
            if step == num_steps:
                pending.append(trainer.drain())  # streaming schedules still hold in-flight microbatches
            if step % log_every == 0 or step == num_steps:
                means = mean_per_stage(pending, trainer.num_stages)
                pending = []
                log.write(step, time.perf_counter() - loop_start, "train", means)
                last = next((m for m in reversed(means) if m is not None), None)
                if last is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
            if (eval_every and step % eval_every == 0) or step == num_steps:
                test = trainer.evaluate_batches(data.eval_batches("test", cfg["eval_batch_size"]))
                log.write(step, time.perf_counter() - loop_start, "test", test)
            bar.update(1)
        train_time = time.perf_counter() - loop_start

    sample = _train_sample_size(data)
    train = trainer.evaluate_batches(data.eval_batches("train", cfg["eval_batch_size"], max_examples=sample))
    results = _results(experiment, train, test, train_time, time.perf_counter() - started)
    results["train_eval_examples"] = sample
    write_json(os.path.join(workdir, "results.json"), results)
    say(stage_table(results["stages"]))
    final = results["final"]
    say(f"final head (stage {final['stage']}): test accuracy {100 * final['test_accuracy']:.2f}%, "
        f"test loss {final['test_loss']:.4f} | {num_steps} steps in {train_time:.1f}s | "
        f"results in {os.path.join(workdir, 'results.json')}", flush=True)
    return results


def _check_workdir(workdir) -> None:
    if not workdir:
        raise ConfigError("no workdir given; pass the directory that should receive the run's files")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} exists and is not a directory; choose another --workdir")


def _train_sample_size(data) -> int:
    """A seeded sample of the training split as large as the test split (at least 1,000 examples):
    the table's train loss is then an eval-mode figure that costs no more than the test evaluation."""
    return min(data.num_train, max(data.num_test, 1000))


def _results(experiment, train, test, train_time, total_time) -> dict:
    cfg, trainer = experiment.config, experiment.trainer
    stages = []
    for k, span in enumerate(experiment.stage_layers):
        stages.append({
            "stage": k,
            "layers": list(span),
            # backprop trains only the last head; the others keep their initial weights
            "head_trained": bool(trainer.kernels[k].trains_head),
            "train_loss": train[k]["loss"],
            "train_accuracy": train[k]["accuracy"],
            "test_loss": test[k]["loss"],
            "test_accuracy": test[k]["accuracy"],
        })
    return {
        "dataset": experiment.dataset.name,
        "model": experiment.network.name,
        "method": trainer.method.name,
        "schedule": cfg["schedule"]["name"],
        "microbatches": trainer.microbatches,
        "num_stages": trainer.num_stages,
        "num_steps": experiment.num_steps,
        "batch_size": cfg["batch_size"],
        "train_time_s": round(train_time, 3),
        "total_time_s": round(total_time, 3),
        "stages": stages,
        "final": dict(stages[-1]),
    }
