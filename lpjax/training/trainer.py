"""The one training loop entry point every method, schedule and executor goes through."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpjax.config.base import NONFINITE_POLICIES
from lpjax.config.checks import one_of
from lpjax.errors import ConfigError, NonFiniteError
from lpjax.executors import make_executor
from lpjax.data.checks import examples
from lpjax.executors.base import Executor
from lpjax.training.batch_checks import BatchChecks
from lpjax.core.stage_rule import StageRule
from lpjax.core.losses import check_logits_match_labels, get_loss
from lpjax.core.methods import Method
from lpjax.core.optimizers import per_stage_optimizers
from lpjax.core.schedules import Schedule, Sequential
from lpjax.core.shared_readout import holds_no_copies, share_readout
from lpjax.core.staging import Stage


class Trainer:
    """Trains a ``StagedModel`` with a method, per-stage optax optimizers, a schedule and a layout.

    ``layout=None`` runs the reference executor on one device. ``step`` never waits on the device:
    the metrics it returns are device arrays.

    The trainer trains its own copy of ``model``'s arrays (the executors donate their buffers to XLA,
    which would otherwise delete the caller's), so ``model`` keeps working and one model can start
    several trainers. ``export()`` writes the trained parameters and statistics back into ``model``;
    ``lpjax.fit`` does so when it ends.

    ``model`` may also be a function that builds the ``StagedModel`` (its factory, seeded). With the
    spmd executor the model is then only traced (``nnx.eval_shape``: ``self.model`` holds shapes)
    and each stage's state is created by a jitted initialiser on the devices that hold it, so no host
    ever holds another host's stages; the other executors build it. ``devices``: the devices the
    layout's mesh is laid on (``jax.devices()`` when None; a TPU topology's for compile-only).
    """

    def __init__(self, model, *, method: Method, optimizer, loss="softmax_cross_entropy",
                 schedule: Schedule | None = None, layout=None, num_classes: int | None = None, remat: str = "none",
                 devices=None, nonfinite: str = "halt"):
        if not isinstance(method, Method):
            raise ConfigError(f"method must be an lpjax method such as lpjax.Greedy(), got {method!r}")
        factory = model if callable(model) and not isinstance(model, nnx.Module) else None
        on_device = factory is not None and layout is not None and layout.executor == "spmd"
        if on_device:  # traced: shapes only, with the readout's read-only copies in place
            found = {}

            def traced():
                built = factory()
                found["paths"] = _readout_paths(built, method)
                return built

            model = nnx.eval_shape(traced)
        elif factory is not None:
            model = factory()
        method.check(model)
        self.model, self.method = model, method
        self.schedule = schedule or Sequential(1)
        if method.needs_flush and not self.schedule.synchronous:
            raise ConfigError(f"{method.name} needs a flushing schedule (sequential, gpipe or 1f1b), not {self.schedule!r}")
        if method.shared is not None and not self.schedule.synchronous:
            raise ConfigError(f"a shared readout is refreshed at step boundaries, which streaming does not have; "
                              f"use a flushing schedule (sequential, gpipe or 1f1b), not {self.schedule!r}")
        # the user's model gets the read-only copies too, so export() writes into the same structure
        paths = found["paths"] if on_device else _readout_paths(model, method)
        self.layout = layout
        self.num_classes = num_classes
        self.loss_fn = get_loss(loss)
        optimizers = per_stage_optimizers(optimizer, len(model), method)
        self.nonfinite = one_of(nonfinite, NONFINITE_POLICIES, "nonfinite")
        self.rules = [StageRule(_copy_of(stage), k, len(model), method, tx, self.loss_fn, readout_path=path, remat=remat,
                                make_stage=_stage_builder(factory, k, method) if on_device else None,
                                check_writes=self.nonfinite == "skip")
                      for k, (stage, tx, path) in enumerate(zip(model, optimizers, paths))]
        self.executor: Executor = make_executor(self.rules, self.schedule, layout, devices=devices)
        self.steps = 0
        self.stage_examples = [0] * len(model)  # examples each stage has run forward so far
        self._done_seen, self._microbatch_rows = [0] * len(model), 0
        self._checked_shapes = False
        self._logits = {}
        self.batch_checks = BatchChecks(self)  # lpjax/training/batch_checks.py: what a bad batch raises

    @property
    def num_stages(self):
        return len(self.rules)

    @property
    def microbatches(self):
        return self.schedule.microbatches

    @property
    def stage_states(self):
        """Each stage's live ``StageState`` (params, statistics, optimizer state), on its devices.

        Mid-pipeline with a streaming schedule: between ``step`` calls some microbatches are still in
        flight, so stage k may have run microbatches that stage k+1 has not yet, and cotangents for
        already-run microbatches may not have reached it. After ``drain()`` (or ``flush()``), and
        always with the sequential and gpipe schedules, every fed microbatch has reached every stage.
        ``export()`` and ``predict()`` drain first."""
        return self.executor.states

    @property
    def data_shard(self):
        """``(shard_index, shard_count)``: which rows of each microbatch this process feeds, as the
        data sources' ``shard_index`` / ``shard_count`` with ``microbatches=self.microbatches``
        (lpjax/data/dataset.py). ``(0, 1)``, every row, in one process; over several processes whose
        count divides the layout's ``data`` axis, each holds a block of data columns of every stage
        and feeds only their rows."""
        return self.executor.data_shard

    @property
    def num_data(self):
        """Devices per stage: the size of the layout's ``data`` axis (1 on the reference executor)."""
        return self.executor.placement.num_data

    # -- training ----------------------------------------------------------------------------
    def own_rows(self, x, y):
        """This process's rows (``data_shard``) of a global batch ``(x, y)``."""
        index, count = self.data_shard
        if count == 1:
            return x, y
        self.split_batch(x, y)  # the global batch must split into microbatches and data slices

        def own(a):
            parts = np.split(np.asarray(a), self.microbatches)
            return np.concatenate([p[len(p) * index // count:len(p) * (index + 1) // count] for p in parts])

        return own(x), own(y)

    def split_batch(self, x, y, *, local=False):
        """``local``: ``(x, y)`` are this process's rows of the batch (``data_shard``)."""
        batch = len(x)
        count = self.data_shard[1] if local else 1
        parts = self.microbatches * self.num_data // count
        if len(y) != batch:
            raise ConfigError(f"batch has {batch} inputs but {len(y)} labels")
        if batch % parts:
            raise ConfigError(
                f"batch size {batch} is not divisible by microbatches x data = {parts}; "
                f"use a batch size that is a multiple of {parts}"
            )
        m = self.microbatches
        if m == 1:  # every step pays for np.split's generality otherwise
            return [np.asarray(x)], [np.asarray(y)]
        return np.split(np.asarray(x), m), np.split(np.asarray(y), m)

    def step(self, x, y, *, local=False):
        """One optimizer step per stage on the batch ``(x, y)``; returns per-stage metrics.

        In a multi-process run every process passes the same global batch, or, with ``local=True``,
        only its own rows of it (``data_shard``; what ``lpjax train`` reads on each host)."""
        x, y = self.batch_checks.training(x, y)
        if not local:
            x, y = self.own_rows(x, y)
        xs, ys = self.split_batch(x, y, local=True)
        if not self._checked_shapes:
            self.check_shapes(xs[0], ys[0])
        self._microbatch_rows = len(xs[0]) * self.data_shard[1]  # the whole microbatch's rows
        if self.method.shared is not None and self.method.shared.refreshes_before(self.steps):
            # a flushing schedule leaves every stage at the step boundary: no task is in flight
            self.executor.refresh_shared()
        self.executor.feed(xs, ys)
        self.steps += 1
        self._count_examples()
        return self.executor.take_metrics()

    def drain(self):
        """Finish all in-flight microbatches (streaming schedules); returns their metrics."""
        self.executor.drain()
        self._count_examples()
        return self.executor.take_metrics()

    def flush(self):
        """Drain and forget what is left in flight, so the stage states are the whole training state
        (before a checkpoint; a resumed run starts from exactly this); returns the drained metrics."""
        self.executor.drain()
        self._count_examples()
        self.executor.flush()
        self._done_seen = [0] * self.num_stages
        return self.executor.take_metrics()

    def host_states(self):
        """Every stage's state as numpy arrays, in every process (a collective in multi-process runs,
        after which each host holds the whole model): what the Python API's per-stage checkpoints
        save over several processes; ``lpjax train`` writes sharded ones instead."""
        return self.executor.host_states()

    def load_states(self, states, steps: int | None = None):
        """Continue from restored stage states.

        Args:
          states: ``StageState`` pytrees, one per stage, or the SPMD executor's ``ShardedStates``
            from a sharded checkpoint (what ``Checkpointer.restore_latest`` gives).
          steps: the optimizer steps those states have taken, which a method's refresh rule counts
            from (a shared readout's copy); the step counter is left as it is when omitted.
        """
        self.executor.load_states(states)
        if steps is not None:
            self.steps = steps

    def checkpoint_states(self, sharded: bool = False):
        """What a checkpoint saves now: the live stage states, or with ``sharded`` (``lpjax train``
        over several processes; the spmd executor only) the state buffers where they live, with
        their fingerprints (``ShardedStates``; a collective)."""
        return self.executor.checkpoint_states(sharded)

    def checkpoint_target(self):
        """What ``Checkpointer.restore_latest`` reads a checkpoint onto: the live stage states, or
        on the spmd executor a ``ShardedTarget`` (which also reads a per-stage checkpoint, through
        the host)."""
        return self.executor.checkpoint_target()

    def health(self):
        """Per stage, the gradient norm at its last update, the updates skipped so far because a
        loss, gradient or (``nonfinite="skip"``) written value was not finite, and whether the
        stage's whole state is finite (under ``nonfinite="halt"`` an update that overflows is
        written, and this is where it shows), never gathering the stage states: device scalars on
        the dataflow executors; on the spmd executor numpy scalars read where each stage lives and
        gathered as three numbers per stage (a collective: every process calls it)."""
        norms, skipped, finite = self.executor.stage_scalars()
        return [{"grad_norm": n, "skipped": s, "finite": f} for n, s, f in zip(norms, skipped, finite)]

    def _refuse_nonfinite(self, what):
        bad = [k for k, h in enumerate(jax.device_get(self.health())) if not bool(h["finite"])]
        if bad:
            raise NonFiniteError(f"{what}: stage {bad[0]}'s parameters or optimizer state are not finite (an update "
                                 f"overflowed); lower the learning rate, or build the Trainer with nonfinite='skip', "
                                 f"which checks every update before writing it")

    def _count_examples(self):
        for k, done in enumerate(self.executor.done):
            self.stage_examples[k] += (done - self._done_seen[k]) * self._microbatch_rows
            self._done_seen[k] = done

    def check_shapes(self, x, y):
        """Fail before compiling anything if a head's output cannot be scored against the labels."""
        h = jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(x.dtype))
        for k, rule in enumerate(self.rules):
            try:
                h, logits = jax.eval_shape(rule.predict, rule.state_shapes(), h)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"stage {k} cannot take an input of shape {h.shape}: {str(err).splitlines()[0]}") from None
            if rule.trains_head or k == self.num_stages - 1:
                check_logits_match_labels(logits.shape, np.shape(y), self.num_classes, where=f"stage {k}'s head")
        self._checked_shapes = True

    # -- the trained model -------------------------------------------------------------------
    def export(self):
        """The user's ``StagedModel`` (the one this trainer was built from) holding the trained
        parameters and non-trainable state (batch statistics), in eval mode, ready for ``model(x)``
        and ``nnx.state(model)``; returns it.

        Drains first (finishing in-flight microbatches, which does not change training: see
        docs/semantics.md). The arrays written into the model are copies on the default device, so
        further training does not touch them; call ``export()`` again for newer parameters. In a
        multi-process run every process must call it, and it gathers every stage's state to every
        host (``host_states()``, a collective): the whole model must then fit in this host's memory.
        ``evaluate`` and ``health`` gather nothing of the kind.
        """
        self.drain()
        self._refuse_nonfinite("export()")
        device = jax.devices()[0]
        for stage, state in zip(self.model, self.executor.host_states()):
            for part in ("body", "head"):
                arrays = jax.device_put({"params": state.params[part], "rest": state.rest[part]}, device)
                nnx.update(getattr(stage, part), arrays["params"], arrays["rest"])
            stage.eval()
        return self.model

    def predict(self, x):
        """Anytime predictions: the logits of every stage's head on the inputs ``x``, in stage order
        (device arrays), computed in eval mode with the current stage states.

        Works at any point, also in the middle of streaming training: it drains first, which finishes
        the in-flight microbatches and does not change the training result (docs/semantics.md). Equal
        to ``self.export()(x)`` without touching the user's model. One process only: over several,
        a process holds some stages only (use ``evaluate``, or ``export``, which gathers them)."""
        if jax.process_count() > 1:
            raise ConfigError("predict() runs in one process; in a multi-process run use evaluate() (on the mesh) "
                              "or export(), which gathers every stage to this host")
        x = self.batch_checks.prediction(x)
        self.drain()
        place, outputs, h = self.executor.placement, [], x
        for k in range(self.num_stages):
            if k not in self._logits:
                self._logits[k] = jax.jit(self.rules[k].predict)
            h, logits = self._logits[k](self.executor.states[k], place.put_state(k, h))
            outputs.append(logits)
        return outputs

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, x, y, batch_size: int = 500):
        """Loss and accuracy of every stage's head on held-out arrays (anytime prediction)."""
        x, y = examples(x, y, "evaluate")
        return self.evaluate_batches((x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, len(x), batch_size))

    def evaluate_batches(self, batches, *, local=False):
        """Like ``evaluate``, over an iterable of ``(x, y)`` batches (a data source's eval stream).

        In a multi-process run every process must call it: with the same batches, of which each
        contributes its block of rows, or with ``local=True`` with its own shard of the split
        (``eval_batches(..., shard_index=jax.process_index(), shard_count=jax.process_count())``,
        what ``lpjax train`` does), all of which it contributes; shards may differ in length. The
        batches then run through one forward pipeline on the executor's mesh, each stage on its
        own devices (lpjax/executors/spmd/eval.py): no host gathers another stage's parameters.
        The totals are summed over all processes and every process gets them."""
        batches = self.batch_checks.each(batches)
        self.drain()
        return self._eval_figures(*self.executor.evaluate(batches, local=local))

    def _eval_figures(self, totals, count):
        if count == 0:
            raise ConfigError("the evaluation split is empty; check the dataset's test split")
        return [{"loss": float(loss / count), "accuracy": float(correct / count)} for loss, correct in totals]


def _copy_of(stage: Stage) -> Stage:
    """The stage with fresh copies of all its arrays: what the trainer trains (and donates). An
    abstract stage's shapes stay as they are."""
    graphdef, state = nnx.split(stage)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.copy(a) if isinstance(a, jax.Array) else a, state))


def _readout_paths(model, method):
    """Where each stage's head keeps the readout: with a shared readout (lpjax/core/shared_readout.py)
    the auxiliary heads of ``model`` get read-only copies of the last one, in place."""
    return share_readout(model) if method.shared is not None else holds_no_copies(model)


def _stage_builder(factory, k, method):
    """Stage k of a fresh model from ``factory``, its readout shared as the trainer shares it: what
    ``StageRule.make_stage`` builds in a jitted initialiser (the other stages' arrays are traced but
    never computed)."""
    def build():
        model = factory()
        _readout_paths(model, method)
        return model[k]

    return build
