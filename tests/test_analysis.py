"""Time-to-target, best learning rates, Pareto frontiers and headline ratios on synthetic curves."""

import math

import numpy as np
import pytest

from lpjax.research import analysis


def run(label, batch, lr, losses, *, ideal_per_step=10.0, flops_per_example=2.0, problem="p"):
    steps = list(range(1, len(losses) + 1))
    return {"run_id": f"{label}-{batch}-{lr}", "problem": problem, "label": label, "method": label,
            "batch_size": batch, "learning_rate": lr, "steps": steps, "loss": list(losses),
            "ideal_time": [s * ideal_per_step for s in steps],
            "compute": [s * batch * flops_per_example for s in steps],
            "wall_time": [0.5 * s for s in steps]}


def test_smooth_is_a_centred_running_mean_that_keeps_gaps():
    np.testing.assert_allclose(analysis.smooth([3, 0, 3, 0, 3], 3), [1.5, 2, 1, 2, 1.5])
    np.testing.assert_allclose(analysis.smooth([1, 2, 3], 1), [1, 2, 3])
    smoothed = analysis.smooth([1.0, None, 1.0, 1.0, 1.0], 3)
    assert np.isnan(smoothed[:3]).all() and not np.isnan(smoothed[3:]).any()
    assert np.isnan(analysis.smooth([1.0, float("inf")], 1)[1])


def test_a_single_lucky_minibatch_does_not_count_once_smoothed():
    losses = [2.0, 1.8, 0.4, 1.6, 1.2, 0.9, 0.8, 0.7]
    assert analysis.first_below(losses, 1.0, window=1) == 2  # the noisy dip
    assert analysis.first_below(losses, 1.0, window=3) == 5  # mean of 1.2, 0.9, 0.8
    assert analysis.first_below(losses, 0.1, window=3) is None


def test_at_target_reads_every_axis_at_the_first_step_below_target():
    r = run("greedy", 8, 1e-3, [3, 2, 1, 0.5, 0.4], ideal_per_step=10.0, flops_per_example=2.0)
    assert analysis.at_target(r, 1.0, window=1) == {"steps": 3, "ideal_time": 30.0, "compute": 48.0,
                                                    "wall_time": 1.5}
    assert analysis.at_target(r, 0.1, window=1) is None


def test_best_learning_rate_per_method_and_batch_size():
    runs = [
        run("backprop", 8, 1e-3, [3, 2, 1, 0.5]),        # reaches 1.0 at step 3
        run("backprop", 8, 3e-3, [3, 0.9, 0.5, 0.4]),    # at step 2: the best rate for batch 8
        run("backprop", 32, 1e-3, [3, 2, 1.5, 1.2]),     # never reaches 1.0, but ends lower
        run("backprop", 32, 3e-3, [3, 2, 1.8, 1.7]),
        run("greedy", 8, 1e-3, [3, 2, 0.9, 0.9]),
        run("greedy", 8, 3e-3, [3, 2, 0.8, 0.5]),        # same step as 1e-3; lower final loss breaks the tie
    ]
    best = analysis.best_runs(runs, target=1.0, window=1)
    got = {(e["label"], e["batch_size"]): (e["learning_rate"], e["steps"], e["reached"]) for e in best}
    assert got == {("backprop", 8): (3e-3, 2, True), ("backprop", 32): (1e-3, None, False),
                   ("greedy", 8): (3e-3, 3, True)}
    assert [e["label"] for e in best][0] == "backprop"  # the baseline comes first in tables
    entry = next(e for e in best if e["label"] == "backprop" and e["batch_size"] == 8)
    assert (entry["ideal_time"], entry["compute"]) == (20.0, 32.0)
    assert entry["final_loss"] == pytest.approx(0.4)


def test_lower_left_pareto_frontier():
    points = [(1, 10), (2, 5), (3, 6), (4, 1), (2, 8), (5, 1), (0.5, 12), (4, 1)]
    assert analysis.pareto_frontier(points) == [6, 0, 1, 3]
    assert analysis.pareto_frontier([]) == []


