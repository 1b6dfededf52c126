"""Decoder-only causal Transformer language model as a flat list of layers."""

from __future__ import annotations

import functools

from flax import nnx

from .base import Network, check_head_index
from .heads import DeepLMHead, LMHead, aux_head_depth, check_aux_head
from .transformer_blocks import TokenEmbedding, TransformerBlock


def _lm_head(dim, vocab_size, num_layers, heads, mlp_ratio, aux, i, rngs):
    check_head_index(i, num_layers)
    depth = aux_head_depth(aux.get("head_depth", 0), aux.get("head_pyramid", False), i, num_layers)
    if depth == 0 and (i == num_layers - 1 or not aux.get("head_temperature")):
        return LMHead(dim, vocab_size, rngs=rngs)
    return DeepLMHead(dim, vocab_size, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                      temperature=aux.get("head_temperature", False), rngs=rngs)


def transformer_lm(*, vocab_size: int = 256, seq_len: int, dim: int = 128, depth: int = 4,
                   heads: int = 4, mlp_ratio: int = 4, rngs: nnx.Rngs,
                   head_depth: int = 0, head_temperature: bool = False, head_pyramid: bool = False) -> Network:
    """Pre-LN GPT-style LM: int tokens [B, T] (T <= seq_len) -> logits [B, T, vocab_size].

    Layer 0 is the embedding (token + learned position); layers 1..depth are
    identical Transformer blocks. The embedding is a layer of its own, rather
    than being folded into the first block, so that all blocks stay
    homogeneous. Every cut gets an ``LMHead`` (LayerNorm + Dense). Every block
    boundary is a natural split.

    Args:
      vocab_size: token ids are in [0, vocab_size); every head's output width.
      seq_len: the longest sequence (the learned position table's length).
      dim, depth, heads, mlp_ratio: model width, number of blocks (>= 1, else ValueError), attention
        heads (must divide ``dim``) and the feed-forward width as a multiple of ``dim``.
      rngs: the random streams the layers and heads are initialised from.
      head_depth, head_temperature, head_pyramid: deepen the auxiliary heads (never the output
        head): ``head_depth`` Transformer blocks before the norm and unembedding, a learned
        temperature, depth shrinking towards the output, as for ``resnet``
        (``models.heads.DeepLMHead``).

    Returns:
      A ``Network`` named ``transformer_lm{depth}x{dim}`` of ``depth + 1`` layers.
    """
    aux_head = check_aux_head(dict(head_depth=head_depth, head_temperature=head_temperature,
                                   head_pyramid=head_pyramid))
    if depth < 1:
        raise ValueError(f"transformer depth must be >= 1, got {depth}")
    layers = [TokenEmbedding(vocab_size, seq_len, dim, rngs=rngs)]
    layers += [TransformerBlock(dim, heads, mlp_ratio, rngs=rngs) for _ in range(depth)]
    return Network(
        layers=layers,
        make_head=functools.partial(_lm_head, dim, vocab_size, len(layers), heads, mlp_ratio, aux_head),
        natural_splits=tuple(range(1, len(layers))),
        name=f"transformer_lm{depth}x{dim}",
    )
