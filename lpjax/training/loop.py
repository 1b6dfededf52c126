"""The one training loop, for every method, schedule and executor, behind ``lpjax train`` and ``lpjax.fit``.

``train_and_evaluate(config, workdir)`` checks the workdir, builds the experiment (which validates
everything and raises ``ConfigError`` before touching the disk), then trains, writing the files
listed in ``lpjax.training.workdir``. ``fit(trainer, data, workdir=..., steps=...)`` runs the same loop on a
``Trainer`` built in Python (the user's own modules), with the same files, resume and policies.
A workdir with checkpoints is resumed from the newest intact one, on the same data order, so a
killed run restarted with the same command ends as if nothing had happened.

Every ``checkpoint.every_steps`` steps, and at the end, the pipeline is flushed, the metrics are
synced and checked, and the stage states are saved (asynchronously). A non-finite loss, gradient or
update never reaches a stage's state (the update is skipped and counted); ``nonfinite=halt`` then stops
the run with ``NonFiniteError`` at the next sync, ``skip`` carries on unless a stage has stopped
training altogether (lpjax.training.nonfinite).
"""

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
from tqdm import tqdm

from lpjax.distributed import multihost
from lpjax.training import workdir as files
from lpjax.training import process_hooks
from lpjax.training.checkpoint import Checkpointer
from lpjax.config.base import NONFINITE_POLICIES
from lpjax.config.build import build_experiment, resolve, stage_layers
from lpjax.config.checks import boolean, non_negative_int, one_of, positive_int
from lpjax.errors import ConfigError
from lpjax.training.lock import WorkdirLock
from lpjax.training.metrics_log import MetricsLog, mean_per_stage, write_json
from lpjax.training.batch_checks import raise_on_bad_labels
from lpjax.training.nonfinite import NonfiniteGuard, streaming_lags
from lpjax.training.preemption import Preempted, StopRequests
from lpjax.training.run_summary import describe, describe_fit, environment, parameter_counts, parameter_table, stage_table


@dataclasses.dataclass
class Run:
    """What the loop needs: a trainer, a data source (lpjax.data's interface), the resolved run
    settings (the keys of ``lpjax.config.build.base_config`` that the loop reads) and how to describe it."""

    trainer: Any
    dataset: Any
    config: dict
    num_steps: int
    model_name: str
    stage_layers: list  # (first, last) layer index of each stage
    header: str
    learning_rates: list | None = None  # per stage: step -> learning rate (host side), when known

    def batches(self, start_step: int = 0):
        """This process's rows of each training batch (all of them in one process)."""
        index, count = self.trainer.data_shard
        at = {"start_step": start_step} if start_step else {}
        if count == 1:
            return self.dataset.train_batches(self.config["batch_size"], seed=self.config["seed"], **at)
        return self.dataset.train_batches(self.config["batch_size"], seed=self.config["seed"], shard_index=index,
                                          shard_count=count, microbatches=self.trainer.microbatches, **at)

    def eval_batches(self, split, **options):
        """This process's shard of an evaluation split (the whole split in one process)."""
        shard = {} if jax.process_count() == 1 else {"shard_index": jax.process_index(),
                                                      "shard_count": jax.process_count()}
        return self.dataset.eval_batches(split, self.config["eval_batch_size"], **options, **shard)

    def evaluate(self, split, **options):
        """Every stage's loss and accuracy on ``split``; over several processes each feeds its own
        shard into one evaluation on the mesh (lpjax/executors/spmd/eval.py) and every process
        gets the summed totals."""
        return self.trainer.evaluate_batches(self.eval_batches(split, **options), local=True)


def train_and_evaluate(config, workdir: str, *, progress: bool = True, verbose: bool = True,
                       dry_run: bool = False) -> dict | None:
    """Train (or resume) the configured experiment and return what ``results.json`` holds.

    ``dry_run``: build and check everything (data, model, trainer, workdir), print the run header
    and stop before anything is compiled or written; returns None."""
    given = resolve(config)
    files.check_local(workdir)  # before joining other hosts: every one of them would refuse it
    multihost.start(given["distributed"])  # several hosts: joins them before JAX touches a device
    multihost.check_same_config(given)
    multihost.check_config(given)
    files.check_writable(workdir)
    files.check_contents(workdir)
    experiment = build_experiment(config)
    multihost.check_layout(experiment.trainer)
    files.check_resumable(workdir, experiment.config)
    run = Run(trainer=experiment.trainer, dataset=experiment.dataset, config=experiment.config,
              num_steps=experiment.num_steps, model_name=experiment.network.name,
              stage_layers=experiment.stage_layers, header=describe(experiment),
              learning_rates=experiment.learning_rates)
    return _run(run, workdir, progress=progress, verbose=verbose, dry_run=dry_run)


