"""Balanced stage splits (lpjax.research.balance) against optima worked out by hand and by exhaustive search."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

import lpjax
from lpjax.research.balance import LayerCosts, balanced_split, descend_min_max, min_max_partition
from lpjax.config.build import build_experiment
from lpjax.models import mlp
from lpjax.training.run_summary import describe


def additive(costs, heads=None):
    heads = heads or [0] * len(costs)
    return lambda i, j: sum(costs[i:j]) + heads[j - 1]


@pytest.mark.parametrize("costs, parts, points, stage_costs", [
    ([1, 2, 3, 4, 5], 2, [3], [6, 9]),  # 1+2+3 | 4+5; cutting at 4 gives 10
    ([7, 2, 5, 10, 8], 2, [3], [14, 18]),
    ([7, 2, 5, 10, 8], 3, [3, 4], [14, 10, 8]),  # 7+2 | 5+10 | 8 costs 15, 7 | 2+5 | 10+8 costs 18
    ([1, 1, 1, 1, 1, 1, 1, 9], 2, [7], [7, 9]),  # a heavy last layer alone
    ([5], 1, [], [5]),
])
def test_min_max_partition_finds_the_hand_optimum(costs, parts, points, stage_costs):
    assert min_max_partition(len(costs), parts, additive(costs)) == (points, stage_costs)


def test_the_head_a_stage_carries_moves_the_cut():
    # four equal layers; a stage ending at the last layer carries a head of 10 (the output head)
    points, costs = min_max_partition(4, 2, additive([1, 1, 1, 1], heads=[0, 0, 0, 10]))
    assert points == [3] and costs == [3, 11]  # an even cut would cost max(2, 12) = 12


def test_a_stage_does_not_pay_its_first_layers_input_gradient():
    layers = LayerCosts(flops=[4, 4, 4, 4, 4], input_grad_flops=[0, 3, 3, 3, 3], head_flops=[0] * 5,
                        memory=[1] * 5, head_memory=[0] * 5)
    # cut at 2: 4+4 | (4+4+4-3) = 8 | 9; at 3: 12 | 5; at 1: 4 | 13
    assert min_max_partition(5, 2, layers.stage_cost("flops")) == ([2], [8, 9])
    # a tie (2 | 3 or 3 | 2): the earlier stage ends first
    assert min_max_partition(5, 2, layers.stage_cost("memory")) == ([2], [2, 3])


@pytest.mark.parametrize("seed", range(5))
def test_min_max_partition_matches_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    costs = [float(c) for c in rng.integers(1, 20, size=9)]
    heads = [float(h) for h in rng.integers(0, 8, size=9)]
    cost = additive(costs, heads)
    for parts in (2, 3, 4):
        best = min(max(cost(i, j) for i, j in zip((0, *cut), (*cut, 9)))
                   for cut in itertools.combinations(range(1, 9), parts - 1))
        points, stage_costs = min_max_partition(9, parts, cost)
        assert max(stage_costs) == best
        assert stage_costs == [cost(i, j) for i, j in zip((0, *points), (*points, 9))]


def working_set(costs, heads):
    """Like a stage's memory: what its layers keep plus the largest layer's working space, plus its head;
    it grows with the run but does not add up over layers."""
    return lambda i, j: sum(costs[i:j]) + max(costs[i:j]) + heads[j - 1]


@pytest.mark.parametrize("seed", range(5))
def test_descend_min_max_matches_exhaustive_search_on_growing_costs(seed):
    rng = np.random.default_rng(seed)
    costs = [float(c) for c in rng.integers(1, 20, size=10)]
    heads = [float(h) for h in rng.integers(0, 8, size=10)]
    evaluated = set()

    def cost(i, j):
        evaluated.add((i, j))
        return working_set(costs, heads)(i, j)

    for parts in (2, 3, 4):
        cuts = list(itertools.combinations(range(1, 10), parts - 1))
        best = min(max(cost(i, j) for i, j in zip((0, *cut), (*cut, 10))) for cut in cuts)
        evaluated.clear()
        even = lpjax.core.staging.even_split_points(10, parts)
        points, stage_costs = descend_min_max(10, parts, cost, [even])
        assert max(stage_costs) == best
        assert stage_costs == [cost(i, j) for i, j in zip((0, *points), (*points, 10))]
        assert len(evaluated) < 55  # fewer runs measured than the 55 a dynamic program reads


def test_descend_min_max_is_never_worse_than_its_best_candidate():
    # a cost that does not grow with the run (a dip at 3..5) breaks exactness, not the guarantee
    cost = lambda i, j: {(3, 5): 1.0}.get((i, j), float(j - i) ** 2)  # noqa: E731
    for candidates in ([[2, 4]], [[3, 5]], [[1, 2], [3, 5]]):
        points, stage_costs = descend_min_max(8, 3, cost, candidates)
        assert max(stage_costs) <= min(max(cost(i, j) for i, j in zip((0, *c), (*c, 8))) for c in candidates)


def test_memory_balanced_cut_holds_no_more_than_the_even_cut():
    """By the memory table's own accounting (each stage compiled through a Trainer, state donated):
    the memory-balanced cut's largest stage is at most the even cut's; here it is less, the 784-wide
    first layer (its weights, gradient sum and Adam slots) alone in its stage."""
    import optax
    from lpjax.research.memory import stage_breakdowns

    net = mlp(input_shape=(28, 28, 1), num_classes=10, depth=4, width=64, rngs=nnx.Rngs(0))
    split = balanced_split(net, 2, X, Y, by="memory")

    def largest(points):
        model = lpjax.stage_network(net, split_points=points, rngs=nnx.Rngs(1))
        trainer = lpjax.Trainer(model, method=lpjax.Chunked(), optimizer=optax.adam(1e-3))
        return max(part["peak"] for part in stage_breakdowns(trainer, X, Y))

    even = lpjax.core.staging.even_split_points(4, 2)
    assert split.points == [1] and even == [2]
    assert largest(split.points) == max(split.costs) < largest(even) == max(split.even_costs)


def test_too_many_stages_is_a_config_error():
    with pytest.raises(lpjax.ConfigError, match="cannot cut 3 layers into 4 stages"):
        min_max_partition(3, 4, additive([1, 1, 1]))


X = jax.ShapeDtypeStruct((8, 28, 28, 1), np.float32)
Y = jax.ShapeDtypeStruct((8,), np.int32)


def test_measured_mlp_layers_and_a_wide_first_layer_alone_in_its_stage():
    net = mlp(input_shape=(28, 28, 1), num_classes=10, depth=4, width=64, rngs=nnx.Rngs(0))
    costs = balanced_split(net, 2, X, Y)
    # XLA: [B, n] @ [n, m] is 2·B·n·m FLOPs; forward, weight gradient and input gradient of a hidden layer
    layers = lpjax.research.balance.measure_layers(net, X, Y)
    assert layers.input_grad_flops[1] == 2 * 64 * 64
    assert 6 * 64 * 64 <= layers.flops[1] <= 6 * 64 * 64 + 10 * 64  # plus the bias and ReLU
    assert layers.flops[0] >= 4 * 784 * 64  # no input gradient into the data
    # the 784-wide first layer costs more than the other three together: it gets a stage to itself
    assert costs.points == [1]
    assert costs.shares[0] > 0.5 and sum(costs.shares) == pytest.approx(1.0)
    model = lpjax.stage_network(net, num_stages=2, split_points="balanced", example=(X, Y), rngs=nnx.Rngs(1))
    assert [s.num_layers for s in model] == [1, 3] and model.split.points == [1]
    assert "balanced by FLOPs at layers [1]: stage shares" in model.split.describe()


def test_config_balanced_split_shows_shares_in_the_run_header():
    config = {"dataset": {"name": "digits"}, "model": {"name": "deep_mlp", "depth": 4, "width": 16},
              "method": {"name": "chunked"}, "stages": 2, "split_points": "balanced_memory", "num_steps": 1,
              "batch_size": 16}
    experiment = build_experiment(config)
    assert experiment.split is not None and experiment.split.by == "memory"
    assert len(experiment.model) == 2
    assert "balanced by memory at layers" in describe(experiment)
    with pytest.raises(lpjax.ConfigError, match="'balancd' is not a cut"):
        build_experiment(dict(config, split_points="balancd"))
