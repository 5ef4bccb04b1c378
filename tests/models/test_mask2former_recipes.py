"""recipes/mmseg's two Mask2Former ADE20K configs (ResNet-50 and Swin-T): they build and predict, every
parameter gets the learning rate and weight decay MMEngine's optimizer constructor gives it under the
configs' ``paramwise_cfg``, the ResNet's BatchNorms are frozen as ``requires_grad=False`` freezes them,
the test-time ``size_divisor`` padding is MMSegmentation's, and both recipes train on the ADE20K
replica. The shortest-edge resize's parity with mmcv/mmseg is in tests/data/test_transforms.py."""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import RECIPES, train_on_ade20k_replica
from torch import nn

from hooktrain.engine.optim import param_groups
from hooktrain.models.backbone_keys import to_encoder_keys, to_timm
from hooktrain.models.encoder import build_encoder
from hooktrain.models.inference import image_logits, pad_to_multiple
from hooktrain.models.segmentor import build_segmentor
from hooktrain.recipe.model import EncoderConfig, InferenceConfig
from hooktrain.recipe.schema import load_recipe

R50 = "mask2former_r50_8xb2-160k_ade20k-512x512"
SWIN_T = "mask2former_swin-t_8xb2-160k_ade20k-512x512"
NAMES = [R50, SWIN_T]
OFFLINE = ["model.encoder.pretrained=false"]


def recipe_path(name: str):
    return RECIPES / "mmseg" / f"{name}.yaml"


@pytest.fixture(scope="module")
def built():
    """Each recipe and its model (random weights), built once."""
    out = {}
    for name in NAMES:
        recipe = load_recipe(recipe_path(name), OFFLINE)
        torch.manual_seed(0)
        out[name] = recipe, build_segmentor(recipe.model, num_classes=recipe.data.num_classes)
    return out


# ---------------------------------------------------------------- what the configs say


def test_the_recipes_say_what_the_configs_say(built):
    for name in NAMES:
        recipe, _ = built[name]
        head, data = recipe.model.decode_head, recipe.data
        assert head.type == "mask2former" and head.num_queries == 100 and head.channels == 256
        assert (head.encoder_layers, head.encoder_feedforward, head.decoder_layers, head.decoder_feedforward) == (
            6, 1024, 9, 2048)  # fmt: skip
        assert head.loss.model_dump() == dict(
            class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1, num_points=12544,
            oversample_ratio=3.0, importance_sample_ratio=0.75,
        )  # fmt: skip
        resize = data.train.pipeline.resize
        assert resize.scales == [int(512 * x * 0.1) for x in range(5, 21)] and resize.max_size == 2048
        assert data.train.pipeline.crop_size == (512, 512) and data.train.pipeline.cat_max_ratio == 0.75
        assert data.train.batch_size == 2 and data.reduce_zero_label and data.val.pipeline.scale == (2048, 512)
        assert recipe.model.inference.mode == "whole" and recipe.model.inference.size_divisor == 32
        opt = recipe.optimizer
        assert (opt.type, opt.lr, opt.weight_decay, opt.eps, opt.betas) == ("adamw", 1e-4, 0.05, 1e-8, (0.9, 0.999))
        assert recipe.train.clip_grad_norm == 0.01 and recipe.train.max_iters == 160000
        assert (recipe.schedule.warmup_iters, recipe.schedule.power, recipe.schedule.min_lr) == (0, 0.9, 0.0)
        assert [(h.type, h.interval) for h in recipe.hooks][1] == ("eval", 5000)
    r50, swin = built[R50][0].model.encoder, built[SWIN_T][0].model.encoder
    assert r50.name == "resnet50.tv_in1k" and r50.frozen_norms and r50.out_norm is None
    assert swin.name == "swin_tiny_patch4_window7_224" and swin.drop_path_rate == 0.3 and not swin.frozen_norms
    assert swin.out_norm == "layer_norm" and swin.out_norm_eps == 1e-5


