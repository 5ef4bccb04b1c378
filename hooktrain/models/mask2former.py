"""Mask2Former (Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation",
CVPR 2022) on a hierarchical timm encoder.

The encoder's levels (optionally through per-level LayerNorms, as transformers' Swin backbone has
them) feed the pixel decoder (:class:`~hooktrain.models.pixel_decoder.MSDeformAttnPixelDecoder`),
whose refined levels and mask features feed the masked-attention transformer decoder
(:class:`~hooktrain.models.mask2former_decoder.MaskedAttentionDecoder`). Numerically this is
transformers' ``Mask2FormerForUniversalSegmentation``; its checkpoints convert in
:mod:`hooktrain.models.mask2former_keys`.
"""

from __future__ import annotations

import torch
from torch import nn

from hooktrain.errors import UserError
from hooktrain.models.encoder import build_encoder, load_pretrained_out_norms
from hooktrain.models.mask2former_decoder import MaskedAttentionDecoder, Prediction
from hooktrain.models.mask_classifier import MaskClassifier, build_criterion
from hooktrain.models.mask_criterion import MaskClassificationLoss
from hooktrain.models.necks import OutNorms
from hooktrain.models.pixel_decoder import MSDeformAttnPixelDecoder
from hooktrain.models.vit import is_vit
from hooktrain.recipe.model import InferenceConfig, ModelConfig


class Mask2Former(MaskClassifier):
    """Mask2Former: ``encoder`` (a timm ``features_only`` module, levels finest first),
    ``out_norms`` (or None), ``pixel_decoder`` and ``decoder``.

    :meth:`predictions` returns ``decoder.layers + 1`` :data:`Prediction` s: the initial queries',
    then one per decoder layer, the final one last (transformers' auxiliary predictions, then its
    ``masks_queries_logits`` / ``class_queries_logits``). Masks are at the finest level's size
    (a quarter of the input for stride-4 encoders).
    """

    def __init__(
        self,
        encoder: nn.Module,
        pixel_decoder: MSDeformAttnPixelDecoder,
        decoder: MaskedAttentionDecoder,
        criterion: MaskClassificationLoss,
        *,
        out_norms: OutNorms | None = None,
        ignore_index: int = 255,
        inference: InferenceConfig | None = None,
        channels_last: bool = False,
    ):
        super().__init__(criterion, ignore_index=ignore_index, inference=inference, channels_last=channels_last)
        self.encoder = encoder
        self.out_norms = out_norms
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder

    def predictions(self, image: torch.Tensor) -> list[Prediction]:
        """Every layer's ``(mask_logits, class_logits)``, the final layer last."""
        features = self.encoder(image)
        if self.out_norms is not None:
            features = self.out_norms(features)
        mask_features, levels = self.pixel_decoder(features)
        return self.decoder(levels, mask_features)


def build_mask2former(cfg: ModelConfig, *, num_classes: int, ignore_index: int, in_channels: int) -> Mask2Former:
    """The Mask2Former a recipe's ``model`` section describes (``decode_head.type: mask2former``): the
    encoder is built as for every hooktrain head (pretrained weights, ``in_channels``, its last four
    levels), with ``encoder.out_norm``'s per-level norms when set."""
    head = cfg.decode_head
    if is_vit(cfg.encoder.name):
        raise UserError(
            f"model.encoder.name: decode_head type mask2former needs a hierarchical encoder (levels of strides "
            f"4 to 32), and '{cfg.encoder.name}' is a ViT; choose e.g. swin_tiny_patch4_window7_224 or resnet50"
        )
    encoder = build_encoder(cfg.encoder, in_channels=in_channels)
    if cfg.encoder.frozen:
        encoder.requires_grad_(False)
    channels = list(encoder.feature_info.channels())
    if len(channels) < 4:
        raise UserError(
            f"model.encoder.name: decode_head type mask2former needs four encoder levels, and "
            f"'{cfg.encoder.name}' gives {len(channels)}; choose a hierarchical encoder such as swin_* or resnet50"
        )
    out_norms = OutNorms(channels, cfg.encoder.out_norm_eps, cfg.channels_last) if cfg.encoder.out_norm else None
    if cfg.encoder.pretrained_path is not None:
        load_pretrained_out_norms(out_norms, cfg.encoder.pretrained_path)
    try:
        pixel_decoder = MSDeformAttnPixelDecoder(
            channels,
            channels=head.channels,
            mask_channels=head.mask_feature_size,
            num_heads=head.num_heads,
            num_layers=head.encoder_layers,
            feedforward=head.encoder_feedforward,
            dropout=head.dropout,
        )
        decoder = MaskedAttentionDecoder(
            head.channels,
            num_classes,
            hidden_dim=head.hidden_dim,
            mask_channels=head.mask_feature_size,
            num_queries=head.num_queries,
            num_heads=head.num_heads,
            num_layers=head.decoder_layers,
            feedforward=head.decoder_feedforward,
            dropout=head.dropout,
            enforce_input_projection=head.enforce_input_projection,
        )
    except ValueError as err:
        raise UserError(f"model.decode_head: {err}") from err
    return Mask2Former(
        encoder,
        pixel_decoder,
        decoder,
        build_criterion(head.loss, num_classes),
        out_norms=out_norms,
        ignore_index=ignore_index,
        inference=cfg.inference,
        channels_last=cfg.channels_last,
    )
