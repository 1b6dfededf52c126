"""The gradient-alignment probe: exact for backprop and the last stage, and equal to a hand-written
computation of the local and true gradients with plain Flax."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lpjax
from lpjax.research.alignment import gradient_alignment
from tiny import tiny_batch, tiny_model

X, Y = tiny_batch(16)


def trained(method, num_stages=3, steps=2):
    trainer = lpjax.Trainer(tiny_model(num_stages), method=method, optimizer=optax.adam(1e-2))
    for _ in range(steps):
        trainer.step(X, Y)
    return trainer


def test_backprop_is_aligned_everywhere():
    assert gradient_alignment(trained(lpjax.Backprop()), X, Y) == pytest.approx([1.0] * 3, abs=1e-5)


@pytest.mark.parametrize("method", [lpjax.Greedy(), lpjax.Overlapping(2)], ids=["greedy", "overlapping"])
def test_local_methods_are_exact_only_at_the_last_stage(method):
    cosines = gradient_alignment(trained(method), X, Y)
    assert cosines[-1] == pytest.approx(1.0, abs=1e-5)
    assert all(-1.0 <= c <= 1.0 for c in cosines)
    assert all(abs(c - 1.0) > 1e-3 for c in cosines[:-1])  # a truncated gradient is not the true one


def flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])


def cosine(a, b):
    a, b = flat(a), flat(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("method,window", [(lpjax.Greedy(), 1), (lpjax.Overlapping(2), 2)],
                         ids=["greedy", "overlapping"])
def test_matches_gradients_written_out_by_hand(method, window):
    """Three stages at their initial weights; stage 0's local gradient is dL0/dθ0 (+ dL1/dθ0 through
    stage 1 when the window is 2), the true one dL2/dθ0 through every stage."""
    model = tiny_model(3)
    trainer = lpjax.Trainer(model, method=method, optimizer=optax.adam(1e-2))
    probe = gradient_alignment(trainer, X, Y)
    s0, s1, s2 = model
    ce = lpjax.core.losses.softmax_cross_entropy

    def local(body0):
        h0 = body0(X)
        loss = ce(s0.head(h0), Y)
        if window == 2:
            loss = loss + ce(s1.head(s1.body(h0)), Y)
        return loss

    def true(body0):
        return ce(s2.head(s2.body(s1.body(body0(X)))), Y)

    want = cosine(nnx.grad(local)(s0.body), nnx.grad(true)(s0.body))
    assert probe[0] == pytest.approx(want, abs=1e-5)


def test_loss_weights_scale_but_do_not_turn_the_gradient():
    weighted = gradient_alignment(lpjax.Trainer(tiny_model(3), method=lpjax.Greedy(loss_weights=(0.5, 2.0, 3.0)),
                                                optimizer=optax.sgd(0.0)), X, Y)
    plain = gradient_alignment(lpjax.Trainer(tiny_model(3), method=lpjax.Greedy(),
                                             optimizer=optax.sgd(0.0)), X, Y)
    assert weighted == pytest.approx(plain, abs=1e-5)


def test_a_stage_no_loss_reaches_has_no_alignment():
    cosines = gradient_alignment(lpjax.Trainer(tiny_model(3), method=lpjax.Greedy(loss_weights=(0.0, 1.0, 1.0)),
                                               optimizer=optax.sgd(0.0)), X, Y)
    assert cosines[0] is None and cosines[2] == pytest.approx(1.0, abs=1e-5)
