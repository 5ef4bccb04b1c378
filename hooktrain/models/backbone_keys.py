"""Backbone checkpoints from MMSegmentation, mmpretrain, NVlabs and transformers, renamed to timm's keys.

hooktrain's encoders are timm models: MiT-B0..B5 is timm ``pvt_v2_bX`` with MiT's FFN ratios
(see :mod:`hooktrain.models.mit`), ResNetV1c is timm ``resnet50c`` / ``resnet101c``; Swin,
ConvNeXt and ViT checkpoints convert in :mod:`hooktrain.models.swin_convnext_vit_keys`. The
functions here take a backbone state dict in one of the formats users bring and return it under
the key names of timm's full model (``stages.0...``); :func:`to_encoder_keys` then fits them to
the ``features_only`` module. Per-level norms outside timm's model (mmpretrain's ConvNeXt and
MMSegmentation's Swin ``norm{i}``) come back as ``out_norms.{i}.*``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from hooktrain.models.swin_convnext_vit_keys import (
    StateDict,
    convnext_from_mmpretrain,
    convnext_from_transformers,
    swin_from_mmseg,
    swin_from_transformers,
    vit_from_mmseg,
)

# Checkpoint formats this module converts, each recognised by a key only it has.
FORMATS = {
    "mmseg-mit": "layers.0.0.projection.weight",
    "nvlabs-mit": "patch_embed1.proj.weight",
    "transformers-mit": "encoder.patch_embeddings.0.proj.weight",
    "mmseg-resnet": "stem.0.weight",
    "mmseg-swin": "stages.0.blocks.0.attn.w_msa.qkv.weight",
    "mmpretrain-convnext": "downsample_layers.0.0.weight",
    "mmseg-vit": "layers.0.attn.attn.in_proj_weight",
    "transformers-convnext": "embeddings.patch_embeddings.weight",
    "transformers-swin": "embeddings.patch_embeddings.projection.weight",
    "timm": None,
}
_CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.")


def strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """The entries under ``prefix``, with it removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def detect_format(state_dict: StateDict) -> str:
    """The name in :data:`FORMATS` of a backbone state dict (``timm`` when none matches)."""
    for name, marker in FORMATS.items():
        if marker is not None and marker in state_dict:
            return name
    return "timm"


def backbone_state(checkpoint: dict) -> StateDict:
    """The backbone's own entries of a loaded checkpoint file.

    Unwraps ``state_dict`` / ``model``, drops a ``backbone.`` (MMSegmentation segmentor) or
    ``segformer.`` (transformers) prefix, and drops ImageNet classifiers.
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    state = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)}
    for prefix in ("backbone.", "segformer."):
        if any(k.startswith(prefix) for k in state):
            state = strip_prefix(state, prefix)
    return {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}


def to_timm(state_dict: StateDict) -> StateDict:
    """Rename a backbone state dict of any :data:`FORMATS` to timm's full-model keys."""
    converters: dict[str, Callable[[StateDict], StateDict]] = {
        "mmseg-mit": mit_from_mmseg,
        "nvlabs-mit": mit_from_nvlabs,
        "transformers-mit": mit_from_transformers,
        "mmseg-resnet": resnet_from_mmseg,
        "mmseg-swin": swin_from_mmseg,
        "mmpretrain-convnext": convnext_from_mmpretrain,
        "mmseg-vit": vit_from_mmseg,
        "transformers-convnext": convnext_from_transformers,
        "transformers-swin": swin_from_transformers,
        "timm": dict,
    }
    return converters[detect_format(state_dict)](state_dict)


def _stage_prefix(stage: int, part: str) -> str:
    """timm's name of MiT stage ``stage``'s patch embedding (``part`` = "patch") or blocks."""
    if part == "patch":
        return "patch_embed." if stage == 0 else f"stages.{stage}.downsample."
    return f"stages.{stage}.blocks."


def mit_from_mmseg(state_dict: StateDict) -> StateDict:
    """MMSegmentation's ``MixVisionTransformer`` keys (``layers.i.0/1/2``) to timm ``pvt_v2``.

    nn.MultiheadAttention's ``in_proj`` [3C, C] holds q, k, v stacked: q is the first C rows,
    timm's ``kv`` the other 2C. The FFN's 1x1 convs become linear layers.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"layers\.(\d+)\.(\d)\.(.+)", key)
        if match is None:
            raise KeyError(key)
        stage, part, rest = int(match[1]), match[2], match[3]
        if part == "0":  # patch embedding
            out[_stage_prefix(stage, "patch") + rest.replace("projection.", "proj.")] = value
        elif part == "2":  # the stage's final norm
            out[f"stages.{stage}.norm.{rest}"] = value
        else:
            block, name = rest.split(".", 1)
            out.update(_mmseg_block_entry(_stage_prefix(stage, "blocks") + f"{block}.", name, value))
    return out


def _mmseg_block_entry(prefix: str, name: str, value: torch.Tensor) -> StateDict:
    if name.startswith("attn.attn.in_proj_"):
        kind = name.rsplit("_", 1)[1]  # weight or bias
        channels = value.shape[0] // 3
        return {f"{prefix}attn.q.{kind}": value[:channels], f"{prefix}attn.kv.{kind}": value[channels:]}
    renames = {
        "attn.attn.out_proj.": "attn.proj.",
        "ffn.layers.0.": "mlp.fc1.",
        "ffn.layers.1.": "mlp.dwconv.",
        "ffn.layers.4.": "mlp.fc2.",
    }
    for old, new in renames.items():
        if name.startswith(old):
            name = new + name[len(old) :]
            if new in ("mlp.fc1.", "mlp.fc2.") and value.ndim == 4:
                value = value.flatten(1)
            break
    return {prefix + name: value}


def mit_from_nvlabs(state_dict: StateDict) -> StateDict:
    """The official SegFormer (NVlabs) ``mix_transformer`` keys to timm ``pvt_v2``."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"patch_embed(\d)\.(.+)", key):
            out[_stage_prefix(int(match[1]) - 1, "patch") + match[2]] = value
        elif match := re.fullmatch(r"block(\d)\.(.+)", key):
            out[_stage_prefix(int(match[1]) - 1, "blocks") + match[2].replace("dwconv.dwconv.", "dwconv.")] = value
        elif match := re.fullmatch(r"norm(\d)\.(.+)", key):
            out[f"stages.{int(match[1]) - 1}.norm.{match[2]}"] = value
        else:
            raise KeyError(key)
    return out


