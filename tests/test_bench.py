"""``run_bench`` end to end on a tiny sweep (8x8 digits, a few steps), resuming, and its input errors."""

import json
import os
import textwrap

import jax
import pytest

import lpjax
from lpjax.research.bench import run_bench
from lpjax.research.plots import plot_run
from lpjax.training.metrics_log import read_records
from lpjax.research.sweep import load_config_file, plan_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "mnist_mlp.py")
FIGURES = ("pareto", "loss_vs_compute", "loss_vs_ideal_time", "loss_vs_wall_time", "steps_vs_batch", "alignment")

SWEEP = """
import ml_collections

def get_config():
    sweep = ml_collections.ConfigDict()
    sweep.smooth_window = 3
    sweep.cost_batch = 8
    sweep.problems = {{"digits": {{
        "recipe": "{recipe}",
        "overrides": {{"dataset": {{"name": "digits"}}, "model": {{"depth": 2, "width": 16}},
                      "optimizer": {{"decay": "constant"}}, "eval_batch_size": 300}},
        "methods": {methods},
        "batch_sizes": (16, 32),
        "learning_rates": (1e-2,),
        "num_steps": 8,
        "target_loss": {target},
    }}}}
    return sweep
"""


def write_sweep(folder, methods="{'backprop': 1, 'greedy': 2}", target=2.25, recipe=RECIPE, **changes):
    text = SWEEP.format(methods=methods, target=target, recipe=recipe)
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    path = os.path.join(folder, "sweep.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    sweep = write_sweep(str(folder))
    workdir = str(folder / "out")
    return sweep, workdir, run_bench(sweep, workdir, verbose=False)


@pytest.mark.xdist_group("bench")  # one worker runs the shared fixture (--dist loadgroup)
def test_bench_writes_report_results_and_figures(bench):
    _, workdir, summary = bench
    report = open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
    for name in FIGURES:
        for fmt in ("png", "svg"):
            path = os.path.join(workdir, "plots", f"{name}.{fmt}")
            assert os.path.getsize(path) > 1000, path
        assert f"plots/{name}.png" in report
    assert "| backprop | 16 | 0.01 |" in report and "| greedy | 32 | 0.01 |" in report
    assert "Gradient alignment at the end of training" in report
    assert {(e["label"], e["batch_size"]) for e in summary["best"]} == {
        ("backprop", 16), ("backprop", 32), ("greedy", 16), ("greedy", 32)}


@pytest.mark.xdist_group("bench")
def test_results_hold_per_step_curves_with_cost_accounting(bench):
    _, workdir, _ = bench
    records = read_records(os.path.join(workdir, "results.jsonl"))
    assert len(records) == 4
    for r in records:
        assert r["steps"] == list(range(1, 9))
        assert all(loss is not None and loss > 0 for loss in r["loss"])
        assert r["wall_time"] == sorted(r["wall_time"]) and r["wall_time"][0] > 0
        per_example, per_step = r["cost"]["flops_per_example"], r["cost"]["ideal_flops_per_step"]
        assert r["compute"] == pytest.approx([s * r["batch_size"] * per_example for s in r["steps"]])
        assert r["ideal_time"] == pytest.approx([s * per_step for s in r["steps"]])
    greedy = next(r for r in records if r["method"] == "greedy")
    backprop = next(r for r in records if r["method"] == "backprop")
    # two greedy stages run in parallel: less ideal time per step than the whole network
    assert greedy["cost"]["ideal_flops_per_step"] < backprop["cost"]["ideal_flops_per_step"]


@pytest.mark.xdist_group("bench")
def test_alignment_is_probed_at_the_largest_batch_size(bench):
    _, _, summary = bench
    rows = {r["label"]: r for r in summary["alignment"]}
    assert set(rows) == {"backprop", "greedy"} and all(r["batch_size"] == 32 for r in rows.values())
    assert rows["backprop"]["alignment"] == pytest.approx([1.0], abs=1e-5)
    first, last = rows["greedy"]["alignment"]
    assert last == pytest.approx(1.0, abs=1e-5) and -1.0 <= first < 1.0 - 1e-4


@pytest.mark.xdist_group("bench")
def test_the_compilation_cache_is_used_then_switched_off(bench):
    _, workdir, _ = bench
    assert os.listdir(os.path.join(workdir, "jax_cache"))
    assert jax.config.jax_compilation_cache_dir is None


@pytest.mark.xdist_group("bench")
def test_rerun_skips_finished_runs(bench, capsys):
    sweep, workdir, _ = bench
    metrics = [os.path.join(workdir, "runs", d, "metrics.jsonl") for d in os.listdir(os.path.join(workdir, "runs"))]
    before = {m: os.path.getmtime(m) for m in metrics}
    run_bench(sweep, workdir, verbose=True)
    assert "4 already done" in capsys.readouterr().out
    assert {m: os.path.getmtime(m) for m in metrics} == before
    assert len(read_records(os.path.join(workdir, "results.jsonl"))) == 4


@pytest.mark.xdist_group("bench")
def test_plot_run_draws_one_training_run(bench):
    _, workdir, summary = bench
    run_dir = os.path.join(workdir, "runs", summary["best"][0]["run_id"])
    paths = plot_run(run_dir)
    assert paths == [os.path.join(run_dir, "curves.png"), os.path.join(run_dir, "curves.svg")]
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(lpjax.ConfigError, match="no metrics.jsonl"):
        plot_run(os.path.join(workdir, "plots"))


def test_changing_a_run_changes_its_id(tmp_path):
    one = plan_runs(load_config_file(write_sweep(str(tmp_path))))
    same = plan_runs(load_config_file(write_sweep(str(tmp_path))))
    two = plan_runs(load_config_file(write_sweep(str(tmp_path), **{'"num_steps": 8': '"num_steps": 9'})))
    assert len(one) == 4 and [s.run_id for s in one] == [s.run_id for s in same]
    assert not {s.run_id for s in one} & {s.run_id for s in two}


def test_relative_recipe_paths_are_found_above_the_sweep_file(tmp_path):
    folder = os.path.join(REPO, "recipes", "sweeps")
    specs = plan_runs(load_config_file(os.path.join(folder, "small.py")), os.path.join(folder, "small.py"))
    assert {s.config["dataset"]["name"] for s in specs} == {"mnist5k", "text_bytes"}


@pytest.mark.parametrize("change,message", [
    ({"'greedy': 2": "'sideways': 2"}, "unknown method 'sideways'"),
    ({'"num_steps": 8': '"num_steps": (8, 8, 8)'}, "num_steps has 3 entries for 2 batch sizes"),
    ({'"target_loss"': '"target"'}, "unknown key problems.digits.target"),
    ({RECIPE: "recipes/missing.py"}, "recipe 'recipes/missing.py' not found"),
    ({"sweep.cost_batch = 8": "sweep.cost_batch = 0"}, "cost_batch must be a positive integer"),
    ({'"learning_rates": (1e-2,)': '"learning_rates": ((1e-2,), (1e-2,), (1e-3,))'},
     "learning_rates has 3 grids for 2 batch sizes"),
    ({'"learning_rates": (1e-2,)': '"learning_rates": ((1e-2,), 1e-3)'}, "mixes rates and tuples of rates"),
], ids=["method", "steps", "key", "recipe", "cost_batch", "rate_grids", "rate_mix"])
def test_bad_sweeps_are_one_line_config_errors(tmp_path, change, message):
    path = write_sweep(str(tmp_path), **change)
    with pytest.raises(lpjax.ConfigError, match=message) as err:
        run_bench(path, str(tmp_path / "out"), verbose=False)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "out" / "results.jsonl")


