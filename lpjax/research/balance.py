"""Cost-balanced stage splits: cut a network's layers so that the slowest (or largest) stage is as
cheap as it can be.

A local method's step takes as long as its slowest stage (lpjax.research.costs), so an even split by layer
count wastes the parallelism when layers differ (a wide first layer, ResNet stages at different
resolutions, a heavy output head). ``split_points="balanced"`` measures every layer once and cuts
with an exact min-max partition:

- FLOPs (``by="flops"``): XLA's FLOPs of each layer's forward and backward pass per example, from
  the lowered programs (``lpjax.research.costs.analyse(compile=False)``), plus the FLOPs of the head that a
  stage ending at that layer carries (forward, backward and loss). A stage does not send a gradient
  out of its first layer, so that layer's input-gradient FLOPs are left out of a stage starting there.
- memory (``by="memory"``): the peak bytes of the stage's compiled programs, the accounting of the
  memory table (``lpjax.research.costs.stage_peak``: a window-1 stage with ``tx``, Adam by default,
  its training forward and update with the state donated). A per-layer model (each layer's
  parameters, non-trainable state, gradient sum and optimizer state, plus the VJP residuals and
  output of its forward pass; the same for the head) proposes a cut, but it does not add up to what
  XLA holds for a stage: XLA keeps less than jax's VJP residuals, shares working memory between the
  layers of a stage, and the stage also holds its input. So the model's cut and the even cut are
  compiled and measured, and ``descend_min_max`` lowers the better one's largest stage with measured
  stages only: the cut is never worse than the even cut by the measured figure.

``min_max_partition`` is a dynamic program over (stages, layers), O(K·n²): it returns a partition
whose largest stage cost is the smallest possible, not a greedy approximation. ``descend_min_max``
needs far fewer evaluations of the cost (each one a compile), and is exact when a run's cost grows
with the run.
"""

import dataclasses
import functools

import jax
import numpy as np
import optax
from flax import nnx

from lpjax.core.staging import even_split_points, register_split_planner
from lpjax.errors import ConfigError

BALANCED = {"balanced": "flops", "balanced_memory": "memory"}


@dataclasses.dataclass
class LayerCosts:
    """Per layer i: ``flops[i]`` forward + backward (with the input gradient) per example,
    ``input_grad_flops[i]`` the part of it that computes the input gradient, ``head_flops[i]`` the
    head read at layer i's output; ``memory[i]`` / ``head_memory[i]`` bytes held during a step."""

    flops: list
    input_grad_flops: list
    head_flops: list
    memory: list
    head_memory: list

    def stage_cost(self, by: str):
        """``cost(i, j)`` of a stage holding layers ``i .. j-1`` and the head at ``j-1``."""
        if by == "flops":
            prefix = np.concatenate([[0.0], np.cumsum(self.flops)])
            return lambda i, j: prefix[j] - prefix[i] - self.input_grad_flops[i] + self.head_flops[j - 1]
        prefix = np.concatenate([[0.0], np.cumsum(self.memory)])
        return lambda i, j: prefix[j] - prefix[i] + self.head_memory[j - 1]


@dataclasses.dataclass
class BalancedSplit:
    by: str  # "flops" | "memory"
    points: list  # start layer of stages 1..K-1
    costs: list  # per stage, in the unit of ``by`` (FLOPs per example or bytes)
    even_costs: list | None = None  # by="memory": the even cut's stages, measured the same way

    @property
    def shares(self) -> list:
        total = sum(self.costs)
        return [c / total if total else 0.0 for c in self.costs]

    def describe(self) -> str:
        """``balanced by FLOPs at layers [3, 6]: stage shares 34/33/33%`` (one line, for run headers)."""
        what = "FLOPs" if self.by == "flops" else "memory"
        shares = "/".join(f"{100 * s:.0f}" for s in self.shares)
        return f"balanced by {what} at layers {self.points}: stage shares {shares}%"


