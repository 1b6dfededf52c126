"""A non-editable ``pip install .`` into a fresh venv trains a shipped recipe by name from a directory
outside the checkout, and finds the shipped sweep suites.

Slow (a fresh venv installs jax, flax, orbax and the rest: minutes even from a warm pip cache), so it
runs only with LPJAX_SLOW_TESTS=1. In CI it belongs in its own job: `LPJAX_SLOW_TESTS=1 python -m
pytest -p no:xdist tests/test_install.py`, with the pip cache kept between runs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1",
                                reason="creates a venv and installs lpjax into it; LPJAX_SLOW_TESTS=1 runs it")


def test_installed_lpjax_trains_a_recipe_by_name_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a clean copy, so the install cannot pick up the checkout's build leftovers
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", "runs", "build", "*.egg-info", ".git",
                                                                "__pycache__", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stderr[-3000:]
    shutil.rmtree(source)  # nothing below may read the source tree

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
    env.pop("PYTHONPATH", None)
    lpjax = str(venv / "bin" / "lpjax")

    listed = subprocess.run([lpjax, "recipes"], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "mnist_resnet" in listed.stdout and "tiny" in listed.stdout
    assert "cifar10_resnet:110" in listed.stdout  # a parametrised recipe, listed per variant

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import lpjax.recipes, lpjax.models, lpjax; "
                            "print(lpjax.recipes.__file__); print(lpjax.models.__name__); "
                            "from lpjax.config import catalog, recipe_file; "  # a former name, and recipes/common.py
                            "print(recipe_file.load_recipe(catalog.find_recipe('cifar10_resnet32'))[0].model.name)"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout.splitlines()[0]
    assert where.stdout.splitlines()[2] == "resnet32"

    run = subprocess.run([lpjax, "train", "--config", "mnist_resnet", "--config.num_steps=30",
                          "--config.eval_every=0", "--workdir", "runs/demo"], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "final head (stage 3)" in run.stdout
    results = json.loads((outside / "runs" / "demo" / "results.json").read_text())
    assert results["num_steps"] == 30 and results["model"].startswith("mnist_resnet")
    assert results["environment"]["git_commit"] is None  # installed, not a checkout
