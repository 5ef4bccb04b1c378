"""The encoder-decoder family (:class:`Segmentor`: a timm encoder with optional per-level norms
and a neck, a decode head, an optional auxiliary head, their losses), and
:func:`build_segmentor`, which builds whichever family the recipe's decode head belongs to
(mask classification: :mod:`hooktrain.models.mask_classifier`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hooktrain.errors import UserError
from hooktrain.models.encoder import build_encoder, load_pretrained_out_norms
from hooktrain.models.eomt import build_eomt
from hooktrain.models.heads import DecodeHead, build_head, resize
from hooktrain.models.hub import with_local_encoder_weights
from hooktrain.models.mask2former import build_mask2former
from hooktrain.models.input_stage import InputStage
from hooktrain.models.losses import HeadLoss
from hooktrain.models.necks import MultiLevelNeck, OutNorms
from hooktrain.models.segmentor_base import SegmentorBase
from hooktrain.recipe.model import InferenceConfig, ModelConfig


class Segmentor(SegmentorBase):
    """The encoder-decoder family: a timm encoder (with optional per-level norms and a neck), a
    decode head, an optional auxiliary head (it only takes part when a mask is given), their
    per-pixel losses. Its scores are the decode head's logits resized (bilinear) to the input."""

    def __init__(
        self,
        encoder: nn.Module,
        decode_head: DecodeHead,
        decode_loss: HeadLoss,
        *,
        aux_head: DecodeHead | None = None,
        aux_loss: HeadLoss | None = None,
        inference: InferenceConfig | None = None,
        channels_last: bool = False,
        input_stage: InputStage | None = None,
        out_norms: OutNorms | None = None,
        neck: nn.Module | None = None,
    ) -> None:
        super().__init__(
            inference=inference,
            channels_last=channels_last,
            align_corners=decode_head.align_corners,
            input_stage=input_stage,
        )
        self.encoder = encoder
        self.out_norms = out_norms
        self.neck = neck
        self.decode_head = decode_head
        self.decode_loss = decode_loss
        self.aux_head = aux_head
        self.aux_loss = aux_loss

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The levels the heads read: the encoder's, through ``out_norms`` and the ``neck``."""
        features = self.encoder(image)
        if self.out_norms is not None:
            features = self.out_norms(features)
        return self.neck(features) if self.neck is not None else features

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        image = self._prepare(image)
        out = self.decode_head(self.features(image))
        return resize(out, image.shape[-2:], self.align_corners)

    def _loss_terms(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(self._prepare(image))
        terms = {f"decode.{k}": v for k, v in self.decode_loss(self.decode_head(features), mask).items()}
        if self.aux_head is not None:
            terms.update({f"aux.{k}": v for k, v in self.aux_loss(self.aux_head(features), mask).items()})
        return terms


# decode_head.type -> the builder of a family other than encoder-decoder, (cfg, *, num_classes,
# ignore_index, in_channels) -> SegmentorBase. A new family is one module and one entry here.
FAMILY_BUILDERS: dict[str, Callable[..., SegmentorBase]] = {"eomt": build_eomt, "mask2former": build_mask2former}


def build_segmentor(
    cfg: ModelConfig, *, num_classes: int, ignore_index: int = 255, in_channels: int = 3
) -> SegmentorBase:
    """Build the segmentor described by the recipe's ``model:`` section, for images of
    ``in_channels`` channels (``data.in_channels``): the mask-classification family for its
    decode heads (``eomt``, ``mask2former``), the encoder-decoder family otherwise."""
    if num_classes < 1:
        raise UserError(f"num_classes is {num_classes}; the dataset must declare at least one class")
    cfg = with_local_encoder_weights(cfg)  # model.encoder.pretrained_path: hf://OWNER/NAME, downloaded
    build = FAMILY_BUILDERS.get(cfg.decode_head.type, _build_encoder_decoder)
    model = build(cfg, num_classes=num_classes, ignore_index=ignore_index, in_channels=in_channels)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.register_state_dict_post_hook(_contiguous_state_dict)
    if cfg.compile:
        model.compile_mode = cfg.compile_mode
    return model


def _build_encoder_decoder(cfg: ModelConfig, *, num_classes: int, ignore_index: int, in_channels: int) -> Segmentor:
    encoder = build_encoder(cfg.encoder, in_channels=in_channels)
    if cfg.encoder.frozen:
        encoder.requires_grad_(False)
    channels = list(encoder.feature_info.channels())
    strides = list(encoder.feature_info.reduction())
    out_norms = OutNorms(channels, cfg.encoder.out_norm_eps, cfg.channels_last) if cfg.encoder.out_norm else None
    if cfg.encoder.pretrained_path is not None:
        load_pretrained_out_norms(out_norms, cfg.encoder.pretrained_path)
    neck = None
    if cfg.neck is not None:
        if len(channels) not in (1, len(cfg.neck.scales)):
            raise UserError(
                f"model.neck.scales: {len(cfg.neck.scales)} scales for the encoder's {len(channels)} levels; "
                "give one scale per level of model.encoder.out_indices"
            )
        neck = MultiLevelNeck(channels, cfg.neck.out_channels, cfg.neck.scales)
        strides = [strides[0] / scale for scale in cfg.neck.scales]
        channels = [cfg.neck.out_channels] * len(cfg.neck.scales)
    head_cfg = cfg.decode_head
    decode_head = build_head(head_cfg, channels, strides, num_classes, where="model.decode_head")
    decode_loss = HeadLoss(
        head_cfg.losses,
        head_cfg.sampler,
        num_classes=num_classes,
        ignore_index=ignore_index,
        align_corners=head_cfg.align_corners,
        where="model.decode_head",
    )
    aux_head = aux_loss = None
    if cfg.aux_head is not None:
        aux_head = build_head(cfg.aux_head, channels, strides, num_classes, where="model.aux_head")
        aux_loss = HeadLoss(
            cfg.aux_head.losses,
            cfg.aux_head.sampler,
            num_classes=num_classes,
            ignore_index=ignore_index,
            align_corners=cfg.aux_head.align_corners,
            where="model.aux_head",
        )
    return Segmentor(
        encoder,
        decode_head,
        decode_loss,
        aux_head=aux_head,
        aux_loss=aux_loss,
        inference=cfg.inference,
        channels_last=cfg.channels_last,
        out_norms=out_norms,
        neck=neck,
    )


def build_recipe_segmentor(
    recipe, *, pretrained: bool = True, on_meta: bool = False, inference_only: bool = False
) -> SegmentorBase:
    """The one way to build a recipe's segmentor: :func:`build_segmentor` with the recipe's
    ``model`` section and its data's classes, ignore index and input channels, and the input
    stage that finishes ``data.train.gpu_augment`` batches on the device.

    ``pretrained=False`` leaves the encoder's pretrained weights out (no download, no file
    read: the weights come from a checkpoint, or do not matter). ``on_meta`` builds it on
    the meta device (shapes only, no memory; implies ``pretrained=False``).
    ``inference_only`` builds it without ``compile`` and ``channels_last``, for tracing,
    exporting and measuring with a compile of one's own.
    """
    update: dict[str, Any] = {}
    if not pretrained or on_meta:
        update["encoder"] = recipe.model.encoder.model_copy(update={"pretrained": False, "pretrained_path": None})
    if inference_only or on_meta:
        update.update(compile_mode="default", compile=False)
    if inference_only:
        update["channels_last"] = False
    model_cfg = recipe.model.model_copy(update=update) if update else recipe.model
    data = recipe.data
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = build_segmentor(
            model_cfg, num_classes=data.num_classes, ignore_index=data.ignore_index, in_channels=data.in_channels
        )
    model.input_stage = InputStage(data.mean, data.std)
    return model


def _contiguous_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """Checkpoints of a channels_last model hold NCHW copies: safetensors refuses strided
    tensors, and a checkpoint should load the same into a model of either memory format."""
    for key, value in state_dict.items():
        if torch.is_tensor(value) and not value.is_contiguous():
            state_dict[key] = value.contiguous()