def fit(trainer, data, *, workdir: str, steps: int, batch_size: int = 64, seed: int = 0, log_every: int = 50,
        eval_every: int = 0, eval_batch_size: int = 500, checkpoint_every: int = 500, keep_checkpoints: int = 3,
        asynchronous_checkpoints: bool = True, nonfinite: str | None = None, alignment_every: int = 0,
        name: str = "custom model", progress: bool = True, verbose: bool = True) -> dict:
    """Train ``trainer`` on ``data`` for ``steps`` steps with everything ``lpjax train`` does: the
    workdir files (config.json, metrics.jsonl, tb/, checkpoints/, results.json), resume from the
    newest intact checkpoint, progress and ETA, the non-finite policy, periodic evaluation and
    gradient-alignment probes. Afterwards the trainer's model (``trainer.model``, the ``StagedModel``
    it was built from) holds the trained parameters (``trainer.export()``). Returns results.json.

    ``data``: an ``lpjax.data`` data source such as ``load_dataset("digits")`` or
    ``lpjax.data.Dataset`` around your own arrays (see docs/extending.md), or a tuple
    ``(train_x, train_y, test_x, test_y)``. The keyword arguments mirror the config keys of the same
    meaning (lpjax/config/base.py). Running again in the same workdir resumes; a workdir that holds a
    different model, method or data is refused with ``ConfigError``. Learning rates are logged per
    stage when the optimizer exposes them (``optax.inject_hyperparams``). ``nonfinite`` is the
    trainer's (``Trainer(nonfinite=...)``) when None; ``"skip"`` needs a trainer built with it, whose
    updates are checked before they are written.
    """
    process_hooks.install()  # lpjax.fit reports failures in one line, as the command line does
    data = _as_data_source(data)
    settings = {
        "seed": non_negative_int(seed, "seed"),
        "batch_size": positive_int(batch_size, "batch_size", "pass batch_size=N with N >= 1"),
        "num_steps": positive_int(steps, "steps", "pass steps=N with N >= 1"),
        "log_every": positive_int(log_every, "log_every", "pass log_every=N with N >= 1"),
        "eval_every": non_negative_int(eval_every, "eval_every"),
        "eval_batch_size": positive_int(eval_batch_size, "eval_batch_size", "pass eval_batch_size=N with N >= 1"),
        "checkpoint": {"every_steps": non_negative_int(checkpoint_every, "checkpoint_every"),
                       "keep": positive_int(keep_checkpoints, "keep_checkpoints", "pass keep_checkpoints=N >= 1"),
                       "asynchronous": boolean(asynchronous_checkpoints, "asynchronous_checkpoints")},
        "nonfinite": _policy(nonfinite, trainer),
        "probe": {"alignment_every": non_negative_int(alignment_every, "alignment_every")},
    }
    if batch_size > data.num_train:
        raise ConfigError(f"batch_size {batch_size} is larger than the {data.num_train} training examples; "
                          f"pass batch_size={data.num_train} or less")
    xs, ys = trainer.split_batch(*data.example_batch(batch_size))
    trainer.check_shapes(xs[0], ys[0])
    trainer.batch_checks.data_source(data)
    cfg = dict(settings,
               dataset={"name": data.name},
               model={"name": name, "parameters": parameter_counts(trainer.model)},
               stages=trainer.num_stages,
               method={"name": trainer.method.name, "window": trainer.method.window},
               schedule={"name": type(trainer.schedule).__name__.lower(), "microbatches": trainer.microbatches},
               layout=None if trainer.layout is None else dataclasses.asdict(trainer.layout))
    files.check_writable(workdir)
    files.check_contents(workdir)
    files.check_resumable(workdir, cfg)
    run = Run(trainer=trainer, dataset=data, config=cfg, num_steps=steps, model_name=name,
              stage_layers=stage_layers(trainer.model), header=describe_fit(trainer, data, cfg, name))
    results = _run(run, workdir, progress=progress, verbose=verbose)
    trainer.export()
    return results


