"""Optimizers with per-parameter rules, and MMSegmentation's warmup + poly LR schedule.

The schedule is a pure function of the optimizer-step index (``lr_factor``), so the LR at
iteration k is the same whatever the number of processes or accumulation steps: the runner
steps the (unprepared) scheduler exactly once per optimizer step.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from hooktrain.config_base import Section

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class ParamRule(Section):
    """Multipliers for the parameters a rule selects. Every matching rule applies; their
    multipliers multiply (``head`` x10 lr and ``norm`` no decay both hit a head's norm)."""

    pattern: str | None = Field(
        None, description="Regular expression searched in the parameter name (e.g. 'head')."
    )
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
    warmup_ratio: float = Field(
        1e-6, gt=0, le=1, description="LR factor at iteration 0 of the warmup."
    )
    power: float = Field(1.0, ge=0, description="Poly power (0 keeps the LR constant).")
    min_lr: float = Field(0.0, ge=0, description="LR the poly decay ends at (absolute).")


def _rule_matches(rule: ParamRule, name: str, module: nn.Module) -> bool:
    if rule.pattern is not None and not re.search(rule.pattern, name):
        return False
    if rule.param_type == "norm" and not isinstance(module, NORM_TYPES):
        return False
    if rule.param_type == "bias" and not name.endswith("bias"):
        return False
    return True


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Parameters grouped by their (lr_mult, decay_mult), each group with its lr and decay."""
    groups: dict[tuple[float, float], dict] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            lr_mult = decay_mult = 1.0
            for rule in cfg.param_rules:
                if _rule_matches(rule, name, module):
                    lr_mult *= rule.lr_mult
                    decay_mult *= rule.decay_mult
            group = groups.setdefault(
                (lr_mult, decay_mult),
                {
                    "params": [],
                    "names": [],
                    "lr": cfg.lr * lr_mult,
                    "weight_decay": cfg.weight_decay * decay_mult,
                    "lr_mult": lr_mult,
                    "decay_mult": decay_mult,
                },
            )
            group["params"].append(param)
            group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over ``param_groups(model, cfg)``."""
    groups = param_groups(model, cfg)
    if cfg.type == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def scheduled_lr(base_lr: float, step: int, max_iters: int, cfg: ScheduleConfig) -> float:
    """The LR of a group with ``base_lr`` at optimizer step ``step`` (mmcv's poly + warmup)."""
    progress = min(step, max_iters) / max_iters
    lr = (base_lr - cfg.min_lr) * (1 - progress) ** cfg.power + cfg.min_lr
    if step < cfg.warmup_iters:
        lr *= 1 - (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` following ``scheduled_lr`` for every parameter group."""
    factors = [
        (lambda step, base=group["lr"]: scheduled_lr(base, step, max_iters, cfg) / base)
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
