"""timm encoders as multi-level feature extractors, with Hub or local-file weights."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from hooktrain.errors import UserError, did_you_mean
from hooktrain.models.backbone_keys import backbone_state, detect_format, to_encoder_keys, to_timm
from hooktrain.models.hub import HubUnavailable, download_weights, offline_if_unreachable
from hooktrain.models.mit import MIT_TO_TIMM, create_mit, hub_repo, is_mit
from hooktrain.models.swin import create_swin, is_swin
from hooktrain.models.vit import build_vit, is_vit
from hooktrain.recipe.model import EncoderConfig

logger = logging.getLogger(__name__)


def build_encoder(cfg: EncoderConfig, in_channels: int = 3) -> nn.Module:
    """Create ``timm.create_model(cfg.name, features_only=True, ...)`` with the configured weights.

    The returned module maps an image batch to a list of feature maps; its ``feature_info``
    gives ``channels()`` and ``reduction()`` (stride) of each returned level. ``mit_b0`` ..
    ``mit_b5`` are SegFormer's encoders (:mod:`hooktrain.models.mit`); their ``pretrained``
    weights are NVIDIA's ``nvidia/mit-bX`` from the Hub.

    ViTs (:func:`hooktrain.models.vit.is_vit`) return their ``out_indices`` blocks' patch tokens
    as maps of one stride (:class:`hooktrain.models.vit.ViTFeatures`), for any input size.

    ``in_channels`` other than 3 goes to timm as ``in_chans``. Pretrained RGB weights then get
    their first convolution adapted by ``timm.models.adapt_input_conv`` (1 channel: the sum
    over RGB; more: RGB repeated, scaled by 3 / in_channels): timm does it when it loads the
    weights itself, :func:`adapt_first_conv` when hooktrain loads them from a file or the Hub.
    """
    if not is_mit(cfg.name) and not cfg.name.startswith("hf-hub:") and not timm.is_model(cfg.name):
        names = [*timm.list_models(), *MIT_TO_TIMM]
        raise UserError(
            f"model.encoder.name: unknown timm model '{cfg.name}'{did_you_mean(cfg.name, names)};"
            " pick a name from timm.list_models() or mit_b0 .. mit_b5"
        )
    kwargs = dict(cfg.kwargs)
    kwargs["out_indices"] = tuple(cfg.out_indices) if cfg.out_indices is not None else (-4, -3, -2, -1)
    if cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if in_channels != 3:
        kwargs["in_chans"] = in_channels
    if is_vit(cfg.name):
        kwargs[_VIT_OPTIONS] = dict(
            norm=cfg.intermediate_norm,
            class_token=cfg.class_token,
            pos_embed_resize=cfg.pos_embed_resize,
            patch_bias=cfg.patch_bias,
            norm_eps=cfg.norm_eps,
        )
    else:
        vit_only = {"intermediate_norm": False, "class_token": False, "pos_embed_resize": "timm", "patch_bias": True,
                    "norm_eps": None}  # fmt: skip
        for key, default in vit_only.items():
            if getattr(cfg, key) != default:
                raise UserError(
                    f"model.encoder.{key} applies to ViT encoders only, and '{cfg.name}' is not one; "
                    f"drop it, or choose a ViT (vit_*, e.g. vit_small_patch14_reg4_dinov2)"
                )
    encoder = _build_weighted(cfg, kwargs)
    if cfg.frozen_norms:
        freeze_norm_affines(encoder)
    if cfg.grad_checkpointing:
        if not hasattr(encoder, "set_grad_checkpointing"):
            raise UserError(
                f"model.encoder.grad_checkpointing: timm's '{cfg.name}' feature extractor cannot recompute its "
                "blocks; set it to false"
            )
        encoder.set_grad_checkpointing(True)
    return encoder


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def freeze_norm_affines(encoder: nn.Module) -> None:
    """``model.encoder.frozen_norms``: every normalisation layer's weight and bias stop requiring
    gradients (MMSegmentation's ``norm_cfg=dict(..., requires_grad=False)``). BatchNorm keeps
    updating its running statistics in training mode, as mmseg's ``norm_eval=False``; a later
    SyncBatchNorm conversion keeps the same (frozen) parameters."""
    for module in encoder.modules():
        if isinstance(module, NORM_LAYERS):
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)


def _build_weighted(cfg: EncoderConfig, kwargs: dict) -> nn.Module:
    if cfg.pretrained_path is not None:
        return _create_from_file(cfg.name, Path(cfg.pretrained_path), kwargs)
    if cfg.pretrained:
        if is_mit(cfg.name):
            return _mit_from_hub(cfg.name, kwargs)
        return _create_from_hub(cfg.name, kwargs)
    return _create(cfg.name, pretrained=False, **kwargs)


_VIT_OPTIONS = "vit_options"  # a kwargs entry for ViTs: build_vit's own options, not timm's


def _create(name: str, **kwargs) -> nn.Module:
    try:
        if is_mit(name):
            kwargs.pop("pretrained")
            return create_mit(name, **kwargs)
        if _VIT_OPTIONS in kwargs:
            options = kwargs.pop(_VIT_OPTIONS)
            return build_vit(name, list(kwargs.pop("out_indices")), **options, **kwargs)
        if is_swin(name):
            return create_swin(name, **kwargs)
        return timm.create_model(name, features_only=True, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        if "in_chans" in kwargs and "in_chans" in str(err):
            raise UserError(
                f"model.encoder.name: timm model '{name}' does not take in_chans, so it cannot read "
                f"{kwargs['in_chans']}-channel images (data.in_channels: {kwargs['in_chans']}); choose an "
                "encoder that does (resnet*, convnext*, efficientnet*, mit_b0 .. mit_b5, ...)"
            ) from err
        raise UserError(
            f"model.encoder: timm could not build '{name}' as a feature extractor with {kwargs} ({err}); "
            "check model.encoder.out_indices / kwargs, or choose an encoder that supports features_only"
        ) from err


def _create_from_hub(name: str, kwargs: dict) -> nn.Module:
    offline, patch = offline_if_unreachable()
    try:
        with patch:
            return _create(name, pretrained=True, **kwargs)
    except RuntimeError as err:  # timm: "No pretrained weights exist for ..."
        raise UserError(
            f"model.encoder: {str(err).splitlines()[0]}; set model.encoder.pretrained: false "
            "or give model.encoder.pretrained_path"
        ) from err
    except OSError as err:  # huggingface_hub's not-found / offline / connection errors
        where = "the Hugging Face Hub is offline or unreachable" if offline else str(err).splitlines()[0]
        raise UserError(
            f"model.encoder: pretrained weights for '{name}' could not be downloaded ({where}); "
            "set model.encoder.pretrained_path to a local .safetensors or timm checkpoint, "
            "or model.encoder.pretrained: false"
        ) from err


def _mit_from_hub(name: str, kwargs: dict) -> nn.Module:
    """MiT with NVIDIA's ImageNet weights (``nvidia/mit-bX``, transformers format) from the Hub,
    converted on load. timm's ``pvt_v2`` weights do not fit: their FFNs are wider."""
    repo = hub_repo(name)
    try:
        path = download_weights(repo)
    except HubUnavailable as err:
        raise UserError(
            f"model.encoder: pretrained weights for '{name}' ({repo}) could not be downloaded ({err}); "
            "set model.encoder.pretrained_path to a local MiT checkpoint, or model.encoder.pretrained: false"
        ) from err
    state = backbone_state(timm.models.load_state_dict(str(path), use_ema=False))
    return _create_converted(name, kwargs, state, source=f"{repo} ({path.name})", key="model.encoder.pretrained")


def _create_from_file(name: str, path: Path, kwargs: dict) -> nn.Module:
    """Load a local checkpoint into the encoder.

    Two layouts are accepted: a full timm model's state_dict (what timm and the Hub publish; loaded
    through timm's own ``pretrained_cfg_overlay=dict(file=...)`` path, so its checkpoint filters and
    classifier removal apply) or the state_dict of the feature extractor itself.
    """
    if not path.is_file():
        raise UserError(
            f"model.encoder.pretrained_path: no such file '{path}'; "
            "point it at a local .safetensors or torch checkpoint"
        )
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as err:  # a corrupt or foreign file: report it as bad input
        raise UserError(
            f"model.encoder.pretrained_path: could not read '{path}' as a checkpoint ({err}); "
            "give a .safetensors file or a torch checkpoint holding a state_dict"
        ) from err
    backbone = backbone_state(state_dict)
    if is_mit(name) or detect_format(backbone) != "timm":
        return _create_converted(name, kwargs, backbone, source=str(path), key="model.encoder.pretrained_path")

    with torch.device("meta"):
        feature_keys = set(_create(name, pretrained=False, **kwargs).state_dict())
    missing, unexpected, matched = _compare_with_full_model(name, state_dict, kwargs)
    if len(feature_keys & state_dict.keys()) > matched:  # the feature extractor's own state_dict
        encoder = _create(name, pretrained=False, **kwargs)
        state_dict = adapt_first_conv(state_dict, encoder.state_dict(), kwargs.get("in_chans", 3))
        result = encoder.load_state_dict(state_dict, strict=False)
        _report(path, result.missing_keys, result.unexpected_keys)
        return encoder
    if not matched:
        raise UserError(
            f"model.encoder.pretrained_path: no parameter of '{path}' matches timm model '{name}'; "
            "use a checkpoint of that architecture (or set model.encoder.name to match it)"
        )
    try:
        encoder = _create(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), pretrained_strict=False, **kwargs
        )
    except RuntimeError as err:  # e.g. shape mismatches
        raise UserError(
            f"model.encoder.pretrained_path: '{path}' does not fit timm model '{name}' ({str(err).splitlines()[0]}); "
            "use a checkpoint of that architecture"
        ) from err
    _report(path, missing, unexpected)
    return encoder


