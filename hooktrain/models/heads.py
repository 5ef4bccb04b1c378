"""Decode heads with MMSegmentation's functions and parameter names.

Every head takes the encoder's list of feature maps and returns class logits at the resolution
of its finest input level. Module names follow mmseg's (``convs``, ``psp_modules``,
``bottleneck``, ``<module>.conv`` / ``<module>.bn`` ...), so a zoo checkpoint's head keys load
unchanged; see :mod:`hooktrain.models.segmentor_keys`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.errors import UserError
from hooktrain.models.head_parts import ConvModule, DecodeHead, resize
from hooktrain.models.unet import UNetHead
from hooktrain.recipe.model import (
    ASPPHeadConfig,
    FCNHeadConfig,
    FPNHeadConfig,
    LinearHeadConfig,
    PSPHeadConfig,
    SegformerHeadConfig,
    SegformerMLPHeadConfig,
    SepASPPHeadConfig,
    UNetHeadConfig,
    UPerHeadConfig,
)


class SeparableConvModule(nn.Sequential):
    """mmcv's ``DepthwiseSeparableConvModule``: depthwise then pointwise ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)


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


class FPNNeck(nn.Module):
    """mmseg's ``FPN`` neck with its defaults: 1x1 lateral and 3x3 output convs with bias and no
    norm or activation, top-down nearest upsampling and addition."""

    def __init__(self, in_channels: list[int], width: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, width, 1, norm=False, act=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(width, width, 3, norm=False, act=False) for _ in in_channels)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


class FPNHead(DecodeHead):
    """Semantic FPN: mmseg's ``FPN`` neck (``neck``) then ``FPNHead``.

    Per level, 3x3 ConvModules each followed by a 2x bilinear upsampling until the finest stride
    is reached; the levels are summed.
    """

    def __init__(self, cfg: FPNHeadConfig, in_channels: list[int], strides: list[int], num_classes: int):
        super().__init__(cfg.in_index, cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        level_strides = [strides[i] for i in self.in_index]
        width = cfg.fpn_channels
        self.neck = FPNNeck([in_channels[i] for i in self.in_index], width)
        self.scale_heads = nn.ModuleList()
        for stride in level_strides:
            length = max(1, int(math.log2(stride) - math.log2(level_strides[0])))
            layers: list[nn.Module] = []
            for k in range(length):
                layers.append(ConvModule(width if k == 0 else cfg.channels, cfg.channels, 3))
                if stride != level_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=cfg.align_corners))
            self.scale_heads.append(nn.Sequential(*layers))

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        outs = self.neck(inputs)
        fused = self.scale_heads[0](outs[0])
        for head, x in zip(self.scale_heads[1:], outs[1:]):
            fused = fused + resize(head(x), fused.shape[-2:], self.align_corners)
        return fused


class PyramidPooling(nn.ModuleList):
    """mmseg's ``PPM``: per scale, adaptive average pooling and a 1x1 ConvModule, upsampled back."""

    def __init__(self, pool_scales: list[int], in_channels: int, channels: int, align_corners: bool) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1)) for scale in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[-2:], self.align_corners) for stage in self]


class PSPHead(DecodeHead):
    """mmseg ``PSPHead``: the input and its pyramid-pooled maps, concatenated, through a 3x3 ConvModule."""

    def __init__(self, cfg: PSPHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__([cfg.in_index], cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        in_ch = in_channels[cfg.in_index]
        self.psp_modules = PyramidPooling(cfg.pool_scales, in_ch, cfg.channels, cfg.align_corners)
        self.bottleneck = ConvModule(in_ch + len(cfg.pool_scales) * cfg.channels, cfg.channels, 3)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = inputs[0]
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))


