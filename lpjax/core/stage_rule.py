"""Pure per-stage update rules (docs/semantics.md, "The per-stage rule"), shared unchanged by every executor.

Each stage owns a ``StageState`` (params, non-trainable state such as batch statistics, optimizer
state and a gradient sum). Three pure functions act on it:

- ``forward``: run the body on the stage's input, score its own head, add ``∂L_k/∂(θ_k, φ_k)`` to
  the gradient sum, and return the activation for stage k+1, the input cotangent ``∂L_k/∂h_{k-1}``
  for stage k-1 (only when the window lets it pass) and the body's VJP residual, kept so that later
  losses can reach this stage's parameters without a second forward pass.
- ``backward``: apply residuals to cotangents arriving from later stages' losses, add the parameter
  part to the gradient sum and pass on the input part where the window allows.
- ``update``: one optax step with the mean gradient over the microbatches seen since the last one.
  Local methods give each stage its own optimizer. Backprop trains one model with one optax tree:
  its stages all update at the step's flush, and each passes ``tx`` its own gradient plus one
  *phantom* scalar leaf equal to the norm of every other stage's gradient (a psum over stages). A
  chain of leaf-wise transformations led by ``clip_by_global_norm`` (what ``grad_clip_norm``
  builds) then sees the whole model's global norm and acts on this stage's leaves exactly as optax
  on the unstaged model would; the phantom's own update is dropped (``docs/semantics.md``).
  A non-finite gradient (or loss, which makes the gradient non-finite) leaves the parameters and
  optimizer state as they were and is counted (``skipped``), decided once per update with
  ``lax.cond`` on the gradient norm that is logged anyway. An update can also overflow with a finite
  gradient (a learning rate times a gradient past float32's range). With ``check_writes`` (the
  ``nonfinite=skip`` policy) the step is first computed into a finiteness check of everything it
  would write and skipped as a whole if anything is not finite, so the state stays finite whatever
  happens; that costs one more computation of the optax step per update (``optax.apply_if_finite``
  judges the transformed updates the same way; benchmarks/greedy_overhead.py measures the price).
  Without it (``nonfinite=halt``) an overflowing update is written and ``state_finite`` reports it
  where the training loop reads its health, which then stops the run (lpjax/training/nonfinite.py).

Stage boundaries are cut with ``jax.lax.stop_gradient``; a loss's gradient only crosses a boundary
as an explicit cotangent message, which is what makes the window exact.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lpjax.core.losses import accuracy
from lpjax.core.methods import ONE_TREE
from lpjax.core.remat import apply_layers, check_remat, rematerialised
from lpjax.core.shared_readout import get_readout, set_readout


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StageState:
    params: Any  # {"body": ..., "head": ...}
    rest: Any  # non-Param variables (batch stats, RNG counters): {"body": ..., "head": ...}
    opt_state: Any
    grad_sum: Any  # same tree as the trainable params
    grad_count: Any  # microbatches whose own loss is in grad_sum
    grad_norm: Any  # global norm of the mean gradient at the last update (a metric); NOT_FINITE if it was not
    skipped: Any  # updates skipped because the gradient or the state they would write was not finite


# What ``grad_norm`` holds after an update whose gradient norm was not finite: a finite stand-in, so
# that no saved state ever holds a NaN or an infinity (readers show it as "not finite").
NOT_FINITE = -1.0


def _fresh(state):
    """Rebuild a state's Variables in the current trace: merging Variables created outside a
    ``jax.vjp`` and mutating them inside (batch statistics) is a Flax TraceContextError."""
    return jax.tree.map(lambda leaf: leaf, state)


def _keep_if_finite(new, old):
    """``new`` where every floating leaf is finite, else ``old``: batch statistics of a bad batch are
    dropped along with its update."""
    floats = [leaf for leaf in jax.tree.leaves(new) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    if not floats:
        return new
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in floats]))
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o) if jnp.issubdtype(n.dtype, jnp.floating) else n,
                        new, old)


def all_finite(tree):
    """Whether every floating-point leaf of ``tree`` is finite (a device bool)."""
    verdict = jnp.bool_(True)
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            verdict &= jnp.all(jnp.isfinite(leaf))
    return verdict


def out_of_range(labels, num_classes):
    """How many integer labels lie outside ``[0, num_classes)`` (a device int32)."""
    return jnp.sum((labels < 0) | (labels >= num_classes), dtype=jnp.int32)


def _column_sums_first(squares):
    """Sum of a matrix's entries as its column sums, then their sum. XLA's CPU backend runs a
    column sum as a vectorized kernel (YNNPACK's ``sum_squared_kn``) that takes about 0.55x the CPU
    time of what it emits for a whole-matrix sum (``sum_squared_k1`` over 32x32 windows); the
    barrier keeps its simplifier from merging the two sums back into that one. The same terms are
    added in another order: a NaN or infinity still reaches the result, and the norm differs from
    ``optax.tree.norm``'s only by float32 rounding."""
    columns = jnp.sum(squares.reshape(-1, squares.shape[-1]), axis=0)
    return jnp.sum(jax.lax.optimization_barrier(columns))


def _sum_of_squares(leaf):
    squares = jnp.square((jnp.abs(leaf) if jnp.iscomplexobj(leaf) else leaf).astype(jnp.float32))
    if squares.ndim < 2:
        return jnp.sum(squares)
    # other backends fuse a whole-matrix sum well, and a barrier would only split it in two
    return jax.lax.platform_dependent(squares, cpu=_column_sums_first, default=jnp.sum)


def gradient_sq_norm(grads):
    """The squared global L2 norm of a gradient tree, in float32: the quantity the non-finite check
    and the ``grad_norm`` metric read (``benchmarks/greedy_overhead.py`` measures what it costs)."""
    return sum((_sum_of_squares(leaf) for leaf in jax.tree.leaves(grads)), jnp.zeros((), jnp.float32))


def no_metrics():
    """The metrics of a task that scores no head: NaN loss and accuracy (float32 scalars), which a
    stage's mean over its tasks never counts (``bad_labels`` too)."""
    nan = jnp.full((), jnp.nan, jnp.float32)
    return {"loss": nan, "accuracy": nan, "bad_labels": nan}


def _split(module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return graphdef, params, rest


def _arrays(stage):
    """A stage's ``(params, rest)`` in train mode, each ``{"body", "head"}``."""
    stage.train()
    _, body_params, body_rest = _split(stage.body)
    _, head_params, head_rest = _split(stage.head)
    return {"body": body_params, "head": head_params}, {"body": body_rest, "head": head_rest}


class StageRule:
    """The update rule of stage ``k`` of ``K`` for one method, as pure functions.

    ``stage`` may be abstract (``nnx.eval_shape`` of the model: shapes only) when ``make_stage`` is
    given: a function that builds the stage afresh (from the model's factory, with its seed), which
    ``init_state`` calls under ``jax.jit``, so that the stage's arrays are created on the devices that
    hold them and never on a host.
    """

    def __init__(self, stage, k, num_stages, method, tx, loss_fn, readout_path=None, remat="none", make_stage=None,
                 check_writes=False):
        self.k, self.num_stages = k, num_stages
        # see the module docstring: skip checks each write, halt (Trainer's default, and this) each record
        self.check_writes = check_writes
        self.make_stage = make_stage
        self.remat = check_remat(remat)  # lpjax/core/remat.py: what the forward keeps for the backward
        # shared readout (lpjax/core/shared_readout.py): where this stage's head keeps the readout; the
        # last stage owns it (a Param), the others hold a read-only copy in their non-trainable state
        self.readout_path = readout_path
        self.tx, self.loss_fn = tx, loss_fn
        self.weight = method.weights(num_stages)[k]
        self.trains_head = self.weight != 0.0
        self.sources = method.sources(k, num_stages)
        self.passes_on = {j: method.passes_on(j, k, num_stages) for j in self.sources}
        self.sends_own_gradient = self.trains_head and method.passes_on(k, k, num_stages)
        self.one_tree = method.optimizer == ONE_TREE  # backprop: one optax tree over all stages
        stage.eval()
        self.body_eval_def, _, _ = _split(stage.body)
        self.head_eval_def, _, _ = _split(stage.head)
        self._initial = _arrays(stage)
        self.body_def, self.head_def = _split(stage.body)[0], _split(stage.head)[0]

    # -- state -------------------------------------------------------------------------------
    def trainable(self, params):
        return params if self.trains_head else {"body": params["body"]}

    def initial(self):
        """``(params, rest)``, each ``{"body", "head"}``: the stage's arrays as given, or, with
        ``make_stage``, those of a stage built in the current trace (call it under ``jax.jit`` or
        ``jax.eval_shape``: eagerly it would build the whole model on this host)."""
        return self._initial if self.make_stage is None else _arrays(self.make_stage())

    def state_shapes(self) -> StageState:
        """The stage's ``StageState`` as ``jax.ShapeDtypeStruct``s; builds nothing."""
        return jax.eval_shape(self.init_state, self._initial)

    def init_state(self, initial=None) -> StageState:
        """The state training starts from: ``initial`` (``(params, rest)``; ``self.initial()`` when
        None), fresh optimizer state and zero gradient sums."""
        params, rest = self.initial() if initial is None else initial
        trainable = self.trainable(params)
        return StageState(
            params=params,
            rest=rest,
            opt_state=self.tx.init(self._tx_tree(trainable, jnp.zeros((), jnp.float32))),
            grad_sum=jax.tree.map(jnp.zeros_like, trainable),
            grad_count=jnp.zeros((), jnp.int32),
            grad_norm=jnp.zeros((), jnp.float32),
            skipped=jnp.zeros((), jnp.int32),
        )

    # -- public surface: the body and the local objective, for cost accounting, probes and methods ---
    def apply_body(self, body_params, body_rest, x, *, train: bool = True):
        """The stage's body on ``x``; returns ``(h, new_body_rest)`` (batch statistics updated in train mode)."""
        return self._body(self.body_def if train else self.body_eval_def, body_params, body_rest, x)

    def head_loss(self, head_params, head_rest, h, y, *, train: bool = True):
        """The stage's local objective *unweighted*: ``(ℓ(G_k(h), y), (logits, new_head_rest))``.
        The method's weight λ_k is ``self.weight``; the update uses ``λ_k · ℓ``."""
        logits, new_rest = self._head(self.head_def if train else self.head_eval_def, head_params, head_rest, h)
        return self.loss_fn(logits, y), (logits, new_rest)

    # -- shared readout: the owner's readout, and a reader's copy -----------------------------
    def readout(self, state: StageState) -> dict:
        """The last stage's readout arrays (``{"kernel", "bias"}``), as its loss has trained them."""
        return get_readout(state.params["head"], self.readout_path)

    def with_readout(self, state: StageState, readout: dict) -> StageState:
        """A reader's state with its read-only copy replaced by ``readout`` (a refresh)."""
        return dataclasses.replace(state, rest=dict(state.rest, head=set_readout(state.rest["head"], self.readout_path,
                                                                                  readout)))

    # -- pieces ------------------------------------------------------------------------------
    def _body(self, graphdef, body_params, body_rest, x):
        body = nnx.merge(graphdef, body_params, _fresh(body_rest))
        h = apply_layers(body, x, self.remat)  # a per-layer remat policy checkpoints each layer
        _, _, new_rest = _split(body)
        return h, new_rest

    def _head(self, graphdef, head_params, head_rest, h):
        head = nnx.merge(graphdef, head_params, _fresh(head_rest))
        logits = head(h)
        _, _, new_rest = _split(head)
        return logits, new_rest

    def _metrics(self, logits, y):
        return {"loss": self.loss_fn(logits, y), "accuracy": accuracy(logits, y)}

    # -- the rule ----------------------------------------------------------------------------
    def forward(self, state: StageState, x, y, fresh=False):
        """Returns ``(state, h, own_cotangent | None, residual | None, metrics)``.

        ``fresh`` marks the first microbatch of a step: its gradient replaces the sum instead of
        being added to it, so neither this nor ``update`` spends a pass over memory on zeroing."""
        params, rest = state.params, state.rest
        needs_input_grad = self.sends_own_gradient
        if not needs_input_grad:
            x = jax.lax.stop_gradient(x)
        body_fn = rematerialised(lambda bp, inp: self.apply_body(bp, rest["body"], inp), self.remat)
        h, body_vjp, new_body_rest = jax.vjp(body_fn, params["body"], x, has_aux=True)
        new_rest = dict(rest, body=_keep_if_finite(new_body_rest, rest["body"]))
        grads = jax.tree.map(jnp.zeros_like, state.grad_sum)
        own_dx, metrics = None, no_metrics()
        if self.trains_head:
            @functools.partial(rematerialised, name=self.remat)
            def weighted_loss(hp, hidden):
                loss, (logits, head_rest) = self.head_loss(hp, rest["head"], hidden, y)
                bad = out_of_range(y, logits.shape[-1])
                # an out-of-range label makes the gradient NaN, so the update is skipped and counted
                # like any non-finite one: it never reaches the parameters (Trainer raises at its sync)
                return self.weight * loss * jnp.where(bad == 0, 1.0, jnp.nan), (logits, head_rest, bad)

            (_, (logits, new_head_rest, bad)), (head_grad, dh) = jax.value_and_grad(
                weighted_loss, argnums=(0, 1), has_aux=True)(params["head"], h)
            body_grad, dx = body_vjp(dh)
            grads = {"body": body_grad, "head": head_grad}
            new_rest["head"] = _keep_if_finite(new_head_rest, rest["head"])
            metrics = dict(self._metrics(logits, y), bad_labels=bad.astype(jnp.float32))
            own_dx = dx if needs_input_grad else None
        residual = body_vjp if self.sources else None
        if fresh is True:
            grad_sum, grad_count = grads, jnp.ones_like(state.grad_count)
        else:
            grad_sum = jax.tree.map(jnp.add, state.grad_sum, grads)
            grad_count = state.grad_count + 1
            if fresh is not False:  # traced flag (SPMD executor)
                grad_sum = jax.tree.map(lambda g, total: jnp.where(fresh, g, total), grads, grad_sum)
                grad_count = jnp.where(fresh, 1, grad_count)
        state = dataclasses.replace(state, rest=new_rest, grad_sum=grad_sum, grad_count=grad_count)
        return state, jax.lax.stop_gradient(h), own_dx, residual, metrics

    def backward(self, state: StageState, residuals: dict, cotangents: dict):
        """Apply later losses' cotangents; returns ``(state, {source: cotangent for stage k-1})``."""
        body_sum = state.grad_sum["body"]
        passed = {}
        for j, cotangent in cotangents.items():
            body_grad, dx = residuals[j](cotangent)
            body_sum = jax.tree.map(jnp.add, body_sum, body_grad)
            if self.passes_on[j]:
                passed[j] = dx
        grad_sum = dict(state.grad_sum, body=body_sum)
        return dataclasses.replace(state, grad_sum=grad_sum), passed

    def _tx_tree(self, trainable, phantom):
        """What this stage hands optax: its own leaves, plus the phantom leaf for one-tree methods."""
        return (trainable, phantom) if self.one_tree else trainable

    def mean_grads(self, state: StageState):
        count = jnp.maximum(state.grad_count, 1).astype(jnp.float32)
        return jax.tree.map(lambda g: g / count, state.grad_sum)

    def grad_sq_norm(self, state: StageState):
        """Squared norm of this stage's mean gradient: the summand of the global norm (one-tree)."""
        return gradient_sq_norm(self.mean_grads(state))

    def _step_inputs(self, state: StageState, total_sq):
        """``(mean gradient, global norm, phantom)`` of this stage's update (the phantom: see the module
        docstring; None unless one-tree)."""
        grads = self.mean_grads(state)
        if not self.one_tree:
            return grads, jnp.sqrt(gradient_sq_norm(grads)), None
        own_sq = self.grad_sq_norm(state)
        total_sq = own_sq if total_sq is None else total_sq
        norm = jnp.sqrt(total_sq).astype(jnp.float32)
        return grads, norm, jnp.sqrt(jnp.maximum(total_sq - own_sq, 0.0)).astype(jnp.float32)

    def _stepped(self, state: StageState, grads, phantom):
        """The trainable parameters and optimizer state one optax step writes."""
        trainable = self.trainable(state.params)
        updates, opt_state = self.tx.update(self._tx_tree(grads, phantom), state.opt_state,
                                            self._tx_tree(trainable, jnp.zeros((), jnp.float32)))
        if self.one_tree:
            updates = updates[0]  # the phantom's update is dropped
        return optax.apply_updates(trainable, updates), opt_state

    def update_stays_finite(self, state: StageState, total_sq=None):
        """Whether this stage's next optimizer step (``update`` with the same ``total_sq``) will be
        applied (a device bool): its gradient norm is finite and, with ``check_writes``, so is every
        parameter and optimizer-state value it writes. Executors of one-tree methods AND it over the
        stages and pass the result to every stage's ``update``, so that the whole model steps or none
        of it does."""
        grads, norm, phantom = self._step_inputs(state, total_sq)
        return self._applies(state, grads, norm, phantom)

    def _applies(self, state, grads, norm, phantom):
        if not self.check_writes:
            return jnp.isfinite(norm)
        return jnp.isfinite(norm) & all_finite(self._stepped(state, grads, phantom))

    def update(self, state: StageState, total_sq=None, stays_finite=None) -> StageState:
        """One optimizer step, or none: a step whose gradient norm is not finite, or, with
        ``check_writes``, that would write a non-finite parameter or optimizer-state value (an
        update that overflows, whatever the gradient), leaves the state as it was and is counted in
        ``skipped``. The checked step is computed twice: once into the finiteness check, whose
        values only feed a reduction, and once in place inside the ``lax.cond`` that applies it.
        Computing it once and choosing between old and new state after the check would copy every
        leaf at every step (a select, or a cond that passes its operands through), which measured
        slower still (benchmarks/greedy_overhead.py).

        For one-tree methods (backprop) executors pass ``total_sq``, the sum of every stage's
        ``grad_sq_norm``, and ``stays_finite``, the AND of every stage's ``update_stays_finite``:
        the step and the check then see the whole model. Without them the stage is taken as the
        whole model (one stage; cost analysis)."""
        grads, norm, phantom = self._step_inputs(state, total_sq)
        if stays_finite is None:
            stays_finite = self._applies(state, grads, norm, phantom)
        new_trainable, opt_state = jax.lax.cond(
            stays_finite, lambda _: self._stepped(state, grads, phantom),
            lambda _: (self.trainable(state.params), state.opt_state), None)
        # grad_sum is left as it is: the next step's first forward overwrites it
        return dataclasses.replace(state, params=dict(state.params, **new_trainable), opt_state=opt_state,
                                   grad_norm=jnp.where(jnp.isfinite(norm), norm, NOT_FINITE),
                                   skipped=state.skipped + (~stays_finite).astype(jnp.int32))

    def state_finite(self, state: StageState):
        """Whether every parameter, non-trainable and optimizer-state value is finite (a device bool):
        what the training loop reads at each record, and always true under ``check_writes``."""
        return all_finite((state.params, state.rest, state.opt_state))

    # -- evaluation --------------------------------------------------------------------------
    def predict(self, state: StageState, x):
        """Eval-mode body and head; returns ``(h, logits)``."""
        h, _ = self.apply_body(state.params["body"], state.rest["body"], x, train=False)
        logits, _ = self._head(self.head_eval_def, state.params["head"], state.rest["head"], h)
        return h, logits
