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


def compile_only(recipe, topology, workdir, *overrides):
    return lpjax("train", "--config", recipe, *overrides, "--topology", topology, "--compile-only", "--workdir",
                 str(workdir))


def test_a_recipe_compiles_for_the_host_cpu_from_shapes_alone(recipe, tmp_path, capsys):
    import jax

    before = {id(a) for a in jax.live_arrays()}
    assert compile_only(recipe, "cpu", tmp_path, "--config.layout.data=4") == 0  # 2 stages x 4 = the 8 CPU devices
    out = capsys.readouterr().out
    # nothing of the model was created: no array of a layer's size appeared (an MLP layer is 32x32 or more)
    assert not [a.shape for a in jax.live_arrays() if id(a) not in before and a.size >= 32 * 32]
    report = json.loads((tmp_path / "compile_only.json").read_text())
    names = [p["name"] for p in report["programs"]]
    assert names[0] == "init state" and any(n.startswith("mailboxes") for n in names), names
    assert any(n.startswith("step (first") for n in names) and any(n.startswith("step (drain") for n in names), names
    assert report["fits"] and report["layout"] == {"stages": 2, "data": 4}
    step = next(p for p in report["programs"] if p["name"].startswith("step (first"))
    rows = {(r["kind"], r["axis"], r["scope"]): r for r in step["collectives"]}
    assert ("collective-permute", "stage", "per clock") in rows
    # the gradient's all-reduce runs in each stage's update branch: 2 branches, a device runs its own
    assert rows[("all-reduce", "data", "per clock, one branch")]["branches"] == 2
    assert step["memory"]["argument"] > 0 and step["memory"]["hbm"] is None  # a CPU has no HBM figure
    assert [len(p["pairs"]) for p in step["ppermute_hops"]] == [4]  # stage 0 -> 1 in each of the 4 data columns
    assert "init state" in out and "collective-permute" in out and "s0d0->s1d0" in out


def test_a_recipe_compiles_for_a_v5e_2x2_that_is_not_attached(recipe, tmp_path, capsys):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'lpjax[tpu]')")
    assert compile_only(recipe, "v5e:2x2", tmp_path) == 0
    out = capsys.readouterr().out
    assert "target v5e:2x2: mesh stage=2 x data=2" in out and "15.75 GiB" in out
    report = json.loads((tmp_path / "compile_only.json").read_text())
    assert report["fits"] and all(p["memory"]["fits"] for p in report["programs"])
    step = next(p for p in report["programs"] if p["name"].startswith("step (first"))
    assert all(hops == 1 for p in step["ppermute_hops"] for _, _, hops in p["pairs"])  # neighbouring chips
    assert step["bytes_per_step_per_axis"]["data"] > step["bytes_per_step_per_axis"]["stage"] > 0


def test_a_model_too_large_for_the_chips_exits_1_naming_the_program_and_the_shortfall(recipe, tmp_path, capsys):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'lpjax[tpu]')")
    # 4 layers of 24576 x 24576: 2 per stage, 2.25 GiB each, 4 copies (parameters, Adam's moments, gradient sum)
    assert compile_only(recipe, "v5e:2x2", tmp_path, "--config.model.width=24576") == 1
    line = one_line(capsys)
    assert line.startswith("lpjax: init state does not fit: needs ") and "HBM has 15.75 GiB (short by " in line, line
    assert json.loads((tmp_path / "compile_only.json").read_text())["fits"] is False


def test_two_slices_put_the_stage_axis_across_them_and_say_why(recipe, tmp_path, capsys):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'lpjax[tpu]')")
    assert compile_only(recipe, "2xv4:2x2x2", tmp_path, "--config.stages=4", "--config.layout.data=4") == 0
    out = capsys.readouterr().out
    assert "(dcn)" in out  # the stage pair at the slice boundary crosses DCN
    note = json.loads((tmp_path / "compile_only.json").read_text())["notes"][0]
    assert note.startswith("across slices belongs 'stage': the step programs move ") and "put its 2 slices on 'stage'" in note
