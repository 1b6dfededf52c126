"""ResNets as a flat list of layers: the stem is layer 0, each residual block one layer."""

from __future__ import annotations

import functools
from typing import Sequence

from flax import nnx

from .base import Network, check_head_index
from .conv_blocks import BasicBlock, Bottleneck, CifarStem, ImageNetStem
from .heads import DeepPoolHead, PoolLinear, aux_head_depth, check_aux_head

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _pool_head(channels, num_classes, head_conv, aux, i, rngs):
    check_head_index(i, len(channels))
    depth = aux_head_depth(aux.get("head_depth", 0), aux.get("head_pyramid", False), i, len(channels))
    last = i == len(channels) - 1
    if depth == 0 and (last or not (aux.get("head_norm") or aux.get("head_temperature"))):
        return PoolLinear(channels[i], num_classes, hidden_conv=head_conv, rngs=rngs)
    return DeepPoolHead(channels[i], num_classes, depth=depth, width=aux.get("head_width"),
                        norm=aux.get("head_norm", False), temperature=aux.get("head_temperature", False), rngs=rngs)


def resnet(
    stage_sizes: Sequence[int],
    block="basic",
    *,
    num_classes: int,
    in_channels: int = 3,
    width: int = 64,
    stage_widths: Sequence[int] | None = None,
    stem: str = "cifar",
    stem_stride: int = 1,
    shortcut: str = "projection",
    head_conv: int = 0,
    name: str = "resnet",
    rngs: nnx.Rngs,
    head_depth: int = 0,
    head_width: int | None = None,
    head_norm: bool = False,
    head_temperature: bool = False,
    head_pyramid: bool = False,
) -> Network:
    """Generic ResNet builder.

    ``block`` is ``"basic"``, ``"bottleneck"`` or a block class with the same
    constructor. Stage ``s`` has ``stage_sizes[s]`` blocks of width
    ``stage_widths[s]`` (default ``width * 2**s``); every stage after the first
    halves the resolution in its first block. ``stem`` is ``"cifar"`` (3x3 conv,
    stride ``stem_stride``) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool), with
    ``width`` output channels. ``shortcut`` is ``"projection"`` (1x1 ConvBN) or
    ``"pad"`` (He et al.'s parameter-free option A).

    ``head_conv`` puts a 3x3 conv of that many channels in every head (0: pool and Dense only).
    The ``head_*`` keywords configure the auxiliary heads (never the output head): ``head_depth``
    conv layers of ``head_width`` channels before pooling, ``head_norm``, ``head_temperature``
    (learned temperature and bias) and ``head_pyramid`` (AugLocal: depth shrinks towards the
    output); see ``models.heads.DeepPoolHead``. ``name`` names the returned network.

    Returns:
      A ``Network`` of 1 + sum(stage_sizes) layers (stem, then one layer per block), taking NHWC
      images with ``in_channels`` channels. Its ``natural_splits`` are the first blocks of stages
      2.., i.e. the layers that downsample; cutting there gives one stage per resolution, with the
      stem riding along in the first stage. An unknown ``stem`` or ``block`` name, or
      ``stage_widths`` of another length than ``stage_sizes``, is a ValueError.
    """
    block_cls = BLOCKS[block] if isinstance(block, str) else block
    aux_head = check_aux_head(dict(head_depth=head_depth, head_width=head_width, head_norm=head_norm,
                                   head_temperature=head_temperature, head_pyramid=head_pyramid))
    if stage_widths is None:
        stage_widths = [width * 2**s for s in range(len(stage_sizes))]
    if len(stage_widths) != len(stage_sizes):
        raise ValueError("stage_widths and stage_sizes must have the same length")

    if stem == "cifar":
        layers = [CifarStem(in_channels, width, stride=stem_stride, rngs=rngs)]
    elif stem == "imagenet":
        layers = [ImageNetStem(in_channels, width, rngs=rngs)]
    else:
        raise ValueError(f"unknown stem {stem!r}; use 'cifar' or 'imagenet'")
    channels = [width]
    natural_splits = []

    for s, (num_blocks, stage_width) in enumerate(zip(stage_sizes, stage_widths)):
        if s > 0:
            natural_splits.append(len(layers))
        for b in range(num_blocks):
            stride = 2 if (s > 0 and b == 0) else 1
            layers.append(block_cls(channels[-1], stage_width, stride, shortcut=shortcut, rngs=rngs))
            channels.append(stage_width * block_cls.expansion)

    return Network(
        layers=layers,
        make_head=functools.partial(_pool_head, tuple(channels), num_classes, head_conv, aux_head),
        natural_splits=tuple(natural_splits),
        name=name,
    )


