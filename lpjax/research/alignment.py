"""Gradient-alignment probe: how close is each stage's local gradient to the true gradient?

For stage k the *local* gradient is what the method's update uses for the body parameters θ_k:
``Σ_j λ_j ∂L_j/∂θ_k`` over the losses j whose window reaches k, each backpropagated only through
stages ``j-w+1 .. j`` (docs/semantics.md). The *true* gradient is ``∂L_K/∂θ_k``, the final head's loss
backpropagated through the whole network. The probe reports their cosine similarity per stage.

Backprop's local gradient is the true one (cosine 1 everywhere), as is the last stage's under any
local method (its only loss is L_K). The paper's finding is that, for the other stages, the cosine
falls with distance from the output.

Both gradients are computed in training mode (batch statistics as a training step would use them),
from the trainer's current stage states; nothing in the trainer changes.
"""

import weakref

import jax
import jax.numpy as jnp
import numpy as np

_PROBES = weakref.WeakKeyDictionary()  # trainer -> its jitted probe, so repeated calls do not recompile


def gradient_alignment(trainer, x, y) -> list:
    """Cosine similarity per stage between the local and the true body gradient on the batch ``(x, y)``.

    ``None`` for a stage whose local or true gradient is zero (no loss reaches it, or no parameters).
    """
    if trainer not in _PROBES:
        _PROBES[trainer] = jax.jit(_make_probe(trainer.rules, trainer.method))
    # executors may keep stages on different devices; the probe runs on one
    states = jax.device_get(list(trainer.stage_states))
    cosines = jax.device_get(_PROBES[trainer](states, np.asarray(x), np.asarray(y)))
    return [None if not np.isfinite(c) else float(c) for c in cosines]


def _make_probe(rules, method):
    num_stages = len(rules)
    reach = method.reach(num_stages)
    weights = [rule.weight for rule in rules]

    def body(k, states, bp, h):
        rule = rules[k]
        return rule.apply_body(bp, states[k].rest["body"], h)[0]

    def loss_through(first, last, states, body_params, h, y, weight):
        """``weight · L_last`` with the gradient flowing through the bodies of stages first..last."""
        for offset, bp in enumerate(body_params):
            h = body(first + offset, states, bp, h)
        rule = rules[last]
        return weight * rule.head_loss(states[last].params["head"], states[last].rest["head"], h, y)[0]

    def probe(states, x, y):
        bodies = [s.params["body"] for s in states]
        inputs = [x]  # h_{k-1} for every stage: the stop-gradient boundary of a window starting at k
        for k in range(num_stages - 1):
            inputs.append(jax.lax.stop_gradient(body(k, states, bodies[k], inputs[k])))
        local = [jax.tree.map(jnp.zeros_like, b) for b in bodies]
        for j in range(num_stages):
            if weights[j] == 0.0:
                continue
            first = max(0, j - reach + 1)
            grads = jax.grad(loss_through, argnums=3)(first, j, states, bodies[first:j + 1], inputs[first], y,
                                                      weights[j])
            for offset, g in enumerate(grads):
                local[first + offset] = jax.tree.map(jnp.add, local[first + offset], g)
        last = num_stages - 1
        true = jax.grad(loss_through, argnums=3)(0, last, states, bodies, x, y, 1.0)
        return jnp.stack([_cosine(a, b) for a, b in zip(local, true)])

    return probe


def _cosine(a, b):
    a = jnp.concatenate([jnp.ravel(v).astype(jnp.float32) for v in jax.tree.leaves(a)] or [jnp.zeros(1)])
    b = jnp.concatenate([jnp.ravel(v).astype(jnp.float32) for v in jax.tree.leaves(b)] or [jnp.zeros(1)])
    norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    cosine = jnp.clip(jnp.dot(a, b) / jnp.where(norms > 0, norms, 1.0), -1.0, 1.0)  # rounding can pass 1
    return jnp.where(norms > 0, cosine, jnp.nan)
