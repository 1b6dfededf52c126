"""Executors: where and how a schedule's tasks run. ``base.Executor`` is the interface every one
implements; docs/semantics.md says what each one must compute."""

from lpjax.errors import ConfigError
from lpjax.executors.dataflow import DataflowExecutor
from lpjax.executors.placement import PerStageMeshes, SingleDevice, make_stage_mesh


def make_executor(rules, schedule, layout=None):
    """The reference executor when ``layout`` is None, else the layout's executor."""
    if layout is None:
        return DataflowExecutor(rules, schedule, SingleDevice())
    if layout.stages != len(rules):
        raise ConfigError(f"layout has {layout.stages} stages but the model has {len(rules)}; make them equal")
    mesh = make_stage_mesh(layout.stages, layout.data)
    if layout.executor == "mpmd":
        return DataflowExecutor(rules, schedule, PerStageMeshes(mesh))
    # any model: stages of different shapes share flat buffers (spmd/buffers.py); loaded only when asked for
    from lpjax.executors.spmd.executor import SpmdExecutor

    return SpmdExecutor(rules, schedule, mesh)


__all__ = ["DataflowExecutor", "PerStageMeshes", "SingleDevice", "make_executor", "make_stage_mesh"]