def _create_converted(name: str, kwargs: dict, state: dict, source: str, key: str) -> nn.Module:
    """The encoder with a backbone checkpoint of MMSegmentation, NVlabs, transformers or timm
    format loaded after renaming to timm's keys. Every encoder tensor must be filled; ``key``
    names the recipe key in errors."""
    fmt = detect_format(state)
    try:
        state = to_timm(state)
    except KeyError as err:
        raise UserError(
            f"{key}: {source} looks like a {fmt} checkpoint but has the unknown key {err}; "
            f"give a backbone checkpoint of '{name}'"
        ) from None
    encoder = _create(name, pretrained=False, **kwargs)
    expected = encoder.state_dict()
    state = adapt_first_conv(to_encoder_keys(state, set(expected)), expected, kwargs.get("in_chans", 3))
    missing = sorted(expected.keys() - state.keys())
    wrong = [k for k in sorted(expected.keys() & state.keys()) if expected[k].shape != state[k].shape]
    if missing or wrong:
        problem = f"{len(missing)} missing tensors (e.g. {missing[:3]})" if missing else ""
        if wrong:
            k = wrong[0]
            shapes = f"{k} is {list(state[k].shape)}, the model's {list(expected[k].shape)}"
            problem += f"{'; ' if problem else ''}{len(wrong)} tensors of another shape (e.g. {shapes})"
        raise UserError(
            f"{key}: {source} ({fmt} format) does not fit encoder '{name}': {problem}; "
            "use a checkpoint of that architecture (timm's pvt_v2 weights do not fit MiT's FFNs)"
        )
    # per-level norms belong to the segmentor: load_pretrained_out_norms takes them
    unused = sorted(k for k in state.keys() - expected.keys() if not k.startswith("out_norms."))
    encoder.load_state_dict({k: state[k] for k in expected})
    _report(source, [], unused)
    return encoder


