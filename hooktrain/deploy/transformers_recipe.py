"""A transformers checkpoint's ``config.json`` as a hooktrain recipe, and the check that a given recipe fits it.

``hooktrain convert transformers SOURCE`` without ``--recipe`` derives the recipe here:
:func:`recipe_from_transformers` turns EoMT (``model_type`` ``eomt``, ``eomt_dinov3``), Mask2Former
(``mask2former``, Swin or ResNet backbones), SegFormer and UperNet (ConvNext or Swin backbones of the
Hub's sizes) configs into recipe data whose model is the checkpoint's architecture, with its classes
(``id2label``), its normalisation (``preprocessor_config.json``) and its evaluation (EoMT: sliding
windows of the training size; Mask2Former: the whole image at short side 512). The
data sources are placeholders (``data/<checkpoint name>``, the ADE20K folder layout) that ``predict``
and ``Segmenter`` never read; set them to fine-tune. With ``--recipe``, :func:`check_recipe_matches`
names the first setting the recipe's model and the config disagree on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from hooktrain.errors import UserError
from hooktrain.models.hub import HubUnavailable, offline_if_unreachable

EOMT_TYPES = ("eomt", "eomt_dinov3")
CONVERTED_TYPES = (*EOMT_TYPES, "mask2former", "segformer", "upernet")
# timm's default LayerNorm eps for each family's base models (dinov2: timm's LayerNorm; dinov3: eps 1e-5)
_TIMM_NORM_EPS = {"dinov2": 1e-6, "dinov3": 1e-5}
_VIT_SIZES = {
    "dinov2": {384: "small", 768: "base", 1024: "large"},
    "dinov3": {384: "small", 768: "base", 1024: "large", 1280: "huge_plus"},
}
# SegFormer-B0..B5 as transformers' SegformerConfig describes them: depths, hidden_sizes, decoder_hidden_size
_MIT_SIZES = {
    "mit_b0": ([2, 2, 2, 2], [32, 64, 160, 256]), "mit_b1": ([2, 2, 2, 2], [64, 128, 320, 512]),
    "mit_b2": ([3, 4, 6, 3], [64, 128, 320, 512]), "mit_b3": ([3, 4, 18, 3], [64, 128, 320, 512]),
    "mit_b4": ([3, 8, 27, 3], [64, 128, 320, 512]), "mit_b5": ([3, 6, 40, 3], [64, 128, 320, 512]),
}  # fmt: skip
_MIT_FIXED = {"num_attention_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1], "patch_sizes": [7, 3, 3, 3],
              "strides": [4, 2, 2, 2], "mlp_ratios": [4, 4, 4, 4], "num_channels": 3}  # fmt: skip


def transformers_config(source: str) -> tuple[dict | None, dict | None]:
    """``config.json`` and ``preprocessor_config.json`` of a transformers checkpoint (a directory or a
    Hub id, downloaded through huggingface_hub), each None where the source has none (a weights file)."""
    path = Path(source)
    if path.is_dir():
        return _read_json(path / "config.json"), _read_json(path / "preprocessor_config.json")
    if path.is_file():
        return None, None
    return _hub_json(source, "config.json"), _hub_json(source, "preprocessor_config.json", optional=True)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"convert transformers: {path} is not valid JSON ({err}); give the checkpoint's own file")


def _hub_json(repo: str, name: str, optional: bool = False) -> dict | None:
    """A JSON file of Hub model ``repo``, None when the repository has no such file (``optional``:
    also when the Hub is out of reach and the cache lacks it)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    offline, patch = offline_if_unreachable()
    try:
        with patch:
            try:
                return _read_json(Path(hf_hub_download(repo, name)))
            except (RemoteEntryNotFoundError, *([LocalEntryNotFoundError] if optional else [])):
                return None
    except (OSError, ValueError) as err:
        why = "the Hugging Face Hub is offline or unreachable" if offline else str(err).strip().splitlines()[0]
        err = HubUnavailable(why)
        raise UserError(
            f"convert transformers: '{repo}' is neither a local path nor a downloadable Hub model ({err}); "
            "give a directory with model.safetensors or a Hub id such as nvidia/segformer-b0-finetuned-ade-512-512"
        ) from None


