"""Swin, ConvNeXt and ViT backbone checkpoints from MMSegmentation, mmpretrain and transformers,
renamed to timm's full-model keys (:func:`hooktrain.models.backbone_keys.to_timm` picks the
converter by the format's marker key). Per-level norms outside timm's model (mmpretrain's
ConvNeXt and MMSegmentation's Swin ``norm{i}``, transformers' ``hidden_states_norms``) come back
as ``out_norms.{i}.*``, hooktrain's :class:`hooktrain.models.necks.OutNorms`.
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]


_MMSEG_SWIN_BLOCK = {
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attn.w_msa.qkv.": "attn.qkv.",
    "attn.w_msa.proj.": "attn.proj.",
    "attn.w_msa.relative_position_bias_table": "attn.relative_position_bias_table",
    "ffn.layers.0.0.": "mlp.fc1.",
    "ffn.layers.1.": "mlp.fc2.",
}


def _unfold_to_swin_order(value: torch.Tensor) -> torch.Tensor:
    """A PatchMerging ``reduction`` weight [out, 4C] or ``norm`` tensor [4C] from mmseg's
    ``nn.Unfold`` channel order (channel-major, then the 2x2 offsets row by row) back to the
    original Swin's and timm's (offset-major: (0,0), (1,0), (0,1), (1,1), then channel): the
    inverse of mmseg's swin2mmseg ``correct_unfold_*_order``."""
    if value.ndim == 2:
        rows, width = value.shape
        return value.reshape(rows, width // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(rows, width)
    return value.reshape(-1, 4).transpose(0, 1)[[0, 2, 1, 3], :].reshape(-1)


def swin_from_mmseg(state_dict: StateDict) -> StateDict:
    """MMSegmentation's ``SwinTransformer`` keys (its zoo checkpoints and its swin2mmseg pretrain
    files) to timm ``swin_*``.

    mmseg merges patches at the end of stage i (``stages.i.downsample``, an ``nn.Unfold`` with
    its own channel order), timm at the start of stage i + 1. The per-level output norms
    ``norm{i}`` become hooktrain's ``out_norms.{i}`` (outside the encoder); the saved
    ``relative_position_index`` and, in pretrain files, ``attn_mask`` buffers are dropped (timm
    derives its own), and a pretrain file's ImageNet ``norm`` is timm's final ``norm``.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"patch_embed\.(projection|norm)\.(.+)", key):
            name = f"patch_embed.{'proj' if match[1] == 'projection' else 'norm'}.{match[2]}"
        elif match := re.fullmatch(r"stages\.(\d+)\.downsample\.((?:reduction|norm)\.(?:weight|bias))", key):
            name, value = f"layers.{int(match[1]) + 1}.downsample.{match[2]}", _unfold_to_swin_order(value)
        elif match := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            rest = match[3]
            if rest in ("attn.w_msa.relative_position_index", "attn_mask"):
                continue
            old = next((old for old in _MMSEG_SWIN_BLOCK if rest.startswith(old)), None)
            if old is None:
                raise KeyError(key)
            name = f"layers.{match[1]}.blocks.{match[2]}.{_MMSEG_SWIN_BLOCK[old]}{rest[len(old):]}"
        elif match := re.fullmatch(r"norm(\d+)\.(weight|bias)", key):
            name = f"out_norms.{match[1]}.{match[2]}"
        elif key in ("norm.weight", "norm.bias"):
            name = key
        else:
            raise KeyError(key)
        out[name] = value
    return out


_MMSEG_VIT_BLOCK = {
    "ln1.": "norm1.",
    "ln2.": "norm2.",
    "attn.attn.in_proj_": "attn.qkv.",  # q, k, v stacked, as timm's qkv
    "attn.attn.out_proj.": "attn.proj.",
    "ffn.layers.0.0.": "mlp.fc1.",
    "ffn.layers.1.": "mlp.fc2.",
}


def vit_from_mmseg(state_dict: StateDict) -> StateDict:
    """MMSegmentation's ``VisionTransformer`` keys to timm ``vit_*``: ``layers.i`` -> ``blocks.i``
    with the names in :data:`_MMSEG_VIT_BLOCK`, ``patch_embed.projection`` -> ``patch_embed.proj``,
    and the final ``ln1`` (``final_norm=True``) -> ``norm``."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key in ("cls_token", "pos_embed"):
            name = key
        elif key.startswith("patch_embed.projection."):
            name = "patch_embed.proj." + key.removeprefix("patch_embed.projection.")
        elif key.startswith("ln1."):
            name = "norm." + key.removeprefix("ln1.")
        elif match := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
            old = next((old for old in _MMSEG_VIT_BLOCK if match[2].startswith(old)), None)
            if old is None:
                raise KeyError(key)
            name = f"blocks.{match[1]}.{_MMSEG_VIT_BLOCK[old]}{match[2][len(old):]}"
        else:
            raise KeyError(key)
        out[name] = value
    return out


_HIDDEN_STATES_NORM = re.compile(r"hidden_states_norms\.stage(\d+)\.(.+)")  # transformers' backbones
_TRANSFORMERS_CONVNEXT_BLOCK = {
    "layer_scale_parameter": "gamma",
    "dwconv.": "conv_dw.",
    "layernorm.": "norm.",
    "pwconv1.": "mlp.fc1.",
    "pwconv2.": "mlp.fc2.",
}


def convnext_from_transformers(state_dict: StateDict) -> StateDict:
    """transformers' ``ConvNextModel`` / ``ConvNextBackbone`` keys to timm ``convnext_*``; the
    backbone's per-level ``hidden_states_norms.stageN`` are hooktrain's ``out_norms.{N-1}``."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"embeddings\.(patch_embeddings|layernorm)\.(.+)", key):
            name = f"stem.{0 if match[1] == 'patch_embeddings' else 1}.{match[2]}"
        elif match := re.fullmatch(r"encoder\.stages\.(\d+)\.downsampling_layer\.(.+)", key):
            name = f"stages.{match[1]}.downsample.{match[2]}"
        elif match := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", key):
            old = next((old for old in _TRANSFORMERS_CONVNEXT_BLOCK if match[3].startswith(old)), None)
            if old is None:
                raise KeyError(key)
            name = f"stages.{match[1]}.blocks.{match[2]}.{_TRANSFORMERS_CONVNEXT_BLOCK[old]}{match[3][len(old):]}"
        elif key.startswith("layernorm."):  # ConvNextModel's pooled-output norm
            name = "head.norm." + key.removeprefix("layernorm.")
        elif match := _HIDDEN_STATES_NORM.fullmatch(key):
            name = f"out_norms.{int(match[1]) - 1}.{match[2]}"
        else:
            raise KeyError(key)
        out[name] = value
    return out


# transformers' Swin block names, as saved (4.x and save_pretrained) and as transformers 5 holds them.
_TRANSFORMERS_SWIN_BLOCK = {
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.output.dense.": "attn.proj.",
    "attention.o_proj.": "attn.proj.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_SWIN_QKV = {"query": "q", "key": "k", "value": "v"}


def swin_from_transformers(state_dict: StateDict) -> StateDict:
    """transformers' ``SwinModel`` / ``SwinBackbone`` keys to timm ``swin_*``.

    transformers keeps query, key and value apart (timm's ``qkv`` is them stacked in that order)
    and merges patches at the end of stage i (``layers.i.downsample``), timm at the start of
    stage i + 1; both concatenate the 2x2 neighbours in the original Swin's order. The saved
    ``relative_position_index`` is derived from the window size; timm builds its own.
    ``hidden_states_norms.stageN`` are hooktrain's ``out_norms.{N-1}``.
    """
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"embeddings\.(patch_embeddings\.projection|norm)\.(.+)", key):
            name = f"patch_embed.{'proj' if match[1] != 'norm' else 'norm'}.{match[2]}"
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.+)", key):
            name = f"layers.{int(match[1]) + 1}.downsample.{match[2]}"
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            prefix, rest = f"layers.{match[1]}.blocks.{match[2]}.", match[3]
            if rest.endswith("relative_position_index"):
                continue
            if part := re.fullmatch(r"attention\.(?:self\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)", rest):
                which = _SWIN_QKV.get(part[1], part[2])
                qkv.setdefault(f"{prefix}attn.qkv.{part[3]}", {})[which] = value
                continue
            old = next((old for old in _TRANSFORMERS_SWIN_BLOCK if rest.startswith(old)), None)
            if old is None:
                raise KeyError(key)
            name = prefix + _TRANSFORMERS_SWIN_BLOCK[old] + rest[len(old) :]
        elif key.startswith("layernorm."):  # SwinModel's final norm
            name = "norm." + key.removeprefix("layernorm.")
        elif match := _HIDDEN_STATES_NORM.fullmatch(key):
            name = f"out_norms.{int(match[1]) - 1}.{match[2]}"
        else:
            raise KeyError(key)
        out[name] = value
    for name, parts in qkv.items():
        if parts.keys() != {"q", "k", "v"}:
            raise KeyError(f"{name} (only {sorted(parts)} of q, k, v)")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


_MMPRETRAIN_CONVNEXT_BLOCK = {
    "depthwise_conv.": "conv_dw.",
    "norm.": "norm.",
    "pointwise_conv1.": "mlp.fc1.",
    "pointwise_conv2.": "mlp.fc2.",
    "gamma": "gamma",
}


def convnext_from_mmpretrain(state_dict: StateDict) -> StateDict:
    """mmpretrain's (and mmcls's) ``ConvNeXt`` keys to timm ``convnext_*``.

    ``downsample_layers.0`` (conv, LayerNorm) is timm's ``stem``; ``downsample_layers.i``
    (LayerNorm, conv) is ``stages.i.downsample``; ``stages.i.j`` is ``stages.i.blocks.j``. The
    per-level norms ``norm{i}`` have no place in timm's model: they come back as
    ``out_norms.{i}.*``, hooktrain's :class:`hooktrain.models.necks.OutNorms` (``model.encoder.out_norm``)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"downsample_layers\.(\d)\.([01])\.(.+)", key):
            stage = int(match[1])
            out[(f"stem.{match[2]}." if stage == 0 else f"stages.{stage}.downsample.{match[2]}.") + match[3]] = value
        elif match := re.fullmatch(r"stages\.(\d)\.(\d+)\.(.+)", key):
            old = next((old for old in _MMPRETRAIN_CONVNEXT_BLOCK if match[3].startswith(old)), None)
            if old is None:
                raise KeyError(key)
            rest = match[3][len(old) :]
            out[f"stages.{match[1]}.blocks.{match[2]}.{_MMPRETRAIN_CONVNEXT_BLOCK[old]}{rest}"] = value
        elif match := re.fullmatch(r"norm(\d)\.(weight|bias)", key):
            out[f"out_norms.{match[1]}.{match[2]}"] = value
        else:
            raise KeyError(key)
    return out
