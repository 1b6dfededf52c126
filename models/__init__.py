"""lpjax model zoo (installed as ``lpjax.models``): each builder returns a ``Network`` (layers + default heads).

The builders share one contract. They take keywords only, ``rngs`` (an ``nnx.Rngs``) included, and
the data-dependent ones (``num_classes``, ``input_shape`` / ``in_channels``, ``vocab_size``,
``seq_len``) are what ``lpjax train`` fills in from the dataset. Sizes are integers >= 1. They
return a new ``Network`` whose parameters are initialised from ``rngs``; a bad option is a
ValueError naming it. Models know nothing of methods, schedules or executors: cut a network with
``lpjax.stage_network``.
"""

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
    """Build a registered model by name, e.g. ``build("resnet32", rngs=nnx.Rngs(0))``.

    Args:
      name: a key of ``MODELS`` (ValueError listing them otherwise).
      **kwargs: the builder's keywords.

    Returns:
      The builder's ``Network``.
    """
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
