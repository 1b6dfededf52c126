"""The run machinery: the Trainer, the training loop (``lpjax.fit``), checkpoints, the workdir, its lock,
metrics logs, run summaries and preemption."""