def cifar_resnet(depth: int, *, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 head_conv: int = 0, rngs: nnx.Rngs) -> Network:
    """He et al. (2016) CIFAR ResNet of ``depth = 6n + 2``: three stages of n basic
    blocks at widths 16/32/64 (scaled by ``width``), option-A shortcuts.

    Returns a ``Network`` named ``resnet{depth}`` of 3n + 1 layers (``resnet`` says the rest); a
    depth that is not 6n + 2 with n >= 1 is a ValueError.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    return resnet((n, n, n), "basic", num_classes=num_classes, in_channels=in_channels,
                  width=width, shortcut="pad", head_conv=head_conv,
                  name=f"resnet{depth}", rngs=rngs)


def resnet32(*, num_classes: int = 10, in_channels: int = 3, width: int = 16,
             head_conv: int = 0, rngs: nnx.Rngs) -> Network:
    """ResNet-32 for CIFAR (~0.46M parameters at width 16): 1 stem + 15 blocks."""
    return cifar_resnet(32, num_classes=num_classes, in_channels=in_channels,
                        width=width, head_conv=head_conv, rngs=rngs)


def resnet110(*, num_classes: int = 10, in_channels: int = 3, width: int = 16,
              head_conv: int = 0, rngs: nnx.Rngs) -> Network:
    """ResNet-110 for CIFAR (~1.7M parameters at width 16): 1 stem + 54 blocks."""
    return cifar_resnet(110, num_classes=num_classes, in_channels=in_channels,
                        width=width, head_conv=head_conv, rngs=rngs)


def resnet18(*, num_classes: int = 10, in_channels: int = 3, width: int = 64,
             head_conv: int = 0, rngs: nnx.Rngs) -> Network:
    """ResNet-18, CIFAR variant: 3x3 stem (no max pool), basic blocks [2, 2, 2, 2]
    at widths 64..512 (scaled by ``width``), projection shortcuts. 1 stem + 8 blocks."""
    return resnet((2, 2, 2, 2), "basic", num_classes=num_classes, in_channels=in_channels,
                  width=width, head_conv=head_conv, name="resnet18", rngs=rngs)


def resnet50(*, num_classes: int = 1000, in_channels: int = 3, width: int = 64,
             head_conv: int = 0, rngs: nnx.Rngs) -> Network:
    """ResNet-50, ImageNet variant: 7x7/2 stem + max pool, bottleneck blocks
    [3, 4, 6, 3], output widths 256..2048 at ``width=64``. 1 stem + 16 blocks."""
    return resnet((3, 4, 6, 3), "bottleneck", num_classes=num_classes, in_channels=in_channels,
                  width=width, stem="imagenet", head_conv=head_conv, name="resnet50", rngs=rngs)


def mnist_resnet(*, num_classes: int = 10, in_channels: int = 1, width: int = 16,
                 blocks_per_stage: Sequence[int] = (2, 2, 2, 2), head_conv: int = 0,
                 rngs: nnx.Rngs, head_depth: int = 0, head_width: int | None = None, head_norm: bool = False,
                 head_temperature: bool = False, head_pyramid: bool = False) -> Network:
    """A small ResNet for 28x28 digits that trains in about a minute on two CPU cores.

    The stride-2 stem brings 28x28 down to 14x14 at once (full-resolution convs
    dominated the cost and buy nothing on MNIST); four stages of basic blocks
    follow at widths ``width * (1, 2, 4, 4)`` and resolutions 14/7/4/2. With the
    default two blocks per stage that is 1 + 8 = 9 layers, so a 4-stage cut at
    ``natural_splits`` (3, 5, 7) gives every stage at least two layers. The last
    stage does not widen further: at 2x2 the extra channels cost time, not accuracy.
    """
    multipliers = (1, 2, 4, 4)
    if len(blocks_per_stage) != len(multipliers):
        raise ValueError("mnist_resnet has exactly four stages")
    return resnet(tuple(blocks_per_stage), "basic", num_classes=num_classes,
                  in_channels=in_channels, width=width,
                  stage_widths=[width * m for m in multipliers], stem_stride=2,
                  head_conv=head_conv, name="mnist_resnet", rngs=rngs,
                  head_depth=head_depth, head_width=head_width, head_norm=head_norm,
                  head_temperature=head_temperature, head_pyramid=head_pyramid)
