"""Decode heads (mmseg semantics): FCN, semantic FPN, UPerNet and the SegFormer all-MLP head.

Every head takes the encoder's list of feature maps and returns class logits at the resolution
of its finest input level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.errors import UserError
from hooktrain.models.config import (
    FCNHeadConfig,
    FPNHeadConfig,
    SegformerHeadConfig,
    UPerHeadConfig,
)


class ConvModule(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU, as mmcv's ConvModule with its usual configs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size, align_corners: bool) -> torch.Tensor:
    """Bilinear resize, a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class DecodeHead(nn.Module):
    """Base: picks the input levels, ends with Dropout2d and a 1x1 classifier (``conv_seg``)."""

    def __init__(self, in_index: list[int], channels: int, num_classes: int, dropout: float, align_corners: bool):
        super().__init__()
        self.in_index = list(in_index)
        self.align_corners = align_corners
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        # mmseg initialises the classifier with N(0, 0.01), which keeps the first losses near log(C).
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Map the selected levels to one ``channels``-wide feature map."""
        raise NotImplementedError

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        fused = self.fuse([features[i] for i in self.in_index])
        return self.conv_seg(self.dropout(fused))


class FCNHead(DecodeHead):
    """mmseg ``FCNHead``: ``num_convs`` 3x3 ConvModules, optionally concatenated with the input."""

    def __init__(self, cfg: FCNHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__([cfg.in_index], cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        in_ch = in_channels[cfg.in_index]
        self.convs = nn.Sequential(
            *[ConvModule(in_ch if i == 0 else cfg.channels, cfg.channels, 3) for i in range(cfg.num_convs)]
        )
        self.conv_cat = ConvModule(in_ch + cfg.channels, cfg.channels, 3) if cfg.concat_input else None

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = inputs[0]
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return out


class FPNHead(DecodeHead):
    """Semantic FPN: mmseg's ``FPN`` neck then ``FPNHead``.

    Neck: 1x1 lateral convs, top-down nearest upsampling and addition, 3x3 output convs (plain
    convs with bias, as mmseg's FPN defaults). Head: per level, 3x3 ConvModules each followed by a
    2x bilinear upsampling until the finest stride is reached; the levels are summed.
    """

    def __init__(self, cfg: FPNHeadConfig, in_channels: list[int], strides: list[int], num_classes: int):
        super().__init__(cfg.in_index, cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        chans = [in_channels[i] for i in self.in_index]
        level_strides = [strides[i] for i in self.in_index]
        width = cfg.fpn_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, width, 1) for c in chans)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in chans)
        self.scale_heads = nn.ModuleList()
        for i, stride in enumerate(level_strides):
            length = max(1, int(math.log2(stride) - math.log2(level_strides[0])))
            layers: list[nn.Module] = []
            for k in range(length):
                layers.append(ConvModule(width if k == 0 else cfg.channels, cfg.channels, 3))
                if stride != level_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=cfg.align_corners))
            self.scale_heads.append(nn.Sequential(*layers))

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        fused = self.scale_heads[0](outs[0])
        for head, x in zip(self.scale_heads[1:], outs[1:]):
            fused = fused + resize(head(x), fused.shape[-2:], self.align_corners)
        return fused


class UPerHead(DecodeHead):
    """mmseg ``UPerHead``: PPM on the coarsest level, FPN top-down, concat of all levels, 3x3 fusion."""

    def __init__(self, cfg: UPerHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__(cfg.in_index, cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        chans = [in_channels[i] for i in self.in_index]
        width = cfg.channels
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(chans[-1], width, 1)) for scale in cfg.pool_scales
        )
        self.ppm_bottleneck = ConvModule(chans[-1] + len(cfg.pool_scales) * width, width, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, width, 1) for c in chans[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(width, width, 3) for _ in chans[:-1])
        self.fpn_bottleneck = ConvModule(len(chans) * width, width, 3)

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(stage(x), x.shape[-2:], self.align_corners) for stage in self.ppm]
        return self.ppm_bottleneck(torch.cat([x, *pooled], dim=1))

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self._psp(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([resize(x, size, self.align_corners) for x in outs], dim=1))


class SegformerHead(DecodeHead):
    """SegFormer's all-MLP decoder: a per-level linear projection (1x1 conv with bias) to
    ``channels``, bilinear upsampling to the finest level, concat, 1x1 ConvModule fusion."""

    def __init__(self, cfg: SegformerHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__(cfg.in_index, cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        chans = [in_channels[i] for i in self.in_index]
        self.linears = nn.ModuleList(nn.Conv2d(c, cfg.channels, 1) for c in chans)
        self.linear_fuse = ConvModule(len(chans) * cfg.channels, cfg.channels, 1)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        size = inputs[0].shape[-2:]
        projected = [resize(linear(x), size, self.align_corners) for linear, x in zip(self.linears, inputs)]
        return self.linear_fuse(torch.cat(projected, dim=1))


def build_head(cfg, in_channels: list[int], strides: list[int], num_classes: int, where: str) -> DecodeHead:
    """Build the head described by ``cfg`` on encoder levels with ``in_channels`` and ``strides``.

    Multi-level heads with ``in_index: null`` read every level; negative indices count from the end.
    ``where`` names the recipe key in error messages.
    """
    levels = len(in_channels)
    if isinstance(cfg, FCNHeadConfig):
        cfg = cfg.model_copy(update={"in_index": _check_index(cfg.in_index, levels, where)})
        if cfg.num_convs == 0 and in_channels[cfg.in_index] != cfg.channels:
            raise UserError(
                f"{where}: num_convs 0 needs channels equal to the input level's {in_channels[cfg.in_index]}; "
                "set num_convs >= 1 or channels to match"
            )
        return FCNHead(cfg, in_channels, num_classes)
    in_index = list(range(levels)) if cfg.in_index is None else [_check_index(i, levels, where) for i in cfg.in_index]
    cfg = cfg.model_copy(update={"in_index": in_index})
    if isinstance(cfg, FPNHeadConfig):
        return FPNHead(cfg, in_channels, strides, num_classes)
    if isinstance(cfg, UPerHeadConfig):
        return UPerHead(cfg, in_channels, num_classes)
    if isinstance(cfg, SegformerHeadConfig):
        return SegformerHead(cfg, in_channels, num_classes)
    raise TypeError(f"unknown head config {type(cfg).__name__}")


def _check_index(index: int, levels: int, where: str) -> int:
    if not -levels <= index < levels:
        raise UserError(
            f"{where}.in_index: level {index} does not exist, the encoder returns {levels} levels; "
            f"use indices in [-{levels}, {levels - 1}] or change model.encoder.out_indices"
        )
    return index % levels
