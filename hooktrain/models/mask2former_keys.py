"""transformers' ``Mask2FormerForUniversalSegmentation`` checkpoints as hooktrain's
:class:`~hooktrain.models.mask2former.Mask2Former`.

:func:`mask2former_keys_from_transformers` renames a state dict (Swin or ResNet backbone) to
hooktrain's keys, the encoder's under timm's full-model names (``encoder.layers.0...``, fitted to
the ``features_only`` module by :func:`hooktrain.models.backbone_keys.to_encoder_keys`), the Swin
backbone's per-level norms as ``out_norms.*``. :func:`mask2former_model_from_transformers` reads
a ``config.json`` into the recipe's ``model`` section.
"""

from __future__ import annotations

import re

import torch

from hooktrain.models.backbone_keys import UnknownKeys
from hooktrain.models.swin_convnext_vit_keys import swin_from_transformers

StateDict = dict[str, torch.Tensor]

_BACKBONE = "model.pixel_level_module.encoder."
# (pattern, replacement) on the keys after ``model.pixel_level_module.decoder.`` / ``model.transformer_module.``
_PIXEL_DECODER = [
    (r"level_embed", r"level_embed"),
    (r"input_projections\.(\d)\.([01])\.(weight|bias)", r"input_proj.\1.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     r"layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"layers.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.(fc1|fc2)\.(weight|bias)", r"layers.\1.\2.\3"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"layers.\1.norm2.\2"),
    (r"mask_projection\.(weight|bias)", r"mask_proj.\1"),
    (r"adapter_(\d+)\.([01])\.(weight|bias)", lambda m: f"lateral_convs.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (r"layer_(\d+)\.([01])\.(weight|bias)", lambda m: f"output_convs.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
]  # fmt: skip
_DECODER = [
    (r"queries_embedder\.weight", r"query_pos.weight"),
    (r"queries_features\.weight", r"query_feat.weight"),
    (r"level_embed\.weight", r"level_embed.weight"),
    (r"input_projections\.(\d)\.(weight|bias)", r"input_proj.\1.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.([qkv]_proj|out_proj)\.(weight|bias)", r"layers.\1.self_attn.\2.\3"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"layers.\1.self_attn_norm.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(weight|bias)", r"layers.\1.cross_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)", r"layers.\1.cross_attn_norm.\2"),
    (r"decoder\.layers\.(\d+)\.(fc1|fc2)\.(weight|bias)", r"layers.\1.\2.\3"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
    (r"decoder\.layernorm\.(weight|bias)", r"norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(weight|bias)", r"mask_embed.layers.\1.\2"),
]  # fmt: skip
_CROSS_ATTN_IN_PROJ = re.compile(r"decoder\.layers\.(\d+)\.cross_attn\.in_proj_(weight|bias)")


def mask2former_keys_from_transformers(state_dict: StateDict) -> StateDict:
    """A transformers Mask2Former state dict (as saved, or as transformers 5 holds it) under hooktrain's
    keys. ``nn.MultiheadAttention``'s stacked ``in_proj`` becomes separate q, k, v projections; the
    loss's ``criterion.empty_weight`` and SwinModel's unused final ``layernorm`` are dropped. Raises
    :class:`~hooktrain.models.backbone_keys.UnknownKeys` naming every key no rule maps."""
    backbone, out, unknown = {}, {}, []
    for key, value in state_dict.items():
        if key == "criterion.empty_weight":
            continue
        if key.startswith(_BACKBONE):
            backbone[key.removeprefix(_BACKBONE)] = value
        elif key in ("class_predictor.weight", "class_predictor.bias"):
            out["decoder.class_head." + key.removeprefix("class_predictor.")] = value
        elif key.startswith(prefix := "model.pixel_level_module.decoder."):
            _rename(key, prefix, _PIXEL_DECODER, "pixel_decoder.", value, out, unknown)
        elif key.startswith(prefix := "model.transformer_module."):
            name = key.removeprefix(prefix)
            if match := _CROSS_ATTN_IN_PROJ.fullmatch(name):
                for part, chunk in zip("qkv", value.chunk(3)):
                    out[f"decoder.layers.{match[1]}.cross_attn.{part}_proj.{match[2]}"] = chunk
            else:
                _rename(key, prefix, _DECODER, "decoder.", value, out, unknown)
        else:
            unknown.append(key)
    try:
        out.update(_backbone_keys(backbone))
    except KeyError as err:
        key = str(err.args[0])
        unknown.append(_BACKBONE + ("swin." if "swin." + key in backbone else "") + key)
    if unknown:
        raise UnknownKeys(unknown, hint="is it a transformers Mask2Former checkpoint with a Swin or ResNet backbone?")
    return out


def _rename(key: str, prefix: str, rules: list, new_prefix: str, value, out: StateDict, unknown: list) -> None:
    name = key.removeprefix(prefix)
    for pattern, replacement in rules:
        if (match := re.fullmatch(pattern, name)) is not None:
            name = match.expand(replacement) if isinstance(replacement, str) else replacement(match)
            out[new_prefix + name] = value
            return
    unknown.append(key)


def _backbone_keys(backbone: StateDict) -> StateDict:
    """The backbone's tensors as ``encoder.<timm key>`` (``out_norms.*`` for Swin's per-level norms)."""
    backbone = {re.sub(r"^swin\.", "", k): v for k, v in backbone.items()}  # transformers 5 nests SwinModel
    if "embeddings.patch_embeddings.projection.weight" in backbone:
        # SwinModel's final norm: SwinBackbone holds it but never applies it
        converted = swin_from_transformers({k: v for k, v in backbone.items() if not k.startswith("layernorm.")})
    elif "embedder.embedder.convolution.weight" in backbone:
        converted = resnet_from_transformers(backbone)
    else:
        raise KeyError(next(iter(sorted(backbone)), "(no backbone tensors)"))
    return {k if k.startswith("out_norms.") else f"encoder.{k}": v for k, v in converted.items()}


_RESNET_LAYER = re.compile(
    r"encoder\.stages\.(\d)\.layers\.(\d+)\.(shortcut|layer\.(\d))\.(convolution|normalization)\.(.+)"
)


def resnet_from_transformers(state_dict: StateDict) -> StateDict:
    """transformers' ``ResNetBackbone`` keys (``downsample_in_bottleneck: false``, the stride on the
    3x3 convolution, as timm's) to timm ``resnet*``: the stem's ``conv1``/``bn1``, and per layer
    ``conv{j}``/``bn{j}`` and the shortcut's ``downsample.0``/``downsample.1``."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(.+)", key):
            name = f"{'conv1' if match[1] == 'convolution' else 'bn1'}.{match[2]}"
        elif match := _RESNET_LAYER.fullmatch(key):
            stage, layer, part, index, kind, rest = match.groups()
            if part == "shortcut":
                name = f"downsample.{0 if kind == 'convolution' else 1}.{rest}"
            else:
                name = f"{'conv' if kind == 'convolution' else 'bn'}{int(index) + 1}.{rest}"
            name = f"layer{int(stage) + 1}.{layer}.{name}"
        else:
            raise KeyError(key)
        out[name] = value
    return out


# transformers 5.25's Mask2FormerConfig defaults for the keys read here (config.json may leave them out)
_DEFAULTS = {
    "feature_size": 256, "mask_feature_size": 256, "hidden_dim": 256, "encoder_feedforward_dim": 1024,
    "activation_function": "relu", "encoder_layers": 6, "decoder_layers": 10, "num_attention_heads": 8,
    "dropout": 0.0, "dim_feedforward": 2048, "pre_norm": False, "enforce_input_projection": False,
    "common_stride": 4, "num_queries": 100, "no_object_weight": 0.1, "class_weight": 2.0, "mask_weight": 5.0,
    "dice_weight": 5.0, "train_num_points": 12544, "oversample_ratio": 3.0, "importance_sample_ratio": 0.75,
    "feature_strides": [4, 8, 16, 32],
}  # fmt: skip
# what hooktrain's Mask2Former always is
_FIXED = {"activation_function": "relu", "pre_norm": False, "common_stride": 4, "feature_strides": [4, 8, 16, 32]}


def mask2former_model_from_transformers(config: dict) -> dict:
    """The recipe's ``model`` section (``encoder`` and ``decode_head``) of a transformers Mask2Former
    ``config.json`` dict with a Swin or ResNet backbone. Raises ``ValueError`` naming the config key
    hooktrain cannot represent."""
    if config.get("model_type") != "mask2former":
        raise ValueError(f"model_type {config.get('model_type')!r} is not a Mask2Former checkpoint ('mask2former')")
    get = {**_DEFAULTS, **config}.get
    for key, value in _FIXED.items():
        got = list(get(key)) if isinstance(value, list) else get(key)
        if got != value:
            raise ValueError(f"{key} {get(key)!r}: hooktrain's Mask2Former has {value!r}")
    loss = {
        "class_weight": get("class_weight"), "mask_weight": get("mask_weight"), "dice_weight": get("dice_weight"),
        "no_object_weight": get("no_object_weight"), "num_points": get("train_num_points"),
        "oversample_ratio": get("oversample_ratio"), "importance_sample_ratio": get("importance_sample_ratio"),
    }  # fmt: skip
    head = {
        "type": "mask2former", "num_queries": get("num_queries"), "channels": get("feature_size"),
        "hidden_dim": get("hidden_dim"), "mask_feature_size": get("mask_feature_size"),
        "num_heads": get("num_attention_heads"), "encoder_layers": get("encoder_layers"),
        "encoder_feedforward": get("encoder_feedforward_dim"), "decoder_layers": get("decoder_layers") - 1,
        "decoder_feedforward": get("dim_feedforward"), "enforce_input_projection": get("enforce_input_projection"),
        "dropout": get("dropout"), "loss": loss,
    }  # fmt: skip
    return {"encoder": _encoder(config.get("backbone_config") or {"model_type": "swin"}), "decode_head": head}


# (embed_dim, depths, num_heads, window_size) of the Hub's Mask2Former Swins -> timm's model of those sizes
_TIMM_SWINS = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24), 7): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), (3, 6, 12, 24), 7): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 7): "swin_base_patch4_window7_224",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 12): "swin_base_patch4_window12_384",
    (192, (2, 2, 18, 2), (6, 12, 24, 48), 12): "swin_large_patch4_window12_384",
}


def _encoder(backbone: dict) -> dict:
    """``model.encoder`` for the backbone: timm's Swin of its sizes (other sizes: Swin-T's with them as
    ``kwargs``), or timm's ResNet-50 with its depths and widths as ``kwargs``. Swin's drop path
    is 0 (timm's default is 0.1); set ``model.encoder.drop_path_rate`` to fine-tune with one."""
    kind = backbone.get("model_type")
    stages = backbone.get("out_features") or ["stage1", "stage2", "stage3", "stage4"]
    if list(stages) != ["stage1", "stage2", "stage3", "stage4"]:
        raise ValueError(f"backbone_config.out_features {stages}: hooktrain reads all four stages")
    if kind == "swin":
        get = {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
               "patch_size": 4, "mlp_ratio": 4.0, "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
               "use_absolute_embeddings": False, **backbone}.get  # fmt: skip
        for key, want in (("hidden_act", "gelu"), ("layer_norm_eps", 1e-5), ("use_absolute_embeddings", False)):
            if get(key) != want:
                raise ValueError(f"backbone_config.{key} {get(key)!r}: timm's Swin has {want!r}")
        kwargs = {key: get(key) for key in ("embed_dim", "depths", "num_heads", "window_size", "patch_size",
                                            "mlp_ratio", "qkv_bias")}  # fmt: skip
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        sizes = (kwargs["embed_dim"], tuple(kwargs["depths"]), tuple(kwargs["num_heads"]), kwargs["window_size"])
        name = _TIMM_SWINS.get(sizes) if (kwargs["patch_size"], kwargs["mlp_ratio"], kwargs["qkv_bias"]) == (
            4, 4.0, True) else None  # fmt: skip
        # transformers' per-level norms are nn.LayerNorm's default eps, not layer_norm_eps
        return {"name": name or "swin_tiny_patch4_window7_224", "kwargs": {} if name else kwargs,
                "drop_path_rate": 0.0, "out_norm": "layer_norm", "out_norm_eps": 1e-5}  # fmt: skip
    if kind == "resnet":
        get = {"embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 6, 3],
               "layer_type": "bottleneck", "hidden_act": "relu", "downsample_in_first_stage": False,
               "downsample_in_bottleneck": False, **backbone}.get  # fmt: skip
        for key, want in (("layer_type", "bottleneck"), ("hidden_act", "relu"), ("downsample_in_first_stage", False),
                          ("downsample_in_bottleneck", False), ("embedding_size", 64)):  # fmt: skip
            if get(key) != want:
                raise ValueError(f"backbone_config.{key} {get(key)!r}: timm's resnet50 has {want!r}")
        kwargs = {"layers": list(get("depths")), "channels": [size // 4 for size in get("hidden_sizes")]}
        return {"name": "resnet50", "kwargs": kwargs}
    raise ValueError(f"backbone_config.model_type {kind!r}: hooktrain converts Swin and ResNet backbones")