def mit_from_transformers(state_dict: StateDict) -> StateDict:
    """transformers' ``SegformerModel`` encoder keys (as saved on the Hub) to timm ``pvt_v2``.

    transformers keeps key and value apart; timm's ``kv`` is them stacked, key first.
    """
    out: StateDict = {}
    renames = {
        "layer_norm_1.": "norm1.",
        "layer_norm_2.": "norm2.",
        "attention.self.query.": "attn.q.",
        "attention.self.sr.": "attn.sr.",
        "attention.self.layer_norm.": "attn.norm.",
        "attention.output.dense.": "attn.proj.",
        "mlp.dense1.": "mlp.fc1.",
        "mlp.dwconv.dwconv.": "mlp.dwconv.",
        "mlp.dense2.": "mlp.fc2.",
    }
    for key, value in state_dict.items():
        if match := re.fullmatch(r"encoder\.patch_embeddings\.(\d)\.(proj|layer_norm)\.(.+)", key):
            part = "proj" if match[2] == "proj" else "norm"
            out[_stage_prefix(int(match[1]), "patch") + f"{part}.{match[3]}"] = value
        elif match := re.fullmatch(r"encoder\.layer_norm\.(\d)\.(.+)", key):
            out[f"stages.{match[1]}.norm.{match[2]}"] = value
        elif match := re.fullmatch(r"encoder\.block\.(\d)\.(\d+)\.(.+)", key):
            prefix = _stage_prefix(int(match[1]), "blocks") + f"{match[2]}."
            name = match[3]
            if name.startswith(("attention.self.key.", "attention.self.value.")):
                continue  # stacked into kv below
            for old, new in renames.items():
                if name.startswith(old):
                    name = new + name[len(old) :]
                    break
            else:
                raise KeyError(key)
            out[prefix + name] = value
        else:
            raise KeyError(key)
    for key in state_dict:
        if match := re.fullmatch(r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.key\.(weight|bias)", key):
            stem = key[: -len(f"key.{match[3]}")]
            value = torch.cat([state_dict[key], state_dict[f"{stem}value.{match[3]}"]])
            out[_stage_prefix(int(match[1]), "blocks") + f"{match[2]}.attn.kv.{match[3]}"] = value
    return out


def resnet_from_mmseg(state_dict: StateDict) -> StateDict:
    """MMSegmentation's ``ResNetV1c`` keys to timm ``resnet50c``: only the deep stem is named
    differently (``stem.0/1/3/4/6/7`` -> ``conv1.0/1/3/4/6`` and ``bn1``)."""
    stem = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}
    out: StateDict = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"stem\.(\d)\.(.+)", key):
            if match[1] not in stem:
                raise KeyError(key)
            key = f"{stem[match[1]]}.{match[2]}"
        out[key] = value
    return out


def to_encoder_keys(state_dict: StateDict, encoder_keys: set[str]) -> StateDict:
    """Fit timm full-model keys to a ``features_only`` module's, which may flatten ``stages.0``
    (and ``stem.0``) to ``stages_0``. Keys the encoder lacks are kept as they are, for the caller to report."""
    out: StateDict = {}
    for key, value in state_dict.items():
        flat = re.sub(r"^(stages|layers|stem)\.(\d+)\.", r"\1_\2.", key)
        if key not in encoder_keys and f"model.{key}" in encoder_keys:  # a wrapped model (ViTs)
            flat = f"model.{key}"
        out[flat if key not in encoder_keys and flat in encoder_keys else key] = value
    return out


class UnknownKeys(ValueError):
    """Source keys no rule maps; ``keys`` lists them."""

    def __init__(self, keys: list[str], hint: str | None = None) -> None:
        super().__init__(f"{len(keys)} keys with no counterpart: {', '.join(keys[:5])}")
        self.keys = keys
        self.hint = hint  # what does convert, when the checkpoint is of a kind that does not


def mmseg_backbone(state_dict: StateDict, prefix: str) -> StateDict:
    """The backbone keys of an MMSegmentation checkpoint under ``prefix`` as hooktrain's ``encoder.*``
    (timm's full-model names) and ``out_norms.*``. Raises :class:`UnknownKeys`."""
    try:
        converted = to_timm(strip_prefix(state_dict, prefix))
    except KeyError as err:
        raise UnknownKeys([f"{prefix}{err.args[0]}"]) from None
    # A backbone's per-level norms (mmpretrain ConvNeXt's norm{i}) are the segmentor's out_norms.
    return {k if k.startswith("out_norms.") else f"encoder.{k}": v for k, v in converted.items()}
