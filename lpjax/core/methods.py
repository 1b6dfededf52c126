"""Update methods (docs/semantics.md, "The per-stage rule") as data: an open, public protocol plus a
registry of names.

With stages k = 0..K-1, stage k's loss ``L_k = λ_k ℓ(G_k(h_k), y)`` backpropagates through stages
``k-w+1 .. k``. So the gradient of stage k's body sums ``∂L_j/∂θ_k`` over the *sources*
``j = k .. k+w-1`` (those with λ_j ≠ 0), and its head gets ``∂L_k/∂φ_k``.

A ``Method`` declares everything the update rules (core/stage_rule.py), schedules and executors need, and nothing else:

- ``losses`` and ``loss_weights``: which stages' heads carry a loss and with what weight λ_k
  (``EVERY_STAGE``: one per stage, weight 1 unless given; ``LAST_STAGE``: only the final head);
- ``window``: how many stages each loss's gradient reaches, counting its own (``None``: every stage
  before it);
- ``needs_flush``: whether the gradient of a step only exists once the whole pipeline has run, so the
  schedule must drain before the update;
- ``optimizer``: how the optimizer is split (``PER_STAGE``: each stage its own optax state and its
  own finite check; ``ONE_TREE``: one optax tree over the whole model, global norm across stages);
- ``one_layer_per_stage``: a structural requirement checked against the model;
- ``shared``: state shared across stages, with its refresh rule (``SharedReadout``: the auxiliary
  heads read a stop-gradient copy of the last stage's readout, refreshed every R steps; see
  ``lpjax/core/shared_readout.py``). Which stages each loss's gradient reaches is ``window`` (through
  the bodies) plus, for a shared state, the rule that only its owner's loss trains it.

Backprop is not a special case: it is ``losses=LAST_STAGE, window=None, needs_flush=True,
optimizer=ONE_TREE``. A method knows nothing about devices or order; the update rules turn it into
per-stage functions and the schedules decide when they run.

``register_method(name)`` adds a factory to ``METHODS``; config strings (``method.name``) are looked up
there, and the factory validates its own options (``window``, ``loss_weights``). See
``docs/methods.md`` for writing your own.
"""

import dataclasses

from lpjax.errors import ConfigError

EVERY_STAGE, LAST_STAGE = "every_stage", "last_stage"
PER_STAGE, ONE_TREE = "per_stage", "one_tree"


@dataclasses.dataclass(frozen=True)
class SharedReadout:
    """State shared across stages: the last stage's readout (its classifier Dense, or the LM's
    unembedding), read by every other stage's head through a stop-gradient copy.

    Owner: the last stage; only its loss trains the readout. Readers: stages 0..K-2, whose losses
    train their bodies and private head layers but not the readout. Refresh rule: the copy is taken
    at the start of every step whose index is a multiple of ``refresh_steps``, after the previous
    step's update (docs/semantics.md, "Shared readout")."""

    refresh_steps: int = 1

    def __post_init__(self):
        if not isinstance(self.refresh_steps, int) or isinstance(self.refresh_steps, bool) or self.refresh_steps < 1:
            raise ConfigError(f"method.readout_refresh_steps must be an integer >= 1, got {self.refresh_steps!r}")

    def refreshes_before(self, step: int) -> bool:
        """Whether the copy is refreshed before step ``step`` (0-based) runs; step 0 starts from a
        copy of the initial readout."""
        return step > 0 and step % self.refresh_steps == 0


