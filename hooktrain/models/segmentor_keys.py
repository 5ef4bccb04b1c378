"""Whole segmentors from MMSegmentation's model zoo and from transformers, as hooktrain keys.

hooktrain's heads carry MMSegmentation's module names, so a zoo checkpoint's head keys pass
unchanged; only the prefixes move (``auxiliary_head.`` -> ``aux_head.``, the FPN ``neck.`` ->
``decode_head.neck.``) and the backbone is renamed to timm's keys. A transformers SegFormer
needs its NVlabs head mapped onto :class:`hooktrain.models.heads.SegformerMLPHead`.
"""

from __future__ import annotations

import re

import torch

from hooktrain.models.backbone_keys import StateDict, strip_prefix, to_timm

_MMSEG_PREFIXES = {"decode_head.": "decode_head.", "neck.": "decode_head.neck.", "auxiliary_head.": "aux_head."}


class UnknownKeys(ValueError):
    """Source keys no rule maps; ``keys`` lists them."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"{len(keys)} keys with no counterpart: {', '.join(keys[:5])}")
        self.keys = keys


def _with_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    return {prefix + k: v for k, v in state_dict.items()}


def _backbone(state_dict: StateDict, prefix: str) -> StateDict:
    try:
        return _with_prefix(to_timm(strip_prefix(state_dict, prefix)), "encoder.")
    except KeyError as err:
        raise UnknownKeys([f"{prefix}{err.args[0]}"]) from None


def from_mmseg(checkpoint: dict) -> StateDict:
    """A zoo checkpoint (``{"state_dict": ..., "meta": ...}`` or a bare state dict) in hooktrain's
    keys, the encoder's under timm's full-model names. Raises :class:`UnknownKeys`."""
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    out = _backbone(state, "backbone.")
    unknown = []
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        prefix = next((p for p in _MMSEG_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            out[_MMSEG_PREFIXES[prefix] + key[len(prefix) :]] = value
    if unknown:
        raise UnknownKeys(unknown)
    return out


def from_transformers(state_dict: StateDict) -> StateDict:
    """A transformers ``SegformerForSemanticSegmentation`` state dict (as saved on the Hub) in
    hooktrain's keys for an ``mit_bX`` encoder and a ``segformer_mlp`` head."""
    out = _backbone(state_dict, "segformer.")
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
