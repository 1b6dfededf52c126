"""Executors: where and how a schedule's tasks run. ``base.Executor`` is the interface every one
implements; docs/semantics.md says what each one must compute."""

from lpjax.errors import ConfigError
from lpjax.executors.dataflow import DataflowExecutor
from lpjax.executors.placement import PerStageMeshes, SingleDevice, make_stage_mesh


def make_executor(rules, schedule, layout=None, *, devices=None):
    """The executor that runs ``schedule``'s tasks of ``rules``.

    Args:
      rules, schedule: the stages' ``StageRule``s and the schedule.
      layout: the ``Layout`` (None: the reference executor on one device).
      devices: the devices the layout's mesh is laid on (``jax.devices()`` when None): a TPU
        topology's compile-only devices for ``lpjax train --compile-only``.

    Returns:
      The executor.
    """
    if layout is None:
        return DataflowExecutor(rules, schedule, SingleDevice())
    if layout.stages != len(rules):
        raise ConfigError(f"layout has {layout.stages} stages but the model has {len(rules)}; make them equal")
    mesh = make_stage_mesh(layout.stages, layout.data, devices)
    if layout.executor == "mpmd":
        return DataflowExecutor(rules, schedule, PerStageMeshes(mesh))
    # any model: stages of different shapes share flat buffers (spmd/buffers.py); loaded only when asked for
    from lpjax.executors.spmd.executor import SpmdExecutor

    return SpmdExecutor(rules, schedule, mesh)


__all__ = ["DataflowExecutor", "PerStageMeshes", "SingleDevice", "make_executor", "make_stage_mesh"]
