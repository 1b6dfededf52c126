"""The one training loop, for every method, schedule and executor.

``train_and_evaluate(config, workdir)`` checks the workdir, builds the experiment (which validates
everything and raises ``ConfigError`` before touching the disk), then trains, writing the files
listed in ``lpjax.workdir``. A workdir with checkpoints is resumed from the newest intact one, on the
same data order, so a killed run restarted with the same command ends as if nothing had happened.

Every ``checkpoint.every_steps`` steps, and at the end, the pipeline is flushed, the metrics are
synced and checked, and the stage states are saved (asynchronously). A non-finite loss or gradient
never reaches a stage's state (its update is skipped and counted); ``nonfinite=halt`` then stops the
run with ``NonFiniteError`` at the next sync, ``skip`` carries on.
"""

import os
import sys
import time

import jax
from tqdm import tqdm

from . import multihost
from . import workdir as files
from .checkpoint import Checkpointer
from .config import build_experiment, resolve
from .errors import NonFiniteError
from .metrics_log import MetricsLog, mean_per_stage, write_json
from .preemption import Preempted, StopRequests
from .report import describe, stage_table


def train_and_evaluate(config, workdir: str, *, progress: bool = True, verbose: bool = True) -> dict:
    """Train (or resume) the configured experiment and return what ``results.json`` holds."""
    started = time.perf_counter()
    given = resolve(config)
    multihost.start(given["distributed"])  # several hosts: joins them before JAX touches a device
    multihost.check_same_config(given)
    multihost.check_config(given)
    writer = multihost.is_writer()  # process 0 alone writes files and prints
    verbose, progress = verbose and writer, progress and writer
    files.check_writable(workdir)
    experiment = build_experiment(config)
    multihost.check_layout(experiment.trainer)
    trainer, data, cfg = experiment.trainer, experiment.dataset, experiment.config
    files.check_resumable(workdir, cfg)
    say = print if verbose else (lambda *a, **k: None)
    say(describe(experiment), flush=True)

    if writer:
        files.create(workdir)
        os.makedirs(files.path(workdir, files.CHECKPOINTS), exist_ok=True)
    multihost.sync("lpjax_workdir_created")
    checkpointer = Checkpointer(files.path(workdir, files.CHECKPOINTS), trainer.num_stages,
                                keep=cfg["checkpoint"]["keep"], asynchronous=cfg["checkpoint"]["asynchronous"])
    try:
        start_step, batches = _resume(experiment, checkpointer, say)
        if writer:
            write_json(files.path(workdir, files.CONFIG), cfg)
        log = (MetricsLog(files.path(workdir, files.METRICS), files.path(workdir, files.TENSORBOARD),
                          resume_step=start_step) if writer else NullLog())
        with log:
            train_time, test = _loop(experiment, checkpointer, log, batches, start_step, progress)
    finally:
        checkpointer.close()  # waits for a save in flight, also when the loop stopped on an error

    sample = _train_sample_size(data)
    train = trainer.evaluate_batches(data.eval_batches("train", cfg["eval_batch_size"], max_examples=sample))
    results = _results(experiment, train, test, train_time, time.perf_counter() - started)
    results["train_eval_examples"] = sample
    results["resumed_from_step"] = start_step
    if writer:
        write_json(files.path(workdir, files.RESULTS), results)
    say(stage_table(results["stages"]))
    final = results["final"]
    say(f"final head (stage {final['stage']}): test accuracy {100 * final['test_accuracy']:.2f}%, "
        f"test loss {final['test_loss']:.4f} | {experiment.num_steps} steps in {train_time:.1f}s | "
        f"results in {files.path(workdir, files.RESULTS)}", flush=True)
    return results


def _resume(experiment, checkpointer, say):
    """``(start_step, batches)``: the newest intact checkpoint loaded into the trainer (or step 0),
    and the training stream positioned right after the last batch that checkpoint had seen."""
    batches = experiment.batches()
    restored = checkpointer.restore_latest(_saved_states(experiment.trainer))
    if restored is None:
        return 0, batches
    states, meta = restored
    experiment.trainer.load_states(states)
    batches.set_state(meta["data_state"])
    say(f"resumed from the checkpoint at step {meta['step']}", flush=True)
    return meta["step"], batches