class UPerHead(DecodeHead):
    """mmseg ``UPerHead``: PPM on the coarsest level, FPN top-down, concat of all levels, 3x3 fusion."""

    def __init__(self, cfg: UPerHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__(cfg.in_index, cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        chans = [in_channels[i] for i in self.in_index]
        width = cfg.channels
        self.psp_modules = PyramidPooling(cfg.pool_scales, chans[-1], width, cfg.align_corners)
        self.bottleneck = ConvModule(chans[-1] + len(cfg.pool_scales) * width, width, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, width, 1) for c in chans[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(width, width, 3) for _ in chans[:-1])
        self.fpn_bottleneck = ConvModule(len(chans) * width, width, 3)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        top = inputs[-1]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([resize(x, size, self.align_corners) for x in outs], dim=1))


class ASPPHead(DecodeHead):
    """mmseg ``ASPPHead`` (DeepLabV3): global pooling and one branch per dilation (1x1 for 1,
    3x3 atrous otherwise), concatenated, through a 3x3 ConvModule."""

    def __init__(self, cfg: ASPPHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__([cfg.in_index], cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        in_ch = in_channels[cfg.in_index]
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_ch, cfg.channels, 1))
        self.aspp_modules = nn.ModuleList(self._branch(in_ch, cfg.channels, d) for d in cfg.dilations)
        self.bottleneck = ConvModule((len(cfg.dilations) + 1) * cfg.channels, cfg.channels, 3)

    @staticmethod
    def _branch(in_channels: int, channels: int, dilation: int) -> nn.Module:
        if dilation == 1:
            return ConvModule(in_channels, channels, 1)
        return ConvModule(in_channels, channels, 3, dilation=dilation)

    def _aspp(self, x: torch.Tensor) -> torch.Tensor:
        pooled = resize(self.image_pool(x), x.shape[-2:], self.align_corners)
        return self.bottleneck(torch.cat([pooled, *(branch(x) for branch in self.aspp_modules)], dim=1))

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self._aspp(inputs[0])


class SepASPPHead(ASPPHead):
    """mmseg ``DepthwiseSeparableASPPHead`` (DeepLabV3+): ASPP with depthwise-separable atrous
    branches; its output, upsampled to a fine level, is concatenated with that level's 1x1
    projection (``c1_bottleneck``) and fused by two separable 3x3 convs (``sep_bottleneck``)."""

    def __init__(self, cfg: SepASPPHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__(cfg, in_channels, num_classes)
        self.in_index = [cfg.in_index, cfg.c1_index]
        self.c1_bottleneck = ConvModule(in_channels[cfg.c1_index], cfg.c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(
            SeparableConvModule(cfg.channels + cfg.c1_channels, cfg.channels, 3),
            SeparableConvModule(cfg.channels, cfg.channels, 3),
        )

    @staticmethod
    def _branch(in_channels: int, channels: int, dilation: int) -> nn.Module:
        if dilation == 1:
            return ConvModule(in_channels, channels, 1)
        return SeparableConvModule(in_channels, channels, 3, dilation=dilation)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x, fine = inputs
        c1 = self.c1_bottleneck(fine)
        out = resize(self._aspp(x), c1.shape[-2:], self.align_corners)
        return self.sep_bottleneck(torch.cat([out, c1], dim=1))


class SegformerHead(DecodeHead):
    """mmseg ``SegformerHead``: per level a 1x1 ConvModule to ``channels``, bilinear upsampling to
    the finest level, concat (c1..c4), 1x1 ConvModule ``fusion_conv``."""

    def __init__(self, cfg: SegformerHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__(cfg.in_index, cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        self.convs = nn.ModuleList(ConvModule(in_channels[i], cfg.channels, 1) for i in self.in_index)
        self.fusion_conv = ConvModule(len(self.in_index) * cfg.channels, cfg.channels, 1)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        size = inputs[0].shape[-2:]
        outs = [resize(conv(x), size, self.align_corners) for conv, x in zip(self.convs, inputs)]
        return self.fusion_conv(torch.cat(outs, dim=1))


class SegformerMLPHead(DecodeHead):
    """The official (NVlabs) SegFormer head, which transformers' ``SegformerDecodeHead`` is: per
    level a linear projection with bias (``linear_c``, here 1x1 convs), bilinear upsampling to the
    finest level, concat in reverse (c4..c1), 1x1 ConvModule ``linear_fuse``."""

    def __init__(self, cfg: SegformerMLPHeadConfig, in_channels: list[int], num_classes: int):
        super().__init__(cfg.in_index, cfg.channels, num_classes, cfg.dropout, cfg.align_corners)
        self.linear_c = nn.ModuleList(nn.Conv2d(in_channels[i], cfg.channels, 1) for i in self.in_index)
        self.linear_fuse = ConvModule(len(self.in_index) * cfg.channels, cfg.channels, 1)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        size = inputs[0].shape[-2:]
        outs = [resize(linear(x), size, self.align_corners) for linear, x in zip(self.linear_c, inputs)]
        return self.linear_fuse(torch.cat(outs[::-1], dim=1))


class LinearHead(DecodeHead):
    """DINOv2's ``BNHead``: the levels resized (bilinear) to the first one's size, concatenated,
    BatchNorm, then the classifier; no convolution of its own."""

    def __init__(self, cfg: LinearHeadConfig, in_channels: list[int], num_classes: int):
        width = sum(in_channels[i] for i in cfg.in_index)
        super().__init__(cfg.in_index, width, num_classes, cfg.dropout, cfg.align_corners)
        self.bn = nn.BatchNorm2d(width)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        size = inputs[0].shape[2:]
        return self.bn(torch.cat([resize(x, size, self.align_corners) for x in inputs], dim=1))


def build_head(cfg, in_channels: list[int], strides: list[int], num_classes: int, where: str) -> DecodeHead:
    """Build the head described by ``cfg`` on encoder levels with ``in_channels`` and ``strides``.

    Multi-level heads with ``in_index: null`` read every level; negative indices count from the end.
    ``where`` names the recipe key in error messages.
    """
    levels = len(in_channels)
    if isinstance(cfg, UNetHeadConfig):
        return UNetHead(cfg, in_channels, strides, num_classes, where)
    if isinstance(cfg, (FCNHeadConfig, PSPHeadConfig, ASPPHeadConfig)):
        cfg = cfg.model_copy(update={"in_index": _check_index(cfg.in_index, levels, f"{where}.in_index")})
        if isinstance(cfg, SepASPPHeadConfig):
            cfg = cfg.model_copy(update={"c1_index": _check_index(cfg.c1_index, levels, f"{where}.c1_index")})
            return SepASPPHead(cfg, in_channels, num_classes)
        if isinstance(cfg, ASPPHeadConfig):
            return ASPPHead(cfg, in_channels, num_classes)
        if isinstance(cfg, PSPHeadConfig):
            return PSPHead(cfg, in_channels, num_classes)
        if cfg.num_convs == 0 and in_channels[cfg.in_index] != cfg.channels:
            raise UserError(
                f"{where}: num_convs 0 needs channels equal to the input level's {in_channels[cfg.in_index]}; "
                "set num_convs >= 1 or channels to match"
            )
        return FCNHead(cfg, in_channels, num_classes)
    in_index = (
        list(range(levels))
        if cfg.in_index is None
        else [_check_index(i, levels, f"{where}.in_index") for i in cfg.in_index]
    )
    cfg = cfg.model_copy(update={"in_index": in_index})
    if isinstance(cfg, FPNHeadConfig):
        return FPNHead(cfg, in_channels, strides, num_classes)
    if isinstance(cfg, UPerHeadConfig):
        return UPerHead(cfg, in_channels, num_classes)
    if isinstance(cfg, SegformerHeadConfig):
        return SegformerHead(cfg, in_channels, num_classes)
    if isinstance(cfg, SegformerMLPHeadConfig):
        return SegformerMLPHead(cfg, in_channels, num_classes)
    if isinstance(cfg, LinearHeadConfig):
        return LinearHead(cfg, in_channels, num_classes)
    raise TypeError(f"unknown head config {type(cfg).__name__}")


def _check_index(index: int, levels: int, key: str) -> int:
    if not -levels <= index < levels:
        raise UserError(
            f"{key}: level {index} does not exist, the encoder returns {levels} levels; "
            f"use indices in [-{levels}, {levels - 1}] or change model.encoder.out_indices"
        )
    return index % levels
