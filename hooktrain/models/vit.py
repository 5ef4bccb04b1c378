"""timm ViTs (DINOv2, DINOv3, DeiT, AugReg, EVA, ...) as feature extractors: chosen blocks'
patch tokens as maps of one stride, for a neck (``MultiLevelNeck``) or a single-scale head."""

from __future__ import annotations

import functools
import types

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models import FeatureInfo
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# timm modules whose models are plain token transformers with ``forward_intermediates``; the hybrids
# embed their patches from a CNN stem's features (e.g. vit_tiny_r_s16_p8_224, vit_small_r26_s32_224).
_VIT_MODULES = (
    "timm.models.vision_transformer",
    "timm.models.vision_transformer_hybrid",
    "timm.models.eva",
    "timm.models.deit",
    "timm.models.beit",
)


def is_vit(name: str) -> bool:
    """Whether timm model ``name`` is a ViT this module serves (not hierarchical, no features_only stages)."""
    name = name.removeprefix("timm/")
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__ in _VIT_MODULES


class ViTFeatures(nn.Module):
    """The patch tokens of ``model``'s blocks ``out_indices`` as NCHW maps (register and class
    tokens dropped; timm's ``forward_intermediates``).

    ``norm`` applies the model's final LayerNorm to every returned block; ``class_token``
    appends the class token, broadcast over the map, as ``embed_dim`` more channels (DINOv2's
    linear head). The inner model is ``self.model``, so parameter names are timm's under
    ``model.``, as timm's own ``features_only`` ViTs name them. Layers after the last returned
    block (and the classifier, and the final norm unless ``norm``) are pruned.
    """

    def __init__(self, model: nn.Module, out_indices: list[int], *, norm: bool = False, class_token: bool = False):
        super().__init__()
        if class_token and getattr(model, "cls_token", None) is None:
            raise ValueError("this ViT has no class token")
        self.model = model
        self.indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm, prune_head=True)
        self.norm = norm
        self.class_token = class_token
        stride = model.patch_embed.feat_ratio()
        width = model.embed_dim * (2 if class_token else 1)
        self.feature_info = FeatureInfo(
            [{"num_chs": width, "reduction": stride, "module": f"blocks.{i}"} for i in self.indices],
            list(range(len(self.indices))),
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks in the backward pass (timm's own switch)."""
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.model.forward_intermediates(
            x,
            indices=self.indices,
            norm=self.norm,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=self.class_token,
        )
        grid_h = self._grid_height(x.shape[-2])
        if not self.class_token:
            return [self._to_map(tokens, grid_h) for tokens in out]
        # prefix tokens are [class, registers...]
        maps = [(self._to_map(tokens, grid_h), prefix) for tokens, prefix in out]
        return [torch.cat([m, prefix[:, 0, :, None, None].expand_as(m)], dim=1) for m, prefix in maps]

    def _grid_height(self, height):
        """Patch rows for an input ``height``. Integer arithmetic only (timm's ``NCHW`` output uses
        ``math.ceil``), so that an ONNX trace keeps the height dynamic instead of freezing it."""
        embed = self.model.patch_embed
        # A hybrid ViT's CNN stem (timm's HybridEmbed) pads like TensorFlow's "same": ceil(height / ratio) rows.
        ratio = getattr(embed, "feature_ratio", (1, 1))[0]
        rows = (height + ratio - 1) // ratio
        patch = embed.patch_size[0]
        return (rows + patch - 1) // patch if embed.dynamic_img_pad else rows // patch

    @staticmethod
    def _to_map(tokens: torch.Tensor, grid_h) -> torch.Tensor:
        """Patch tokens ``[B, H*W, C]`` as ``[B, C, H, W]`` (row-major tokens, as timm lays them out)."""
        batch, _, channels = tokens.shape
        return tokens.reshape(batch, grid_h, -1, channels).permute(0, 3, 1, 2).contiguous()


def build_vit(name: str, out_indices: list[int], *, norm: bool, class_token: bool, pos_embed_resize: str,
              patch_bias: bool, norm_eps: float | None = None, **kwargs) -> ViTFeatures:  # fmt: skip
    """``timm.create_model(name, dynamic_img_size=True, **kwargs)`` as :class:`ViTFeatures`: any
    input size (position embeddings resized by timm; ``pos_embed_resize="mmseg"``: as
    MMSegmentation's ``VisionTransformer`` resizes them, bicubic without antialiasing).
    ``patch_bias=False`` removes the patch embedding's bias after any pretrained weights loaded,
    as MMSegmentation's ViT (``patch_bias=False``) ignores the pretrained one; ``norm_eps`` sets
    every LayerNorm's eps."""
    kwargs.setdefault("dynamic_img_pad", True)  # pad the bottom/right to whole patches, as mmseg's 'corner'
    if norm_eps is not None:
        kwargs["norm_layer"] = functools.partial(LayerNorm, eps=norm_eps)
    model = timm.create_model(name, dynamic_img_size=True, **kwargs)
    if not patch_bias:
        model.patch_embed.proj.bias = None
    if pos_embed_resize == "mmseg":
        if not isinstance(model, VisionTransformer) or model.reg_token is not None or model.no_embed_class:
            raise ValueError(
                "pos_embed_resize 'mmseg' needs a ViT with a class token and position embeddings over it, "
                "no register tokens (MMSegmentation's VisionTransformer)"
            )
        model._pos_embed = types.MethodType(_mmseg_pos_embed, model)
    return ViTFeatures(model, out_indices, norm=norm, class_token=class_token)


def _mmseg_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` (class token, position embedding over it and the
    patches) with MMSegmentation's resize: ``F.interpolate(bicubic, align_corners=False)``, no
    antialiasing, only when the token count differs from the embedding's."""
    batch, height, width, channels = x.shape
    tokens = x.reshape(batch, -1, channels)
    if self.cls_token is not None:
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
    pos = self.pos_embed
    if tokens.shape[1] != pos.shape[1]:
        grid_h, grid_w = self.patch_embed.grid_size
        prefix, grid = pos[:, : pos.shape[1] - grid_h * grid_w], pos[:, pos.shape[1] - grid_h * grid_w :]
        grid = grid.reshape(1, grid_h, grid_w, channels).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        pos = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)
    return self.pos_drop(tokens + pos)