@dataclasses.dataclass(frozen=True)
class Method:
    """A local-update method as a frozen declaration (the module docstring says what each field means).

    Attributes:
      name: the name run headers and results show (the registry key for the shipped methods).
      window: stages each loss's gradient reaches, its own included, an int >= 1; None: all before it.
      losses: ``EVERY_STAGE`` (every head has a loss) or ``LAST_STAGE`` (only the output head).
      loss_weights: EVERY_STAGE only: one weight λ_k >= 0 per stage; None: 1 for every stage.
      one_layer_per_stage: ``check`` refuses a model with a stage of several layers.
      needs_flush: a step's gradient exists only once the whole pipeline has run (flushing schedules).
      optimizer: ``PER_STAGE`` (one optax state and finite check per stage) or ``ONE_TREE``.
      shared: a ``SharedReadout``, or None.

    Construction checks each field's type and range, and raises ConfigError naming the fix; what
    depends on the model (the stage count, the layers per stage) is checked by ``check``.
    """

    name: str
    window: int | None = 1  # stages each loss's gradient reaches (its own included); None: all before it
    losses: str = EVERY_STAGE
    loss_weights: tuple[float, ...] | None = None  # EVERY_STAGE only; default 1 for every stage
    one_layer_per_stage: bool = False
    needs_flush: bool = False
    optimizer: str = PER_STAGE
    shared: SharedReadout | None = None  # state shared across stages, with its refresh rule

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or self.window < 1):
            raise ConfigError(f"window must be an integer >= 1, got {self.window!r}; the paper's overlapping window is 2")
        if self.losses not in (EVERY_STAGE, LAST_STAGE):
            raise ConfigError(f"losses must be {EVERY_STAGE!r} or {LAST_STAGE!r}, got {self.losses!r}")
        if self.optimizer not in (PER_STAGE, ONE_TREE):
            raise ConfigError(f"optimizer must be {PER_STAGE!r} or {ONE_TREE!r}, got {self.optimizer!r}")
        if self.losses == LAST_STAGE and self.loss_weights is not None:
            raise ConfigError(f"{self.name} uses only the last head's loss; drop loss_weights or pick a local method")
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        if isinstance(self.shared, dict):  # dataclasses.asdict(method) round-trips
            object.__setattr__(self, "shared", SharedReadout(**self.shared))
        if self.shared is not None and not isinstance(self.shared, SharedReadout):
            raise ConfigError(f"shared must be an lpjax.SharedReadout, got {self.shared!r}")
        if self.shared is not None and self.losses == LAST_STAGE:
            raise ConfigError(f"{self.name} trains only the last head, so no auxiliary head reads a shared readout; "
                              f"drop method.shared_readout or pick a local method (greedy, chunked, overlapping)")

    def describe(self) -> str:
        """The name, plus the shared state when there is one (run headers)."""
        if self.shared is None:
            return self.name
        return f"{self.name} + shared readout (refreshed every {self.shared.refresh_steps} steps)"

    def weights(self, num_stages: int) -> tuple[float, ...]:
        """Each stage's loss weight λ_k, ``num_stages`` floats: (0, .., 0, 1) for LAST_STAGE, else the
        given weights (ConfigError when their count is not ``num_stages``) or all 1."""
        if self.losses == LAST_STAGE:
            return (0.0,) * (num_stages - 1) + (1.0,)
        if self.loss_weights is None:
            return (1.0,) * num_stages
        if len(self.loss_weights) != num_stages:
            raise ConfigError(
                f"{len(self.loss_weights)} loss weights for {num_stages} stages; give one weight per stage"
            )
        return tuple(float(w) for w in self.loss_weights)

    def reach(self, num_stages: int) -> int:
        """The window as a number: ``window``, or ``num_stages`` when it is None (every stage)."""
        return num_stages if self.window is None else self.window

    def sources(self, k: int, num_stages: int) -> tuple[int, ...]:
        """The later stages j > k whose loss gradient reaches stage k's body: those inside the window
        with a non-zero weight, in increasing order (k itself excluded)."""
        weights = self.weights(num_stages)
        last = min(k + self.reach(num_stages) - 1, num_stages - 1)
        return tuple(j for j in range(k + 1, last + 1) if weights[j] != 0.0)

    def passes_on(self, j: int, k: int, num_stages: int) -> bool:
        """Whether loss ``j``'s gradient continues from stage k into stage k-1 (k-1 is inside j's window)."""
        return k >= 1 and j - (k - 1) < self.reach(num_stages)

    def check(self, model) -> None:
        """Raises ConfigError when the method cannot train ``model`` (a ``StagedModel``): a stage of
        several layers for a one-layer-per-stage method, a window longer than the stages, a shared
        readout on one stage or with the last stage's weight at 0. Returns None otherwise."""
        if self.one_layer_per_stage:
            thick = [k for k, stage in enumerate(model) if stage.num_layers != 1]
            if thick:
                raise ConfigError(
                    f"{self.name} trains one layer per stage but stage {thick[0]} holds "
                    f"{model[thick[0]].num_layers} layers; cut one stage per layer or use Chunked"
                )
        if self.window is not None and self.window > len(model):
            raise ConfigError(
                f"window {self.window} is longer than the {len(model)} stages; use a window of at most {len(model)}"
            )
        weights = self.weights(len(model))
        if self.shared is not None:
            if len(model) < 2:
                raise ConfigError("a shared readout needs at least 2 stages (one owner, one reader); "
                                  "drop method.shared_readout or cut more stages")
            if weights[-1] == 0.0:
                raise ConfigError("only the last stage's loss trains the shared readout, but its weight is 0; "
                                  "give the last stage a non-zero loss weight")