def load_pretrained_out_norms(out_norms: nn.Module | None, path: str) -> None:
    """Fill ``out_norms`` (``model.encoder.out_norm``) from the per-level norms of the
    ``model.encoder.pretrained_path`` file: MMSegmentation's Swin and mmpretrain's ConvNeXt
    ``norm{i}``, which their backbone files carry. Pretrain files have none, or only the last
    (mmpretrain's ImageNet ConvNeXt files: ``norm3``); the others keep their initialisation, as
    those libraries' do."""
    state = backbone_state(timm.models.load_state_dict(path, use_ema=False))
    if detect_format(state) == "timm":
        return
    try:
        state = to_timm(state)
    except KeyError:  # build_encoder has refused the file already
        return
    norms = {k.removeprefix("out_norms."): v for k, v in state.items() if k.startswith("out_norms.")}
    if not norms:
        if out_norms is not None:
            logger.info("encoder weights from %s: no per-level norms; model.encoder.out_norm starts fresh", path)
        return
    if out_norms is None:
        logger.warning(
            "encoder weights from %s: its %d per-level norm tensors are unused (model.encoder.out_norm is null)",
            path,
            len(norms),
        )
        return
    expected = out_norms.state_dict()
    if not norms.keys() <= expected.keys() or any(norms[k].shape != expected[k].shape for k in norms):
        widths = [len(v) for k, v in sorted(norms.items()) if k.endswith(".weight")]
        raise UserError(
            f"model.encoder.pretrained_path: '{path}' has per-level norms of {widths} channels, the model's "
            f"out_norm levels {[norm.normalized_shape[0] for norm in out_norms]}; set model.encoder.out_indices "
            "to the checkpoint's levels ([0, 1, 2, 3] for a 4-stage Swin or ConvNeXt)"
        )
    out_norms.load_state_dict(norms, strict=False)
    loaded = sorted({k.split(".")[0] for k in norms}, key=int)
    logger.info("encoder weights: per-level norms out_norms.%s loaded from %s", ", ".join(loaded), path)