def test_the_recipes_build_and_predict_at_the_input_size(built):
    for name in NAMES:
        _, model = built[name]
        model.eval()
        with torch.no_grad():
            scores = model.logits(torch.randn(1, 3, 64, 96))
            (predicted,) = model.predict(torch.randn(1, 3, 50, 70), [(50, 70)], [(100, 140)])
        assert scores.shape == (1, 150, 64, 96) and torch.isfinite(scores).all()
        assert predicted.shape == (150, 100, 140)


# ---------------------------------------------------------------- parameter groups


def mmseg_name(name: str) -> str:
    """The name MMSegmentation's model gives hooktrain's parameter ``name`` where it matters to the
    configs' custom keys: the backbone's prefix, Swin's stages (timm's downsample opens stage i,
    mmseg's closes stage i - 1) and per-level norms (backbone.norm0..3), mmdet's Mask2FormerHead's
    query_embed / query_feat / level_embed and the pixel decoder's level_encoding."""
    rules = [
        (r"encoder\.model\.layers\.(\d+)\.downsample\.(.*)",
         lambda m: f"backbone.stages.{int(m[1]) - 1}.downsample.{m[2]}"),
        (r"encoder\.model\.layers\.(\d+)\.(.*)", r"backbone.stages.\1.\2"),
        (r"encoder\.model\.(.*)", r"backbone.\1"),
        (r"encoder\.(.*)", r"backbone.\1"),
        (r"out_norms\.(\d+)\.(.*)", r"backbone.norm\1.\2"),
        (r"decoder\.query_pos\.weight", "decode_head.query_embed.weight"),
        (r"decoder\.(query_feat|level_embed)\.weight", r"decode_head.\1.weight"),
        (r"pixel_decoder\.level_embed", "decode_head.pixel_decoder.level_encoding.weight"),
        (r"pixel_decoder\.(.*)", r"decode_head.pixel_decoder.\1"),
        (r"decoder\.(.*)", r"decode_head.transformer_decoder.\1"),
    ]  # fmt: skip
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise AssertionError(f"no MMSegmentation name for {name}")


def custom_keys(name: str) -> dict[str, dict]:
    """The configs' ``paramwise_cfg.custom_keys``, as written in them."""
    embed_multi = dict(lr_mult=1.0, decay_mult=0.0)
    keys = {"backbone": dict(lr_mult=0.1, decay_mult=1.0), "query_embed": embed_multi, "query_feat": embed_multi,
            "level_embed": embed_multi}  # fmt: skip
    if name == SWIN_T:
        depths = [2, 2, 6, 2]
        backbone_multi = dict(lr_mult=0.1, decay_mult=0.0)
        keys.update({"backbone.patch_embed.norm": backbone_multi, "backbone.norm": backbone_multi,
                     "absolute_pos_embed": backbone_multi, "relative_position_bias_table": backbone_multi})  # fmt: skip
        keys.update({f"backbone.stages.{s}.blocks.{b}.norm": backbone_multi for s, n in enumerate(depths)
                     for b in range(n)})  # fmt: skip
        keys.update({f"backbone.stages.{s}.downsample.norm": backbone_multi for s in range(len(depths) - 1)})
    return keys