def check_model_type(config: dict, source: str) -> str:
    """The config's ``model_type``, refused in one line unless hooktrain converts it."""
    model_type = config.get("model_type")
    if model_type not in CONVERTED_TYPES:
        raise UserError(
            f"convert transformers: {source} is a model_type {model_type!r} checkpoint (config.json), which hooktrain "
            f"does not convert; it converts {', '.join(CONVERTED_TYPES)}"
        )
    return model_type


def recipe_from_transformers(config: dict, preprocessor: dict | None, source: str) -> dict[str, Any]:
    """Recipe data (before validation) for the checkpoint of ``config``: EoMT, Mask2Former, SegFormer or
    UperNet."""
    model_type = check_model_type(config, source)
    if model_type in EOMT_TYPES:
        model, size = _eomt_model(config), _eomt_settings(config)["img_size"]
    elif model_type == "mask2former":
        model, size = _mask2former_model(config), 512  # Mask2Former's ADE20K evaluation: short side 512
    elif model_type == "segformer":
        processor_size = (preprocessor or {}).get("size")  # SegformerImageProcessor's {height, width}
        height = processor_size.get("height") if isinstance(processor_size, dict) else None
        model, size = _segformer_model(config), height or 512
    else:
        model, size = _upernet_model(config), 512
    names = _class_names(config)
    name = Path(source).name
    placeholder = {"type": "folder", "root": f"data/{name}"}
    data = {
        "num_classes": len(names),
        "class_names": names,
        **_normalisation(preprocessor),
        "train": {"source": {**placeholder, "split": "training"}},
        "val": {"source": {**placeholder, "split": "validation"}, "pipeline": {"scale": [4 * size, size]}},
    }
    return {"work_dir": f"work_dirs/{name}", "model": model, "data": data}


def _eomt_settings(config: dict) -> dict:
    from hooktrain.models.eomt_keys import eomt_settings_from_transformers

    try:
        return eomt_settings_from_transformers(config)
    except ValueError as err:
        raise UserError(f"convert transformers: config.json {err}; hooktrain cannot convert this EoMT") from None