def test_frontiers_per_method_skip_runs_that_missed_the_target():
    best = [
        {"problem": "p", "label": "greedy", "reached": True, "ideal_time": 1.0, "compute": 9.0},
        {"problem": "p", "label": "greedy", "reached": True, "ideal_time": 2.0, "compute": 10.0},
        {"problem": "p", "label": "greedy", "reached": True, "ideal_time": 3.0, "compute": 4.0},
        {"problem": "p", "label": "greedy", "reached": False, "ideal_time": None, "compute": None},
    ]
    front = analysis.frontiers(best)[("p", "greedy")]
    assert [(e["ideal_time"], e["compute"]) for e in front] == [(1.0, 9.0), (3.0, 4.0)]


def test_steps_vs_batch_and_critical_batch_size():
    best = [{"problem": "p", "label": "backprop", "batch_size": b, "steps": s}
            for b, s in [(64, 40), (8, 200), (16, 100), (32, 60), (128, None)]]
    pairs = analysis.steps_vs_batch(best)[("p", "backprop")]
    assert pairs == [(8, 200), (16, 100), (32, 60), (64, 40), (128, None)]
    # fewest examples 1600 (batch 8 or 16) over fewest steps 40
    assert analysis.critical_batch_size(pairs) == pytest.approx(1600 / 40)
    assert analysis.critical_batch_size([(8, 10), (16, None)]) is None


def test_headline_ratios_at_the_largest_batch_size():
    runs = [run("backprop", 8, 1e-3, [3, 0.5]), run("backprop", 64, 1e-3, [3, 2, 2, 0.5]),
            run("greedy", 64, 1e-3, [3, 2, 2, 2, 2, 0.5], ideal_per_step=2.0, flops_per_example=3.0),
            run("overlapping", 64, 1e-3, [3, 2, 2, 0.5], ideal_per_step=4.0, flops_per_example=4.0),
            run("chunked", 64, 1e-3, [3, 3, 3])]
    row = analysis.headline(analysis.best_runs(runs, target=1.0, window=1))["p"]
    assert row["batch_size"] == 64
    assert row["best_local"]["label"] == "greedy"  # ideal time 12 beats overlapping's 16
    assert row["ideal_time_ratio"] == pytest.approx(12 / 40)
    assert row["compute_ratio"] == pytest.approx((6 * 64 * 3.0) / (4 * 64 * 2.0))
    assert row["steps_ratio"] == pytest.approx(6 / 4)
    # no ratio without a baseline that reached the target
    missing = analysis.headline(analysis.best_runs(runs[2:], target=1.0, window=1))["p"]
    assert missing["baseline"] is None and missing["ideal_time_ratio"] is None
    assert math.isclose(missing["best_local"]["ideal_time"], 12.0)


def test_paired_bootstrap_interval_covers_the_mean_and_narrows_with_seeds():
    rng = np.random.default_rng(1)
    noise = {s: rng.normal(0, 1.0) for s in range(40)}  # shared by both methods of a seed: pairing removes it
    base = {s: 10.0 + noise[s] + rng.normal(0, 0.1) for s in range(40)}
    other = {s: 9.5 + noise[s] + rng.normal(0, 0.1) for s in range(40)}
    few = analysis.paired_bootstrap({s: base[s] for s in range(4)}, other)
    many = analysis.paired_bootstrap(base, other)
    assert many["n"] == 40 and few["n"] == 4
    for out in (few, many):
        assert out["low"] <= out["mean"] <= out["high"]
    # the 0.5 difference lies inside the interval and the interval excludes 0, though each method's
    # own spread over seeds (std 1) is twice the difference
    assert many["low"] < 0.5 < many["high"] and many["low"] > 0
    assert many["high"] - many["low"] < few["high"] - few["low"]


def test_paired_bootstrap_pairs_by_seed_and_skips_missing_values():
    out = analysis.paired_bootstrap({0: 3.0, 1: 5.0, 2: float("nan"), 3: 1.0}, {0: 1.0, 1: 2.0, 2: 0.0, 4: 0.0})
    assert out["n"] == 2 and out["mean"] == pytest.approx(2.5)  # seeds 0 and 1: differences 2 and 3
    assert 2.0 <= out["low"] <= out["high"] <= 3.0
    same = analysis.paired_bootstrap({0: 1.0}, {0: 0.25})
    assert same["low"] == same["high"] == same["mean"] == 0.75
    assert analysis.paired_bootstrap({0: 1.0}, {1: 1.0}) == {"mean": None, "low": None, "high": None, "n": 0,
                                                             "level": 0.95}
