"""Per-parameter optimizer rules, the warmup + poly schedule, and EoMT's two-stage warm-up."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import QUICKSTART
from torch import nn

from hooktrain.engine.optim import (
    OptimizerConfig,
    ParamRule,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    param_groups,
    scheduled_lr,
    split_encoder_groups,
)
from hooktrain.errors import UserError
from hooktrain.models import build_recipe_segmentor
from hooktrain.recipe.schema import load_recipe


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


# EoMT's two-stage warm-up (schedule.encoder_warmup_iters) on a tiny DINOv2 with registers and
# its final norm, under a linear head, with EoMT's optimizer: AdamW lr 1e-4, weight decay 0.05,
# layer decay 0.8 numbered as EoMT's, warm-ups [500, 1000], poly power 0.9.
TOTAL, HEAD_WARMUP, ENCODER_WARMUP, POWER = 2000, 500, 1000, 0.9
EOMT_RECIPE = [
    "model.encoder={name: vit_small_patch14_reg4_dinov2, pretrained: false, out_indices: [3], intermediate_norm: true, "
    "kwargs: {depth: 4, embed_dim: 48, num_heads: 2, img_size: 28}}",
    "model.decode_head={type: linear}",
    "optimizer={type: adamw, lr: 1.0e-4, weight_decay: 0.05, "
    "layer_decay: {rate: 0.8, num_layers: 4, decay_type: eomt}}",
    f"schedule={{warmup_iters: {HEAD_WARMUP}, encoder_warmup_iters: {ENCODER_WARMUP}, power: {POWER}}}",
    f"train.max_iters={TOTAL}",
]


def eomt_two_stage_lr(base_lr: float, step: int, backbone: bool) -> float:
    """EoMT's TwoStageWarmupPolySchedule (tue-mps/eomt training/two_stage_warmup_poly_schedule.py) for
    one group, warmup_steps (HEAD_WARMUP, ENCODER_WARMUP), total_steps TOTAL, poly_power POWER."""
    if not backbone:
        if step < HEAD_WARMUP:
            return base_lr * (step / HEAD_WARMUP)
        return base_lr * (1 - (step - HEAD_WARMUP) / (TOTAL - HEAD_WARMUP)) ** POWER
    if step < HEAD_WARMUP:
        return 0.0
    if step < HEAD_WARMUP + ENCODER_WARMUP:
        return base_lr * ((step - HEAD_WARMUP) / ENCODER_WARMUP)
    return base_lr * (1 - (step - HEAD_WARMUP - ENCODER_WARMUP) / (TOTAL - HEAD_WARMUP - ENCODER_WARMUP)) ** POWER


def eomt_base_lr(name: str) -> float:
    """EoMT's configure_optimizers' lr for a hooktrain name: block i 1e-4 * 0.8 ** (3 - i), the
    ViT's parameters before its blocks block 0's, its final norm and everything else 1e-4."""
    if (match := re.match(r"encoder\.model\.blocks\.(\d+)\.", name)) is not None:
        return 1e-4 * 0.8 ** (3 - int(match[1]))
    if re.match(r"encoder\.model\.(cls_token|reg_token|pos_embed|patch_embed\.)", name):
        return 1e-4 * 0.8**3
    return 1e-4


def eomt_optimizer(options: list[str] = ()):
    recipe = load_recipe(QUICKSTART, [*EOMT_RECIPE, *options])
    model = build_recipe_segmentor(recipe, on_meta=True)
    optimizer = build_optimizer(model, recipe.optimizer)
    return model, optimizer, build_scheduler(optimizer, recipe.schedule, recipe.train.max_iters)


def lrs_by_name(optimizer) -> dict[str, float]:
    return {name: group["lr"] for group in optimizer.param_groups for name in group["names"]}


def test_two_stage_schedule_gives_every_parameter_eomts_lr():
    """Each parameter's lr at the start, mid first warm-up, its end, mid second warm-up, its end,
    after, and the last steps: EoMT's lr for its name (relative 1e-12), the encoder's parameters
    (encoder.*) scheduled as EoMT's backbone, every other one as its other groups."""
    model, optimizer, scheduler = eomt_optimizer()
    names = [name for name, _ in model.named_parameters()]
    assert all(group["encoder"] == group["names"][0].startswith("encoder.") for group in optimizer.param_groups)
    assert all(len({name.startswith("encoder.") for name in g["names"]}) == 1 for g in optimizer.param_groups)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.05}
    checked = {0, 1, 250, 499, 500, 501, 1000, 1499, 1500, 1501, 1750, 1999, 2000}
    for step in range(TOTAL + 1):
        if step in checked:
            got = lrs_by_name(optimizer)
            assert sorted(got) == sorted(names)
            for name in names:
                want = eomt_two_stage_lr(eomt_base_lr(name), step, backbone=name.startswith("encoder."))
                assert math.isclose(got[name], want, rel_tol=1e-12, abs_tol=0), (step, name, got[name], want)
        optimizer.step()
        scheduler.step()
    # anchors by hand: the head at half its warm-up, the encoder's last block at half its own
    assert eomt_two_stage_lr(1e-4, 250, backbone=False) == pytest.approx(5e-5, rel=1e-15)
    assert eomt_two_stage_lr(1e-4, 1000, backbone=True) == pytest.approx(5e-5, rel=1e-15)
    assert eomt_two_stage_lr(1e-4, 1499, backbone=True) > 0 == eomt_two_stage_lr(1e-4, 2000, backbone=True)