def _loop(experiment, checkpointer, log, batches, start_step, progress):
    """Steps ``start_step + 1 .. num_steps``; returns the training time and the last test figures."""
    trainer, data, cfg = experiment.trainer, experiment.dataset, experiment.config
    num_steps, log_every, eval_every = experiment.num_steps, cfg["log_every"], cfg["eval_every"]
    save_every, probe_every = cfg["checkpoint"]["every_steps"], cfg["probe"]["alignment_every"]
    pending, test = [], None  # Trainer.step results since the last train record, still on the device
    loop_start = last_time = time.perf_counter()
    last_examples = list(trainer.stage_examples)
    with tqdm(total=num_steps, initial=start_step, unit="step", file=sys.stderr, dynamic_ncols=True,
              disable=not progress, mininterval=0.1 if sys.stderr.isatty() else 10.0) as bar, \
            StopRequests() as stops:
        for step in range(start_step + 1, num_steps + 1):
            x, y = next(batches)
            pending.append(trainer.step(x, y))
            preempted = stops.agreed(step) and step < num_steps  # every process stops after the same step
            save = step == num_steps or (save_every and step % save_every == 0) or preempted
            if save:
                pending.append(trainer.flush())
            if step % log_every == 0 or save:
                now = time.perf_counter()
                stages = _train_record(trainer, pending, now - last_time, last_examples)
                pending, last_time, last_examples = [], now, list(trainer.stage_examples)
                log.write(step, now - loop_start, "train", stages)
                _apply_nonfinite_policy(cfg["nonfinite"], stages, step)
                last = next((s for s in reversed(stages) if s.get("loss") is not None), None)
                if last is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
            if probe_every and step % probe_every == 0:
                from .alignment import gradient_alignment  # only runs that probe need it

                log.write(step, time.perf_counter() - loop_start, "alignment", [],
                          alignment=gradient_alignment(trainer, x, y))
            if (eval_every and step % eval_every == 0) or step == num_steps:
                test = trainer.evaluate_batches(data.eval_batches("test", cfg["eval_batch_size"]))
                log.write(step, time.perf_counter() - loop_start, "test", test)
            if save:
                checkpointer.save(step, _saved_states(trainer), {"data_state": batches.get_state(), "config": cfg})
            bar.update(1)
            if preempted:
                raise Preempted(step, stops.signum)  # after the checkpoint: the caller's finally waits for it
    if test is None:  # nothing left to train: the checkpoint already held the last step
        test = trainer.evaluate_batches(data.eval_batches("test", cfg["eval_batch_size"]))
    return time.perf_counter() - loop_start, test


def _saved_states(trainer):
    """What a checkpoint holds: the live stage states, or, over several processes, every stage
    gathered to the host (a collective; see lpjax/checkpoint.py)."""
    return trainer.stage_states if jax.process_count() == 1 else trainer.host_states()


class NullLog:
    """The metrics log of processes other than 0: they compute every record but write none."""

    def write(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _train_record(trainer, pending, seconds, examples_before) -> list:
    """Per stage: mean loss and accuracy since the last record, gradient norm at the last update,
    updates skipped so far, and examples per second through the stage."""
    pending, health = jax.device_get((pending, trainer.health()))  # the record's one wait on the device
    means = mean_per_stage(pending, trainer.num_stages)
    health = mean_per_stage([health], trainer.num_stages, names=("grad_norm", "skipped"))
    stages = []
    for k in range(trainer.num_stages):
        record = dict(means[k] or {"loss": None, "accuracy": None}, **health[k])
        record["skipped"] = int(record["skipped"])
        record["examples_per_s"] = (trainer.stage_examples[k] - examples_before[k]) / max(seconds, 1e-9)
        stages.append(record)
    return stages


def _apply_nonfinite_policy(policy, stages, step) -> None:
    bad = [(k, s["skipped"]) for k, s in enumerate(stages) if s["skipped"]]
    if bad and policy == "halt":
        where = ", ".join(f"stage {k} ({n} update{'s' if n > 1 else ''})" for k, n in bad)
        raise NonFiniteError(f"non-finite loss or gradient by step {step}: skipped {where}; the last checkpoint "
                             f"holds finite values. Lower the learning rate or check the data, or set "
                             f"--config.nonfinite=skip to carry on past bad batches")


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
