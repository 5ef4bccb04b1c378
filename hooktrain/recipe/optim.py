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


class ScheduleConfig(Section):
    """Linear warmup, then poly decay over the whole run (MMSegmentation's PolyLR)."""

    warmup_iters: int = Field(0, ge=0, description="Iterations of linear warmup.")
    warmup_ratio: float = Field(1e-6, gt=0, le=1, description="LR factor at iteration 0 of the warmup.")
    power: float = Field(1.0, ge=0, description="Poly power (0 keeps the LR constant).")
    min_lr: float = Field(0.0, ge=0, description="LR the poly decay ends at (absolute).")