def min_max_partition(num_items: int, num_parts: int, cost) -> tuple:
    """Split items ``0..num_items-1`` into ``num_parts`` contiguous non-empty runs minimising the largest
    ``cost(i, j)`` of a run ``i..j-1``; ``cost`` need not be additive. Returns ``(points, costs)``,
    ``points`` the start of runs 1.. . Exact (dynamic programming); among equally good partitions the
    one whose earlier runs end first."""
    if not 1 <= num_parts <= num_items:
        raise ConfigError(f"cannot cut {num_items} layers into {num_parts} stages; use 1 to {num_items} stages")
    inf = float("inf")
    # best[k][j]: the smallest largest-run cost of the first j items in k runs; start[k][j]: its last run's start
    best = [[inf] * (num_items + 1) for _ in range(num_parts + 1)]
    start = [[0] * (num_items + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, num_parts + 1):
        for j in range(k, num_items - (num_parts - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], start[k][j] = value, i
    bounds, j = [num_items], num_items
    for k in range(num_parts, 0, -1):
        j = start[k][j]
        bounds.append(j)
    bounds.reverse()
    return bounds[1:-1], [float(cost(i, j)) for i, j in zip(bounds, bounds[1:])]


def descend_min_max(num_items: int, num_parts: int, cost, candidates) -> tuple:
    """The best of ``candidates`` (lists of split points) by their largest ``cost(i, j)``, then lowered
    while some partition has every run below the current largest: a pass packs runs from the left,
    each as long as it stays below (a binary search for its end). Exact when a run's cost grows with
    the run (``cost(i, j) <= cost(i, j + 1)`` and ``cost(i + 1, j) <= cost(i, j)``): greedy packing then
    finds a partition under a threshold whenever one exists. Memoise ``cost``: runs recur between passes.
    Returns ``(points, costs)`` as ``min_max_partition``."""
    def runs(points):
        bounds = [0, *points, num_items]
        return list(zip(bounds, bounds[1:]))

    def largest(points):
        return max(cost(i, j) for i, j in runs(points))

    best = min((list(c) for c in candidates), key=largest)
    while (packed := _pack_below(num_items, num_parts, cost, largest(best))) is not None:
        best = packed
    return best, [float(cost(i, j)) for i, j in runs(best)]


def _pack_below(num_items, num_parts, cost, threshold):
    """Split points whose every run costs less than ``threshold``, each run as long as it can be; None if
    the packing fails."""
    points, start = [], 0
    for part in range(num_parts - 1):
        low, high = start + 1, num_items - (num_parts - 1 - part)  # leave one item for each later run
        if cost(start, low) >= threshold:
            return None
        while low < high:  # the longest run below the threshold
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost(start, mid) < threshold else (low, mid - 1)
        points.append(low)
        start = low
    return points if cost(start, num_items) < threshold else None


def measured_stage_memory(network, x, y, *, loss="softmax_cross_entropy", tx=None, remat="none"):
    """``cost(i, j)``: peak bytes of a stage holding layers ``i .. j-1`` and the head at ``j-1``, compiled
    as a window-1 stage with ``tx`` (Adam by default) at inputs shaped like ``x`` and labels like ``y``
    (``lpjax.research.costs.stage_peak``, the memory table's accounting) under the ``remat`` policy
    (lpjax/core/remat.py), memoised."""
    from lpjax.core.losses import get_loss
    from lpjax.core.methods import make_method
    from lpjax.core.stage_rule import StageRule
    from lpjax.core.staging import Stage
    from lpjax.research.costs import abstract_like, stage_peak

    tx = tx or optax.adam(1e-3)
    x, y = abstract_like(x), abstract_like(y)
    inputs = [x]  # the input of every layer
    for layer in network.layers[:-1]:
        graphdef, params, rest = _split(layer)
        inputs.append(jax.eval_shape(lambda p, r, inp, g=graphdef: nnx.merge(g, p, r)(inp),
                                     abstract_like(params), abstract_like(rest), inputs[-1]))
    method, loss_fn = make_method("chunked"), get_loss(loss)

    @functools.cache
    def cost(i, j):
        stage = Stage(nnx.Sequential(*network.layers[i:j]), network.make_head(j - 1, nnx.Rngs(0)), layers=j - i)
        # a window-1 stage computes the same whatever its index, except that stage 0 reads the data
        rule = StageRule(stage, 0 if i == 0 else 1, 2, method, tx, loss_fn, remat=remat)
        return stage_peak(rule, jax.eval_shape(rule.init_state), inputs[i], y)["peak"]

    return cost


# -- measuring the layers -----------------------------------------------------------------------------
def _bytes(tree) -> int:
    return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def _split(module):
    module.train()
    return nnx.split(module, nnx.Param, ...)


def measure_layers(network, x, y, *, loss="softmax_cross_entropy", tx=None) -> LayerCosts:
    """Per-layer costs of ``network`` (a ``lpjax.models.Network``) at inputs shaped like ``x`` and labels
    like ``y`` (arrays or ShapeDtypeStructs, batch first). Nothing runs: programs are only lowered."""
    from lpjax.research.costs import abstract_like, analyse
    from lpjax.core.losses import get_loss

    loss_fn = get_loss(loss)
    tx = tx or optax.adam(1e-3)
    x, y = abstract_like(x), abstract_like(y)
    batch = x.shape[0]
    rngs = nnx.Rngs(0)
    out = LayerCosts([], [], [], [], [])
    h = x
    for i, layer in enumerate(network.layers):
        graphdef, params, rest = _split(layer)
        params, rest = abstract_like(params), abstract_like(rest)

        def body(p, r, inp, graphdef=graphdef):
            return nnx.merge(graphdef, p, jax.tree.map(lambda a: a, r))(inp)

        def grads(p, r, inp, cotangent, with_input, body=body):
            if with_input:
                _, vjp = jax.vjp(lambda q, v: body(q, r, v), p, inp)
            else:
                _, vjp = jax.vjp(lambda q: body(q, r, inp), p)
            return vjp(cotangent)

        out_shape = jax.eval_shape(body, params, rest, h)
        weights_only = analyse(functools.partial(grads, with_input=False), params, rest, h, out_shape, compile=False)
        differentiable = jax.numpy.issubdtype(h.dtype, jax.numpy.floating)
        both = analyse(functools.partial(grads, with_input=True), params, rest, h, out_shape, compile=False) \
            if differentiable else weights_only
        out.flops.append(both.flops / batch)
        out.input_grad_flops.append(max(both.flops - weights_only.flops, 0.0) / batch if i > 0 else 0.0)
        residuals = jax.eval_shape(lambda p, r, inp, body=body: jax.tree.leaves(jax.vjp(
            lambda q: body(q, r, inp), p)[1]), params, rest, h)
        out.memory.append(_state_bytes(params, rest, tx) + _bytes(residuals) + _bytes(out_shape))

        head_def, head_params, head_rest = _split(network.make_head(i, rngs))
        head_params, head_rest = abstract_like(head_params), abstract_like(head_rest)

        def head_loss(p, r, hidden, labels, head_def=head_def):
            logits = nnx.merge(head_def, p, jax.tree.map(lambda a: a, r))(hidden)
            return loss_fn(logits, labels)

        head = analyse(lambda p, r, hidden, labels: jax.value_and_grad(head_loss, argnums=(0, 2))(p, r, hidden, labels),
                       head_params, head_rest, out_shape, y, compile=False)
        out.head_flops.append(head.flops / batch)
        head_residuals = jax.eval_shape(lambda p, r, hidden, labels: jax.tree.leaves(jax.vjp(
            lambda q, v: head_loss(q, r, v, labels), p, hidden)[1]), head_params, head_rest, out_shape, y)
        out.head_memory.append(_state_bytes(head_params, head_rest, tx) + _bytes(head_residuals))
        h = out_shape
    return out


def _state_bytes(params, rest, tx) -> int:
    """Parameters, non-trainable state, gradient sum and optimizer state."""
    return 2 * _bytes(params) + _bytes(rest) + _bytes(jax.eval_shape(tx.init, params))


_MEASURED = {}  # layer costs by network structure and input shapes: a sweep cuts the same network many times
_MEASURED_STAGES = {}  # measured stage peaks (``measured_stage_memory``), by the same key


def _structure_key(network, x, y, loss, tx):
    """Layer types, static attributes and parameter shapes (not values), input and label shapes."""
    try:
        from lpjax.research.costs import abstract_like
        layers = tuple((nnx.graphdef(layer), str(jax.tree.map(lambda a: (a.shape, str(a.dtype)),
                                                              abstract_like(nnx.state(layer)))))
                       for layer in network.layers)
        key = (layers, tuple(np.shape(x)), str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype),
               tuple(np.shape(y)), str(y.dtype), loss if isinstance(loss, str) else id(loss), tx is None)
        hash(key)
        return key
    except Exception:  # an unhashable structure: measure every time
        return None


def balanced_split(network, num_stages: int, x, y, *, by: str = "flops", loss="softmax_cross_entropy",
                   tx=None, remat="none") -> BalancedSplit:
    """The split points that minimise the slowest (``by="flops"``) or largest (``by="memory"``) stage;
    ``remat``: the policy the stages' peaks are measured under (memory only)."""
    if by not in ("flops", "memory"):
        raise ConfigError(f"a balanced split is by 'flops' or 'memory', got {by!r}")
    key = _structure_key(network, x, y, loss, tx)
    costs = _MEASURED.get(key) if key is not None else None
    if costs is None:
        costs = measure_layers(network, x, y, loss=loss, tx=tx)
        if key is not None:
            _MEASURED[key] = costs
    num_layers = len(network.layers)
    points, stage_costs = min_max_partition(num_layers, num_stages, costs.stage_cost(by))
    if by == "flops":
        return BalancedSplit(by=by, points=points, costs=stage_costs)
    shared = key is not None and tx is None  # the key tells optimizers apart only by being given or not
    measured = _MEASURED_STAGES.get((key, remat)) if shared else None
    if measured is None:
        measured = measured_stage_memory(network, x, y, loss=loss, tx=tx, remat=remat)
        if shared:  # peaks depend on shapes only: every K of the same network shares the stages
            _MEASURED_STAGES[(key, remat)] = measured
    if measured(num_layers - 1, num_layers) is None:  # a backend whose XLA gives no peak: the model's cut
        return BalancedSplit(by=by, points=points, costs=stage_costs)
    even = even_split_points(num_layers, num_stages)
    points, stage_costs = descend_min_max(num_layers, num_stages, measured, [points, even])
    bounds = [0, *even, num_layers]
    return BalancedSplit(by=by, points=points, costs=stage_costs,
                         even_costs=[float(measured(i, j)) for i, j in zip(bounds, bounds[1:])])


for _name, _by in BALANCED.items():
    register_split_planner(_name, lambda network, num_stages, example, loss, by=_by: balanced_split(
        network, num_stages, *example, by=by, loss=loss))
