"""transformers' EoMT checkpoints as :class:`~hooktrain.models.eomt.EoMT` on timm's ViTs.

``EomtForUniversalSegmentation`` (``model_type: eomt``, DINOv2 with registers) becomes timm's
``VisionTransformer`` of ``vit_*_patch14_reg4_dinov2``; ``EomtDinov3ForUniversalSegmentation``
(``model_type: eomt_dinov3``, DINOv3 with RoPE) becomes timm's ``Eva`` of ``vit_*_patch16_dinov3``.
:func:`eomt_settings_from_transformers` reads a checkpoint's ``config.json`` (any size),
:func:`build_eomt_from_settings` builds the model (random weights) and
:func:`eomt_keys_from_transformers` renames the state dict to it.
"""

from __future__ import annotations

import functools
import re

import timm
import torch
from timm.layers import DropPath, LayerNorm, SwiGLUPacked, get_act_layer

from hooktrain.models.eomt import EoMT

StateDict = dict[str, torch.Tensor]

# transformers 5.25's defaults for the config keys read here (config.json may leave a default out).
_SHARED_DEFAULTS = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0, "layer_norm_eps": 1e-6,
    "image_size": 640, "patch_size": 16, "num_channels": 3, "layerscale_value": 1.0, "num_upscale_blocks": 2,
    "num_blocks": 4, "num_queries": 200, "num_register_tokens": 4,
}  # fmt: skip
_DEFAULTS = {
    "eomt": {**_SHARED_DEFAULTS, "mlp_ratio": 4, "use_swiglu_ffn": False},
    "eomt_dinov3": {
        **_SHARED_DEFAULTS, "intermediate_size": 4096, "use_gated_mlp": False, "rope_parameters": None,
        "query_bias": True, "key_bias": False, "value_bias": True, "proj_bias": True, "mlp_bias": True,
        "pos_embed_shift": None, "pos_embed_jitter": None, "pos_embed_rescale": 2.0,
    },
}  # fmt: skip
# transformers' ``hidden_act`` names as timm's
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu"}


def eomt_settings_from_transformers(config: dict) -> dict:
    """What :func:`build_eomt_from_settings` needs, from a transformers EoMT ``config.json`` dict.

    Raises ``ValueError`` naming the config key when the checkpoint has something timm's ViT cannot
    represent."""
    model_type = config.get("model_type")
    if model_type not in _DEFAULTS:
        raise ValueError(f"model_type {model_type!r} is not an EoMT checkpoint ('eomt' or 'eomt_dinov3')")
    get = {**_DEFAULTS[model_type], **config}.get
    dim, heads = get("hidden_size"), get("num_attention_heads")
    if dim % heads:
        raise ValueError(f"num_attention_heads {heads} does not divide hidden_size {dim}")
    patch_size = get("patch_size")
    if isinstance(patch_size, (list, tuple)):
        if len(set(patch_size)) != 1:
            raise ValueError(f"patch_size {patch_size}: only square patches convert")
        patch_size = patch_size[0]
    act = _ACTIVATIONS.get(get("hidden_act"))
    if act is None:
        raise ValueError(f"hidden_act {get('hidden_act')!r} has no timm equivalent here ({sorted(_ACTIVATIONS)})")
    settings = {
        "family": "dinov3" if model_type == "eomt_dinov3" else "dinov2",
        "embed_dim": dim, "depth": get("num_hidden_layers"), "num_heads": heads, "patch_size": patch_size,
        "img_size": get("image_size"), "in_chans": get("num_channels"), "reg_tokens": get("num_register_tokens"),
        "layer_scale_init": get("layerscale_value"), "norm_eps": get("layer_norm_eps"), "act": act,
        "dropout": get("hidden_dropout_prob"), "attn_dropout": get("attention_dropout"),
        "drop_path_rate": get("drop_path_rate"), "num_queries": get("num_queries"), "num_blocks": get("num_blocks"),
        "num_upscale_blocks": get("num_upscale_blocks"), "id2label": _labels(config),
    }  # fmt: skip
    settings["num_labels"] = len(settings["id2label"])
    if settings["family"] == "dinov2":
        settings.update(_dinov2_mlp(get))
    else:
        settings.update(_dinov3_settings(get, act))
    return settings


