"""Decode heads of the mask-classification family (``model.decode_head.type: eomt`` or
``mask2former``): queries that each predict a class and a mask, trained with Mask2Former's
matching criterion."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hooktrain.recipe.section import Section


class MaskLossConfig(Section):
    """Mask2Former's criterion: Hungarian matching of queries to the ground-truth segments (one
    per class present), then class cross-entropy (unmatched queries: the no-object class) and
    mask BCE and Dice on importance-sampled points, on every layer's predictions. Defaults are
    Mask2Former's and EoMT's."""

    class_weight: float = Field(2.0, ge=0.0, description="Weight of the class cross-entropy (cost and loss).")
    mask_weight: float = Field(5.0, ge=0.0, description="Weight of the mask sigmoid BCE (cost and loss).")
    dice_weight: float = Field(5.0, ge=0.0, description="Weight of the mask Dice loss (cost and loss).")
    no_object_weight: float = Field(
        0.1, ge=0.0, description="Cross-entropy weight of the no-object class (Mask2Former's eos_coef)."
    )
    num_points: int = Field(12544, ge=1, description="Points sampled per mask for matching and the mask losses.")
    oversample_ratio: float = Field(3.0, ge=1.0, description="Candidate points per sampled point.")
    importance_sample_ratio: float = Field(
        0.75, ge=0.0, le=1.0, description="Share of the points taken where the prediction is least certain."
    )


class MaskAnnealingConfig(Section):
    """EoMT's mask annealing: block ``i`` of the last ``num_blocks`` masks the queries' attention
    with probability 1 until ``starts[i]``, ``(1 - progress) ** power`` between, and 0 from
    ``ends[i]`` on (``iteration`` = optimizer steps done), so the trained model predicts
    without masks. The paper's ADE20K 512 schedule (about 40k iterations) is starts
    [6520, 13040, 19560, 26080], ends [13040, 19560, 26080, 32600]."""

    starts: list[int] = Field(description="Iteration at which each masked block starts to anneal, earliest first.")
    ends: list[int] = Field(description="Iteration from which each block no longer masks.")
    power: float = Field(0.9, gt=0.0, description="Polynomial power of the annealing (EoMT's poly_power).")

    @model_validator(mode="after")
    def _ordered(self) -> MaskAnnealingConfig:
        if len(self.starts) != len(self.ends):
            raise ValueError(f"starts has {len(self.starts)} entries and ends {len(self.ends)}; give one per block")
        for start, end in zip(self.starts, self.ends):
            if not 0 <= start < end:
                raise ValueError(f"each block needs 0 <= start < end, got start {start}, end {end}")
        return self


class EoMTHeadConfig(Section):
    """EoMT (Kerssies et al., CVPR 2025): ``num_queries`` learned queries join the ViT encoder's
    tokens before its last ``num_blocks`` blocks; a class head and a mask MLP read them, and
    ``num_upscale_blocks`` transposed-conv blocks upsample the patch tokens the masks are dot
    products with. The encoder (``model.encoder``) must be a timm ViT; it keeps its timm
    parameter names. Scores for inference are Mask2Former's semantic inference."""

    type: Literal["eomt"] = Field("eomt", description="Head kind.")
    num_queries: int = Field(100, ge=1, description="Learned queries (EoMT: 100 for semantic segmentation).")
    num_blocks: int = Field(4, ge=1, description="Last encoder blocks that also process the queries.")
    num_upscale_blocks: int = Field(2, ge=0, description="x2 upsampling blocks of the patch tokens for the masks.")
    mask_annealing: MaskAnnealingConfig | None = Field(
        None, description="When the masked attention fades out; null = the blocks always mask."
    )
    loss: MaskLossConfig = Field(default_factory=MaskLossConfig, description="Matching and losses.")
    align_corners: Literal[False] = Field(
        False, description="Mask logits are resized to the input with align_corners=False (Mask2Former)."
    )

    @model_validator(mode="after")
    def _one_schedule_per_block(self) -> EoMTHeadConfig:
        if self.mask_annealing is not None and len(self.mask_annealing.starts) != self.num_blocks:
            raise ValueError(
                f"mask_annealing has {len(self.mask_annealing.starts)} blocks' schedules for num_blocks "
                f"{self.num_blocks}; give one start and end per block"
            )
        return self


class Mask2FormerHeadConfig(Section):
    """Mask2Former (Cheng et al., CVPR 2022) on a hierarchical encoder (Swin, ResNet, ConvNeXt, ...:
    at least four levels, finest first, e.g. strides 4 to 32; not a ViT). Its pixel decoder refines
    the three coarsest levels with multi-scale deformable attention and adds the finer ones FPN-style
    (the mask features); ``num_queries`` queries go through ``decoder_layers`` masked-attention
    layers, each attending to one level (cycling coarsest to finest) within its previous mask.
    Every layer's prediction (and the initial queries') is supervised. Numerically transformers'
    ``Mask2FormerForUniversalSegmentation``; ``model.encoder.out_norm: layer_norm`` with
    ``out_norm_eps: 1.0e-5`` adds its Swin backbone's per-level norms."""

    type: Literal["mask2former"] = Field("mask2former", description="Head kind.")
    num_queries: int = Field(100, ge=1, description="Learned queries (Mask2Former: 100 for semantic segmentation).")
    channels: int = Field(
        256,
        ge=32,
        multiple_of=32,
        description="Width of the pixel decoder (transformers' feature_size, mmdet's feat_channels); "
        "its GroupNorms have 32 groups.",
    )
    hidden_dim: int = Field(256, ge=1, description="Width of the transformer decoder and its queries.")
    mask_feature_size: int = Field(
        256, ge=1, description="Channels of the mask features and of the queries' mask embeddings."
    )
    num_heads: int = Field(
        8, ge=1, description="Attention heads of the deformable encoder and of the decoder (both widths' divisor)."
    )
    encoder_layers: int = Field(6, ge=0, description="Deformable-attention layers of the pixel decoder.")
    encoder_feedforward: int = Field(
        1024, ge=1, description="FFN width of the pixel decoder's layers (transformers' encoder_feedforward_dim)."
    )
    decoder_layers: int = Field(
        9,
        ge=1,
        description="Masked-attention decoder layers: transformers' decoder_layers - 1 (which counts the "
        "initial queries' prediction), mmdet's num_layers.",
    )
    decoder_feedforward: int = Field(
        2048, ge=1, description="FFN width of the decoder layers (transformers' dim_feedforward)."
    )
    enforce_input_projection: bool = Field(
        False,
        description="A 1x1 convolution from the pixel decoder's levels to the decoder even when channels equals "
        "hidden_dim (transformers' enforce_input_projection; a projection is always there when they differ).",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout of the attention and FFN layers.")
    loss: MaskLossConfig = Field(default_factory=MaskLossConfig, description="Matching and losses.")
    align_corners: Literal[False] = Field(
        False, description="Mask logits are resized to the input with align_corners=False (Mask2Former)."
    )

    @model_validator(mode="after")
    def _heads_divide_widths(self) -> Mask2FormerHeadConfig:
        for key in ("channels", "hidden_dim"):
            if getattr(self, key) % self.num_heads:
                raise ValueError(f"num_heads {self.num_heads} does not divide {key} {getattr(self, key)}")
        return self


MASK_CLASSIFICATION_HEADS = ("eomt", "mask2former")