def test_two_stage_schedule_equals_lightly_trains_eomt_scheduler():
    """Against LightlyTrain's copy of EoMT's TwoStageWarmupPolySchedule (skipped unless lightly_train
    is importable): its groups, one per parameter with EoMT's lr, encoder's first, stepped beside
    hooktrain's; every parameter's lr equal at every step."""
    eomt = pytest.importorskip("lightly_train._task_models.dinov2_eomt_semantic_segmentation.scheduler")
    model, optimizer, scheduler = eomt_optimizer()
    named = list(model.named_parameters())
    backbone = [(name, param) for name, param in named if name.startswith("encoder.")]
    others = [(name, param) for name, param in named if not name.startswith("encoder.")]
    groups = [{"params": [param], "lr": eomt_base_lr(name), "name": name} for name, param in backbone + others]
    reference = torch.optim.AdamW(groups, weight_decay=0.05)
    reference_scheduler = eomt.TwoStageWarmupPolySchedule(
        reference, len(backbone), (HEAD_WARMUP, ENCODER_WARMUP), TOTAL, POWER
    )
    for step in range(TOTAL + 1):
        got = lrs_by_name(optimizer)
        for group in reference.param_groups:
            assert math.isclose(got[group["name"]], group["lr"], rel_tol=1e-12, abs_tol=0), (step, group["name"])
        for opt, sched in ((optimizer, scheduler), (reference, reference_scheduler)):
            opt.step()
            sched.step()


def test_two_stage_scheduler_state_resumes_and_the_default_schedule_keeps_its_groups():
    """The scheduler's state (what a checkpoint keeps) is the step and base lrs, no factors: a
    rebuilt optimizer and scheduler loading it give the same lrs. Without encoder_warmup_iters the
    groups are param_groups' own, unmarked."""
    _, optimizer, scheduler = eomt_optimizer()
    for _ in range(700):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["last_epoch"] == 700 and state["lr_lambdas"] == [None] * len(optimizer.param_groups)
    _, resumed, resumed_scheduler = eomt_optimizer()
    resumed.load_state_dict(optimizer.state_dict())
    resumed_scheduler.load_state_dict(state)
    for _ in range(3):
        for opt, sched in ((optimizer, scheduler), (resumed, resumed_scheduler)):
            opt.step()
            sched.step()
        assert lrs_by_name(resumed) == lrs_by_name(optimizer)
    model, single, _ = eomt_optimizer(["schedule.encoder_warmup_iters=null"])
    unsplit = param_groups(model, load_recipe(QUICKSTART, EOMT_RECIPE).optimizer)
    assert [g["names"] for g in single.param_groups] == [g["names"] for g in unsplit]
    assert not any("encoder" in g for g in single.param_groups)


def test_split_encoder_groups_keeps_settings_and_puts_the_heads_first():
    model = Net()
    model.encoder = nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.01))
    assert len(optimizer.param_groups) == 1
    split_encoder_groups(optimizer)
    head, encoder = optimizer.param_groups
    assert (head["encoder"], encoder["encoder"]) == (False, True)
    assert encoder["names"] == ["encoder.weight", "encoder.bias"]
    assert "encoder.weight" not in head["names"] and len(head["params"]) == len(head["names"])
    assert {key: value for key, value in encoder.items() if key not in ("params", "names", "encoder")} == {
        key: value for key, value in head.items() if key not in ("params", "names", "encoder")
    }


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("schedule.min_lr=1.0e-6", r"^recipe key 'schedule': .*min_lr must be 0 with encoder_warmup_iters .*1e-06"),
        ("schedule.warmup_ratio=0.1", r"^recipe key 'schedule': .*warmup_ratio must keep its default .*, got 0\.1"),
        ("schedule.encoder_warmup_iters=-1", r"schedule\.encoder_warmup_iters"),
    ],
)
def test_two_stage_schedule_refuses_what_eomts_has_not(option, message):
    with pytest.raises(UserError, match=message) as err:
        load_recipe(QUICKSTART, [*EOMT_RECIPE, option])
    assert "\n" not in str(err.value)


def test_two_stage_edges_without_first_warmup_or_second():
    """warmup_iters 0: the heads start at their full lr, the encoder warms up from step 0;
    encoder_warmup_iters 0: the encoder jumps from 0 to the poly decay after the first stage."""
    no_first = ScheduleConfig(warmup_iters=0, encoder_warmup_iters=4, power=1.0)
    assert scheduled_lr(1.0, 0, 10, no_first) == 1.0
    assert [scheduled_lr(1.0, k, 10, no_first, encoder=True) for k in (0, 2, 4, 7)] == [0.0, 0.5, 1.0, 0.5]
    no_second = ScheduleConfig(warmup_iters=4, encoder_warmup_iters=0, power=1.0)
    assert [scheduled_lr(1.0, k, 10, no_second, encoder=True) for k in (3, 4, 7, 10)] == [0.0, 1.0, 0.5, 0.0]
    assert [scheduled_lr(1.0, k, 10, no_second) for k in (0, 2, 4, 7, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
