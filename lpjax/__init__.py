"""lpjax: local-parallel training of deep networks in JAX (Laskin, Metz et al., arXiv 2012.03837)."""

from . import losses, methods, schedules
from .errors import ConfigError
from .layout import Layout
from .methods import Backprop, Chunked, Greedy, Overlapping
from .staging import Stage, StagedModel, cut_layers, stage_network
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Backprop", "Chunked", "ConfigError", "Greedy", "Layout", "Overlapping", "Stage", "StagedModel",
    "Trainer", "cut_layers", "losses", "methods", "schedules", "stage_network",
]
