"""Cost accounting against FLOPs counted by hand for bias-free Dense stages (lpjax.research.costs)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.research.costs import cost_dict, seconds, step_cost

B, DIN, D, C = 4, 6, 5, 3  # batch, input width, hidden width, classes
X = jax.ShapeDtypeStruct((B, DIN), np.float32)
Y = jax.ShapeDtypeStruct((B,), np.int32)


def dense_model(num_stages):
    """Stage k: body Dense(DIN or D -> D), head Dense(D -> C); no biases, no activations, so a
    stage's body FLOPs are exactly its matmuls."""
    rngs = nnx.Rngs(0)
    return lpjax.StagedModel([
        lpjax.Stage(nnx.Linear(DIN if k == 0 else D, D, use_bias=False, rngs=rngs),
                    nnx.Linear(D, C, use_bias=False, rngs=rngs))
        for k in range(num_stages)])


def costs(method, num_stages=2):
    return step_cost(lpjax.Trainer(dense_model(num_stages), method=method, optimizer=optax.sgd(0.1)), X, Y)


# XLA counts [B, n] @ [n, m] as 2·B·n·m FLOPs.
FWD0, FWD1 = 2 * B * DIN * D, 2 * B * D * D
HEAD_MATMULS = 3 * 2 * B * D * C  # logits, dW, dh
# The softmax cross-entropy adds elementwise work per logit (exp, max, sums, the gradient); XLA counted
# about 12 FLOPs per logit on jax 0.10 and 0.12, so allow up to 20.
HEAD_EXTRA_PER_LOGIT = 20


@pytest.fixture(scope="module")
def greedy():
    return costs(lpjax.Greedy())


@pytest.fixture(scope="module")
def backprop():
    return costs(lpjax.Backprop())


def test_forward_and_backward_flops_are_the_matmuls(greedy, backprop):
    for step in (greedy, backprop):
        assert [s.forward.flops for s in step.stages] == [FWD0, FWD1]
    # greedy: no gradient leaves a stage, so a backward pass is the weight gradient alone
    assert [s.backward.flops for s in greedy.stages] == [FWD0, FWD1]
    # backprop: stage 1 also sends the input gradient to stage 0 (one more matmul); stage 0's input is data
    assert [s.backward.flops for s in backprop.stages] == [FWD0, 2 * FWD1]


def test_heads_count_only_where_the_method_trains_them(greedy, backprop):
    for s in greedy.stages + backprop.stages[1:]:
        assert HEAD_MATMULS <= s.head.flops <= HEAD_MATMULS + HEAD_EXTRA_PER_LOGIT * B * C
    assert backprop.stages[0].head.flops == 0  # backprop never uses the auxiliary head


def test_overlapping_stage_pays_one_backward_pass_per_loss_in_its_window():
    step = costs(lpjax.Overlapping(2))
    first, last = step.stages
    assert (first.backward_passes, last.backward_passes) == (2, 1)
    assert first.backward.flops == 2 * FWD0  # its own loss and stage 1's, both weight gradients only
    assert last.backward.flops == 2 * FWD1  # its own loss, with the input gradient sent to stage 0


def test_ideal_time_and_compute_follow_the_papers_model(greedy, backprop):
    per_stage = [s.flops_per_example for s in greedy.stages]
    assert per_stage[0] == pytest.approx((FWD0 + FWD0 + greedy.stages[0].head.flops) / B)
    assert greedy.flops_per_example == pytest.approx(sum(per_stage))
    assert greedy.ideal_flops_per_step == pytest.approx(max(per_stage))  # stages run in parallel
    # backprop: one example through the whole network (last head only) per step, whatever the batch
    whole = (FWD0 + FWD0 + FWD1 + 2 * FWD1 + backprop.stages[1].head.flops) / B
    assert backprop.flops_per_example == pytest.approx(whole)
    assert backprop.ideal_flops_per_step == pytest.approx(whole)
    np.testing.assert_allclose(backprop.compute([1, 10], batch_size=64), [64 * whole, 640 * whole])
    np.testing.assert_allclose(greedy.ideal_time([1, 10]), [max(per_stage), 10 * max(per_stage)])
    np.testing.assert_allclose(seconds(greedy.ideal_time(10), 1e9), 10 * max(per_stage) / 1e9)


def test_update_and_memory_are_reported_but_not_per_example(greedy):
    assert all(s.update.flops > 0 for s in greedy.stages)
    totals = greedy.totals()
    assert totals["update_flops"] == sum(s.update.flops for s in greedy.stages)
    assert greedy.flops_per_example * B == pytest.approx(
        totals["forward_flops"] + totals["backward_flops"] + totals["head_flops"])
    # a stage's compiled step at least holds its own weights (float32)
    assert greedy.stages[0].peak_bytes >= 4 * (DIN * D + D * C)
    assert greedy.peak_bytes_per_device == max(s.peak_bytes for s in greedy.stages)
    assert greedy.to_dict()["stages"][1]["flops_per_example"] == pytest.approx(greedy.stages[1].flops_per_example)


@pytest.mark.parametrize("method", [lpjax.Backprop(), lpjax.Overlapping(2)])
def test_whole_step_computes_the_reference_step(method):
    """``whole_step``, the program whose peak is backprop's memory on one device, is one step of the
    method: the reference executor's parameters after one step on the same batch, bit for bit or close."""
    from lpjax.research.costs import whole_step
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(B, DIN)).astype(np.float32), rng.integers(0, C, size=(B,)).astype(np.int32)
    trainer = lpjax.Trainer(dense_model(3), method=method, optimizer=optax.adam(1e-2))
    before = [jax.tree.map(np.asarray, s) for s in trainer.stage_states]
    after = jax.jit(lambda s: whole_step(trainer.rules, s, x, y))(before)
    trainer.step(x, y)
    for ours, reference in zip(after, trainer.stage_states):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours.params, reference.params)
    assert not np.allclose(after[0].params["body"]["kernel"], before[0].params["body"]["kernel"])


