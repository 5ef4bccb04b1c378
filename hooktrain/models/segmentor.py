"""The segmentor: a timm encoder (with optional per-level norms and a neck), a decode head, an
optional auxiliary head, their losses."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hooktrain.errors import UserError
from hooktrain.models.encoder import build_encoder, load_pretrained_out_norms
from hooktrain.models.heads import DecodeHead, build_head, resize
from hooktrain.models.inference import predict_logits
from hooktrain.models.input_stage import InputStage
from hooktrain.models.losses import HeadLoss
from hooktrain.models.necks import MultiLevelNeck, OutNorms
from hooktrain.recipe.model import InferenceConfig, ModelConfig


class Segmentor(nn.Module):
    """Encoder-decoder segmentor.

    ``forward(image, mask)`` returns the weighted loss terms (training); ``forward(image)`` returns
    logits at the input size; ``predict`` runs the configured whole/slide/flip inference. The
    auxiliary head only takes part when a mask is given. Mode (train/eval) and gradient context
    are the caller's; ``predict`` runs without gradients. ``input_stage`` turns a train batch
    into the ``(image, mask)`` that ``forward`` takes, on the device (MMSegmentation's
    ``data_preprocessor``).

    With ``compile_mode`` set (``model.compile``), the training forward (encoder, heads, the
    logits' upsampling inside the losses, the losses) and :meth:`logits` each run as one
    ``torch.compile``d function (:func:`compiled`).
    """

    compile_mode: str | None = None

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
        super().__init__()
        self.encoder = encoder
        self.out_norms = out_norms
        self.neck = neck
        self.decode_head = decode_head
        self.decode_loss = decode_loss
        self.aux_head = aux_head
        self.aux_loss = aux_loss
        self.inference = inference or InferenceConfig()
        self.channels_last = channels_last
        self.align_corners = decode_head.align_corners
        self.input_stage = input_stage or InputStage()  # a train batch to (image, mask) on the device

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The levels the heads read: the encoder's, through ``out_norms`` and the ``neck``."""
        features = self.encoder(image)
        if self.out_norms is not None:
            features = self.out_norms(features)
        return self.neck(features) if self.neck is not None else features

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Decode-head logits resized (bilinear) to the input size."""
        if self.compile_mode is None or torch.compiler.is_compiling():
            return self._logits(image)
        return compiled(Segmentor._logits, INFERENCE_COMPILE_MODES[self.compile_mode])(self, image)

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        """With ``mask`` [B,H,W] (255 = ignore): ``{"decode.loss_ce": ..., "aux.loss_ce": ...}``,
        each term already multiplied by its weight. Without: logits [B,C,H,W] at the input size."""
        if mask is None:
            return self.logits(image)
        if self.compile_mode is None or torch.compiler.is_compiling():
            return self._loss_terms(image, mask)
        if self.compile_mode in CUDA_GRAPH_MODES:
            # Each call is a new step: the previous step's graph outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(Segmentor._loss_terms, self.compile_mode)(self, image, mask)

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

    @torch.no_grad()
    def predict(
        self, image: torch.Tensor, img_shapes: Sequence[Sequence[int]], ori_shapes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Float32 scores ``[C, H_i, W_i]`` per image at its original size ``ori_shapes[i]``: logits,
        or with ``flip`` the mean class probabilities (MMSegmentation's TTA); argmax is the
        prediction either way. Multi-scale (``inference.scales``) needs the original images and
        goes through :func:`hooktrain.models.inference.predict_scales`.

        ``image`` is a padded batch [B,3,h,w] whose i-th image fills the top-left ``img_shapes[i]``;
        see :func:`hooktrain.models.inference.predict_logits` for the whole/slide/flip details.
        """
        return predict_logits(self.logits, image, img_shapes, ori_shapes, self.inference, self.align_corners)


# torch.compile modes (``model.compile_mode``). CUDA graphs need the static shapes of training
# (fixed crop and batch); inference sees every image size, so it compiles without them.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
INFERENCE_COMPILE_MODES = {
    "default": "default",
    "reduce-overhead": "default",
    "max-autotune": "max-autotune-no-cudagraphs",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}


@functools.cache
def compiled(method: Callable, mode: str) -> Callable:
    """``torch.compile(method, mode=mode)``, once per process, for an unbound ``Segmentor``
    method. The module is an argument rather than a bound ``self``, so a copy of a model (an
    EMA average, say) runs its own parameters, and the parameter names, hence checkpoints, are
    the eager model's."""
    return torch.compile(method, mode=mode)


def build_segmentor(cfg: ModelConfig, *, num_classes: int, ignore_index: int = 255, in_channels: int = 3) -> Segmentor:
    """Build the segmentor described by the recipe's ``model:`` section, for images of
    ``in_channels`` channels (``data.in_channels``)."""
    if num_classes < 1:
        raise UserError(f"num_classes is {num_classes}; the dataset must declare at least one class")
    encoder = build_encoder(cfg.encoder, in_channels=in_channels)
    if cfg.encoder.frozen:
        encoder.requires_grad_(False)
    channels = list(encoder.feature_info.channels())
    strides = list(encoder.feature_info.reduction())
    out_norms = OutNorms(channels, cfg.encoder.out_norm_eps) if cfg.encoder.out_norm else None
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
    model = Segmentor(
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
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.register_state_dict_post_hook(_contiguous_state_dict)
    if cfg.compile:
        model.compile_mode = cfg.compile_mode
    return model


def build_recipe_segmentor(
    recipe, *, pretrained: bool = True, on_meta: bool = False, inference_only: bool = False
) -> Segmentor:
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
