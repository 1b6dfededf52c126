"""Several processes: joining them (``join``), running one training across them (``multihost``), the
local launcher (``launch``) and the watchdog that ends a run whose peer died."""

from lpjax.distributed.join import initialize

__all__ = ["initialize"]
