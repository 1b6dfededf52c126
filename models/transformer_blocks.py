"""Layers of the decoder-only Transformer LM (pre-LN, causal)."""

from __future__ import annotations

import jax
from flax import nnx


class TokenEmbedding(nnx.Module):
    """int tokens [B, T] -> token embedding + learned absolute position embedding [B, T, dim]."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.tokens = nnx.Embed(vocab_size, dim, embedding_init=init, rngs=rngs)
        self.positions = nnx.Param(init(rngs.params(), (seq_len, dim)))
        self.dtype = None  # the compute dtype (models/precision.py); None: the parameters' own


    def __call__(self, tokens):
        length = tokens.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"sequence of {length} tokens exceeds seq_len {self.positions.shape[0]}")
        embedded = self.tokens(tokens) + self.positions[...][:length]
        return embedded if self.dtype is None else embedded.astype(self.dtype)


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention where position t only sees positions <= t."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.reshape(batch, length, dim))


class FeedForward(nnx.Module):
    """Position-wise Dense -> GELU -> Dense."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class TransformerBlock(nnx.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x)).

    Every block of a model has the same parameter tree and shapes, so an SPMD
    executor can stack consecutive blocks on a leading axis.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = CausalSelfAttention(dim, heads, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = FeedForward(dim, mlp_ratio * dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))