def _labels(config: dict) -> dict[int, str]:
    """``id2label`` with integer keys; config.json leaves out transformers' default, two ``LABEL_i``."""
    id2label = config.get("id2label") or {i: f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
    return {int(index): label for index, label in id2label.items()}


def _dinov2_mlp(get) -> dict:
    """transformers' DINOv2 MLP: ``mlp_ratio``, or SwiGLU with 2/3 of it rounded up to a multiple of 8."""
    hidden = int(get("hidden_size") * get("mlp_ratio"))
    if get("use_swiglu_ffn"):
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return {"mlp_hidden": hidden, "swiglu": bool(get("use_swiglu_ffn"))}


def _dinov3_settings(get, act: str) -> dict:
    """DINOv3's MLP, attention biases and RoPE, checked against what timm's ``Eva`` has."""
    gated = bool(get("use_gated_mlp"))
    if act != ("silu" if gated else "gelu"):
        raise ValueError(f"hidden_act {get('hidden_act')!r}: timm's DINOv3 MLP uses {'silu' if gated else 'gelu'}")
    if get("key_bias"):
        raise ValueError("key_bias: timm's Eva attention has no key bias")
    if get("query_bias") != get("value_bias"):
        raise ValueError("query_bias: timm's Eva attention has query and value biases both or neither")
    for key in ("proj_bias", "mlp_bias"):
        if not get(key):
            raise ValueError(f"{key}: timm's Eva always has this bias")
    rope = get("rope_parameters") or {"rope_type": "default", "rope_theta": 100.0}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters: rope_type {rope.get('rope_type')!r} (only 'default' converts)")
    return {
        "mlp_hidden": get("intermediate_size"), "swiglu": gated, "qkv_bias": bool(get("query_bias")),
        "rope_temperature": rope.get("rope_theta", 100.0), "rope_shift": get("pos_embed_shift"),
        "rope_jitter": get("pos_embed_jitter"), "rope_rescale": get("pos_embed_rescale"),
    }  # fmt: skip


def timm_vit_from_settings(settings: dict) -> torch.nn.Module:
    """The timm ViT of ``settings`` (random weights, no classifier, ``dynamic_img_size``)."""
    dim = settings["embed_dim"]
    common = dict(
        num_classes=0, dynamic_img_size=True, embed_dim=dim, depth=settings["depth"],
        num_heads=settings["num_heads"], patch_size=settings["patch_size"], img_size=settings["img_size"],
        in_chans=settings["in_chans"], init_values=settings["layer_scale_init"] or 1.0,  # 0 would drop layer scale
        norm_layer=functools.partial(LayerNorm, eps=settings["norm_eps"]), pos_drop_rate=settings["dropout"],
        attn_drop_rate=settings["attn_dropout"],
    )  # fmt: skip
    if settings["family"] == "dinov2":
        # packed SwiGLU (timm's giant DINOv2): fc1 holds gate and value, twice the hidden width
        width = 2 * settings["mlp_hidden"] if settings["swiglu"] else settings["mlp_hidden"]
        mlp = dict(mlp_layer=SwiGLUPacked, act_layer="silu") if settings["swiglu"] else dict(act_layer=settings["act"])
        vit = timm.create_model(
            "vit_small_patch14_reg4_dinov2", reg_tokens=settings["reg_tokens"],
            mlp_ratio=_mlp_ratio(dim, width), **mlp, **common,
        )  # fmt: skip
    else:
        vit = timm.create_model(
            "vit_small_patch16_dinov3", num_reg_tokens=settings["reg_tokens"], qkv_bias=settings["qkv_bias"],
            mlp_ratio=_mlp_ratio(dim, settings["mlp_hidden"]), swiglu_mlp=settings["swiglu"],
            # any alignment selects timm's split SwiGLU (fc1_g, fc1_x: vit_huge_plus_patch16_dinov3's names)
            swiglu_align_to=1 if settings["swiglu"] else 0,
            rope_temperature=settings["rope_temperature"], rope_shift_coords=settings["rope_shift"],
            rope_jitter_coords=settings["rope_jitter"], rope_rescale_coords=settings["rope_rescale"],
            **common,
        )  # fmt: skip
    if settings["drop_path_rate"]:
        # transformers drops every block's branches at the same rate; timm's drop_path_rate ramps up from 0
        for block in vit.blocks:
            block.drop_path1 = DropPath(settings["drop_path_rate"])
            block.drop_path2 = DropPath(settings["drop_path_rate"])
    return vit


def _mlp_ratio(dim: int, hidden: int) -> float:
    """A ratio for which timm's ``int(dim * mlp_ratio)`` is exactly ``hidden``."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def build_eomt_from_settings(settings: dict) -> EoMT:
    """:class:`EoMT` (random weights) of :func:`eomt_settings_from_transformers`'s ``settings``."""
    return EoMT(
        timm_vit_from_settings(settings),
        settings["num_labels"],
        num_queries=settings["num_queries"],
        num_blocks=settings["num_blocks"],
        num_upscale_blocks=settings["num_upscale_blocks"],
        act_layer=get_act_layer(settings["act"]),
    )


# transformers' names (after the layer's ``layers.N.``) -> timm's (after ``encoder.blocks.N.``)
_BLOCK_RENAMES = {
    "dinov2": {
        "norm1": "norm1", "norm2": "norm2", "attention.out_proj": "attn.proj", "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.down_proj": "mlp.fc2",
    },
    "dinov3": {
        "norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "layer_scale1.lambda1": "gamma_1",
        "layer_scale2.lambda1": "gamma_2", "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2",
        "attention.q_proj.bias": "attn.q_bias", "attention.v_proj.bias": "attn.v_bias",
    },
}  # fmt: skip
_RENAMES = {
    "embeddings.cls_token": "encoder.cls_token",
    "embeddings.register_tokens": "encoder.reg_token",
    "embeddings.patch_embeddings.projection": "encoder.patch_embed.proj",  # DINOv2
    "embeddings.patch_embeddings": "encoder.patch_embed.proj",  # DINOv3
    "layernorm": "encoder.norm",
    "query": "query",
    "class_predictor": "class_head",
    "mask_head": "mask_head",
    "attn_mask_probs": "attn_mask_probs",
}
_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_UPSCALE_RENAMES = {"conv1": "upsample", "conv2": "depthwise", "layernorm2d": "norm"}


def eomt_keys_from_transformers(state_dict: StateDict, config: dict) -> StateDict:
    """A transformers EoMT state dict under :class:`EoMT`'s names (``config``: its ``config.json``).

    q/k/v projections become timm's fused ``qkv``, SwiGLU's gate and up projections timm's MLP, the
    position embeddings timm's ``pos_embed``; the loss's buffers (``criterion.*``) are dropped."""
    settings = eomt_settings_from_transformers(config)
    family = settings["family"]
    out, parts = {}, {}
    for key, value in state_dict.items():
        if key.startswith("criterion.") or key == "embeddings.mask_token" or value.numel() == 0:
            continue  # the loss's class weights, DINOv3's unused mask token, no register tokens
        if key == "embeddings.position_embeddings.weight":
            out["encoder.pos_embed"] = value[None]
        elif match := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias|lambda1)", key):
            layer, name, kind = match.groups()
            if _is_fused(settings, name, kind):
                parts.setdefault(layer, {})[f"{name}.{kind}"] = value
            else:
                out[f"encoder.blocks.{layer}.{_rename(_BLOCK_RENAMES[family], f'{name}.{kind}', key)}"] = value
        elif match := re.fullmatch(r"upscale_block\.block\.(\d+)\.(\w+)\.(weight|bias)", key):
            index, name, kind = match.groups()
            out[f"upscale.{index}.{_rename(_UPSCALE_RENAMES, name, key)}.{kind}"] = value
        else:
            out[_rename(_RENAMES, key, key)] = value
    for layer, layer_parts in parts.items():
        out.update(_fused(family, f"encoder.blocks.{layer}", layer_parts))
    return out


