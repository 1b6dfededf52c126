"""``lpjax train --topology T --compile-only`` (lpjax/training/compile_only.py): bad requests end with one
line and exit 2; a recipe compiles for the host's own CPU devices (a valid target) with abstract state,
and, where libtpu is installed, for a deviceless v5e:2x2 (the compile .ci/run's last step runs)."""

import json
import textwrap

import pytest

from lpjax.cli import main
from lpjax.executors import topology as T

T.quiet_libtpu_env()

# digits through a 4-layer MLP, chunked over 2 stages x 2 data on the spmd executor
SMALL = textwrap.dedent("""
    from lpjax.config.build import base_config


    def get_config():
        config = base_config()
        config.dataset.name = "digits"
        config.model.name = "mlp"
        config.model.depth = 4
        config.model.width = 32
        config.stages = 2
        config.method.name = "chunked"
        config.schedule.name = "streaming"
        config.schedule.microbatches = 2
        config.layout.executor = "spmd"
        config.layout.data = 2
        config.batch_size = 16
        config.eval_batch_size = 16
        config.num_steps = 4
        return config
""")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "small.py"
    path.write_text(SMALL)
    return str(path)


def lpjax(*argv):
    return main(["lpjax", *argv])


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, words", [
    (["--topology", "v9:2x2", "--compile-only"], ["unknown TPU kind 'v9'"]),
    (["--topology", "v5e-16", "--compile-only"], ["not a cloud accelerator name", "v5e:4x4"]),
    (["--compile-only"], ["--compile-only needs --topology"]),
    (["--topology", "v5e:2x2"], ["--topology is for --compile-only"]),
    (["--topology", "cpu", "--compile-only", "--config.layout.data=1"],
     ["uses 2 of cpu's", "--config.layout.data=4"]),
    (["--topology", "cpu", "--compile-only", "--config.layout.executor=mpmd"], ["set --config.layout.executor=spmd"]),
])
def test_a_bad_compile_only_request_is_one_line_and_exit_2(recipe, capsys, argv, words, monkeypatch):
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")
    assert lpjax("train", "--config", recipe, *argv) == 2
    line = one_line(capsys)
    assert line.startswith("lpjax: error: ") and all(w in line for w in words), line


def test_without_libtpu_the_line_names_the_extra_that_installs_it(recipe, capsys, monkeypatch):
    monkeypatch.setattr(T, "libtpu_available", lambda: False)  # as on a machine where pip never installed it
    assert lpjax("train", "--config", recipe, "--topology", "v5e:2x2", "--compile-only") == 2
    assert "pip install 'lpjax[tpu]'" in one_line(capsys)
