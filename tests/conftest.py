"""Settings every test process shares; this must run before anything imports jax.

- Simulated CPU devices for the multi-device tests.
- XLA's CPU backend compiles without LLVM's optimization passes (``--xla_backend_optimization_level=0``),
  unless ``LPJAX_TEST_FULL_OPTIMIZATION=1``. The HLO passes, and so fusion, buffer assignment and
  donation, are the same as in a user's run; only the machine code is less optimized. The suite spends
  most of its time compiling small programs that then run a few steps: on the 2-core CI machine this
  took the three slowest training tests from 194 s to 126 s. Subprocesses (the CLI, multi-host
  workers) inherit the setting through the environment.
"""

import os
import sys

# helpers and worker scripts live in tests/support/; tests import them by module name (from tiny import ...)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_FAST_COMPILE = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("LPJAX_TEST_FULL_OPTIMIZATION") != "1" and "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {_FAST_COMPILE}".strip()


def pytest_configure(config):
    # pytest-xdist registers this marker itself; with -p no:xdist the tests still name it
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one xdist worker (--dist loadgroup)")