def _policy(nonfinite, trainer):
    """``fit``'s non-finite policy: the trainer's by default; ``skip`` over a trainer that writes
    updates unchecked (``halt``) would not keep the state finite, so it is refused."""
    if nonfinite is None:
        return trainer.nonfinite
    one_of(nonfinite, NONFINITE_POLICIES, "nonfinite")
    if nonfinite == "skip" and trainer.nonfinite != "skip":
        raise ConfigError("fit(nonfinite='skip') needs a trainer that checks each update before writing it; "
                          "build it with lpjax.Trainer(..., nonfinite='skip')")
    return nonfinite


def _as_data_source(data):
    if isinstance(data, tuple) and len(data) == 4:
        from lpjax.data import Dataset

        return Dataset.from_arrays(*data)
    needed = ("train_batches", "eval_batches", "example_batch", "num_train", "name")
    missing = [attr for attr in needed if not hasattr(data, attr)]
    if missing:
        raise ConfigError(f"data must be an lpjax data source (lpjax.data.load_dataset or lpjax.data.Dataset) or a "
                          f"tuple (train_x, train_y, test_x, test_y); a {type(data).__name__} has no "
                          f"{', '.join(missing)}")
    return data


def _run(run: Run, workdir: str, *, progress: bool, verbose: bool, dry_run: bool = False):
    started = time.perf_counter()
    trainer, data, cfg = run.trainer, run.dataset, run.config
    writer = multihost.is_writer()  # process 0 alone writes files and prints
    verbose, progress = verbose and writer, progress and writer
    say = print if verbose else (lambda *a, **k: None)
    say(run.header, flush=True)
    say(parameter_table(trainer.model), flush=True)
    if dry_run:
        say(f"dry run: data, model, trainer and workdir {workdir!r} checked; stopping before compiling or "
            f"writing anything", flush=True)
        return None

    if writer:
        files.create(workdir)
    # one writer per workdir: a second run is refused here, before it writes anything
    with (WorkdirLock(workdir) if writer else contextlib.nullcontext()):
        return _run_locked(run, workdir, say, progress, started, writer)


def _run_locked(run: Run, workdir: str, say, progress, started, writer):
    trainer, data, cfg = run.trainer, run.dataset, run.config
    if writer:
        os.makedirs(files.path(workdir, files.CHECKPOINTS), exist_ok=True)
    multihost.sync("lpjax_workdir_created")
    multihost.check_shared_filesystem(files.path(workdir, files.CHECKPOINTS))
    checkpointer = Checkpointer(files.path(workdir, files.CHECKPOINTS), trainer.num_stages,
                                keep=cfg["checkpoint"]["keep"], asynchronous=cfg["checkpoint"]["asynchronous"],
                                sharded=jax.process_count() > 1)
    try:
        start_step, batches = _resume(run, checkpointer, say)
        if writer:
            with files.writing(files.CONFIG, workdir, workdir):
                write_json(files.path(workdir, files.CONFIG), cfg)
        log = (MetricsLog(files.path(workdir, files.METRICS), files.path(workdir, files.TENSORBOARD),
                          resume_step=start_step) if writer else NullLog())
        with log:
            log.write_config(cfg)
            train_time, test = _loop(run, checkpointer, log, batches, start_step, progress, say)
            log.write_final(run.num_steps, test)
    finally:
        checkpointer.close()  # waits for a save in flight, also when the loop stopped on an error

    sample = _train_sample_size(data)
    train = run.evaluate("train", max_examples=sample)
    results = _results(run, train, test, train_time, time.perf_counter() - started)
    results["train_eval_examples"] = sample
    results["resumed_from_step"] = start_step
    results["steps_run"] = run.num_steps - start_step
    results["environment"] = environment()
    if writer:
        with files.writing(files.RESULTS, workdir, workdir):
            write_json(files.path(workdir, files.RESULTS), results)
    say(stage_table(results["stages"]))
    final = results["final"]
    ran = run.num_steps - start_step
    if ran == 0:
        what = f"already finished at step {start_step}; no steps run"
    elif start_step:
        what = f"{ran} steps (resumed at step {start_step}, now at {run.num_steps}) in {train_time:.1f}s"
    else:
        what = f"{ran} steps in {train_time:.1f}s"
    say(f"final head (stage {final['stage']}): test accuracy {100 * final['test_accuracy']:.2f}%, "
        f"test loss {final['test_loss']:.4f} | {what} | results in {files.path(workdir, files.RESULTS)}", flush=True)
    return results


