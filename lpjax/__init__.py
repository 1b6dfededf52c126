"""lpjax: local-parallel training of deep networks in JAX (Laskin, Metz et al., arXiv 2012.03837)."""

import importlib

from . import losses, methods, schedules
from .errors import ConfigError
from .layout import Layout
from .methods import Backprop, Chunked, Greedy, Method, Overlapping, SharedReadout, make_method, register_method
from .staging import Stage, StagedModel, cut_layers, stage_network
from .trainer import Trainer

__version__ = "0.1.0"

# Loaded on first use: the model zoo and the run machinery import more than a Trainer needs.
_LAZY = {"models": "lpjax.models", "data": "lpjax.data", "fit": "lpjax.train"}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, name) if name == "fit" else module
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lpjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Backprop", "Chunked", "ConfigError", "Greedy", "Layout", "Method", "Overlapping", "SharedReadout", "Stage", "StagedModel",
    "Trainer", "cut_layers", "data", "fit", "losses", "make_method", "methods", "models", "register_method",
    "schedules", "stage_network",
]