def _eomt_model(config: dict) -> dict:
    """``model:`` of an EoMT: a timm ViT whose ``kwargs`` build exactly ``timm_vit_from_settings``'s."""
    from hooktrain.models.eomt_keys import _mlp_ratio

    s = _eomt_settings(config)
    family, dim = s["family"], s["embed_dim"]
    if s["in_chans"] != 3:
        raise UserError(f"convert transformers: config.json num_channels {s['in_chans']}: only RGB EoMTs convert")
    kwargs = {"img_size": s["img_size"], "patch_size": s["patch_size"], "embed_dim": dim, "depth": s["depth"],
              "num_heads": s["num_heads"], "init_values": s["layer_scale_init"] or 1.0,
              "pos_drop_rate": s["dropout"], "attn_drop_rate": s["attn_dropout"]}  # fmt: skip
    size = _VIT_SIZES[family].get(dim, "small")  # cosmetic: kwargs give every size
    if family == "dinov2":
        if s["swiglu"] and s["act"] != "silu":
            raise UserError(
                f"convert transformers: config.json hidden_act {config.get('hidden_act', 'gelu')!r} with "
                "use_swiglu_ffn: a recipe's EoMT heads take the SwiGLU's silu; hooktrain cannot convert it"
            )
        width = 2 * s["mlp_hidden"] if s["swiglu"] else s["mlp_hidden"]  # SwiGLUPacked: gate and value in fc1
        kwargs.update(reg_tokens=s["reg_tokens"], mlp_ratio=_mlp_ratio(dim, width))
        if s["swiglu"]:
            name = "vit_giant_patch14_reg4_dinov2"  # its defaults: SwiGLUPacked MLP, silu
        else:
            name = f"vit_{size}_patch14_reg4_dinov2"
            kwargs["act_layer"] = s["act"]
    else:
        name = f"vit_{size}_patch16_dinov3"
        kwargs.update(
            num_reg_tokens=s["reg_tokens"], qkv_bias=s["qkv_bias"], mlp_ratio=_mlp_ratio(dim, s["mlp_hidden"]),
            swiglu_mlp=s["swiglu"], swiglu_align_to=1 if s["swiglu"] else 0, rope_temperature=s["rope_temperature"],
            rope_shift_coords=s["rope_shift"], rope_jitter_coords=s["rope_jitter"],
            rope_rescale_coords=s["rope_rescale"],
        )  # fmt: skip
    image = s["img_size"]
    return {
        # transformers drops every block at drop_path_rate, timm ramps up to it: the same at inference
        "encoder": {"name": name, "pretrained": False, "drop_path_rate": s["drop_path_rate"], "kwargs": kwargs,
                    **({} if math.isclose(s["norm_eps"], _TIMM_NORM_EPS[family]) else {"norm_eps": s["norm_eps"]})},
        "decode_head": {"type": "eomt", "num_queries": s["num_queries"], "num_blocks": s["num_blocks"],
                        "num_upscale_blocks": s["num_upscale_blocks"]},  # fmt: skip
        # EoMT evaluates windows of its training size; with 2/3 strides mmseg's grid is EoMT's up to 2 windows a side
        "inference": {"mode": "slide", "crop_size": [image, image], "stride": [image * 2 // 3] * 2},
    }


def _mask2former_model(config: dict) -> dict:
    """``model:`` of a ``Mask2FormerForUniversalSegmentation`` (:func:`mask2former_model_from_transformers`),
    evaluated on the whole image as Mask2Former's semantic ADE20K models are."""
    from hooktrain.models.mask2former_keys import mask2former_model_from_transformers

    try:
        model = mask2former_model_from_transformers(config)
    except ValueError as err:
        raise UserError(f"convert transformers: config.json {err}; hooktrain cannot convert this Mask2Former") from None
    return {**model, "inference": {"mode": "whole"}}


def _segformer_model(config: dict) -> dict:
    """``model:`` of a ``SegformerForSemanticSegmentation``: ``mit_bX`` and the ``segformer_mlp`` head."""
    get = {"depths": [2, 2, 2, 2], "hidden_sizes": [32, 64, 160, 256], **_MIT_FIXED, "decoder_hidden_size": 256,
           "classifier_dropout_prob": 0.1, **config}.get  # fmt: skip
    name = _mit_name(get("depths"), get("hidden_sizes"))
    for key, value in _MIT_FIXED.items():
        if get(key) != value:
            raise UserError(f"convert transformers: config.json {key} {get(key)} is not SegFormer's {value}")
    return {
        "encoder": {"name": name, "pretrained": False},
        "decode_head": {"type": "segformer_mlp", "channels": get("decoder_hidden_size"),
                        "dropout": get("classifier_dropout_prob"), "align_corners": False},  # fmt: skip
        "inference": {"mode": "whole"},
    }


def _upernet_model(config: dict) -> dict:
    """``model:`` of a ``UperNetForSemanticSegmentation`` on a ConvNext or Swin of the Hub's sizes, as
    ``recipes/transformers/upernet-*-tiny.yaml`` has it: per-level LayerNorms, ``upernet`` + ``fcn``."""
    get = {"hidden_size": 512, "pool_scales": [1, 2, 3, 6], "use_auxiliary_head": True, "auxiliary_channels": 256,
           "auxiliary_num_convs": 1, "auxiliary_concat_input": False, "auxiliary_loss_weight": 0.4, **config}.get
    backbone = get("backbone_config") or {}
    family = backbone.get("model_type")
    if family not in _UPERNET_BACKBONES:
        raise UserError(
            f"convert transformers: config.json backbone_config model_type {family!r}: hooktrain converts "
            "transformers' UperNet with a convnext or swin backbone only"
        )
    defaults, keys, names, eps = _UPERNET_BACKBONES[family]
    sizes = tuple(_as_tuple({**defaults, **backbone}[key]) for key in keys)
    if sizes not in names:
        raise UserError(
            f"convert transformers: config.json backbone_config {dict(zip(keys, sizes))} is none of the Hub's "
            f"UperNet {family} sizes; give --recipe with the timm encoder of that size"
        )
    if list(backbone.get("out_indices") or []) != [1, 2, 3, 4]:
        raise UserError("convert transformers: config.json backbone_config out_indices must be [1, 2, 3, 4]")
    losses = [{"type": "cross_entropy", "weight": 1.0, "avg_non_ignore": False}]
    model = {
        "encoder": {"name": names[sizes], "pretrained": False, "out_indices": [0, 1, 2, 3], "out_norm": "layer_norm",
                    "out_norm_eps": eps},
        "decode_head": {"type": "upernet", "channels": get("hidden_size"), "pool_scales": get("pool_scales"),
                        "dropout": 0.1, "align_corners": False, "losses": losses},
        "aux_head": None,
        # MMSegmentation's evaluation of the checkpoints: ConvNeXt's 512 windows, Swin's whole image
        "inference": {"mode": "slide", "crop_size": [512, 512], "stride": [341, 341]} if family == "convnext"
        else {"mode": "whole"},
    }  # fmt: skip
    if get("use_auxiliary_head"):
        model["aux_head"] = {"type": "fcn", "in_index": 2, "channels": get("auxiliary_channels"),
                             "num_convs": get("auxiliary_num_convs"), "concat_input": get("auxiliary_concat_input"),
                             "dropout": 0.1, "align_corners": False,
                             "losses": [{**losses[0], "weight": get("auxiliary_loss_weight")}]}  # fmt: skip
    return model


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


# per backbone model_type: transformers' defaults, the keys that tell the sizes apart, the timm encoder of
# each size, and the eps of transformers' per-level norms (hidden_states_norms)
_UPERNET_BACKBONES = {
    "convnext": (
        {"depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]}, ("depths", "hidden_sizes"),
        {((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny", ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_small",
         ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base",
         ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large",
         ((3, 3, 27, 3), (256, 512, 1024, 2048)): "convnext_xlarge"},
        1e-6,
    ),
    "swin": (
        {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
        ("embed_dim", "depths", "num_heads", "window_size"),
        {(96, (2, 2, 6, 2), (3, 6, 12, 24), 7): "swin_tiny_patch4_window7_224",
         (96, (2, 2, 18, 2), (3, 6, 12, 24), 7): "swin_small_patch4_window7_224",
         (128, (2, 2, 18, 2), (4, 8, 16, 32), 12): "swin_base_patch4_window12_384",
         (192, (2, 2, 18, 2), (6, 12, 24, 48), 12): "swin_large_patch4_window12_384"},
        1e-5,
    ),
}  # fmt: skip


def _mit_name(depths: list[int], hidden_sizes: list[int]) -> str:
    for name, sizes in _MIT_SIZES.items():
        if sizes == (list(depths), list(hidden_sizes)):
            return name
    raise UserError(
        f"convert transformers: config.json depths {depths} with hidden_sizes {hidden_sizes} is none of "
        "SegFormer-B0..B5 (mit_b0..mit_b5); hooktrain cannot convert it"
    )


def _class_names(config: dict) -> list[str]:
    """``id2label``'s names in index order (transformers' default: two, ``LABEL_0`` and ``LABEL_1``)."""
    id2label = config.get("id2label") or {i: f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
    labels = {int(index): str(label) for index, label in id2label.items()}
    if sorted(labels) != list(range(len(labels))):
        raise UserError(f"convert transformers: config.json id2label's indices {sorted(labels)} are not 0..N-1")
    return [labels[i] for i in range(len(labels))]


def _normalisation(preprocessor: dict | None) -> dict:
    """``data.mean`` / ``data.std`` in 0-255 units from an image processor, which rescales (by 1/255)
    before it normalises: ``(x * r - mean) / std`` is ``(x - mean / r) / (std / r)``."""
    if not preprocessor:
        return {}  # hooktrain's defaults: ImageNet's, as transformers' image processors default to
    rescale = preprocessor.get("rescale_factor", 1 / 255) if preprocessor.get("do_rescale", True) else 1.0
    if preprocessor.get("do_normalize", True):
        mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
        if mean is None or std is None:
            return {}
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return {"mean": [round(m / rescale, 6) for m in mean], "std": [round(s / rescale, 6) for s in std]}


def check_recipe_matches(config: dict, recipe: Any, model: torch.nn.Module, recipe_path: str | None) -> None:
    """One ``UserError`` line naming the first setting in which ``model`` (built from ``recipe``, the
    one at ``recipe_path`` or, None, the derived one) is not the checkpoint's ``config``: the config
    key, the recipe's value and the checkpoint's."""
    model_type = config.get("model_type")
    if model_type in EOMT_TYPES:
        from hooktrain.models.eomt import EoMT
        from hooktrain.models.eomt_keys import build_eomt_from_settings

        if not isinstance(model, EoMT):
            raise UserError(
                f"convert transformers: config.json is an EoMT ({model_type}) and --recipe {recipe_path}'s "
                f"model.decode_head.type is {recipe.model.decode_head.type}; set it to eomt, or leave --recipe out"
            )

        with torch.device("meta"):
            reference = build_eomt_from_settings(_eomt_settings(config))
        pairs = _pairs(_eomt_traits(model), _eomt_traits(reference))
    elif model_type == "mask2former":
        from hooktrain.models import build_recipe_segmentor
        from hooktrain.models.mask2former import Mask2Former
        from hooktrain.recipe.model import ModelConfig

        if not isinstance(model, Mask2Former):
            raise UserError(
                f"convert transformers: config.json is a Mask2Former and --recipe {recipe_path}'s "
                f"model.decode_head.type is {recipe.model.decode_head.type}; set it to mask2former, "
                "or leave --recipe out"
            )
        # the recipe with the derived model and the checkpoint's class count (not validated: names may differ)
        data = recipe.data.model_copy(update={"num_classes": len(_class_names(config))})
        derived = ModelConfig.model_validate(_mask2former_model(config))
        reference = build_recipe_segmentor(recipe.model_copy(update={"model": derived, "data": data}), on_meta=True)
        pairs = _pairs(_mask2former_traits(model), _mask2former_traits(reference))
    else:
        pairs = [("num_labels", "data.num_classes", recipe.data.num_classes, len(_class_names(config)))]
        head = recipe.model.decode_head
        if model_type == "segformer":
            expected = recipe_from_transformers(config, None, "checkpoint")["model"]
            pairs += [("depths, hidden_sizes", "model.encoder.name", recipe.model.encoder.name,
                       expected["encoder"]["name"]),
                      ("decoder_hidden_size", "model.decode_head.channels", getattr(head, "channels", None),
                       expected["decode_head"]["channels"])]  # fmt: skip
        elif model_type == "upernet":
            aux = recipe.model.aux_head
            pairs += [("hidden_size", "model.decode_head.channels", getattr(head, "channels", None),
                       config.get("hidden_size", 512)),
                      ("auxiliary_channels", "model.aux_head.channels", aux and aux.channels,
                       config.get("auxiliary_channels", 256) if config.get("use_auxiliary_head", True) else None)]
    for key, where, got, want in pairs:
        same = math.isclose(got, want) if isinstance(want, float) and isinstance(got, float) else got == want
        if not same:
            label, fix = (
                (f"--recipe {recipe_path}", "fix the recipe, or leave --recipe out to derive it")
                if recipe_path
                else ("the recipe derived from config.json", f"drop the --cfg-options that change {where}")
            )
            raise UserError(
                f"convert transformers: {label} disagrees with config.json on {key}: the recipe's {where} "
                f"gives {got}, the checkpoint {want}; {fix}"
            )


def _pairs(got: dict, want: dict) -> list[tuple]:
    return [(key, where, got[key][1], value) for key, (where, value) in want.items()]


_FAMILIES = {"VisionTransformer": "eomt (DINOv2's ViT)", "Eva": "eomt_dinov3 (DINOv3's ViT)"}


def _mask2former_traits(model: torch.nn.Module) -> dict[str, tuple[str, Any]]:
    """What a Mask2Former's architecture is, by transformers' config key: (where a recipe sets it, value)."""
    pixel, decoder, head = model.pixel_decoder, model.decoder, "model.decode_head"
    return {
        "num_labels": ("data.num_classes", decoder.class_head.out_features - 1),
        "backbone_config": ("model.encoder.name (its levels' channels)", list(model.encoder.feature_info.channels())),
        "backbone_config (its per-level norms)": ("model.encoder.out_norm", model.out_norms is not None),
        "num_queries": (f"{head}.num_queries", decoder.query_feat.num_embeddings),
        "feature_size": (f"{head}.channels", pixel.mask_proj.in_channels),
        "mask_feature_size": (f"{head}.mask_feature_size", pixel.mask_proj.out_channels),
        "hidden_dim": (f"{head}.hidden_dim", decoder.hidden_dim),
        "num_attention_heads": (f"{head}.num_heads", decoder.layers[0].cross_attn.num_heads),
        "encoder_layers": (f"{head}.encoder_layers", len(pixel.layers)),
        "encoder_feedforward_dim": (f"{head}.encoder_feedforward", pixel.layers[0].fc1.out_features
                                    if len(pixel.layers) else None),
        "decoder_layers - 1": (f"{head}.decoder_layers", len(decoder.layers)),
        "dim_feedforward": (f"{head}.decoder_feedforward", decoder.layers[0].fc1.out_features),
        "enforce_input_projection": (f"{head}.enforce_input_projection (a projection before the decoder)",
                                     isinstance(decoder.input_proj[0], torch.nn.Conv2d)),
    }  # fmt: skip


def _eomt_traits(model: torch.nn.Module) -> dict[str, tuple[str, Any]]:
    """What an EoMT's architecture is, by transformers' config key: (where a recipe sets it, value)."""
    from timm.layers import PatchEmbed

    vit, block = model.encoder, model.encoder.blocks[0]
    encoder = "model.encoder"
    family = _FAMILIES.get(type(vit).__name__, type(vit).__name__)
    if not isinstance(vit.patch_embed, PatchEmbed):  # timm's hybrids: transformers' EoMT has no CNN stem
        family = f"a ViT with a CNN stem ({type(vit.patch_embed).__name__})"
    traits = {
        "model_type": (f"{encoder}.name", family),
        "num_labels": ("data.num_classes", model.class_head.out_features - 1),
        "hidden_size": (f"{encoder} (embed_dim)", vit.embed_dim),
        "num_hidden_layers": (f"{encoder} (depth)", len(vit.blocks)),
        "num_attention_heads": (f"{encoder} (num_heads)", block.attn.num_heads),
        "patch_size": (f"{encoder} (patch_size)", vit.patch_embed.patch_size[0]),
        "num_register_tokens": (f"{encoder} (reg_tokens)", vit.num_prefix_tokens - (vit.cls_token is not None)),
        "layer_norm_eps": (f"{encoder} (its LayerNorms' eps)", vit.norm.eps),
        "use_swiglu_ffn / use_gated_mlp": (f"{encoder} (its MLP)", type(block.mlp).__name__),
        "mlp_ratio / intermediate_size": (f"{encoder} (MLP width)", block.mlp.fc2.in_features),
        "hidden_act": (f"{encoder} (its MLP's activation, EoMT's heads')", type(model.mask_head.act).__name__),
        "num_queries": ("model.decode_head.num_queries", model.num_queries),
        "num_blocks": ("model.decode_head.num_blocks", model.num_blocks),
        "num_upscale_blocks": ("model.decode_head.num_upscale_blocks", len(model.upscale)),
    }
    if getattr(vit, "pos_embed", None) is not None:  # learned position embeddings: their grid is the image size
        traits["image_size"] = (f"{encoder} (img_size)", vit.patch_embed.img_size[0])
    return traits
