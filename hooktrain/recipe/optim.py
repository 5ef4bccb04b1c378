"""The recipe's ``optimizer:`` and ``schedule:`` sections (no torch: recipes validate fast).
``hooktrain.engine.optim`` builds them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hooktrain.recipe.section import Section


class ParamRule(Section):
    """Multipliers for the parameters a rule selects. Every matching rule applies; their
    multipliers multiply (``head`` x10 lr and ``norm`` no decay both hit a head's norm)."""

    pattern: str | None = Field(None, description="Regular expression searched in the parameter name (e.g. 'head').")
    param_type: Literal["norm", "bias"] | None = Field(
        None, description="Select parameters of normalisation layers, or biases."
    )
    lr_mult: float = Field(1.0, ge=0, description="Multiplier of the learning rate.")
    decay_mult: float = Field(1.0, ge=0, description="Multiplier of the weight decay.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern


class LayerDecay(Section):
    """MMSegmentation's layer-wise LR decay (``LearningRateDecayOptimizerConstructor``, and
    ``LayerDecayOptimizerConstructor`` for BEiT/MAE). Each encoder parameter gets a layer id and the
    learning rate ``lr * rate ** (num_layers + 1 - id)``; the rest of the model (heads, neck,
    out_norms, a ViT's final norm) has id ``num_layers + 1``, so the full rate. Weight decay is 0
    for 1-D parameters and biases (a ViT's cls_token and pos_embed keep theirs, as in mmseg).
    ``param_rules`` still apply on top (their multipliers multiply); mmseg's constructor has no
    custom keys, so leave them out for mmseg's exact groups."""

    rate: float = Field(
        ..., gt=0, le=1, description="Decay per layer (mmseg's paramwise_cfg decay_rate / layer_decay_rate), e.g. 0.9."
    )
    num_layers: int = Field(
        ...,
        ge=1,
        description="mmseg's num_layers: 6 in its ConvNeXt-T config, 12 in ConvNeXt-S/B/L/XL's; a ViT's depth "
        "(12 for ViT-B).",
    )
    decay_type: Literal["layer_wise", "stage_wise", "eomt"] = Field(
        "layer_wise",
        description="layer_wise: ConvNeXt's stem/downsamples and blocks numbered as mmseg's get_layer_id_for_convnext "
        "(stage 2 in groups of 3 blocks), or a ViT's embeddings 0 and block i i+1 (get_layer_id_for_vit); "
        "stage_wise (ConvNeXt only): stem and downsamples 0, stage i i+1. "
        "eomt (ViT only; EoMT's configure_optimizers, num_layers = the ViT's depth): block i gets "
        "lr * rate ** (num_layers - 1 - i), the ViT's parameters before its blocks (patch_embed, cls_token, "
        "reg_token, pos_embed) block 0's rate, the ViT's parameters after them (its final norm) and everything "
        "outside the ViT the full lr; weight decay applies to every parameter, none excluded.",
    )


class OptimizerConfig(Section):
    """The optimizer and its per-parameter rules."""

    type: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd.")
    lr: float = Field(6e-5, gt=0, description="Base learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="Base weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum.")
    param_rules: list[ParamRule] = Field(
        default_factory=list,
        description="Per-parameter multipliers, e.g. [{pattern: head, lr_mult: 10}, "
        "{param_type: norm, decay_mult: 0}].",
    )
    layer_decay: LayerDecay | None = Field(
        None,
        description="Layer-wise LR decay of a ConvNeXt or ViT encoder, as MMSegmentation's, e.g. "
        "{rate: 0.9, num_layers: 6, decay_type: stage_wise}.",
    )


_DEFAULT_WARMUP_RATIO = 1e-6


class ScheduleConfig(Section):
    """Linear warmup, then poly decay over the whole run (MMSegmentation's PolyLR); or, with
    ``encoder_warmup_iters``, EoMT's two-stage warm-up (its ``TwoStageWarmupPolySchedule``)."""

    warmup_iters: int = Field(0, ge=0, description="Iterations of linear warmup.")
    warmup_ratio: float = Field(
        _DEFAULT_WARMUP_RATIO, gt=0, le=1, description="LR factor at iteration 0 of the warmup."
    )
    power: float = Field(1.0, ge=0, description="Poly power (0 keeps the LR constant).")
    min_lr: float = Field(0.0, ge=0, description="LR the poly decay ends at (absolute).")
    encoder_warmup_iters: int | None = Field(
        None,
        ge=0,
        description="EoMT's two-stage warm-up (TwoStageWarmupPolySchedule, warmup_steps [warmup_iters, "
        "encoder_warmup_iters], poly_power = power, total = train.max_iters): the encoder's parameters "
        "(encoder.*) keep lr 0 for warmup_iters iterations, warm up linearly from 0 over encoder_warmup_iters, "
        "then poly-decay to 0 at max_iters; every other parameter warms up linearly from 0 over warmup_iters, "
        "then poly-decays to 0 at max_iters. min_lr must be 0 and warmup_ratio its default (unused). null = the single "
        "warmup + poly schedule above.",
    )

    @model_validator(mode="after")
    def _two_stage_has_no_floor_or_ratio(self) -> ScheduleConfig:
        if self.encoder_warmup_iters is not None:
            if self.min_lr != 0:
                raise ValueError(
                    "min_lr must be 0 with encoder_warmup_iters (EoMT's two-stage schedule decays to 0), "
                    f"got {self.min_lr}"
                )
            if self.warmup_ratio != _DEFAULT_WARMUP_RATIO:
                raise ValueError(
                    "warmup_ratio must keep its default with encoder_warmup_iters (EoMT's two-stage schedule warms "
                    f"up from 0), got {self.warmup_ratio}"
                )
        return self
