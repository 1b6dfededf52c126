"""The base config: every key a config may have, with its default and what it means.

A recipe starts from ``base_config()`` and sets what it needs, so every key below exists and can be
overridden on the command line (``--config.optimizer.learning_rate=3e-4``):

    seed                    int; seeds the data split, the batch order and the parameter init
    dataset.name            a registered dataset (lpjax.data.DATASETS); every other key in this
                            section is passed to its loader (e.g. max_train, test_size, seq_len);
                            keys left at None are dropped so the loader's default applies
    model.name              a model of lpjax.models.MODELS; every other key is a builder keyword.
                            num_classes / vocab_size / input_shape / in_channels / seq_len are
                            filled from the dataset unless set
    model.builder           instead of a zoo model: your own builder, "my_pkg.blocks:build" or
                            "path/to/file.py:build", a function taking the other model keys (and
                            rngs) that returns an lpjax.models.Network (docs/extending.md)
    stages                  cut the model's layers into this many near-equal stages, or
    split_points            (tuple) the layer indices where stages 1.. start, or "balanced" /
                            "balanced_memory" with ``stages``: cut where the slowest stage (by
                            XLA FLOPs, heads included) or the largest (by memory) is cheapest
                            (lpjax.research.balance); the run header prints each stage's share
    method.name             a registered method (lpjax.core.methods.METHODS): backprop | greedy |
                            chunked | overlapping, or your own (docs/methods.md)
    method.window           overlapping only (default 2)
    method.loss_weights     optional, one per stage; >= 0 (a negative weight would make its stage
                            ascend its loss) and not all 0
    method.shared_readout   true: the auxiliary heads end in a read-only copy of the last stage's
                            readout (SOLO; local methods, flushing schedules; docs/methods.md)
    method.readout_refresh_steps  steps between refreshes of that copy (default 1: every step)
    optimizer.*             see lpjax.config.optimizer
    schedule.name           sequential | gpipe | 1f1b | streaming (lpjax.core.schedules)
    schedule.microbatches   microbatches per step; must divide batch_size
    layout.executor         reference (one device) | mpmd | spmd
    layout.stages           devices along the stage axis (default: one per stage)
    layout.data             devices per stage (data parallelism inside a stage)
    batch_size              examples per optimizer step
    num_steps               optimizer steps; when set it wins over num_epochs
    num_epochs              passes over the training split
    log_every               steps between training-metric records (the only host syncs)
    eval_every              steps between evaluations on the test split; 0: only at the end
    eval_batch_size         examples per evaluation batch
    checkpoint.every_steps  steps between checkpoints (0: only at the end); a checkpoint flushes the
                            pipeline first, so runs with different values differ slightly
    checkpoint.keep         checkpoints kept (the newest ones)
    checkpoint.asynchronous save in the background while training goes on
    nonfinite               skip | halt: what a non-finite loss or gradient does. Either way the
                            stage's update is skipped and counted; halt then stops the run with exit
                            code 1. skip also checks each update's written values before writing them
                            (one more optax step per update) and skips one that overflows; halt writes
                            it and stops at the next record (docs/semantics.md, "Non-finite values")
    remat                   none | nothing_saved | dots_saved | dots_no_batch_saved | layers_nothing_saved:
                            what each stage's forward keeps for its backward (lpjax/core/remat.py); the
                            rest is recomputed (layers_*: one layer at a time, which lowers the peak)
    precision.compute       float32 | bfloat16: what every layer computes in (lpjax/models/precision.py);
                            losses and normalisation statistics stay in float32
    precision.params        float32 | bfloat16: how parameters and optimizer state are stored
    probe.alignment_every   steps between gradient-alignment probes (0: off); see lpjax.research.alignment
    distributed.*           several hosts (lpjax/distributed/multihost.py): coordinator ("host:port"),
                            num_processes, process_id (all three, or none: then LPJAX_* variables
                            or the detected TPU pod / SLURM / Kubernetes cluster), auto_detect,
                            init_timeout_s (wait for every process to join), peer_timeout_s
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lpjax.executors.layout import EXECUTORS as LAYOUT_EXECUTORS

EXECUTORS = ("reference", *LAYOUT_EXECUTORS)  # "reference": no layout, one device
NONFINITE_POLICIES = ("halt", "skip")
OPEN_SECTIONS = ("dataset", "model")  # free-form: their extra keys are loader / builder keywords


def base_config() -> ml_collections.ConfigDict:
    """A fresh config holding every key a config may have, with its default (the module docstring
    says what each means). Keys without a default are typed placeholders (None), so the command line
    can set them; recipes fill in the rest. ``dataset`` and ``model`` also take keys of their own."""
    return ml_collections.ConfigDict({
        "seed": 0,
        "dataset": {"name": placeholder(str)},
        "model": {"name": placeholder(str), "builder": placeholder(str)},
        "stages": placeholder(int),
        "split_points": placeholder(object),  # a tuple, or "balanced" / "balanced_memory"
        "method": {"name": placeholder(str), "window": placeholder(int), "loss_weights": placeholder(tuple),
                   "shared_readout": False, "readout_refresh_steps": placeholder(int)},
        "optimizer": {
            "name": "adam",
            "learning_rate": 1e-3,
            "learning_rates": placeholder(tuple),
            "weight_decay": 0.0,
            "momentum": 0.9,
            "decay": "constant",
            "warmup_steps": 0,
            "grad_clip_norm": placeholder(float),
        },
        "schedule": {"name": "sequential", "microbatches": 1},
        "layout": {"executor": "reference", "stages": placeholder(int), "data": 1},
        "batch_size": 64,
        "num_steps": placeholder(int),
        "num_epochs": placeholder(int),
        "log_every": 50,
        "eval_every": 0,
        "eval_batch_size": 500,
        "checkpoint": {"every_steps": 500, "keep": 3, "asynchronous": True},
        "nonfinite": "halt",
        "remat": "none",
        "precision": {"compute": "float32", "params": "float32"},
        "probe": {"alignment_every": 0},
        "distributed": {"coordinator": placeholder(str), "num_processes": placeholder(int),
                        "process_id": placeholder(int), "auto_detect": True, "init_timeout_s": 300,
                        "peer_timeout_s": placeholder(float)},
    })
