"""The SPMD executor: every stage in one jitted program over the mesh's ``stage`` axis."""

from lpjax.executors.spmd.executor import SpmdExecutor

__all__ = ["SpmdExecutor"]
