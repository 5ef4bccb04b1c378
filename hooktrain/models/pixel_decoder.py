"""Mask2Former's pixel decoder (``MSDeformAttnPixelDecoder``): a multi-scale deformable attention
encoder (Deformable DETR's) over the encoder's three coarsest levels, then FPN-style lateral and
output convolutions down to the finest level, whose projection gives the mask features.

Plain PyTorch throughout: the deformable sampling is ``F.grid_sample``, as transformers'
``multi_scale_deformable_attention`` (and Deformable DETR's reference ``ms_deform_attn_core_pytorch``)
compute it, so it runs on any device and exports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_LEVELS = 3  # levels the deformable encoder and the masked-attention decoder read
NUM_POINTS = 4  # sampling points per head and level


def sine_position_embedding(
    height: int, width: int, num_features: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """DETR's normalised sine position embedding of an ``height x width`` map, ``[height * width,
    2 * num_features]`` (the ``y`` half first), computed in the order transformers'
    ``Mask2FormerSinePositionEmbedding`` computes it (``normalize=True``, scale 2 pi, temperature 1e4)."""
    y = torch.arange(1, height + 1, dtype=dtype, device=device)
    x = torch.arange(1, width + 1, dtype=dtype, device=device)
    y = y / (y[-1:] + 1e-6) * (2 * math.pi)
    x = x / (x[-1:] + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_features, dtype=torch.int64, device=device).to(dtype)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_features)
    pos_y, pos_x = y[:, None] / dim_t, x[:, None] / dim_t
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat([pos_y[:, None].expand(-1, width, -1), pos_x[None].expand(height, -1, -1)], dim=-1)
    return pos.flatten(0, 1)


def multi_scale_deformable_attention(
    value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Deformable DETR's sampling: ``value [B, S, heads, d]`` (the levels' maps flattened one after
    the other), ``locations [B, N, heads, levels, points, 2]`` (x, y in 0..1) and ``weights
    [B, N, heads, levels, points]`` give ``[B, N, heads * d]``, bilinear with zero padding."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1
    sampled = []
    for level, (values, (height, width)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        values = values.flatten(2).transpose(1, 2).reshape(batch * heads, dim, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B * heads, N, points, 2]
        sampled.append(F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(batch, heads * dim, queries)
    return out.transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable self-attention: each token samples ``NUM_POINTS`` points per head on
    every level around its reference point, at learned offsets, and sums them with learned
    softmax weights."""

    def __init__(self, dim: int, num_heads: int, num_levels: int = NUM_LEVELS, num_points: int = NUM_POINTS):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide the pixel decoder's channels {dim}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Deformable DETR's: offsets start on a ring of directions, one per head, growing with the point."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1) * torch.arange(1, self.num_points + 1)[:, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """``x [B, S, C]`` and its position embedding ``pos [B or 1, S, C]``; ``reference [S, levels, 2]``."""
        batch, length, dim = x.shape
        query = x + pos
        value = self.value_proj(x).view(batch, length, self.num_heads, dim // self.num_heads)
        shape = (batch, length, self.num_heads, self.num_levels, self.num_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(batch, length, self.num_heads, -1).softmax(-1).view(shape)
        normalizer = _level_sizes(shapes, x)
        locations = reference[None, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(multi_scale_deformable_attention(value, shapes, locations, weights))


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN, each with a residual."""

    def __init__(self, dim: int, num_heads: int, feedforward: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, feedforward)
        self.fc2 = nn.Linear(feedforward, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, shapes: list[tuple[int, int]]):
        x = self.norm1(x + self.dropout(self.self_attn(x, pos, reference, shapes)))
        return self.norm2(x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x))))))


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, bias: bool, relu: bool = False) -> nn.Sequential:
    """Convolution and GroupNorm(32) (and ReLU): Mask2Former's ``Conv2d(norm="GN")``."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    layers = [conv, nn.GroupNorm(32, out_channels)] + ([nn.ReLU()] if relu else [])
    return nn.Sequential(*layers)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder on ``in_channels`` levels (finest first, e.g. strides 4..32).

    The three coarsest levels are projected to ``channels`` (1x1 conv, GroupNorm), flattened into
    one sequence with sine position embeddings plus a learned per-level embedding, and refined by
    ``num_layers`` deformable encoder layers. Each finer level then gets an FPN step: its lateral
    1x1 conv plus the bilinearly upsampled coarser output, through a 3x3 conv. ``forward`` returns
    ``(mask_features [B, mask_channels, H/4, W/4], [the three refined levels, coarsest first])``.
    """

    def __init__(
        self,
        in_channels: list[int],
        *,
        channels: int = 256,
        mask_channels: int = 256,
        num_heads: int = 8,
        num_layers: int = 6,
        feedforward: int = 1024,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(in_channels) <= NUM_LEVELS:
            raise ValueError(f"Mask2Former needs at least {NUM_LEVELS + 1} encoder levels, got {len(in_channels)}")
        if channels % 32:
            raise ValueError(f"the pixel decoder's channels ({channels}) must be a multiple of 32 (GroupNorm(32))")
        coarse = in_channels[-NUM_LEVELS:][::-1]
        self.input_proj = nn.ModuleList(_conv_norm(c, channels, 1, bias=True) for c in coarse)  # coarsest first
        self.level_embed = nn.Parameter(torch.empty(NUM_LEVELS, channels))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(channels, num_heads, feedforward, dropout) for _ in range(num_layers)
        )
        fine = in_channels[:-NUM_LEVELS]  # finest first: lateral_convs[i] reads level i
        self.lateral_convs = nn.ModuleList(_conv_norm(c, channels, 1, bias=False) for c in fine)
        self.output_convs = nn.ModuleList(_conv_norm(channels, channels, 3, bias=False, relu=True) for _ in fine)
        self.mask_proj = nn.Conv2d(channels, mask_channels, 1)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Mask2Former's: Xavier input projections, ``c2_xavier_fill`` (Kaiming, a=1) FPN convolutions."""
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for conv in [m[0] for m in (*self.lateral_convs, *self.output_convs)] + [self.mask_proj]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarse = features[-NUM_LEVELS:][::-1]
        maps = [proj(x) for proj, x in zip(self.input_proj, coarse)]
        shapes = [(x.shape[-2], x.shape[-1]) for x in maps]
        tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in maps], dim=1)
        channels = tokens.shape[-1]
        pos = torch.cat(
            [
                sine_position_embedding(h, w, channels // 2, tokens.device, tokens.dtype) + self.level_embed[level]
                for level, (h, w) in enumerate(shapes)
            ]
        )[None]
        reference = _reference_points(shapes, tokens.device, tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, pos, reference, shapes)
        outputs = [
            x.transpose(1, 2).reshape(x.shape[0], channels, h, w)
            for x, (h, w) in zip(tokens.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        for level in reversed(range(len(self.lateral_convs))):
            lateral = self.lateral_convs[level](features[level])
            up = F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(self.output_convs[level](lateral + up))
        return self.mask_proj(outputs[-1]), outputs[:NUM_LEVELS]


def _reference_points(shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Each token's pixel centre, ``(x, y)`` in 0..1, repeated for every level: ``[S, levels, 2]``
    (no padding, so every level's valid ratio is 1)."""
    points = []
    for height, width in shapes:
        # linspace(0.5, n - 0.5, n) (the same values in float16/32/64, its step being 1), but as ``arange``:
        # the ONNX exporter's linspace divides by n - 1, which is NaN for a level of one row or column
        y, x = torch.meshgrid(
            (torch.arange(height, dtype=torch.float32, device=device) + 0.5).to(dtype),
            (torch.arange(width, dtype=torch.float32, device=device) + 0.5).to(dtype),
            indexing="ij",
        )
        points.append(torch.stack((x.reshape(-1) / width, y.reshape(-1) / height), -1))
    return torch.cat(points)[:, None].expand(-1, len(shapes), -1)


def _level_sizes(shapes: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """``[levels, 2]``: each level's ``(width, height)`` in ``like``'s dtype and device. Built from the
    sizes themselves (``torch.as_tensor``, not ``torch.tensor``), so that an ONNX trace, in which they
    are traced values, keeps them dynamic instead of freezing the export size's."""
    sizes = [torch.stack([torch.as_tensor(width), torch.as_tensor(height)]) for height, width in shapes]
    return torch.stack(sizes).to(like)
