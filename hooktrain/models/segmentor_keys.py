"""Whole segmentors from MMSegmentation's model zoo and from transformers, as hooktrain keys.

hooktrain's heads carry MMSegmentation's module names, so a zoo checkpoint's head keys pass
unchanged; only the prefixes move (``auxiliary_head.`` -> ``aux_head.``, the FPN ``neck.`` ->
``decode_head.neck.``; a ViT's ``MultiLevelNeck`` stays ``neck.``) and the backbone is renamed
to timm's keys; Mask2Former's (mmdet's ``Mask2FormerHead``) are renamed by
:mod:`hooktrain.models.mask2former_mmseg_keys`. A transformers SegFormer needs its NVlabs head
mapped onto :class:`hooktrain.models.heads.SegformerMLPHead`.
A transformers UperNet's heads are mmseg's under other names (``batch_norm``, ``classifier``),
its backbone's per-level norms hooktrain's ``out_norms``.
"""

from __future__ import annotations

import re

import torch

from hooktrain.models import mask2former_mmseg_keys
from hooktrain.models.backbone_keys import (
    StateDict,
    UnknownKeys,
    detect_format,
    mmseg_backbone,
    strip_prefix,
)

_MMSEG_PREFIXES = {"decode_head.": "decode_head.", "neck.": "decode_head.neck.", "auxiliary_head.": "aux_head."}


def from_mmseg(checkpoint: dict) -> StateDict:
    """A zoo checkpoint (``{"state_dict": ..., "meta": ...}`` or a bare state dict) in hooktrain's
    keys, the encoder's under timm's full-model names. Raises :class:`UnknownKeys`."""
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    if mask2former_mmseg_keys.MARKER in state:  # mmdet's Mask2FormerHead: its own names, not hooktrain's
        return mask2former_mmseg_keys.mask2former_keys_from_mmseg(state)
    out = mmseg_backbone(state, "backbone.")
    prefixes = dict(_MMSEG_PREFIXES)
    if any(k.startswith("neck.convs.") for k in state):  # a MultiLevelNeck (ViT), not the FPN head's neck
        prefixes["neck."] = "neck."
    unknown = []
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            out[prefixes[prefix] + key[len(prefix) :]] = value
    if unknown:
        raise UnknownKeys(unknown)
    return out


def from_transformers(state_dict: StateDict) -> StateDict:
    """A transformers segmentor's state dict (as saved on the Hub) in hooktrain's keys, told apart
    by what it holds: ``SegformerForSemanticSegmentation`` (``segformer.``) or
    ``UperNetForSemanticSegmentation`` (``backbone.`` with a ``decode_head.classifier``)."""
    if any(k.startswith("segformer.") for k in state_dict):
        return _segformer_from_transformers(state_dict)
    if any(k.startswith("backbone.") for k in state_dict) and "decode_head.classifier.weight" in state_dict:
        return _upernet_from_transformers(state_dict)
    raise UnknownKeys(sorted(state_dict))


_UPERNET_HEADS = {"decode_head.": "decode_head.", "auxiliary_head.": "aux_head."}
_UPERNET_BACKBONES = (
    "hooktrain converts transformers' UperNet with a ConvNext or Swin backbone only "
    "(openmmlab/upernet-convnext-*, openmmlab/upernet-swin-*)"
)


def _upernet_from_transformers(state_dict: StateDict) -> StateDict:
    """``UperNetForSemanticSegmentation`` with a ConvNext or Swin backbone, for a ``convnext_*`` /
    ``swin_*`` encoder with ``out_norm: layer_norm`` and ``upernet`` + ``fcn`` heads.

    transformers' heads are mmseg's with ``batch_norm`` for ``bn`` and ``classifier`` for
    ``conv_seg``; the backbone's per-level ``hidden_states_norms`` become ``out_norms``."""
    backbone, out, unknown = {}, {}, []
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.swin\.", "backbone.", key)  # transformers 5 nests SwinBackbone's model
        if key.startswith("backbone.layernorm."):
            continue  # SwinModel's final norm, which SwinBackbone loads but never applies
        elif key.startswith("backbone."):
            backbone[key] = value
        elif (prefix := next((p for p in _UPERNET_HEADS if key.startswith(p)), None)) is not None:
            name = key[len(prefix) :].replace(".batch_norm.", ".bn.")
            name = re.sub(r"^classifier\.", "conv_seg.", name)
            out[_UPERNET_HEADS[prefix] + name] = value
        else:
            unknown.append(key)
    if unknown:
        raise UnknownKeys(unknown)
    if detect_format(strip_prefix(backbone, "backbone.")) not in ("transformers-convnext", "transformers-swin"):
        raise UnknownKeys(sorted(backbone), hint=_UPERNET_BACKBONES)
    return {**mmseg_backbone(backbone, "backbone."), **out}


def _segformer_from_transformers(state_dict: StateDict) -> StateDict:
    """``SegformerForSemanticSegmentation`` for an ``mit_bX`` encoder and a ``segformer_mlp`` head."""
    out = mmseg_backbone(state_dict, "segformer.")
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("segformer."):
            continue
        name = key.removeprefix("decode_head.")
        if name.startswith("linear_c.") and ".proj." in name:
            target = name.replace(".proj.", ".")
            value = value[:, :, None, None] if value.ndim == 2 else value
        elif name == "linear_fuse.weight":
            target = "linear_fuse.conv.weight"
        elif name.startswith("batch_norm."):
            target = "linear_fuse.bn." + name.removeprefix("batch_norm.")
        elif name.startswith("classifier."):
            target = "conv_seg." + name.removeprefix("classifier.")
        else:
            unknown.append(key)
            continue
        if not key.startswith("decode_head."):
            unknown.append(key)
            continue
        out["decode_head." + target] = value
    if unknown:
        raise UnknownKeys(unknown)
    return out


_SMP_CONV = re.compile(r"\.(conv[12]|center\.\d)\.(0|1)\.")


def from_smp(state_dict: StateDict) -> StateDict:
    """segmentation_models_pytorch's ``Unet`` as hooktrain keys. With a timm encoder
    (``tu-<name>``), ``encoder.model.`` is the timm feature extractor hooktrain's encoder is;
    smp's own ResNet encoders (``resnet34``, its default) carry torchvision's names, which are
    timm's ``resnet*``'s. smp's
    ``Conv2dReLU`` (``0`` conv, ``1`` BatchNorm) becomes ``conv``/``bn``, ``attention.``
    wrappers go, ``segmentation_head.0.`` is ``decode_head.conv_seg.``. The attention smp builds
    for the last block but never applies (it has no skip) has no counterpart and is left out."""
    blocks = [int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.blocks.")]
    unused = f"decoder.blocks.{max(blocks, default=0)}.attention1."
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith(unused):
            continue
        if key.startswith("encoder."):  # a timm encoder (tu-), or smp's own ResNet: timm's names
            converted["encoder." + key.removeprefix("encoder.").removeprefix("model.")] = value
        elif key.startswith("segmentation_head.0."):
            converted["decode_head.conv_seg." + key.removeprefix("segmentation_head.0.")] = value
        elif key.startswith("decoder."):
            name = "decode_head." + key.removeprefix("decoder.").replace(".attention.", ".", 1)
            converted[_SMP_CONV.sub(lambda m: f".{m[1]}.{'conv' if m[2] == '0' else 'bn'}.", name)] = value
        else:
            unknown.append(key)
    if unknown:
        raise UnknownKeys(unknown)
    return converted