METHODS: dict = {}  # name -> factory(*, window=None, loss_weights=None) -> Method


def register_method(name: str):
    """Decorator: make a method factory available as ``method.name=<name>`` in configs and sweeps.

    Args:
      name: the config name. Registering a second factory under a taken name raises ValueError
        (registering the same factory again is allowed).

    Returns:
      The decorator; it returns the factory unchanged. The factory is called with the config's
      ``method`` options that are set, as keywords (``window``, ``loss_weights``, and any your method
      declares), validates them (ConfigError naming the fix) and returns a ``Method``.
    """
    def register(factory):
        if name in METHODS and METHODS[name] is not factory:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = factory
        return factory
    return register


def _no_window(name, window):
    if window not in (None, 1):
        raise ConfigError(f"{name} always uses window 1, got window={window}; use method 'overlapping' for w >= 2")


@register_method("backprop")
def Backprop(*, window=None, loss_weights=None) -> Method:
    """Global backpropagation of the last head's loss; the baseline.

    Returns the ``Method`` with ``losses=LAST_STAGE``, ``window=None``, ``needs_flush=True`` and
    ``optimizer=ONE_TREE``. ``window`` must be left out and ``loss_weights`` is refused (ConfigError).
    """
    if window is not None:
        raise ConfigError(f"backprop's gradient reaches every stage, got window={window}; drop method.window")
    return Method("backprop", window=None, losses=LAST_STAGE, loss_weights=loss_weights, needs_flush=True,
                  optimizer=ONE_TREE)


@register_method("greedy")
def Greedy(loss_weights=None, *, window=None) -> Method:
    """Window 1 with one layer per stage (greedy layer-wise training).

    Args:
      loss_weights: optional, one weight >= 0 per stage.
      window: only None or 1 (ConfigError otherwise).

    Returns:
      The ``Method``: every head a loss, window 1, ``one_layer_per_stage=True``.
    """
    _no_window("greedy", window)
    return Method("greedy", window=1, loss_weights=loss_weights, one_layer_per_stage=True)


@register_method("chunked")
def Chunked(loss_weights=None, *, window=None) -> Method:
    """Window 1 with several layers per stage; the number of chunks is the number of stages.

    Takes what ``Greedy`` takes, and returns the ``Method`` with every head a loss, window 1 and any
    number of layers per stage.
    """
    _no_window("chunked", window)
    return Method("chunked", window=1, loss_weights=loss_weights)


@register_method("overlapping")
def Overlapping(window: int | None = 2, loss_weights=None) -> Method:
    """Each loss reaches back through ``window`` stages (the paper's overlapping variant uses 2).

    Args:
      window: an int >= 2 (None: 2); window 1 is ``Chunked`` (ConfigError).
      loss_weights: optional, one weight >= 0 per stage.

    Returns:
      The ``Method``: every head a loss, stage k's body trained by losses k .. k+window-1.
    """
    window = 2 if window is None else window
    if not isinstance(window, int) or window < 2:
        raise ConfigError(f"overlapping needs window >= 2, got {window!r}; window 1 is Chunked")
    return Method("overlapping", window=window, loss_weights=loss_weights)


def make_method(name: str, *, shared_readout: bool = False, readout_refresh_steps: int | None = None,
                **options) -> Method:
    """The registered method ``name``, built with the options that are set (None means the default).

    Args:
      name: a key of ``METHODS`` (ConfigError listing them otherwise).
      shared_readout: True adds a ``SharedReadout(readout_refresh_steps)`` to whatever the factory
        builds, so every registered method (yours included) can take it without knowing about it.
      readout_refresh_steps: steps between refreshes of the shared copy (default 1); only with
        ``shared_readout`` (ConfigError otherwise).
      **options: the factory's keywords (``window``, ``loss_weights``, ...); None values are dropped.

    Returns:
      The ``Method``. Every problem with the options is a ConfigError naming the fix.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[name](**{key: value for key, value in options.items() if value is not None})
    if not isinstance(shared_readout, bool):
        raise ConfigError(f"method.shared_readout must be true or false, got {shared_readout!r}")
    if shared_readout:
        method = dataclasses.replace(method, shared=SharedReadout(1 if readout_refresh_steps is None
                                                                  else readout_refresh_steps))
    elif readout_refresh_steps is not None:
        raise ConfigError("method.readout_refresh_steps is set but method.shared_readout is not; "
                          "set --config.method.shared_readout=True or drop the refresh interval")
    return method