def mmengine_lr_and_decay(name: str, module: nn.Module, keys: dict, lr: float, decay: float) -> tuple[float, float]:
    """MMEngine 0.10's ``DefaultOptimWrapperConstructor.add_params`` for one parameter, with the
    configs' settings (custom_keys, norm_decay_mult 0.0; no bias or depth-wise multipliers): the
    longest custom key (then alphabetical) contained in the name decides alone; otherwise a
    parameter of a norm layer gets weight decay x norm_decay_mult."""
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in name:
            return lr * keys[key].get("lr_mult", 1.0), decay * keys[key].get("decay_mult", 1.0)
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
    return lr, decay * 0.0 if isinstance(module, norms) else decay


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_mmengines_lr_and_weight_decay(built, name):
    recipe, model = built[name]
    ours = {}
    for group in param_groups(model, recipe.optimizer):
        for param_name in group["names"]:
            ours[param_name] = (group["lr"], group["weight_decay"])
    keys = custom_keys(name)
    expected, modules = {}, dict(model.named_modules())
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            module = modules[param_name.rpartition(".")[0]]
            expected[param_name] = mmengine_lr_and_decay(mmseg_name(param_name), module, keys, 1e-4, 0.05)
    assert ours.keys() == expected.keys()
    wrong = {k: (ours[k], expected[k]) for k in ours if not all(a == pytest.approx(b, rel=1e-12, abs=0)
                                                                for a, b in zip(ours[k], expected[k]))}  # fmt: skip
    assert not wrong, list(wrong.items())[:5]
    # what the configs mean, spelt out: the backbone at lr x0.1, the decoder's embeddings and
    # every trainable norm without decay, the pixel decoder's level encoding with it
    assert all(lr == pytest.approx(1e-5) for k, (lr, _) in ours.items() if k.startswith(("encoder.", "out_norms.")))
    assert all(lr == pytest.approx(1e-4) for k, (lr, _) in ours.items() if k.startswith(("decoder.", "pixel_decoder.")))
    for key in ("decoder.query_pos.weight", "decoder.query_feat.weight", "decoder.level_embed.weight"):
        assert ours[key] == (pytest.approx(1e-4), 0.0)
    assert ours["pixel_decoder.level_embed"] == (pytest.approx(1e-4), pytest.approx(0.05))
    norm_params = [f"{m}.{p}" for m, module in modules.items() if isinstance(module, (nn.LayerNorm, nn.GroupNorm))
                   for p, _ in module.named_parameters(recurse=False)]  # fmt: skip
    assert norm_params and all(ours[k][1] == 0.0 for k in norm_params)
    if name == SWIN_T:
        tables = [k for k in ours if k.endswith("relative_position_bias_table")]
        assert len(tables) == 12 and all(ours[k] == (pytest.approx(1e-5), 0.0) for k in tables)
        assert ours["out_norms.0.weight"] == (pytest.approx(1e-5), 0.0)
        assert ours["encoder.model.layers.1.blocks.0.attn.qkv.weight"] == (pytest.approx(1e-5), pytest.approx(0.05))
    else:
        assert not [k for k in ours if k.startswith("encoder.") and ".bn" in k]  # frozen BatchNorms
        assert ours["encoder.layer1.0.conv1.weight"] == (pytest.approx(1e-5), pytest.approx(0.05))


MMDET = ["mmdet==3.3.0", "six==1.17.0"]  # mmseg's Mask2FormerHead is mmdet's; six: mmdet.models imports it


def mmdet_site(mmseg_env) -> Path:
    """mmdet for ``optim_reference.py --mmdet``: ``pip install --no-deps --target`` next to the
    MMSegmentation environment, once (a marker written last; a concurrent install that loses the
    rename is dropped). ``HOOKTRAIN_MMSEG_WHEELS`` installs from that wheel directory, no index."""
    site = mmseg_env.site.parent / "mmdet-3.3.0"
    if (site / ".hooktrain-complete").is_file():
        return site
    wheels = os.environ.get("HOOKTRAIN_MMSEG_WHEELS")
    source = ["--no-index", "--find-links", wheels] if wheels else []
    staging = Path(tempfile.mkdtemp(prefix=".mmdet-", dir=site.parent))
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:",
                             "--target", str(staging), *source, *MMDET], capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"pip could not install {MMDET}:\n{result.stderr[-3000:]}")
    (staging / ".hooktrain-complete").write_text(json.dumps(MMDET))
    try:
        os.replace(staging, site)
    except OSError:  # another process installed it first
        shutil.rmtree(staging, ignore_errors=True)
    return site


