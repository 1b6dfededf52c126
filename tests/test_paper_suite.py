"""The paper suite (lpjax.research.paper, recipes/sweeps/paper.py): its plan, and every report section on a tiny
configuration that trains in seconds."""

import os

import pytest

from lpjax.research import memory, paper
from lpjax.research.bench import run_bench, suite_path
from lpjax.research.sweep import check_sweep, load_config_file, plan_runs

TINY = '''
import ml_collections

def get_config():
    sweep = ml_collections.ConfigDict()
    sweep.smooth_window = 3
    sweep.cost_batch = 8
    sweep.cost_compile = False  # lowered FLOPs, as the paper suite: one compile less per architecture
    sweep.problems = {
        "f1_mlp": {"recipe": "recipes/mnist_mlp.py",
                   "overrides": {"dataset": {"name": "digits"}, "model": {"name": "deep_mlp", "depth": 4, "width": 16},
                                 "optimizer": {"decay": "constant"}, "eval_batch_size": 300,
                                 "checkpoint": {"every_steps": 0}},
                   "split_points": "balanced",
                   "methods": {"backprop": 1, "overlapping": 4},
                   "batch_sizes": (16, 64), "learning_rates": (1e-2,), "num_steps": (12, 6), "target_loss": 2.2},
        "f3_random_labels": {"recipe": "recipes/mnist_mlp.py",
                             "overrides": {"dataset": {"random_labels": True, "max_train": 200},
                                           "model": {"depth": 2, "width": 16}, "eval_batch_size": 500},
                             "measure": "final", "methods": {"backprop": 1, "greedy": 2},
                             "batch_sizes": (50,), "learning_rates": (1e-2,), "num_steps": (8,)},
        "f4_digits": {"recipe": "recipes/mnist_mlp.py",
                      "overrides": {"dataset": {"name": "digits"}, "model": {"depth": 2, "width": 16},
                                    "eval_batch_size": 300},
                      "measure": "final", "methods": {"backprop": 1, "greedy": 2},
                      "batch_sizes": (32,), "learning_rates": (1e-2,), "num_steps": (5,), "seeds": (0, 1)},
    }
    sweep.findings = {"pareto": ("f1_mlp",), "capacity": "f3_random_labels", "ranking": ("f4_digits",)}
    sweep.memory = {"stages": (2,), "models": {"tiny_mlp": {"model": "mlp", "input_shape": (8, 8, 1),
                                                              "num_classes": 10, "depth": 4, "width": 16, "batch": 8}}}
    return sweep
'''


