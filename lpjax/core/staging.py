"""Staged models: a network as an ordered list of (body, auxiliary head) stages.

Bodies and heads are plain Flax NNX modules; nothing here needs them to subclass an lpjax type.
"""

from collections.abc import Sequence

from flax import nnx

from lpjax.errors import ConfigError


class Stage(nnx.Module):
    """Stage k: body ``F_k`` and auxiliary head ``G_k``. ``layers`` records how many splittable layers
    the body holds (1 for a user-built body), which the greedy method checks."""

    def __init__(self, body: nnx.Module, head: nnx.Module, *, layers: int = 1):
        self.body = body
        self.head = head
        self.num_layers = layers

    def __call__(self, x):
        return self.body(x)


class StagedModel(nnx.Module):
    """An ordered list of stages; the last stage's head is the network's output head.

    An NNX module, so ``nnx.state(model)``, ``nnx.split`` and ``model.eval()`` work on the whole
    model (its state is ``{"stages": {k: {"body": ..., "head": ...}}}``)."""

    def __init__(self, stages: Sequence[Stage]):
        self.split = None  # the lpjax.research.balance.BalancedSplit when stage_network balanced the cut
        stages = list(stages)
        if not stages:
            raise ConfigError("a StagedModel needs at least one stage")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise ConfigError(f"stage {i} is a {type(stage).__name__}; wrap it as lpjax.Stage(body=..., head=...)")
        self.stages = nnx.List(stages)

    def __len__(self):
        return len(self.stages)

    def __getitem__(self, k):
        return self.stages[k]

    def __iter__(self):
        return iter(self.stages)

    def __call__(self, x):
        """Anytime predictions: the logits of every head, in stage order."""
        outputs = []
        for stage in self.stages:
            x = stage.body(x)
            outputs.append(stage.head(x))
        return outputs


def even_split_points(num_layers: int, num_stages: int) -> list[int]:
    """Start indices of stages 1..K-1 when cutting ``num_layers`` into ``num_stages`` near-equal runs;
    earlier stages get the extra layer."""
    if num_stages < 1:
        raise ConfigError(f"num_stages must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise ConfigError(
            f"cannot cut {num_layers} layers into {num_stages} stages; use at most {num_layers} stages"
        )
    base, extra = divmod(num_layers, num_stages)
    points, start = [], 0
    for k in range(num_stages - 1):
        start += base + (1 if k < extra else 0)
        points.append(start)
    return points


def check_split_points(points: Sequence[int], num_layers: int) -> list[int]:
    points = list(points)
    if any(not isinstance(p, int) for p in points):
        raise ConfigError(f"split points must be integers, got {points}")
    bounds = [0, *points, num_layers]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(
            f"split points {points} must be strictly increasing and inside (0, {num_layers}); "
            f"each stage needs at least one layer"
        )
    return points


def cut_layers(layers, make_head, *, num_stages=None, split_points=None, rngs: nnx.Rngs) -> StagedModel:
    """Cut a list of layers into contiguous stages, by count or by explicit split points.

    ``make_head(i, rngs)`` builds the auxiliary head that reads the output of ``layers[i]``.
    """
    layers = list(layers)
    if (num_stages is None) == (split_points is None):
        raise ConfigError("give exactly one of num_stages or split_points")
    if split_points is None:
        points = even_split_points(len(layers), num_stages)
    else:
        points = check_split_points(split_points, len(layers))
    bounds = [0, *points, len(layers)]
    stages = []
    for start, stop in zip(bounds, bounds[1:]):
        body = nnx.Sequential(*layers[start:stop])
        stages.append(Stage(body, make_head(stop - 1, rngs), layers=stop - start))
    return StagedModel(stages)


def stage_network(network, *, num_stages=None, split_points=None, example=None, loss="softmax_cross_entropy",
                  rngs: nnx.Rngs) -> StagedModel:
    """Cut a ``lpjax.models.Network`` (layers + default heads) into stages.

    ``split_points="balanced"`` (or ``"balanced_memory"``) with ``num_stages=K`` cuts where the
    slowest (largest) stage is cheapest, measured at ``example=(x, y)``, a batch or its
    ShapeDtypeStructs (lpjax.research.balance); the model's ``split`` attribute then holds the cut, its per-stage
    costs and shares (``model.split.describe()``)."""
    split = None
    if isinstance(split_points, str):
        split = balanced(network, num_stages, split_points, example, loss)
        split_points, num_stages = split.points, None
    model = cut_layers(network.layers, network.make_head, num_stages=num_stages,
                       split_points=split_points, rngs=rngs)
    model.split = split
    return model


# Cut planners by name (``split_points="balanced"``): lpjax.research.balance registers its own when
# lpjax is imported, so this layer needs nothing from the research tooling.
SPLIT_PLANNERS = {}


def register_split_planner(name: str, plan) -> None:
    """Make ``split_points=name`` call ``plan(network, num_stages, example, loss)``, which returns an
    object with ``points`` (the split points) and ``describe()``; it becomes the model's ``split``."""
    SPLIT_PLANNERS[name] = plan


def balanced(network, num_stages, kind, example, loss="softmax_cross_entropy"):
    """The planned split of ``split_points=kind`` (a name in ``SPLIT_PLANNERS``, such as "balanced")."""
    if kind not in SPLIT_PLANNERS:
        raise ConfigError(f"split_points {kind!r} is not a cut; use a tuple of layer indices, "
                          f"{' or '.join(repr(k) for k in SPLIT_PLANNERS)}")
    if num_stages is None:
        raise ConfigError(f"split_points={kind!r} needs the number of stages; set num_stages (stages=K in a config)")
    if example is None:
        raise ConfigError(f"split_points={kind!r} measures the layers; pass example=(x, y), a batch or its shapes")
    even_split_points(len(network.layers), num_stages)  # the stage count checks of an even cut
    return SPLIT_PLANNERS[kind](network, num_stages, example, loss)