def _is_fused(settings: dict, name: str, kind: str) -> bool:
    """Whether a layer's tensor is one part of a timm tensor that joins several (see :func:`_fused`)."""
    if name in _QKV:
        return settings["family"] == "dinov2" or kind == "weight"  # Eva keeps q_bias, v_bias apart (no k bias)
    return settings["swiglu"] and name in ("mlp.gate_proj", "mlp.up_proj")


def _fused(family: str, prefix: str, parts: StateDict) -> StateDict:
    """timm's fused tensors of one block: ``attn.qkv`` and the SwiGLU input projections."""
    out = {f"{prefix}.attn.qkv.weight": torch.cat([parts.pop(f"{name}.weight") for name in _QKV])}
    if family == "dinov2":
        out[f"{prefix}.attn.qkv.bias"] = torch.cat([parts.pop(f"{name}.bias") for name in _QKV])
    for kind in ("weight", "bias"):
        if f"mlp.gate_proj.{kind}" not in parts:
            continue
        gate, up = parts.pop(f"mlp.gate_proj.{kind}"), parts.pop(f"mlp.up_proj.{kind}")
        if family == "dinov2":
            out[f"{prefix}.mlp.fc1.{kind}"] = torch.cat([gate, up])  # SwiGLUPacked: act(first half) * second
        else:
            out[f"{prefix}.mlp.fc1_g.{kind}"], out[f"{prefix}.mlp.fc1_x.{kind}"] = gate, up
    if parts:
        raise ValueError(f"unexpected keys under {prefix}: {sorted(parts)}")
    return out


def _rename(renames: dict[str, str], name: str, key: str) -> str:
    """``name`` with its longest prefix in ``renames`` replaced."""
    for old in sorted(renames, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return renames[old] + name[len(old) :]
    raise ValueError(f"unknown key in an EoMT checkpoint: {key}")