def test_paper_suite_plan():
    path = suite_path("paper")
    sweep = check_sweep(load_config_file(path))
    specs = plan_runs(sweep, path)
    by_problem = {}
    for s in specs:
        by_problem.setdefault(s.problem, []).append(s)
    # F1: backprop, chunked 2/4, overlapping 4, greedy 8, all balanced by FLOPs; the learning-rate grid
    # is per batch size (1, 2 and 4 rates for the MLP, wide at the largest batch so that backprop's best
    # rate lies inside it; 1 and 2 for the Transformer)
    assert len(by_problem["f1_mlp"]) == 5 * (1 + 2 + 4) and len(by_problem["f1_transformer"]) == 5 * (1 + 2)
    rates = {(s.batch_size, s.learning_rate) for s in by_problem["f1_mlp"] if s.method == "greedy"}
    assert rates == {(32, 1e-3), (256, 1e-3), (256, 3e-3), (2048, 1e-3), (2048, 3e-3), (2048, 1e-2), (2048, 3e-2)}
    # the MLP is deep and uniform, its input pooled so the first layer is not the widest
    model = by_problem["f1_mlp"][0].config["model"]
    assert model["name"] == "deep_mlp" and model["depth"] >= 8 and (28 // model["pool"]) ** 2 <= model["width"]
    # 8 blocks: 2 whole blocks per stage at K = 4; greedy one layer per stage, 9 with the embedding
    assert by_problem["f1_transformer"][0].config["model"]["depth"] == 8
    assert {s.stages for s in by_problem["f1_transformer"]} == {1, 2, 4, 9}
    assert {s.stages for s in by_problem["f1_mlp"]} == {1, 2, 4, 8}
    assert all(s.config["split_points"] == ("balanced" if s.stages > 1 else None) for s in by_problem["f1_mlp"])
    # F3: one run per method, shuffled labels, the same steps for every method
    f3 = by_problem["f3_random_labels"]
    assert len(f3) == 4 and len({s.num_steps for s in f3}) == 1
    assert all(s.config["dataset"]["random_labels"] is True for s in f3)
    # F4: five methods x six seeds on the ResNet (paired comparisons need them), three on the LM
    for name, seeds in (("f4_mnist_resnet", 6), ("f4_byte_lm", 3)):
        assert len(by_problem[name]) == 5 * seeds
        assert sorted({s.seed for s in by_problem[name]}) == list(range(seeds))
        assert len({s.run_id for s in by_problem[name]}) == 5 * seeds
    assert sweep["memory"]["stages"] == (2, 4, 8)


def test_paper_report_sections_on_a_tiny_suite(tmp_path):
    recipe_dir = tmp_path / "recipes" / "sweeps"
    recipe_dir.mkdir(parents=True)
    sweep_file = recipe_dir / "tiny_paper.py"
    sweep_file.write_text(TINY)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.symlink(os.path.join(repo, "recipes", "mnist_mlp.py"), tmp_path / "recipes" / "mnist_mlp.py")
    out = run_bench(str(sweep_file), str(tmp_path / "work"), verbose=False)
    found = out["findings"]
    assert [r["problem"] for r in found["pareto"]] == ["f1_mlp"]
    per_step = found["pareto"][0]["per_step_ratio"]
    assert set(per_step) == {"overlapping"} and all(0 < v < 1 for v in per_step.values())
    capacity = found["capacity"][0]
    assert set(capacity["local"]) == {"greedy"} and 0 <= capacity["backprop"] <= 1
    ranking = found["ranking"][0]
    assert ranking["rows"]["backprop"][2] == 2  # two seeds each
    assert ranking["order"] == ["greedy"] and ranking["gap_greedy"] == ranking["gap_best"]
    memory = out["memory"][0]
    assert 0 < memory["local"][2]["largest"] < memory["backprop_bytes"]
    report = open(out["report"]).read()
    for text in ("## Paper findings", "F1 Pareto crossover, f1_mlp", "F2 alignment", "F3 random-label",
                 "F4 ranking, f4_digits", "Memory per device", "| tiny_mlp | 8 |", paper.COMMAND,
                 "least over all batch sizes", "## Where the time went", "load average",
                 "### F1: ideal time to target at every batch size", "| f1_mlp | 64 |",
                 "#### Where the bytes go, K = 2", "backprop - method [95 % interval]"):
        assert text in report, text
    assert "reproduced**" in report
    assert "## f3_random_labels" not in report  # final-measure problems have no Pareto section
    records = [r for r in out["best"] if r["problem"] == "f1_mlp"]
    assert records


def test_fastest_to_target_is_each_methods_least_ideal_time_over_batch_sizes():
    """The frontier reading of F1: backprop's least time is at batch 256 here, the best local method's
    at 64, and methods or batches that never reached the target do not count."""
    def entry(label, batch, ideal_time, reached=True):
        return {"problem": "p", "label": label, "batch_size": batch, "reached": reached,
                "ideal_time": ideal_time if reached else None}
    best = [entry("backprop", 64, 10.0), entry("backprop", 256, 8.0), entry("greedy", 64, 2.0),
            entry("greedy", 256, None, reached=False), entry("chunked", 256, 3.0),
            {**entry("backprop", 512, 1.0), "problem": "q"}]  # another problem's backprop does not count
    out = paper.fastest_to_target(best, "p")
    assert out == {"label": "greedy", "batch_size": 64, "backprop_batch_size": 256, "ratio": 2.0 / 8.0}
    assert paper.fastest_to_target([entry("greedy", 64, 2.0)], "p")["ratio"] is None  # no backprop


def test_ratios_by_batch_are_each_methods_ideal_time_over_backprops_at_that_batch():
    def entry(label, batch, ideal_time, steps, reached=True, problem="p"):
        return {"problem": problem, "label": label, "batch_size": batch, "reached": reached,
                "ideal_time": ideal_time if reached else None, "steps": steps if reached else None}
    best = [entry("backprop", 16, 10.0, 100), entry("greedy", 16, 8.0, 200), entry("chunked-4", 16, 4.0, 120),
            entry("backprop", 128, 4.0, 40), entry("greedy", 128, None, None, reached=False),
            entry("chunked-4", 128, 2.0, 60), entry("backprop", 512, 1.0, 10, problem="q")]
    rows = paper.ratios_by_batch(best, "p")
    assert [r["batch_size"] for r in rows] == [16, 128]
    assert rows[0]["ratios"] == {"chunked-4": 0.4, "greedy": 0.8} and rows[0]["best_local"] == "chunked-4"
    assert rows[1]["ratios"] == {"chunked-4": 0.5, "greedy": None} and rows[1]["best_ratio"] == 0.5
    assert rows[1]["steps"] == {"backprop": 40, "chunked-4": 60, "greedy": None}
    assert paper.ratios_by_batch([entry("greedy", 16, 1.0, 5)], "p")[0]["ratios"] == {"greedy": None}


def memory_benchmark():
    """benchmarks/memory_per_device.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("memory_per_device",
                                                  os.path.join(repo, "benchmarks", "memory_per_device.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_benchmark_tiny(tmp_path, capsys):
    """benchmarks/memory_per_device.py --tiny: the largest stage shrinks as K grows, below backprop's
    single-device peak; each stage's figure is a compiled program's peak (weights at least)."""
    import json

    module = memory_benchmark()
    out = tmp_path / "rows.json"
    assert module.main(["--tiny", "--stages", "2", "4", "--remat", "layers_nothing_saved", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    base, k2, k4 = row["backprop_bytes"], row["local"]["2"], row["local"]["4"]
    assert 0 < k4["largest"] < k2["largest"] < base
    assert len(k4["stage_bytes"]) == 4 and len(k4["split_points"]) == 3
    assert min(k4["stage_bytes"]) >= 4 * 32 * 10  # a stage holds at least its float32 head weights
    for k in (k2, k4):  # the memory-balanced cut never holds more than the even cut, measured alike
        assert k["largest"] <= k["even"]["largest"] and k["ratio"] == k["largest"] / base
    # the breakdown's parts add up to each training program's peak, backprop's whole step included
    for part in [row["backprop_breakdown"], *k4["breakdown"]]:
        assert sum(part[key] for key in memory.PARTS) == part["training"] <= part["peak"]
    assert row["backprop_breakdown"]["parameters"] + row["backprop_breakdown"]["head"] >= 4 * (64 * 32 + 3 * 32 * 32)
    printed = capsys.readouterr().out
    assert "| tiny_mlp | 16 |" in printed and "K = 4, largest local stage / backprop: tiny_mlp" in printed
    assert "#### Where the bytes go, K = 4" in printed and "| tiny_mlp | stage 3 |" in printed
    # K = 4 again with per-layer remat on both sides (the suite's policy): two ratios, each over its own
    # backprop; the verdict judges only the ratios without remat
    remat = row["remat"]
    assert remat["policy"] == "layers_nothing_saved" and remat["k"] == 4 and len(remat["split_points"]) == 3
    assert remat["vs_plain"] == remat["largest"] / base and remat["vs_remat"] == remat["largest"] / remat["backprop_bytes"]
    assert remat["largest"] == max(remat["stage_bytes"]) <= remat["even"]["largest"]
    (largest_part,) = [p for p in remat["breakdown"] if p["peak"] is not None]
    assert largest_part["peak"] == remat["largest"]
    verdict = memory.memory_verdict([{**row, "local": {4: k4}}])
    assert verdict["remat_k4"]["tiny_mlp"]["vs_remat"] == remat["vs_remat"]
    assert verdict["reproduced"] == (k4["ratio"] <= memory.MEMORY_GOAL)
    assert "#### With remat (layers_nothing_saved), K = 4" in printed and "| / backprop with remat |" in printed
    assert "K = 4 with remat layers_nothing_saved, tiny_mlp: largest stage / backprop without remat" in printed
    assert module.main(["--tiny", "--case", "nope"]) == 2


def test_memory_cases_pass_only_the_keywords_a_builder_takes():
    from lpjax.models import resnet32, transformer_lm
    spec = {"model": "resnet32", "input_shape": (32, 32, 3), "num_classes": 10, "batch": 128}
    assert memory.builder_options(spec, resnet32) == {"num_classes": 10}
    x, y = memory.example_shapes(spec)
    assert x.shape == (128, 32, 32, 3) and y.shape == (128,)
    lm = {"model": "transformer_lm", "seq_len": 256, "dim": 256, "depth": 8, "heads": 4, "batch": 32}
    assert memory.builder_options(lm, transformer_lm) == {"seq_len": 256, "dim": 256, "depth": 8, "heads": 4}
    assert memory.example_shapes(lm)[0].shape == (32, 256)


def _final_records(means, seeds=6, noise=0.0, shared=1.0):
    """Test accuracies per method and seed: each seed shifts every method alike (``shared``, what pairing
    removes); ``noise`` is each run's own."""
    import numpy as np
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, shared, size=seeds)
    return [{"problem": "f4_resnet", "label": label, "seed": s, "test_loss": None, "train_accuracy": None,
             "train_loss": None, "test_accuracy": (mean + offsets[s] + rng.normal(0, noise)) / 100}
            for label, mean in means.items() for s in range(seeds)]


