"""Optimizers with per-parameter rules, and MMSegmentation's warmup + poly LR schedule (or
EoMT's two-stage warm-up, ``schedule.encoder_warmup_iters``).

The schedule is a pure function of the optimizer-step index (``lr_factor``), so the LR at
iteration k is the same whatever the number of processes or accumulation steps: the runner
steps the (unprepared) scheduler exactly once per optimizer step.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from hooktrain.engine.layer_decay import layer_decay_mults
from hooktrain.recipe.optim import OptimizerConfig, ParamRule, ScheduleConfig

__all__ = [
    "OptimizerConfig",
    "ParamRule",
    "ScheduleConfig",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "scheduled_lr",
    "split_encoder_groups",
    "two_stage_factor",
    "use_fused_adamw",
]

ENCODER_PREFIX = "encoder."  # the segmentor's encoder, whose groups EoMT's schedule warms up second

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _rule_matches(rule: ParamRule, name: str, module: nn.Module) -> bool:
    if rule.pattern is not None and not re.search(rule.pattern, name):
        return False
    if rule.param_type == "norm" and not isinstance(module, NORM_TYPES):
        return False
    if rule.param_type == "bias" and not name.endswith("bias"):
        return False
    return True


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Parameters grouped by their (lr_mult, decay_mult), each group with its lr and decay.
    ``cfg.layer_decay`` sets each parameter's multipliers first; ``cfg.param_rules`` multiply them."""
    layer_mults = layer_decay_mults(model, cfg.layer_decay) if cfg.layer_decay is not None else {}
    groups: dict[tuple[float, float], dict] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            lr_mult, decay_mult = layer_mults.get(name, (1.0, 1.0))
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


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device: torch.device | str | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD over ``param_groups(model, cfg)``.

    AdamW is fused (``fused=True``: one kernel for the whole update) when the parameters train
    on CUDA: ``device``, the device the model will be moved to (the runner builds the optimizer
    before ``accelerator.prepare`` moves the model), or else the parameters' own device.
    Elsewhere torch's default implementation is kept.
    """
    groups = param_groups(model, cfg)
    if cfg.type == "adamw":
        fused = True if use_fused_adamw(groups, device) else None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def use_fused_adamw(groups: list[dict], device: torch.device | str | None = None) -> bool:
    """Whether AdamW over ``groups`` runs fused: on CUDA (``device``, else the parameters')."""
    if device is not None:
        return torch.device(device).type == "cuda"
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.device.type == "cuda" for p in params)


def scheduled_lr(base_lr: float, step: int, max_iters: int, cfg: ScheduleConfig, *, encoder: bool = False) -> float:
    """The LR of a group with ``base_lr`` at optimizer step ``step``: mmcv's poly + warmup, or with
    ``cfg.encoder_warmup_iters`` EoMT's two-stage schedule for an encoder (``encoder``) or other group."""
    if cfg.encoder_warmup_iters is not None:
        return base_lr * two_stage_factor(step, max_iters, cfg, encoder=encoder)
    progress = min(step, max_iters) / max_iters
    lr = (base_lr - cfg.min_lr) * (1 - progress) ** cfg.power + cfg.min_lr
    if step < cfg.warmup_iters:
        lr *= 1 - (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def two_stage_factor(step: int, max_iters: int, cfg: ScheduleConfig, *, encoder: bool) -> float:
    """EoMT's ``TwoStageWarmupPolySchedule.get_lr`` as a factor of the base LR, with ``warmup_steps``
    ``(cfg.warmup_iters, cfg.encoder_warmup_iters)``, ``total_steps`` ``max_iters`` and ``poly_power``
    ``cfg.power``: other groups warm up over the first stage, encoder groups are 0 during it and
    warm up over the second; both then poly-decay to 0 at ``max_iters``."""
    assert cfg.encoder_warmup_iters is not None
    step = min(step, max_iters)  # past max_iters the poly base would go negative
    first, second = cfg.warmup_iters, cfg.encoder_warmup_iters
    if not encoder:
        if first > 0 and step < first:
            return step / first
        return (1 - max(0, step - first) / max(1, max_iters - first)) ** cfg.power
    if step < first:
        return 0.0
    if step < first + second:
        return (step - first) / second
    return (1 - max(0, step - first - second) / max(1, max_iters - first - second)) ** cfg.power


def split_encoder_groups(optimizer: torch.optim.Optimizer) -> None:
    """Mark each group ``encoder`` (all its parameters in ``encoder.``) or not, first moving the
    encoder's parameters of a mixed group into a new group with the same settings, appended after
    the existing ones: the mixed group keeps its place with the rest, so the runner's logged LR
    (the first group without a multiplier) stays the heads'.

    Needs the ``names`` that ``param_groups`` records and an optimizer that has not stepped yet.
    Deterministic, so a resumed run rebuilds the same groups its checkpointed state refers to."""
    if optimizer.state:
        raise ValueError("split_encoder_groups: the optimizer has already stepped")
    for group in list(optimizer.param_groups):
        if "names" not in group:
            raise ValueError("split_encoder_groups: the optimizer's groups must come from param_groups (their names)")
        in_encoder = [name.startswith(ENCODER_PREFIX) for name in group["names"]]
        if all(in_encoder) or not any(in_encoder):
            group["encoder"] = all(in_encoder) and bool(in_encoder)
            continue
        settings = {key: value for key, value in group.items() if key not in ("params", "names")}
        members = list(zip(group["params"], group["names"], in_encoder))
        group["params"] = [param for param, _, is_encoder in members if not is_encoder]
        group["names"] = [name for _, name, is_encoder in members if not is_encoder]
        group["encoder"] = False
        encoder_group = {
            **settings,
            "params": [param for param, _, is_encoder in members if is_encoder],
            "names": [name for _, name, is_encoder in members if is_encoder],
            "encoder": True,
        }
        optimizer.add_param_group(encoder_group)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` following ``scheduled_lr`` for every parameter group.

    With ``cfg.encoder_warmup_iters`` the encoder's parameters first get groups of their own
    (``split_encoder_groups``), since EoMT's schedule treats them apart. The factors are plain
    functions, so the scheduler's saved state stays ``base_lrs`` and the step."""
    if cfg.encoder_warmup_iters is None:
        factors = [
            (lambda step, base=group["lr"]: scheduled_lr(base, step, max_iters, cfg) / base)
            for group in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    split_encoder_groups(optimizer)
    factors = [
        (lambda step, encoder=group["encoder"]: two_stage_factor(step, max_iters, cfg, encoder=encoder))
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