@pytest.fixture(scope="module")
def mmengine_groups(mmseg_env, tmp_path_factory) -> Path:
    """MMEngine's DefaultOptimWrapperConstructor with each config's own paramwise_cfg on the config's
    own model (MMSegmentation 1.2.2 + mmdet 3.3.0), from tests/mmseg_ref/optim_reference.py."""
    out = tmp_path_factory.mktemp("mask2former_param_groups")
    script = Path(__file__).parents[1] / "mmseg_ref" / "optim_reference.py"
    mmseg_env.run(script, "--mmdet", str(mmdet_site(mmseg_env)), str(out), *NAMES)
    return out


def backbone_names(want: dict, model: nn.Module) -> dict[str, str]:
    """hooktrain's name of every mmseg backbone parameter in ``want``, by hooktrain's own mmseg
    backbone renaming (``to_timm``, ``to_encoder_keys``): each tensor is filled with its index, which
    the renaming's channel permutations (Swin's PatchMerging) keep."""
    names = [name for name in want if name.startswith("backbone.")]
    state = {name.removeprefix("backbone."): torch.full(want[name][2], float(i)) for i, name in enumerate(names)}
    timm_state = to_timm(state)
    out_norms = {k: v for k, v in timm_state.items() if k.startswith("out_norms.")}
    encoder = to_encoder_keys({k: v for k, v in timm_state.items() if k not in out_norms},
                              set(model.encoder.state_dict()))  # fmt: skip
    renamed = {**{f"encoder.{k}": v for k, v in encoder.items()}, **out_norms}
    assert all((v == v.flatten()[0]).all() for v in renamed.values())
    return {k: names[int(v.flatten()[0])] for k, v in renamed.items()}


HEAD_EMBEDDINGS = {
    "decoder.query_pos.weight": "decode_head.query_embed.weight",
    "decoder.query_feat.weight": "decode_head.query_feat.weight",
    "decoder.level_embed.weight": "decode_head.level_embed.weight",
    "pixel_decoder.level_embed": "decode_head.pixel_decoder.level_encoding.weight",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups_equal_mmengines_on_mmsegmentations_own_model(built, mmengine_groups, name):
    """MMEngine's constructor on MMSegmentation's own Mask2Former (mmdet's head) against the recipe's
    groups. The backbone parameter by parameter (trainable ones: the ResNet's frozen BatchNorms are in
    neither), mmseg's names mapped by hooktrain's own backbone renaming; the head's embeddings by name;
    the rest of the head (mmdet's attention keeps q, k, v in one in_proj tensor, hooktrain's in three)
    as the number of scalars at each (lr, weight decay), which must be equal."""
    recipe, model = built[name]
    want = json.loads((mmengine_groups / f"{name}.json").read_text())
    got = {n: (g["lr"], g["weight_decay"]) for g in param_groups(model, recipe.optimizer) for n in g["names"]}
    renamed = backbone_names(want, model)
    assert sorted(renamed) == sorted(k for k in got if k.startswith(("encoder.", "out_norms.")))
    assert sorted(renamed.values()) == sorted(k for k in want if k.startswith("backbone."))
    assert {k: got[k] for k in renamed} == {k: tuple(want[v][:2]) for k, v in renamed.items()}
    assert {k: got[k] for k in HEAD_EMBEDDINGS} == {k: tuple(want[v][:2]) for k, v in HEAD_EMBEDDINGS.items()}
    ours, theirs = collections.Counter(), collections.Counter()
    params = dict(model.named_parameters())
    for key, settings in got.items():
        if not key.startswith(("encoder.", "out_norms.")):
            ours[settings] += params[key].numel()
    for key, (lr, decay, shape) in want.items():
        if not key.startswith("backbone."):
            theirs[(lr, decay)] += math.prod(shape)
    assert ours == theirs and len(ours) == 2  # decay 0.05, and 0 (norms and embeddings)


# ---------------------------------------------------------------- frozen BatchNorm affine


def test_frozen_norms_freeze_batchnorm_affine_but_not_its_statistics():
    """``encoder.frozen_norms`` is mmseg's ``norm_cfg=dict(type='SyncBN', requires_grad=False)`` with
    ``norm_eval=False``: weights and biases of every BatchNorm get no gradient and stay out of the
    optimizer; running statistics still move in training; the convolutions train."""
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="resnet18", frozen_norms=True)).train()
    bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not p.requires_grad for m in bns for p in m.parameters())
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.requires_grad for m in convs)
    before = bns[0].running_mean.clone()
    sum(level.sum() for level in encoder(torch.randn(2, 3, 64, 64))).backward()
    assert not torch.equal(before, bns[0].running_mean)
    assert all(m.weight.grad is None for m in bns) and convs[0].weight.grad is not None
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)  # train.sync_bn keeps them frozen
    assert all(not p.requires_grad for m in synced.modules() if isinstance(m, nn.SyncBatchNorm) for p in m.parameters())
    default = build_encoder(EncoderConfig(name="resnet18"))
    assert all(p.requires_grad for p in default.parameters())