def test_ranking_is_reproduced_only_beyond_the_paired_interval():
    # per-seed spread (1 pt) larger than the gaps, but shared by the methods of a seed: pairing resolves it
    paper_order = {"backprop": 95.0, "chunked-2": 94.8, "chunked-3": 94.5, "overlapping": 94.0, "greedy": 93.0}
    r = paper.ranking_finding(_final_records(paper_order, noise=0.05), "f4_resnet")
    assert r["order"] == ["chunked-2", "chunked-3", "overlapping", "greedy"] and r["reproduced"]
    assert {(c["better"], c["worse"]) for c in r["checks"]} == {
        ("chunked-2", "overlapping"), ("chunked-2", "greedy"), ("chunked-3", "greedy"), ("overlapping", "greedy")}
    assert r["paired"]["greedy"]["low"] > 1.5 and r["paired"]["greedy"]["n"] == 6
    # gaps of 0.05 to 0.2 pt under 1 pt of each run's own noise: whatever the means say, not resolved
    close = {"backprop": 95.0, "chunked-2": 94.9, "chunked-3": 94.85, "overlapping": 94.8, "greedy": 94.7}
    noisy = paper.ranking_finding(_final_records(close, noise=1.0, shared=0.0), "f4_resnet")
    assert not noisy["reproduced"]
    assert any(c["low"] <= 0 <= c["high"] for c in noisy["checks"])  # an interval that includes 0
    # overlapping clearly closest: not the paper's order, and said so with the interval
    reversed_ = paper.ranking_finding(_final_records({**paper_order, "overlapping": 95.5}, noise=0.05), "f4_resnet")
    assert not reversed_["reproduced"]
    assert [(c["better"], c["worse"]) for c in reversed_["contrary"]] == [("chunked-2", "overlapping")]
    lines = "\n".join(paper.render({"pareto": [], "alignment": [], "capacity": [], "ranking": [reversed_]}))
    assert ("the order differs from the paper's beyond the interval (a finding of ours): "
            "overlapping above chunked-2") in lines
    assert "chunked-2 - overlapping: -0.7" in lines and "the order is reversed" in lines


