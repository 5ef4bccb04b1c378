"""What sits between the encoder and the heads: per-level LayerNorms and MMSegmentation's
``MultiLevelNeck``. Both map a list of feature maps to a list of feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from hooktrain.models.head_parts import ConvModule


class OutNorms(nn.ModuleList):
    """A LayerNorm over the channels of each level (MMSegmentation's Swin ``norm{i}``,
    mmpretrain's ConvNeXt ``norm{i}``, transformers' ``hidden_states_norms``), each level returned
    contiguous in the model's memory format (NCHW unless ``channels_last``)."""

    def __init__(self, channels: list[int], eps: float, channels_last: bool = False) -> None:
        super().__init__([LayerNorm2d(c, eps=eps) for c in channels])
        self.channels_last = channels_last

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        # LayerNorm2d returns a channels-last view; a head mixing layouts sends torch.cat and
        # BatchNorm down slow CPU paths (UPerNet Swin-T inference was 4% behind transformers').
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return [norm(x).contiguous(memory_format=layout) for norm, x in zip(self, features, strict=True)]


class MultiLevelNeck(nn.Module):
    """MMSegmentation's ``MultiLevelNeck`` (no norm, no activation, as its configs use it): level
    ``i`` goes through a 1x1 conv, a bilinear rescale by ``scales[i]`` and a 3x3 conv. One input
    level feeds every output. Parameter names are mmseg's (``lateral_convs.i.conv``, ``convs.i.conv``)."""

    def __init__(self, in_channels: list[int], out_channels: int, scales: list[float]) -> None:
        super().__init__()
        if len(in_channels) not in (1, len(scales)):
            raise ValueError(f"{len(in_channels)} input levels for {len(scales)} scales")
        self.scales = list(scales)
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=False, act=False) for c in in_channels)
        self.convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, norm=False, act=False) for _ in scales)
        for module in self.modules():  # mmseg's init_weights
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        lateral = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=True)]
        if len(lateral) == 1:
            lateral = lateral * len(self.scales)
        out = []
        for x, scale, conv in zip(lateral, self.scales, self.convs):
            if scale != 1:
                x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            out.append(conv(x))
        return out
