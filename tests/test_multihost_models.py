"""`lpjax launch -n 2 -- train` (2 devices per process) equals one process on 4 devices, in
metrics.jsonl and in parameters (<= 1e-6), for the Transformer LM (overlapping, streaming; stages 2
x data 2, so each process holds one data column of both stages and reads only its rows) and for the
BatchNorm ResNet with heterogeneous stages (4 x 1: each process holds two whole stages).

Compiling these SPMD programs takes minutes of CPU on 2 cores, so this file runs with
`make test-slow` only (LPJAX_SLOW_TESTS=1), not in .ci/run's multi-process step."""

import os

import numpy as np
import pytest

from test_multihost_train import assert_same_metrics, both, lpjax, restored_params

pytestmark = pytest.mark.skipif(os.environ.get("LPJAX_SLOW_TESTS") != "1",
                                reason="multi-process training runs; LPJAX_SLOW_TESTS=1 runs them")


# Tiny settings of the two further cases, 4 steps each, a checkpoint every 2 steps.
RECIPES = {
    # byte-level Transformer LM, overlapping (window 2), streaming; stages 2 x data 2: each process
    # holds one data column of both stages and reads only its rows
    "transformer": dict(dataset__name="text_bytes", dataset__seq_len=16, dataset__max_train=256,
                        model__name="transformer_lm", model__dim=16, model__depth=2, model__heads=2,
                        stages=2, method__name="overlapping", method__window=2, layout__data=2,
                        optimizer__name="adamw", optimizer__learning_rate=1e-3, batch_size=8),
    # MNIST ResNet with BatchNorm, heterogeneous stages (stem, then blocks at 7x7, 4x4, 2x2), greedy;
    # stages 4 x data 1: each process holds two whole stages
    "resnet": dict(dataset__name="mnist5k", dataset__test_size=100, dataset__max_train=128,
                   model__name="mnist_resnet", model__blocks_per_stage=(0, 1, 1, 1), model__width=4,
                   stages=4, method__name="greedy",
                   optimizer__name="adam", optimizer__learning_rate=2e-3, batch_size=16),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_launch_equals_one_process_for_the_transformer_and_the_batchnorm_resnet(name, tmp_path):
    settings = dict(RECIPES[name], schedule__name="streaming", schedule__microbatches=2, layout__executor="spmd",
                    num_steps=4, log_every=2, eval_every=0, checkpoint__every_steps=2)
    lines = [f"    config.{key.replace('__', '.')} = {value!r}" for key, value in settings.items()]
    config = tmp_path / f"{name}.py"
    config.write_text("\n".join(["from lpjax.config.build import base_config", "", "", "def get_config():",
                                 "    config = base_config()", *lines, "    return config", ""]))
    one, two = tmp_path / "one", tmp_path / "two"
    single, launched = both(  # each run may take 10 minutes of a busy 2-core machine
        (lpjax, ["train", "--config", str(config), "--workdir", str(one)], {"devices": 4}),
        (lpjax, ["launch", "-n", "2", "--cpu-devices", "2", "--", "train", "--config", str(config),
                 "--workdir", str(two)], {}))
    assert single.returncode == 0, single.stderr[-3000:]
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_metrics(one, two)
    for mine, theirs in zip(restored_params(config, one, 4), restored_params(config, two, 4), strict=True):
        for x, y in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
