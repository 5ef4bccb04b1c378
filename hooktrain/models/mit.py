"""SegFormer's Mix Transformer (MiT-B0..B5) as timm ``pvt_v2`` models.

MiT and PVTv2 share their architecture except in two places, both set here: MiT's FFN ratio is
4 in every stage (timm's ``pvt_v2_b0``..``b4`` use 8, 8, 4, 4), and MMSegmentation builds every
LayerNorm with eps 1e-6 (timm uses 1e-5 for the patch-embedding and spatial-reduction norms).
With those, the encoder computes the same function as MMSegmentation's ``MixVisionTransformer``.
"""

from __future__ import annotations

import timm
from torch import nn

MIT_TO_TIMM = {f"mit_b{i}": f"pvt_v2_b{i}" for i in range(6)}
MIT_FFN_RATIOS = (4, 4, 4, 4)
MIT_LAYER_NORM_EPS = 1e-6


def is_mit(name: str) -> bool:
    """Whether ``name`` is one of ``mit_b0`` .. ``mit_b5``."""
    return name in MIT_TO_TIMM


def hub_repo(name: str) -> str:
    """The Hub repository of NVIDIA's ImageNet-1k MiT weights (transformers format)."""
    return f"nvidia/{name.replace('_', '-')}"


def create_mit(name: str, **kwargs) -> nn.Module:
    """A timm ``features_only`` MiT encoder with random weights; ``kwargs`` go to timm."""
    encoder = timm.create_model(
        MIT_TO_TIMM[name], features_only=True, pretrained=False, mlp_ratios=MIT_FFN_RATIOS, **kwargs
    )
    for module in encoder.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = MIT_LAYER_NORM_EPS
    return encoder