def test_paper_long_suite_plans_the_same_findings_at_full_size():
    """``--suite paper_long``: the quick suite's problems and findings, every problem trained longer or
    over more seeds, with its expected run time per machine type in the report section."""
    quick_path, long_path = suite_path("paper"), suite_path("paper_long")
    quick, long = check_sweep(load_config_file(quick_path)), check_sweep(load_config_file(long_path))
    assert set(long["problems"]) == set(quick["problems"]) and long["memory"] == quick["memory"]
    assert {k: v for k, v in long["findings"].items() if k != "expected_time"} == quick["findings"]
    assert set(long["findings"]["expected_time"]) == {"2 idle CPU cores", "1 GPU (H100 or H200)"}
    runs = {name: plan_runs(sweep, path) for name, sweep, path in (("quick", quick, quick_path),
                                                                   ("long", long, long_path))}
    for problem in quick["problems"]:
        def work(specs):
            return sum(s.num_steps * s.batch_size for s in specs if s.problem == problem)
        assert work(runs["long"]) > 2 * work(runs["quick"]), problem
    lm = [s for s in runs["long"] if s.problem == "f1_transformer"]
    assert {s.stages for s in lm} == {1, 2, 4, 9} and lm[0].config["model"]["depth"] == 8  # greedy: 9 layers
    assert len({s.run_id for s in runs["long"]}) == len(runs["long"])
    found = paper.findings({"headline": {}, "critical_batch_size": {}, "best": [], "alignment": []}, [], long)
    line = next(line for line in paper.render(found) if line.startswith("Expected run time of the suite: "))
    assert "2 idle CPU cores: " in line and "1 GPU (H100 or H200): " in line


def test_the_exact_cut_is_never_worse_than_the_balanced_cut(tmp_path, capsys):
    """memory_per_device.py --exact-cut compiles every run of layers as a stage: its min-max partition
    bounds the suite's balanced cut (a descent over candidates) from below, in the same bytes."""
    import json

    module = memory_benchmark()
    out = tmp_path / "rows.json"
    assert module.main(["--tiny", "--stages", "2", "4", "--remat", "none", "--exact-cut", "--json", str(out)]) == 0
    assert "exact cut, tiny_mlp, K = 4: [" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    found = module.exact_cut("tiny_mlp", module.TINY["tiny_mlp"], (2, 4))
    for k in (2, 4):
        points, costs = found[k]
        assert len(points) == k - 1 and len(costs) == k
        assert max(costs) <= row["local"][str(k)]["largest"]
