"""Staged models: a network as an ordered list of (body, auxiliary head) stages.

Bodies and heads are plain Flax NNX modules; nothing here needs them to subclass an lpjax type.
"""

from collections.abc import Sequence

from flax import nnx

from lpjax.errors import ConfigError


class Stage(nnx.Module):
    """Stage k: body ``F_k`` and auxiliary head ``G_k``.

    Args:
      body: any NNX module mapping the previous stage's output (or the input) to this stage's output.
      head: any NNX module mapping the body's output to this stage's logits (the last stage's head is
        the model's output head).
      layers: how many splittable layers the body holds (1 for a user-built body); the greedy method
        requires 1 in every stage.

    Calling a stage runs its body only; ``StagedModel`` applies the heads.
    """

    def __init__(self, body: nnx.Module, head: nnx.Module, *, layers: int = 1):
        self.body = body
        self.head = head
        self.num_layers = layers

    def __call__(self, x):
        return self.body(x)


class StagedModel(nnx.Module):
    """An ordered list of stages; the last stage's head is the network's output head.

    Args:
      stages: one or more ``Stage`` objects, in order. Raises ConfigError when empty or when an entry
        is not a ``Stage``.

    An NNX module, so ``nnx.state(model)``, ``nnx.split`` and ``model.eval()`` work on the whole
    model (its state is ``{"stages": {k: {"body": ..., "head": ...}}}``). ``len``, indexing and
    iteration give the stages; ``split`` is the planned cut when ``stage_network`` balanced it, else
    None. Calling the model returns every head's logits (see ``__call__``).
    """

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
        """Anytime predictions.

        Args:
          x: a batch of inputs for the first stage.

        Returns:
          A list with one array of logits per stage, in stage order: head k reads the output of
          bodies 0..k. The last entry is the model's prediction.
        """
        outputs = []
        for stage in self.stages:
            x = stage.body(x)
            outputs.append(stage.head(x))
        return outputs


def even_split_points(num_layers: int, num_stages: int) -> list[int]:
    """Where an even cut puts the stage boundaries.

    Args:
      num_layers: how many layers the network has.
      num_stages: how many stages to cut it into, 1..num_layers (ConfigError otherwise).

    Returns:
      The start indices of stages 1..K-1 (K-1 increasing integers): near-equal runs, the earlier
      stages getting the extra layer when the cut is uneven.
    """
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
    """``points`` as a list, after checking that they cut ``num_layers`` into non-empty stages:
    integers, strictly increasing, inside (0, num_layers). Raises ConfigError naming the problem."""
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

    Args:
      layers: the network's splittable layers (NNX modules), in order.
      make_head: ``make_head(i, rngs)`` builds the auxiliary head that reads the output of ``layers[i]``;
        it is called once per stage, with the index of the stage's last layer.
      num_stages: cut into this many near-equal stages (``even_split_points``), or
      split_points: the layer indices where stages 1.. start. Give exactly one of the two.
      rngs: the random streams the heads are initialised from.

    Returns:
      A ``StagedModel`` whose stage k body is ``nnx.Sequential`` of its layers (the same module
      objects, not copies) and whose ``num_layers`` is the run's length. Raises ConfigError for a cut
      that leaves a stage empty.
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

    Args:
      network: the model's layers and its head maker (``network.layers``, ``network.make_head``).
      num_stages: the number of stages K.
      split_points: None (an even cut into ``num_stages``), a sequence of layer indices where stages
        1.. start, or the name of a registered planner: ``"balanced"`` / ``"balanced_memory"`` (with
        ``num_stages``) cuts where the slowest / largest stage is cheapest (lpjax.research.balance).
      example: for a planner only: ``(x, y)``, a batch or its ShapeDtypeStructs, at which the layers
        are measured.
      loss: for a planner only: the loss the heads are measured with.
      rngs: the random streams the heads are initialised from.

    Returns:
      The ``StagedModel``, as ``cut_layers`` makes it; its ``split`` attribute holds a planner's cut
      with its per-stage costs and shares (``model.split.describe()``), else None.
    """
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
    """Make ``split_points=name`` call a planner.

    Args:
      name: the value of ``split_points`` that selects it (a later registration replaces an earlier).
      plan: ``plan(network, num_stages, example, loss)`` returning an object with ``points`` (the
        split points) and ``describe()``; ``stage_network`` stores it as the model's ``split``.
    """
    SPLIT_PLANNERS[name] = plan


def balanced(network, num_stages, kind, example, loss="softmax_cross_entropy"):
    """The planned split of ``split_points=kind`` (a name in ``SPLIT_PLANNERS``, such as "balanced").

    Returns the planner's result (with ``points``); raises ConfigError when ``kind`` is not
    registered, or ``num_stages`` or ``example`` is missing, or K cannot cut the layers.
    """
    if kind not in SPLIT_PLANNERS:
        raise ConfigError(f"split_points {kind!r} is not a cut; use a tuple of layer indices, "
                          f"{' or '.join(repr(k) for k in SPLIT_PLANNERS)}")
    if num_stages is None:
        raise ConfigError(f"split_points={kind!r} needs the number of stages; set num_stages (stages=K in a config)")
    if example is None:
        raise ConfigError(f"split_points={kind!r} measures the layers; pass example=(x, y), a batch or its shapes")
    even_split_points(len(network.layers), num_stages)  # the stage count checks of an even cut
    return SPLIT_PLANNERS[kind](network, num_stages, example, loss)
