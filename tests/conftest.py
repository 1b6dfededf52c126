"""Simulated CPU devices for the multi-device tests; must run before anything imports jax."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
