"""Update methods (docs/semantics.md, "The per-stage rule") as data: which losses exist and how far each reaches back.

With stages k = 0..K-1, stage k's loss ``L_k = λ_k ℓ(G_k(h_k), y)`` backpropagates through stages
``k-w+1 .. k``. So the gradient of stage k's body sums ``∂L_j/∂θ_k`` over the *sources*
``j = k .. k+w-1`` (those with λ_j ≠ 0), and its head gets ``∂L_k/∂φ_k``. Backprop is the window that
spans the whole network with only the last loss switched on.

A method knows nothing about devices or order; the kernels turn it into per-stage functions and the
schedules decide when they run.
"""

import dataclasses

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    window: int | None  # None: the whole network (backprop)
    loss_weights: tuple[float, ...] | None = None
    one_layer_per_stage: bool = False
    needs_flush: bool = False  # backprop's gradient only exists after the whole pipeline has run

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ConfigError(f"window must be an integer >= 1, got {self.window!r}; the paper's overlapping window is 2")

    def weights(self, num_stages: int) -> tuple[float, ...]:
        if self.window is None:
            return (0.0,) * (num_stages - 1) + (1.0,)
        if self.loss_weights is None:
            return (1.0,) * num_stages
        if len(self.loss_weights) != num_stages:
            raise ConfigError(
                f"{len(self.loss_weights)} loss weights for {num_stages} stages; give one weight per stage"
            )
        return tuple(float(w) for w in self.loss_weights)

    def reach(self, num_stages: int) -> int:
        return num_stages if self.window is None else self.window

    def sources(self, k: int, num_stages: int) -> tuple[int, ...]:
        """Later stages whose loss gradient reaches stage k's body (k itself excluded)."""
        weights = self.weights(num_stages)
        last = min(k + self.reach(num_stages) - 1, num_stages - 1)
        return tuple(j for j in range(k + 1, last + 1) if weights[j] != 0.0)

    def passes_on(self, j: int, k: int, num_stages: int) -> bool:
        """Whether loss ``j``'s gradient continues from stage k into stage k-1."""
        return k >= 1 and j - (k - 1) < self.reach(num_stages)

    def check(self, model) -> None:
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
        self.weights(len(model))


def Backprop() -> Method:
    """Global backpropagation of the last head's loss; the baseline."""
    return Method("backprop", window=None, needs_flush=True)


def Greedy(loss_weights=None) -> Method:
    """Window 1 with one layer per stage (greedy layer-wise training)."""
    return Method("greedy", window=1, loss_weights=_tuple(loss_weights), one_layer_per_stage=True)


def Chunked(loss_weights=None) -> Method:
    """Window 1 with several layers per stage; the number of chunks is the number of stages."""
    return Method("chunked", window=1, loss_weights=_tuple(loss_weights))


def Overlapping(window: int = 2, loss_weights=None) -> Method:
    """Each loss reaches back through ``window`` stages (the paper's overlapping variant uses 2)."""
    if not isinstance(window, int) or window < 2:
        raise ConfigError(f"overlapping needs window >= 2, got {window!r}; window 1 is Chunked")
    return Method("overlapping", window=window, loss_weights=_tuple(loss_weights))


def _tuple(weights):
    return None if weights is None else tuple(weights)


METHODS = {"backprop": Backprop, "greedy": Greedy, "chunked": Chunked, "overlapping": Overlapping}


def make_method(name: str, *, window: int | None = None, loss_weights=None) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if name == "backprop":
        if loss_weights is not None:
            raise ConfigError("backprop uses only the last head's loss; drop loss_weights or pick a local method")
        return Backprop()
    if name == "overlapping":
        return Overlapping(window=2 if window is None else window, loss_weights=loss_weights)
    if window not in (None, 1):
        raise ConfigError(f"{name} always uses window 1, got window={window}; use method 'overlapping' for w >= 2")
    return METHODS[name](loss_weights=loss_weights)
