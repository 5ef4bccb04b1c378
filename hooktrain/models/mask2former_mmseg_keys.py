"""MMSegmentation's Mask2Former zoo checkpoints (mmdet 3.x's ``Mask2FormerHead`` under
``decode_head.``) as hooktrain's :class:`~hooktrain.models.mask2former.Mask2Former`.

:func:`mask2former_keys_from_mmseg` renames a zoo state dict (``backbone.`` a plain ResNet, which
is timm's ``resnet50``'s names already, or MMSegmentation's Swin with its per-level ``norm0..3``) to
hooktrain's keys: the backbone by :func:`hooktrain.models.backbone_keys.to_timm` (as ``hooktrain
convert mmseg`` renames every zoo backbone), the head by the rules below. mmdet's
``nn.MultiheadAttention`` keeps q, k, v stacked in one ``in_proj`` tensor; hooktrain's attention
has three projections. The level orders agree: mmdet's ``input_convs``, ``level_encoding``,
``level_embed`` and ``decoder_input_projs`` count from the coarsest level, as hooktrain's do, and
both pixel decoders index ``lateral_convs`` / ``output_convs`` by the encoder level they read.
"""

from __future__ import annotations

import re

import torch

from hooktrain.models.backbone_keys import UnknownKeys, mmseg_backbone

StateDict = dict[str, torch.Tensor]

# A key only mmdet's Mask2FormerHead has: how from_mmseg tells these checkpoints apart.
MARKER = "decode_head.query_embed.weight"

_CONV_NORM = r"(conv|gn)\.(weight|bias)"


def _conv_norm(match: re.Match, offset: int = 2) -> str:
    """mmcv's ``ConvModule`` (``conv``, ``gn``) as hooktrain's ``Sequential(conv, GroupNorm)``."""
    return f"{0 if match[offset] == 'conv' else 1}.{match[offset + 1]}"


_FFN = {"ffn.layers.0.0": "fc1", "ffn.layers.1": "fc2"}  # mmcv's FFN: Sequential(Sequential(fc1, act, drop), fc2, drop)
_ENCODER_NORMS = {"0": "norm1", "1": "norm2"}
_DECODER_NORMS = {"0": "cross_attn_norm", "1": "self_attn_norm", "2": "ffn_norm"}

# (pattern, replacement) on the keys after ``decode_head.``
_HEAD = [
    (r"pixel_decoder\.input_convs\.(\d+)\." + _CONV_NORM, lambda m: f"pixel_decoder.input_proj.{m[1]}.{_conv_norm(m)}"),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)"
     r"\.(weight|bias)", r"pixel_decoder.layers.\1.self_attn.\2.\3"),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.(ffn\.layers\.0\.0|ffn\.layers\.1)\.(weight|bias)",
     lambda m: f"pixel_decoder.layers.{m[1]}.{_FFN[m[2]]}.{m[3]}"),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.norms\.([01])\.(weight|bias)",
     lambda m: f"pixel_decoder.layers.{m[1]}.{_ENCODER_NORMS[m[2]]}.{m[3]}"),
    (r"pixel_decoder\.level_encoding\.weight", "pixel_decoder.level_embed"),
    (r"pixel_decoder\.(lateral_convs|output_convs)\.(\d+)\." + _CONV_NORM,
     lambda m: f"pixel_decoder.{m[1]}.{m[2]}.{_conv_norm(m, 3)}"),
    (r"pixel_decoder\.mask_feature\.(weight|bias)", r"pixel_decoder.mask_proj.\1"),
    (r"transformer_decoder\.layers\.(\d+)\.(cross_attn|self_attn)\.attn\.out_proj\.(weight|bias)",
     r"decoder.layers.\1.\2.out_proj.\3"),
    (r"transformer_decoder\.layers\.(\d+)\.(ffn\.layers\.0\.0|ffn\.layers\.1)\.(weight|bias)",
     lambda m: f"decoder.layers.{m[1]}.{_FFN[m[2]]}.{m[3]}"),
    (r"transformer_decoder\.layers\.(\d+)\.norms\.([012])\.(weight|bias)",
     lambda m: f"decoder.layers.{m[1]}.{_DECODER_NORMS[m[2]]}.{m[3]}"),
    (r"transformer_decoder\.post_norm\.(weight|bias)", r"decoder.norm.\1"),
    (r"query_embed\.weight", "decoder.query_pos.weight"),
    (r"query_feat\.weight", "decoder.query_feat.weight"),
    (r"level_embed\.weight", "decoder.level_embed.weight"),
    (r"decoder_input_projs\.(\d+)\.(weight|bias)", r"decoder.input_proj.\1.\2"),
    (r"cls_embed\.(weight|bias)", r"decoder.class_head.\1"),
    (r"mask_embed\.([024])\.(weight|bias)", lambda m: f"decoder.mask_embed.layers.{int(m[1]) // 2}.{m[2]}"),
]  # fmt: skip
_IN_PROJ = re.compile(r"transformer_decoder\.layers\.(\d+)\.(cross_attn|self_attn)\.attn\.in_proj_(weight|bias)")
_HINT = (
    "is it MMSegmentation's Mask2Former (mmdet's Mask2FormerHead) with a ResNet or Swin backbone, "
    "as recipes/mmseg/mask2former_*.yaml?"
)


def mask2former_keys_from_mmseg(state_dict: StateDict) -> StateDict:
    """A Mask2Former zoo state dict (``backbone.``, ``decode_head.``; a ``module.`` prefix and
    non-tensor entries already dropped) under hooktrain's keys, the encoder's under timm's
    full-model names, Swin's per-level norms as ``out_norms.*``. Raises
    :class:`~hooktrain.models.backbone_keys.UnknownKeys` naming every key no rule maps."""
    out = mmseg_backbone(state_dict, "backbone.")
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            continue
        name = key.removeprefix("decode_head.")
        if name == key:
            unknown.append(key)
        elif match := _IN_PROJ.fullmatch(name):
            for part, chunk in zip("qkv", value.chunk(3)):
                out[f"decoder.layers.{match[1]}.{match[2]}.{part}_proj.{match[3]}"] = chunk
        else:
            for pattern, replacement in _HEAD:
                if (found := re.fullmatch(pattern, name)) is not None:
                    out[found.expand(replacement) if isinstance(replacement, str) else replacement(found)] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        raise UnknownKeys(unknown, hint=_HINT)
    return out
