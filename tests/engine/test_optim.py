"""Per-parameter optimizer rules and the warmup + poly schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hooktrain.engine.optim import (
    OptimizerConfig,
    ParamRule,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    param_groups,
    scheduled_lr,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.decode_head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.LayerNorm(2))


def settings(model, cfg):
    out = {}
    for group in param_groups(model, cfg):
        for name in group["names"]:
            out[name] = (group["lr"], group["weight_decay"])
    return out


def test_rules_multiply_and_select_by_name_type_and_bias():
    cfg = OptimizerConfig(
        lr=1.0,
        weight_decay=0.1,
        param_rules=[
            ParamRule(pattern="head", lr_mult=10),
            ParamRule(param_type="norm", decay_mult=0),
            ParamRule(pattern="pos_embed", decay_mult=0),
            ParamRule(param_type="bias", decay_mult=0.5),
        ],
    )
    got = settings(Net(), cfg)
    assert got["backbone.0.weight"] == (1.0, 0.1)
    assert got["backbone.0.bias"] == (1.0, 0.05)
    assert got["backbone.1.weight"] == (1.0, 0.0)  # BatchNorm: norm rule by module type
    assert got["pos_embed"] == (1.0, 0.0)
    assert got["decode_head.0.weight"] == (10.0, 0.1)
    assert got["decode_head.1.weight"] == (10.0, 0.0)  # head lr and norm decay both apply
    assert len(got) == len(list(Net().parameters()))


def test_optimizer_types():
    model = Net()
    assert isinstance(build_optimizer(model, OptimizerConfig(type="sgd", lr=0.01)), torch.optim.SGD)
    adamw = build_optimizer(model, OptimizerConfig(type="adamw", lr=1e-3, betas=(0.8, 0.9)))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)


def mmcv_poly_with_linear_warmup(base, k, max_iters, warmup, ratio, power, min_lr):
    """mmcv 0.x PolyLrUpdaterHook + linear warmup, written out independently."""
    regular = (base - min_lr) * (1 - k / max_iters) ** power + min_lr
    if k < warmup:
        k_ratio = 1 - (1 - k / warmup) * (1 - ratio)
        return regular * k_ratio
    return regular


@pytest.mark.parametrize("warmup, power, min_lr", [(0, 0.9, 1e-4), (1500, 1.0, 0.0), (10, 2.0, 1e-6)])
def test_schedule_matches_mmcv(warmup, power, min_lr):
    cfg = ScheduleConfig(warmup_iters=warmup, warmup_ratio=1e-6, power=power, min_lr=min_lr)
    for k in [0, 1, 5, 9, 10, 11, 1499, 1500, 1501, 80000, 159999, 160000]:
        expected = mmcv_poly_with_linear_warmup(0.01, k, 160000, warmup, 1e-6, power, min_lr)
        assert scheduled_lr(0.01, k, 160000, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_scheduler_steps_every_group_with_its_multiplier():
    model = Net()
    cfg = OptimizerConfig(lr=0.1, param_rules=[ParamRule(pattern="head", lr_mult=10)])
    optimizer = build_optimizer(model, cfg)
    schedule = ScheduleConfig(warmup_iters=3, warmup_ratio=0.1, power=1.0)
    scheduler = build_scheduler(optimizer, schedule, max_iters=10)
    for k in range(10):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(scheduled_lr(group["lr_mult"] * 0.1, k, 10, schedule))
        optimizer.step()
        scheduler.step()