def adapt_first_conv(state: dict, expected: dict, in_channels: int) -> dict:
    """``state`` with every RGB convolution weight that the model wants with ``in_channels``
    input channels (the first convolution / patch embedding) adapted by timm's
    ``adapt_input_conv``; unchanged when ``in_channels`` is 3."""
    if in_channels == 3:
        return state
    adapted = dict(state)
    for key, weight in state.items():
        want = expected.get(key)
        if (
            want is not None
            and weight.ndim == 4
            and weight.shape[1] == 3
            and tuple(want.shape) == (weight.shape[0], in_channels, *weight.shape[2:])
        ):
            adapted[key] = timm.models.adapt_input_conv(in_channels, weight)
            logger.info("encoder weights: %s adapted from 3 to %d input channels", key, in_channels)
    return adapted


def _compare_with_full_model(name: str, state_dict: dict, kwargs: dict) -> tuple[list[str], list[str], int]:
    """Missing keys, unexpected keys and the number of matching keys of ``state_dict`` against
    timm's full ``name`` model (classifier aside), after the model's own checkpoint filter (which
    converts e.g. original PVT/SegFormer checkpoints). Built on the meta device: no memory, no init."""
    full_kwargs = {k: v for k, v in kwargs.items() if k not in ("out_indices", _VIT_OPTIONS)}
    with torch.device("meta"):
        model = timm.create_model(name, **full_kwargs)
    module = importlib.import_module(timm.models.model_entrypoint(name).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(dict(state_dict), model)
        except Exception:  # a filter that needs real tensors; compare the raw keys instead
            pass
    expected = set(model.state_dict())
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    # The feature extractor drops the classifier, so a checkpoint without one misses nothing.
    expected -= {k for k in expected if k.startswith(tuple(f"{c}." for c in classifiers))}
    keys = set(state_dict)
    unexpected = {k for k in keys - expected if not k.startswith(tuple(f"{c}." for c in classifiers))}
    return sorted(expected - keys), sorted(unexpected), len(expected & keys)


def _report(path: Path | str, missing: list[str], unexpected: list[str]) -> None:
    """Log which keys of the checkpoint did not line up with the model."""
    if missing:
        logger.warning("encoder weights from %s: %d missing keys: %s", path, len(missing), ", ".join(missing))
    if unexpected:
        logger.warning("encoder weights from %s: %d unexpected keys: %s", path, len(unexpected), ", ".join(unexpected))
    if not missing and not unexpected:
        logger.info("encoder weights loaded from %s (all keys matched)", path)