def _resume(run, checkpointer, say):
    """``(start_step, batches)``: the newest intact checkpoint loaded into the trainer (or step 0),
    and the training stream positioned right after the last batch that checkpoint had seen."""
    batches = run.batches()
    restored = checkpointer.restore_latest(run.trainer.checkpoint_target())
    if restored is None:
        return 0, batches
    states, meta = restored
    run.trainer.load_states(states, steps=meta["step"])
    if meta.get("data_shard", [0, 1]) == list(run.trainer.data_shard):
        batches.set_state(meta["data_state"])
    else:  # written by another process layout: the stream's position counts other rows; batch step
        batches = run.batches(start_step=meta["step"])  # is a pure function of (seed, step)
    if meta["step"] >= run.num_steps:
        say(f"already finished at step {meta['step']} (the checkpoint there is the run's last); "
            f"raise the step count to train further", flush=True)
    else:
        say(f"resumed from the checkpoint at step {meta['step']}; {run.num_steps - meta['step']} "
            f"steps to go", flush=True)
    return meta["step"], batches


def _loop(run, checkpointer, log, batches, start_step, progress, say):
    """Steps ``start_step + 1 .. num_steps``; returns the training time and the last test figures."""
    trainer, data, cfg = run.trainer, run.dataset, run.config
    num_steps, log_every, eval_every = run.num_steps, cfg["log_every"], cfg["eval_every"]
    save_every, probe_every = cfg["checkpoint"]["every_steps"], cfg["probe"]["alignment_every"]
    pending, test = [], None  # Trainer.step results since the last train record, still on the device
    saved = start_step or None  # the step of the newest checkpoint, for the halt message
    guard = NonfiniteGuard(cfg["nonfinite"], [h["skipped"] for h in jax.device_get(trainer.health())], start_step,
                           streaming_lags(trainer.num_stages, trainer.microbatches, trainer.schedule.synchronous))
    loop_start = last_time = time.perf_counter()
    last_examples = list(trainer.stage_examples)
    bar = None  # made after the first step, so that its rate and ETA leave compilation out
    with StopRequests() as stops:
        try:
            for step in range(start_step + 1, num_steps + 1):
                if bar is None:
                    say("compiling: the first step traces and compiles every stage's programs...", flush=True)
                x, y = next(batches)
                pending.append(trainer.step(x, y, local=True))
                if bar is None:
                    jax.block_until_ready(pending[-1])
                    say(f"first step done in {time.perf_counter() - loop_start:.1f}s (compilation included); "
                        f"the ETA counts from here", flush=True)
                    bar = tqdm(total=num_steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True,
                               disable=not progress, mininterval=0.1 if sys.stderr.isatty() else 10.0)
                else:
                    bar.update(1)
                preempted = stops.agreed(step) and step < num_steps  # every process stops after the same step
                save = step == num_steps or (save_every and step % save_every == 0) or preempted
                if save:
                    pending.append(trainer.flush())
                if step % log_every == 0 or save:
                    now = time.perf_counter()
                    stages = _train_record(run, step, pending, now - last_time, last_examples)
                    pending, last_time, last_examples = [], now, list(trainer.stage_examples)
                    log.write(step, now - loop_start, "train", stages)
                    guard.check(stages, step, saved)
                    last = next((s for s in reversed(stages) if s.get("loss") is not None), None)
                    if last is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
                if probe_every and step % probe_every == 0:
                    from lpjax.research.alignment import gradient_alignment  # only runs that probe need it

                    log.write(step, time.perf_counter() - loop_start, "alignment", [],
                              alignment=gradient_alignment(trainer, x, y))
                if (eval_every and step % eval_every == 0) or step == num_steps:
                    test = run.evaluate("test")
                    log.write(step, time.perf_counter() - loop_start, "test", test)
                if save:
                    checkpointer.save(step, trainer.checkpoint_states(checkpointer.sharded),
                                      {"data_state": batches.get_state(), "config": cfg,
                                       "data_shard": list(trainer.data_shard)})
                    saved = step
                if preempted:
                    raise Preempted(step, stops.signum)  # after the checkpoint: the caller's finally waits for it
        finally:
            if bar is not None:
                bar.close()
    if test is None:  # nothing left to train: the checkpoint already held the last step
        test = run.evaluate("test")
    return time.perf_counter() - loop_start, test