# ---------------------------------------------------------------- test-time size_divisor


def test_size_divisor_pads_after_the_flip_with_zeros_and_crops_the_scores_back():
    """mmseg's test-time ``stack_batch(size_divisor=32)`` pads the normalised image at the bottom and
    right with 0 (TTA: after its flip), the head predicts at the padded size and
    ``postprocess_result`` crops the padding off before flipping back."""
    seen = []

    def logits_fn(x):
        seen.append(x)
        column = torch.arange(x.shape[-1], dtype=torch.float32).expand(x.shape[0], 1, x.shape[-2], -1)
        return torch.cat([column, x[:, :1]], dim=1)

    image = torch.rand(1, 3, 50, 70) + 1
    cfg = InferenceConfig(size_divisor=32)
    out = image_logits(logits_fn, image, cfg)
    assert seen[-1].shape == (1, 3, 64, 96) and (seen[-1][..., 50:, :] == 0).all() and (seen[-1][..., 70:] == 0).all()
    assert out.shape == (1, 2, 50, 70) and torch.equal(out[0, 1], image[0, 0])
    assert torch.equal(out[0, 0, 0], torch.arange(70.0))
    flipped = image_logits(logits_fn, image, cfg, flip=True)
    assert torch.equal(seen[-1][..., :50, :70], image.flip(-1)) and (seen[-1][..., 70:] == 0).all()
    assert torch.equal(flipped[0, 0, 0], torch.arange(69.0, -1, -1)) and torch.equal(flipped[0, 1], image[0, 0])
    slide = image_logits(logits_fn, image, InferenceConfig(mode="slide", crop_size=(32, 32), stride=(32, 32),
                                                          size_divisor=32))  # fmt: skip
    assert slide.shape == (1, 2, 50, 70) and torch.equal(slide[0, 1], image[0, 0])
    whole = torch.rand(1, 3, 64, 96)
    assert pad_to_multiple(whole, 32) is whole and pad_to_multiple(image, None) is image
    assert torch.equal(image_logits(logits_fn, image, InferenceConfig())[0, 0, 0], torch.arange(70.0))


def test_the_mask2former_recipe_predicts_on_the_padded_image(built):
    recipe, model = built[R50]
    model.eval()
    image = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        (scores,) = model.predict(image, [(40, 52)], [(40, 52)])
        padded = torch.nn.functional.pad(image, (0, 12, 0, 24))
        expected = model.logits(padded)[0, :, :40, :52]
        unpadded = model.logits(image)[0]
    torch.testing.assert_close(scores, expected)
    assert not torch.allclose(scores, unpadded)  # the padding does change Mask2Former's scores


# ---------------------------------------------------------------- training


TINY_SHORTEST_EDGE = "data.train.pipeline.resize={type: shortest_edge_choice, scales: [32, 40, 48], max_size: 96}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_mask2former_recipes_train(tmp_path, name):
    """Each recipe's own model (random weights) trains two iterations and evaluates on the ADE20K
    replica served by the local Hub stand-in, with the shortest-edge resize at test scale."""
    train_on_ade20k_replica(recipe_path(name), tmp_path, TINY_SHORTEST_EDGE)
