"""The recipe's ``optimizer:`` and ``schedule:`` sections (no torch: recipes validate fast).
``hooktrain.engine.optim`` builds them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

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
    decay_type: Literal["layer_wise", "stage_wise"] = Field(
        "layer_wise",
        description="layer_wise: ConvNeXt's stem/downsamples and blocks numbered as mmseg's get_layer_id_for_convnext "
        "(stage 2 in groups of 3 blocks), or a ViT's embeddings 0 and block i i+1 (get_layer_id_for_vit); "
        "stage_wise (ConvNeXt only): stem and downsamples 0, stage i i+1.",
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


class ScheduleConfig(Section):
    """Linear warmup, then poly decay over the whole run (MMSegmentation's PolyLR)."""

    warmup_iters: int = Field(0, ge=0, description="Iterations of linear warmup.")
    warmup_ratio: float = Field(1e-6, gt=0, le=1, description="LR factor at iteration 0 of the warmup.")
    power: float = Field(1.0, ge=0, description="Poly power (0 keeps the LR constant).")
    min_lr: float = Field(0.0, ge=0, description="LR the poly decay ends at (absolute).")
