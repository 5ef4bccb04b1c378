"""timm's Swin Transformer (v1) as a segmentation encoder: any input size, NCHW levels, and
shifted-window attention as MMSegmentation's, transformers' and Microsoft's segmentation Swin
compute it."""

from __future__ import annotations

import functools
import types
from collections import OrderedDict

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models._features import FeatureGetterNet
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import nn


def is_swin(name: str) -> bool:
    """Whether timm model ``name`` is a ``timm.models.swin_transformer`` Swin (v1)."""
    name = name.removeprefix("timm/")
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__ == "timm.models.swin_transformer"


def create_swin(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, features_only=True, **kwargs)`` set up as MMSegmentation's
    ``SwinTransformer``: the input padded at the bottom/right to whole patches (its 'corner'
    padding), attention masks built for each input size (once per size, :class:`ShiftMasks`),
    windows never shrunk and shifts never dropped for small maps (``always_partition``), levels
    returned as NCHW (timm's
    ``forward_intermediates``, so parameters are timm's names under ``model.``), and each block's
    window attention padding before it shifts (:func:`_pad_then_shift_attention`), through
    ``scaled_dot_product_attention``."""
    kwargs.setdefault("strict_img_size", False)
    kwargs.setdefault("always_partition", True)
    kwargs.setdefault("embed_layer", functools.partial(PatchEmbed, dynamic_img_pad=True))
    kwargs.setdefault("feature_cls", "getter")
    model = timm.create_model(name, features_only=True, **kwargs)
    if isinstance(model, FeatureGetterNet):  # the getter lacks the switch its Swin has
        model.set_grad_checkpointing = model.model.set_grad_checkpointing
    masks = ShiftMasks()
    for module in model.modules():
        if isinstance(module, SwinTransformerBlock):
            module._attn = types.MethodType(_pad_then_shift_attention, module)
            module.shift_masks = masks  # one cache for all the blocks of this model
            # timm keeps Swin on eager attention unless TIMM_FUSED_ATTN=2; SDPA is what transformers
            # runs, 1.8x faster here, and on random weights eager's exp(-100) leaves denormals that slow
            # the next linear layer. Outputs move by ~1e-7 relative.
            module.attn.fused_attn = True
    return model


class ShiftMasks:
    """The shifted-window attention masks of one model, kept between forwards: timm's
    ``get_attn_mask``, which a block with ``dynamic_mask`` would build on every forward (six
    times per forward for Swin-T, about six ops each), built once per padded map size, window,
    shift, device and dtype. The last ``max_entries`` are kept (four per input size for Swin-T;
    a few MB each at 512x512)."""

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._masks: OrderedDict[tuple, torch.Tensor | None] = OrderedDict()

    def get(self, block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor | None:
        """``block.get_attn_mask(x)`` for ``x``, the padded and shifted ``[B, H, W, C]`` map."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return block.get_attn_mask(x)  # a constant the tracer or compiler folds itself
        key = (x.shape[1], x.shape[2], tuple(block.window_size), tuple(block.shift_size), x.device, x.dtype,
               torch.is_inference_mode_enabled())  # fmt: skip
        if key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key]
        mask = block.get_attn_mask(x)
        self._masks[key] = mask
        if len(self._masks) > self.max_entries:
            self._masks.popitem(last=False)
        return mask


def _pad_then_shift_attention(self: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """timm's ``SwinTransformerBlock._attn`` with the padding to whole windows done before the
    cyclic shift, as MMSegmentation's ``ShiftWindowMSA``, transformers' ``SwinLayer`` and
    Microsoft's Swin-Transformer-Semantic-Segmentation do. timm 1.0.31 shifts first and pads
    after, while its mask (built on the padded size) assumes the opposite order: on maps that
    are not whole windows (every stage at 512x512), the first rows and columns, wrapped around by
    the shift, share a window and a mask region with the last ones and attend to them (the order
    timm issue #2438 reports for Swin V2; V1's blocks have it too)."""
    _, height, width, channels = x.shape
    window_h, window_w = self.window_size
    x = F.pad(x, (0, 0, 0, (window_w - width % window_w) % window_w, 0, (window_h - height % window_h) % window_h))
    _, padded_h, padded_w, _ = x.shape
    shift = any(self.shift_size)
    if shift:
        x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
    if not self.dynamic_mask:
        mask = self.attn_mask
    elif getattr(self, "shift_masks", None) is not None and shift:
        mask = self.shift_masks.get(self, x)
    else:
        mask = self.get_attn_mask(x)
    windows = self.attn(window_partition(x, self.window_size).view(-1, self.window_area, channels), mask=mask)
    x = window_reverse(windows.view(-1, window_h, window_w, channels), self.window_size, padded_h, padded_w)
    if shift:
        x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
    # a view: the block's residual add reads it as it is (timm copies it to a contiguous tensor first)
    return x[:, :height, :width, :]
