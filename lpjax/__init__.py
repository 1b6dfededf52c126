"""lpjax: local-parallel training of deep networks in JAX (Laskin, Metz et al., arXiv 2012.03837).

The package is layered (README's "Layout of the code"): ``core`` (the algorithm), ``executors``
(where tasks run), ``training`` (the run machinery), ``config``, ``distributed`` and ``research``
(costs, sweeps, benchmarks). The names below are the public API.
"""

import importlib
import sys

from lpjax.core import losses, methods, schedules
from lpjax.core.methods import Backprop, Chunked, Greedy, Method, Overlapping, SharedReadout, make_method, register_method
from lpjax.core.staging import Stage, StagedModel, cut_layers, stage_network
from lpjax.errors import ConfigError
from lpjax.executors.layout import Layout
from lpjax.research import balance, costs  # balance registers split_points="balanced" (core/staging.py)
from lpjax.training.trainer import Trainer

# The documented module paths keep working: ``from lpjax.schedules import GPipe`` and the like.
for _name, _module in {"methods": methods, "schedules": schedules, "losses": losses, "costs": costs,
                       "balance": balance}.items():
    sys.modules[f"lpjax.{_name}"] = _module

__version__ = "0.1.0"

# Loaded on first use: the model zoo and the run machinery import more than a Trainer needs.
_LAZY = {"models": "lpjax.models", "data": "lpjax.data", "fit": "lpjax.training.loop"}


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
    "Trainer", "balance", "costs", "cut_layers", "data", "fit", "losses", "make_method", "methods", "models", "register_method",
    "schedules", "stage_network",
]
