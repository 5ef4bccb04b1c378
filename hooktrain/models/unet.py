"""The U-Net decoder as segmentation_models_pytorch (smp) has it, on any hierarchical encoder.

smp's ``Unet`` feeds its decoder the encoder's levels at strides 2, 4, 8, 16 and 32 (a
zero-channel stand-in at stride 2 for encoders that start at 4, such as ConvNeXt and Swin)
plus the image itself, which only gives the last block its size. From the deepest level, each
block upsamples to the next level's size, concatenates that level, applies scSE attention when
asked, then two 3x3 conv-BN-ReLU; the blocks past the last level upsample x2 without a skip. A
3x3 convolution gives the logits, at the image's size when the encoder's levels reach stride 2.

The module names follow smp's (``blocks.{i}.conv1``, ``attention1``, ...) with mmcv's
``conv``/``bn`` inside each conv module, as hooktrain's other heads; see
:func:`hooktrain.models.segmentor_keys.from_smp`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.errors import UserError
from hooktrain.models.head_parts import ConvModule, DecodeHead
from hooktrain.recipe.model import UNetHeadConfig


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al. 2018), as smp's
    ``SCSEModule``: ``x * cSE(x) + x * sSE(x)``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cSE(x) + x * self.sSE(x)


class UNetBlock(nn.Module):
    """Upsample to ``size``, concatenate the skip (when there is one), attention, two 3x3
    conv-BN-ReLU, attention."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, cfg: UNetHeadConfig, attend_input: bool):
        super().__init__()
        self.mode = cfg.interpolation
        scse = cfg.attention == "scse"
        # smp attends to the concatenation whenever the block has a skip, its stand-in included
        self.attention1 = SCSE(in_channels + skip_channels) if scse and attend_input else nn.Identity()
        self.conv1 = ConvModule(in_channels + skip_channels, out_channels, 3)
        self.conv2 = ConvModule(out_channels, out_channels, 3)
        self.attention2 = SCSE(out_channels) if scse else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int], skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode=self.mode)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        x = self.attention1(x)
        return self.attention2(self.conv2(self.conv1(x)))


class UNetHead(DecodeHead):
    """smp's ``UnetDecoder`` and ``SegmentationHead`` (see the module doc), on encoder levels
    with ``in_channels`` and ``strides`` (each level half the resolution of the one before)."""

    def __init__(self, cfg: UNetHeadConfig, in_channels: list[int], strides: list[int], num_classes: int, where: str):
        levels = len(in_channels)
        if any(b != 2 * a for a, b in zip(strides, strides[1:], strict=False)):
            raise UserError(
                f"{where}: U-Net needs encoder levels that each halve the resolution, and these have strides "
                f"{strides}; set model.encoder.out_indices to consecutive stages"
            )
        blocks = len(cfg.decoder_channels)
        if blocks < levels - 1:
            raise UserError(
                f"{where}.decoder_channels: {blocks} blocks cannot take the encoder's {levels} levels "
                f"(strides {strides}); give at least {levels - 1} widths, or fewer levels in "
                "model.encoder.out_indices"
            )
        width = cfg.decoder_channels[-1]
        super().__init__(list(range(levels)), width, num_classes, cfg.dropout, cfg.align_corners)
        self.conv_seg = nn.Conv2d(width, num_classes, kernel_size=3, padding=1)  # smp's SegmentationHead
        deepest = in_channels[-1]
        self.center = (
            nn.Sequential(ConvModule(deepest, deepest, 3), ConvModule(deepest, deepest, 3)) if cfg.center else nn.Identity()
        )
        skips = in_channels[-2::-1]
        # Blocks past the last skip: smp's stride-2 stand-in (for encoders starting at stride 4)
        # is a skip of no channels, still attended to; the block to the image's size has none.
        inputs = [deepest, *cfg.decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            UNetBlock(inputs[i], skips[i] if i < len(skips) else 0, cfg.decoder_channels[i], cfg,
                      attend_input=i < blocks - 1)  # fmt: skip
            for i in range(blocks)
        )
        self.num_skips = len(skips)
        self._init_as_smp()

    def _init_as_smp(self) -> None:
        """smp's ``initialize_decoder`` and ``initialize_head``: Kaiming-uniform convolutions,
        BatchNorm at 1 and 0, a Xavier-uniform classifier, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if module is self.conv_seg:
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        skips = inputs[-2::-1]
        x = self.center(inputs[-1])
        for i, block in enumerate(self.blocks):
            skip = skips[i] if i < self.num_skips else None
            size = tuple(skip.shape[-2:]) if skip is not None else (2 * x.shape[-2], 2 * x.shape[-1])
            x = block(x, size, skip)
        return x
