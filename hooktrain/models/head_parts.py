"""What every decode head is made of: mmcv's ``ConvModule``, the bilinear ``resize`` and the
``DecodeHead`` base with its classifier (``conv_seg``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
    """mmcv's ``ConvModule``: conv, then BatchNorm (the conv has no bias) and ReLU.

    ``norm=False`` gives a conv with bias and no norm; ``act=False`` drops the ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        *,
        dilation: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=not norm
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


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
