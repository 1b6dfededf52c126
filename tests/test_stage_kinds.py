"""One traced task per kind of stage (lpjax/executors/spmd/program.py ``stage_kinds``): stages whose
tasks trace to the same program share one copy in the device program, unequal stages keep their own,
and a transformer's blocks are one kind whatever the number of stages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.executors.spmd.program import stage_kinds
from lpjax.models import transformer_lm
from lpjax.schedules import Streaming
from tiny import assert_trees_close, stage_params


def _scaled(weight):
    return lambda x, w: (jnp.tanh(x @ w) * weight,)


def test_stages_with_equal_programs_share_a_kind_and_a_different_constant_makes_its_own():
    example = (jnp.zeros((4, 8)), jnp.zeros((8, 8)))
    branches = [[_scaled(1.0)], [_scaled(1.0)], [_scaled(np.arange(8.0))], [_scaled(np.arange(8.0))], [_scaled(2.0)]]
    kind_of, representatives = stage_kinds(branches, example)
    assert kind_of == [0, 0, 1, 1, 2]
    assert representatives == [0, 2, 4]


def test_stages_with_different_shapes_or_branch_counts_are_different_kinds():
    example = (jnp.zeros((4, 8)), jnp.zeros((8, 8)))
    wide = lambda x, w: (jnp.concatenate([x, x], -1),)
    kind_of, _ = stage_kinds([[_scaled(1.0)], [wide], [_scaled(1.0), _scaled(1.0)]], example)
    assert kind_of == [0, 1, 2]


def _lm_trainer(num_stages, layout):
    rngs = nnx.Rngs(0)
    net = transformer_lm(vocab_size=32, seq_len=8, dim=16, depth=num_stages, heads=2, mlp_ratio=2, rngs=rngs)
    model = lpjax.stage_network(net, split_points=list(range(2, num_stages + 1)), rngs=rngs)
    return lpjax.Trainer(model, method=lpjax.Overlapping(2), optimizer=optax.sgd(0.1, momentum=0.9), schedule=Streaming(2),
                         layout=layout)


@pytest.mark.parametrize("num_stages", [4, 6])
def test_a_transformer_shares_its_middle_blocks_and_still_equals_the_reference(num_stages):
    tokens = np.random.default_rng(0).integers(0, 32, (8, 9)).astype(np.int32)
    trained = []
    for layout in (None, lpjax.Layout(stages=num_stages, executor="spmd")):
        trainer = _lm_trainer(num_stages, layout)
        for _ in range(2):
            trainer.step(tokens[:, :-1], tokens[:, 1:])
        trainer.drain()
        trained.append(stage_params(trainer))
    assert_trees_close(*trained, atol=1e-6)