class NullLog:
    """The metrics log of processes other than 0: they compute every record but write none."""

    def write(self, *args, **kwargs):
        pass

    write_config = write_final = write

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _train_record(run, step, pending, seconds, examples_before) -> list:
    """Per stage: mean loss and accuracy since the last record, gradient norm at the last update,
    updates skipped so far, examples per second through the stage and, when known, the learning
    rate of this step's update."""
    trainer = run.trainer
    states = trainer.stage_states if run.learning_rates is None else None
    # over several processes a stage held elsewhere is None here: its learning rate goes unlogged
    injected = None if states is None else [None if s is None else injected_learning_rate(s.opt_state)
                                            for s in states]
    # the record's one wait on the device
    pending, health, injected = jax.device_get((pending, trainer.health(), injected))
    raise_on_bad_labels(pending, step, trainer.batch_checks.num_classes)
    means = mean_per_stage(pending, trainer.num_stages)
    health = mean_per_stage([health], trainer.num_stages, names=("grad_norm", "skipped", "finite"))
    stages = []
    for k in range(trainer.num_stages):
        record = dict(means[k] or {"loss": None, "accuracy": None}, **health[k])
        record["skipped"], record["finite"] = int(record["skipped"]), bool(record["finite"])
        if record["grad_norm"] < 0:  # lpjax.core.stage_rule.NOT_FINITE: the last update's norm was not finite
            record["grad_norm"] = float("nan")
        record["examples_per_s"] = (trainer.stage_examples[k] - examples_before[k]) / max(seconds, 1e-9)
        if run.learning_rates is not None:
            record["learning_rate"] = float(run.learning_rates[k](step - 1))  # optax counts updates from 0
        elif injected[k] is not None:
            record["learning_rate"] = float(injected[k])
        stages.append(record)
    return stages


def injected_learning_rate(opt_state):
    """The learning rate inside an optimizer state built with ``optax.inject_hyperparams``, or None."""
    hyperparams = getattr(opt_state, "hyperparams", None)
    if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
        return hyperparams["learning_rate"]
    if isinstance(opt_state, dict):
        children = opt_state.values()
    else:
        children = opt_state if isinstance(opt_state, (tuple, list)) else ()
    for child in children:
        found = injected_learning_rate(child)
        if found is not None:
            return found
    return None


def _train_sample_size(data) -> int:
    """A seeded sample of the training split as large as the test split (at least 1,000 examples):
    the table's train loss is then an eval-mode figure that costs no more than the test evaluation."""
    return min(data.num_train, max(data.num_test, 1000))


def _results(run, train, test, train_time, total_time) -> dict:
    cfg, trainer = run.config, run.trainer
    counts = parameter_counts(trainer.model)
    stages = []
    for k, span in enumerate(run.stage_layers):
        stages.append({
            "stage": k,
            "layers": list(span),
            # backprop trains only the last head; the others keep their initial weights
            "head_trained": bool(trainer.rules[k].trains_head),
            "parameters": counts[k],
            "train_loss": train[k]["loss"],
            "train_accuracy": train[k]["accuracy"],
            "test_loss": test[k]["loss"],
            "test_accuracy": test[k]["accuracy"],
        })
    return {
        "dataset": run.dataset.name,
        "model": run.model_name,
        "method": trainer.method.name,
        "schedule": cfg["schedule"]["name"],
        "microbatches": trainer.microbatches,
        "num_stages": trainer.num_stages,
        "num_steps": run.num_steps,
        "batch_size": cfg["batch_size"],
        "train_time_s": round(train_time, 3),
        "total_time_s": round(total_time, 3),
        "stages": stages,
        "final": dict(stages[-1]),
    }
