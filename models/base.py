"""The one type every model in the zoo returns."""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx


@dataclasses.dataclass
class Network:
    """A network described as an ordered list of splittable layers.

    ``layers`` are applied in order, ``h = layer(h)``; each takes one array and
    returns one array, so any contiguous run of them can become a stage.
    ``make_head(i, rngs)`` builds the default auxiliary head for a cut right
    after ``layers[i]``; for ``i == len(layers) - 1`` it is the real output head.
    ``natural_splits`` lists layer indices where a stage may naturally start
    (sorted, never 0), e.g. the first block of a new resolution in a ResNet.
    ``name`` is what run headers and results call the model (``mlp4x256``).

    Construction raises ValueError when ``natural_splits`` are not sorted, unique and inside
    1..len(layers)-1.
    """

    layers: list
    make_head: Callable[[int, nnx.Rngs], nnx.Module]
    natural_splits: tuple[int, ...]
    name: str

    def __post_init__(self):
        splits = tuple(int(i) for i in self.natural_splits)
        if list(splits) != sorted(set(splits)) or any(
            not 0 < i < len(self.layers) for i in splits
        ):
            raise ValueError(
                f"{self.name}: natural_splits must be sorted, unique and within "
                f"1..{len(self.layers) - 1}; got {self.natural_splits}"
            )
        self.natural_splits = splits

    def __call__(self, x):
        """Run every layer; handy for checks, not how stages are executed."""
        for layer in self.layers:
            x = layer(x)
        return x


def check_head_index(i: int, num_layers: int) -> int:
    """``i`` when it is a layer index in 0..num_layers-1, else IndexError; for ``make_head``, where a
    negative index would silently wrap to the wrong layer's width."""
    if not 0 <= i < num_layers:
        raise IndexError(f"head index {i} outside 0..{num_layers - 1}")
    return i