def test_backprop_memory_per_device_is_its_whole_step_not_the_sum_of_its_stages(backprop, greedy):
    """Backprop on one device holds every stage; its peak is the whole step compiled as one program,
    which holds at least every stage's parameters, and less than the stages' separately compiled
    programs added up (each counts its own temporaries and the activations between stages again)."""
    assert backprop.peak_bytes_per_device == backprop.step_peak_bytes
    assert backprop.peak_bytes_per_device < sum(s.peak_bytes for s in backprop.stages)
    assert backprop.peak_bytes_per_device >= 4 * (DIN * D + D * D + D * C)
    assert greedy.step_peak_bytes is None  # local methods: the largest stage


def test_cost_analysis_as_dict_or_list_of_dicts():
    # jax returns a dict now and returned a list with one dict per computation before
    assert cost_dict({"flops": 3.0}) == {"flops": 3.0}
    assert cost_dict([{"flops": 3.0}, {"flops": 1.0}]) == {"flops": 3.0}
    assert cost_dict(None) == {} and cost_dict([]) == {}


def test_bad_inputs_are_one_line_config_errors():
    trainer = lpjax.Trainer(dense_model(1), method=lpjax.Chunked(), optimizer=optax.sgd(0.1))
    with pytest.raises(lpjax.ConfigError, match="leading batch axis"):
        step_cost(trainer, np.zeros(()), np.zeros(()))
    with pytest.raises(lpjax.ConfigError, match="device_flops"):
        seconds(1.0, 0)


# -- every model of the zoo ---------------------------------------------------------------------------
# Small or CIFAR shapes; FLOPs from the lowered programs (compile=False), which traces exactly what the
# compiled path traces (the BatchNorm bug lived there) in a fraction of the time.
def _images(h, w, c):
    return jax.ShapeDtypeStruct((2, h, w, c), np.float32), jax.ShapeDtypeStruct((2,), np.int32)


ZOO_INPUTS = {
    "mlp": ({"input_shape": (28, 28, 1), "num_classes": 10}, _images(28, 28, 1)),
    "deep_mlp": ({"input_shape": (28, 28, 1), "num_classes": 10}, _images(28, 28, 1)),
    "resnet18": ({"num_classes": 10}, _images(32, 32, 3)),
    "resnet32": ({"num_classes": 10}, _images(32, 32, 3)),
    "resnet110": ({"num_classes": 10}, _images(32, 32, 3)),
    "resnet50": ({"num_classes": 10}, _images(32, 32, 3)),
    "mnist_resnet": ({"num_classes": 10}, _images(28, 28, 1)),
    "transformer_lm": ({"seq_len": 16, "depth": 2, "dim": 32, "heads": 2},
                       (jax.ShapeDtypeStruct((2, 16), np.int32), jax.ShapeDtypeStruct((2, 16), np.int32))),
}


def test_the_zoo_list_above_covers_every_registered_model():
    from lpjax.models import MODELS
    assert set(MODELS) <= set(ZOO_INPUTS), f"add {sorted(set(MODELS) - set(ZOO_INPUTS))} to ZOO_INPUTS"


@pytest.mark.parametrize("name", sorted(ZOO_INPUTS))
def test_costs_run_on_every_zoo_model(name):
    from lpjax.models import MODELS
    if name not in MODELS:
        pytest.skip(f"{name} is not registered in this checkout")
    options, (x, y) = ZOO_INPUTS[name]
    network = MODELS[name](**options, rngs=nnx.Rngs(0))
    num_stages = min(3, len(network.layers))
    model = lpjax.stage_network(network, num_stages=num_stages, rngs=nnx.Rngs(1))
    trainer = lpjax.Trainer(model, method=lpjax.Overlapping(2), optimizer=optax.adam(1e-3))
    step = step_cost(trainer, x, y, compile=False)
    assert len(step.stages) == num_stages
    for s in step.stages:
        assert s.forward.flops > 0 and s.backward.flops > 0 and s.head.flops > 0, (name, s)
        assert s.update.flops > 0
    assert step.ideal_flops_per_step < step.flops_per_example


def test_compiled_costs_of_a_batchnorm_model_match_the_lowered_ones():
    """The compiled path, with BatchNorm in every layer, gives peak memory; the lowered programs' forward
    FLOPs are within a few per cent of the compiled ones, the backward within a third (XLA rewrites
    strided convolutions' gradients while compiling)."""
    from lpjax.models import mnist_resnet
    network = mnist_resnet(width=4, blocks_per_stage=(0, 1, 1, 1), rngs=nnx.Rngs(0))
    model = lpjax.stage_network(network, num_stages=2, rngs=nnx.Rngs(1))
    trainer = lpjax.Trainer(model, method=lpjax.Chunked(), optimizer=optax.sgd(0.1))
    x, y = _images(28, 28, 1)
    compiled, lowered = step_cost(trainer, x, y), step_cost(trainer, x, y, compile=False)
    assert all(s.peak_bytes > 0 for s in compiled.stages)
    assert lowered.peak_bytes_per_device is None
    for low, full in zip(lowered.stages, compiled.stages):
        assert low.forward.flops == pytest.approx(full.forward.flops, rel=0.05)
        assert low.backward.flops == pytest.approx(full.backward.flops, rel=0.35)
    assert lowered.flops_per_example == pytest.approx(compiled.flops_per_example, rel=0.35)