def test_learning_rates_can_be_one_grid_per_batch_size(tmp_path):
    path = write_sweep(str(tmp_path), **{'"learning_rates": (1e-2,)': '"learning_rates": ((1e-2,), (1e-2, 3e-2))'})
    specs = plan_runs(load_config_file(path), path)
    assert sorted({(s.batch_size, s.learning_rate) for s in specs}) == [(16, 1e-2), (32, 1e-2), (32, 3e-2)]
    assert len(specs) == 2 * 3  # two methods


def test_unknown_suite_names_the_choices(tmp_path):
    with pytest.raises(lpjax.ConfigError, match="unknown suite 'huge'; use one of .*small"):
        run_bench("huge", str(tmp_path), verbose=False)
    with pytest.raises(lpjax.ConfigError, match="does not exist"):
        run_bench(str(tmp_path / "nope.py"), str(tmp_path), verbose=False)


@pytest.mark.xdist_group("bench")
def test_summary_is_plain_json(bench):
    _, workdir, _ = bench
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["headline"]["digits"]["batch_size"] == 32


@pytest.mark.parametrize("name", ["small", "cifar10", "lm1b"])
def test_shipped_sweep_recipes_are_valid(name):
    """Every sweep in recipes/sweeps/ passes the checks and plans one run per combination."""
    from lpjax.research.sweep import check_sweep

    path = os.path.join(REPO, "recipes", "sweeps", f"{name}.py")
    sweep = load_config_file(path)
    problems = check_sweep(sweep)["problems"]
    expected = sum(len(p["methods"]) * len(p["batch_sizes"]) * len(p["learning_rates"]) for p in problems.values())
    runs = plan_runs(sweep, path)
    assert len(runs) == expected == len({run.run_id for run in runs})
