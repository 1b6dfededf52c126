"""lpjax model zoo: each builder returns a ``Network`` (layers + default heads)."""

from .base import Network
from .heads import FlattenLinear, LMHead, PoolLinear
from .mlp import deep_mlp, mlp
from .precision import set_precision, with_precision
from .resnet import cifar_resnet, mnist_resnet, resnet, resnet18, resnet32, resnet50, resnet110
from .transformer import transformer_lm

MODELS = {
    "mlp": mlp,
    "deep_mlp": deep_mlp,
    "resnet18": resnet18,
    "resnet32": resnet32,
    "resnet110": resnet110,
    "resnet50": resnet50,
    "mnist_resnet": mnist_resnet,
    "transformer_lm": transformer_lm,
}


def build(name: str, **kwargs) -> Network:
    """Build a registered model by name, e.g. ``build("resnet32", rngs=nnx.Rngs(0))``."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return builder(**kwargs)


__all__ = [
    "Network", "PoolLinear", "FlattenLinear", "LMHead", "mlp", "deep_mlp", "resnet", "cifar_resnet",
    "resnet18", "resnet32", "resnet110", "resnet50", "mnist_resnet", "transformer_lm",
    "MODELS", "build", "set_precision", "with_precision",
]
