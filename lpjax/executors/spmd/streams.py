"""What the host sends the SPMD executor's program at each call: stage 0's input stream, every
stage's labels, and the lowered control arrays (lowering.py), as global arrays on the mesh.

A host call's input stream is sharded over ``stage`` too: only stage 0 reads it, so the other
stages' devices keep a zeros shard from call to call (``Streams.inputs``), and a process without a
stage-0 device neither fills a stream nor copies one. Over several processes each one places only
the rows it feeds (``data_shard``).
"""

import jax
import numpy as np
from jax.sharding import NamedSharding

from lpjax.executors.spmd.mesh import global_array

P = jax.P


class Streams:
    """Builds one host call's streams for an executor on ``mesh``; keeps the zeros input shards
    (``idle_inputs``) and the last few control arrays on the devices between calls."""

    def __init__(self, mesh, data_shard, local_slices):
        self.mesh = mesh
        self.num_stages, self.num_data = mesh.shape["stage"], mesh.shape.get("data", 1)
        self.data_shard, self.local_slices = data_shard, local_slices
        # whether this process holds a stage-0 device (feeds the input stream)
        self.feeds_inputs = any(d.process_index == jax.process_index()
                                for d in np.asarray(mesh.devices).reshape(self.num_stages, -1)[0])
        self.idle_inputs = {}  # (device, rows) -> the zeros input shard of a device without stage 0
        self._controls = {}

    def for_call(self, clocks, control, inputs, labels, rules, shapes):
        """The program's ``(xs, ys, control)`` for one host call.

        Args:
          clocks: the call's clocks (tasks or None per stage).
          control: the lowered arrays of those clocks (``Lowering.lower``).
          inputs, labels: the host copies of fed microbatches by index; what the call is the last
            to use is removed from them (inputs at stage 0's forward, labels at the last stage's).
          rules: the stages' rules (which ones read labels).
          shapes: the executor's ``Shapes`` (the fed rows' shapes and dtypes).

        Returns:
          Stage 0's input stream ``[K, rows, microbatch rows, ...]`` (one row per forward it runs
          in this call, ``input[t, 0]``, at least one), the labels ``[clocks, K, microbatch rows,
          ...]`` and the control arrays, all global arrays.
        """
        K = self.num_stages
        (x_slice, x_dtype), (y_slice, y_dtype) = shapes.x_spec, shapes.y_spec
        rows = stream_rows(clocks)
        stream_x = np.zeros((rows, *self.fed_shape(x_slice)), x_dtype) if self.feeds_inputs else None
        stream_y = np.zeros((len(clocks), K, *self.fed_shape(y_slice)), y_dtype)
        for t, clock in enumerate(clocks):
            for task in clock:
                if task is None or not task.runs_forward:
                    continue
                k, m = task.stage, task.microbatch
                if k == 0:
                    x = inputs.pop(m)
                    if stream_x is not None:
                        stream_x[control["input"][t, 0]] = x
                if rules[k].trains_head:
                    stream_y[t, k] = labels[m]
                if k == K - 1:
                    labels.pop(m)
        return (self._input_stream(stream_x, rows, shapes.x_spec),
                self._rows(stream_y, P(None, "stage", "data"), (len(clocks), K, *self._full(y_slice))),
                self._control_on_device(control))

    def specs(self, clocks, control, shapes):
        """What ``for_call`` sends for ``clocks``, as ``ShapeDtypeStruct``s placed on the mesh: the
        program lowers from them without any data (compile-only)."""
        (x_slice, x_dtype), (y_slice, y_dtype) = shapes.x_spec, shapes.y_spec

        def placed(spec, shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(self.mesh, spec))

        return (placed(P("stage", None, "data"), (self.num_stages, stream_rows(clocks), *self._full(x_slice)), x_dtype),
                placed(P(None, "stage", "data"), (len(clocks), self.num_stages, *self._full(y_slice)), y_dtype),
                {name: placed(P(None, "stage"), a.shape, a.dtype) for name, a in control.items()})

    def _full(self, slice_shape):
        return (slice_shape[0] * self.num_data, *slice_shape[1:])

    def fed_shape(self, slice_shape):
        """The rows of one microbatch this process feeds."""
        return (slice_shape[0] * self.local_slices, *slice_shape[1:])

    def _input_stream(self, stream_x, rows, x_spec):
        """Stage 0's input stream as a global array sharded over ``stage`` and ``data``: each
        stage-0 device gets its rows of ``stream_x``, every other device a zeros shard kept on it
        from call to call."""
        x_slice, x_dtype = x_spec
        shape = (self.num_stages, rows, *self._full(x_slice))
        sharding = NamedSharding(self.mesh, P("stage", None, "data"))
        offset = self.data_shard[0] * self.fed_shape(x_slice)[0]  # the first row this process feeds
        shards = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            if index[0].indices(shape[0])[0] == 0:
                start, stop, _ = index[2].indices(shape[2])
                shards.append(jax.device_put(stream_x[None, :, start - offset: stop - offset], device))
                continue
            key = (device, rows)
            if key not in self.idle_inputs:
                if len(self.idle_inputs) >= 4 * len(self.mesh.local_devices):
                    self.idle_inputs.pop(next(iter(self.idle_inputs)))
                self.idle_inputs[key] = jax.device_put(np.zeros(sharding.shard_shape(shape), x_dtype), device)
            shards.append(self.idle_inputs[key])
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    def _rows(self, local, spec, global_shape):
        """The global stream array from this process's rows: every row (one process, or whole
        stages per process), or its block of the data axis, placed with
        ``jax.make_array_from_process_local_data``."""
        sharding = NamedSharding(self.mesh, spec)
        if self.data_shard[1] == 1:
            return global_array(local, sharding)
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    def _control_on_device(self, control):
        """The lowered arrays as device arrays; a steady pipeline lowers every step to the same
        arrays, so the last few are kept rather than sent again."""
        key = b"".join(control[name].tobytes() for name in sorted(control)) + repr(
            [control[name].shape for name in sorted(control)]).encode()
        if key not in self._controls:
            if len(self._controls) >= 8:
                self._controls.pop(next(iter(self._controls)))
            self._controls[key] = global_array(control, NamedSharding(self.mesh, P(None, "stage")))
        return self._controls[key]


def stream_rows(clocks) -> int:
    """Rows of a host call's input stream: one per forward stage 0 runs in ``clocks``, at least one."""
    return max(1, sum(task is not None and task.stage == 0 and task.runs_forward for clock in clocks for task in clock))
