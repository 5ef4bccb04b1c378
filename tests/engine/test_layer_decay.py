"""MMSegmentation's layer-wise LR decay (``optimizer.layer_decay``) on timm's parameter names:
by hand on small models, and against MMSegmentation 1.2.2's own constructors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ENV, QUICKSTART, RECIPES, run_cli, tiny
from mmseg_ref.fixtures import CONFIGS

from hooktrain.deploy.convert import fit_to_model
from hooktrain.engine.optim import param_groups
from hooktrain.errors import UserError
from hooktrain.models import build_recipe_segmentor
from hooktrain.models.segmentor import build_segmentor
from hooktrain.models.segmentor_keys import from_mmseg
from hooktrain.recipe.model import ModelConfig
from hooktrain.recipe.optim import LayerDecay, OptimizerConfig, ParamRule
from hooktrain.recipe.schema import load_recipe

CONVNEXT = "convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512"
MAE = "mae-base_upernet_8xb2-amp-160k_ade20k-512x512"
HEAD = {"type": "upernet", "channels": 16, "pool_scales": [1, 2]}


def segmentor(encoder: dict, **model):
    cfg = ModelConfig.model_validate({"encoder": {"pretrained": False, **encoder}, "decode_head": HEAD, **model})
    with torch.device("meta"):
        return build_segmentor(cfg, num_classes=3)


def settings(model, cfg: OptimizerConfig) -> dict[str, tuple[float, float]]:
    return {name: (group["lr"], group["weight_decay"]) for group in param_groups(model, cfg) for name in group["names"]}


def test_convnext_stage_wise_and_layer_wise_ids_are_mmsegs():
    """convnext_atto (depths 2, 2, 6, 2), num_layers 6: lr = 1e-4 * 0.9 ** (7 - id)."""
    model = segmentor({"name": "convnext_atto", "out_norm": "layer_norm"})
    ids = {
        "encoder.stem_0.weight": (0, 0),
        "encoder.stem_1.bias": (0, 0),
        "encoder.stages_0.blocks.1.conv_dw.weight": (1, 1),
        "encoder.stages_1.downsample.1.weight": (0, 2),
        "encoder.stages_1.blocks.0.mlp.fc1.weight": (2, 2),
        "encoder.stages_2.downsample.0.weight": (0, 3),
        "encoder.stages_2.blocks.2.gamma": (3, 3),
        "encoder.stages_2.blocks.5.mlp.fc2.weight": (3, 4),
        "encoder.stages_3.downsample.1.weight": (0, 6),
        "encoder.stages_3.blocks.1.norm.weight": (4, 6),
        "out_norms.3.weight": (7, 7),
        "decode_head.conv_seg.weight": (7, 7),
    }
    for column, decay_type in enumerate(("stage_wise", "layer_wise")):
        decay = LayerDecay(rate=0.9, num_layers=6, decay_type=decay_type)
        cfg = OptimizerConfig(lr=1e-4, weight_decay=0.05, layer_decay=decay)
        got = settings(model, cfg)
        for name, layer in ids.items():
            assert got[name][0] == 1e-4 * 0.9 ** (7 - layer[column]), (decay_type, name)
    # weight decay: none for 1-D parameters (gamma, norms) and biases
    assert got["encoder.stages_0.blocks.0.conv_dw.weight"][1] == 0.05
    assert got["encoder.stages_0.blocks.0.conv_dw.bias"][1] == 0.0
    assert got["encoder.stages_0.blocks.0.gamma"][1] == 0.0
    assert got["decode_head.conv_seg.bias"][1] == 0.0


def test_vit_layer_ids_are_mmsegs_and_param_rules_multiply():
    neck = {"type": "multilevel", "out_channels": 8, "scales": [2, 0.5]}
    model = segmentor({"name": "vit_tiny_patch16_224", "out_indices": [1, 3]}, neck=neck)
    rules = [ParamRule(pattern="decode_head", lr_mult=10), ParamRule(pattern="pos_embed", decay_mult=0)]
    cfg = OptimizerConfig(lr=1.0, weight_decay=0.1, layer_decay=LayerDecay(rate=0.5, num_layers=12), param_rules=rules)
    got = settings(model, cfg)
    assert got["encoder.model.cls_token"] == (0.5**13, 0.1)  # 3-D: mmseg keeps its decay
    assert got["encoder.model.pos_embed"] == (0.5**13, 0.0)  # a rule on top
    assert got["encoder.model.patch_embed.proj.weight"] == (0.5**13, 0.1)
    assert got["encoder.model.blocks.0.attn.qkv.weight"] == (0.5**12, 0.1)
    assert got["encoder.model.blocks.3.mlp.fc2.bias"] == (0.5**9, 0.0)
    assert got["neck.convs.0.conv.weight"] == (1.0, 0.1)
    assert got["decode_head.conv_seg.weight"] == (10.0, 0.1)
    assert not any(name.startswith("encoder.model.blocks.4.") for name in got)  # pruned after the last index


def test_register_tokens_are_embeddings():
    """DINOv2's register tokens (no mmseg counterpart) decay with the class token, at layer 0."""
    model = segmentor({"name": "vit_small_patch14_reg4_dinov2", "out_indices": [11]})
    got = settings(model, OptimizerConfig(lr=1.0, layer_decay=LayerDecay(rate=0.5, num_layers=12)))
    assert got["encoder.model.reg_token"][0] == got["encoder.model.cls_token"][0] == 0.5**13
    assert got["encoder.model.blocks.11.norm1.weight"][0] == 0.5


def test_layer_decay_refuses_other_encoders_and_stage_wise_vits():
    cfg = OptimizerConfig(layer_decay=LayerDecay(rate=0.9, num_layers=6))
    with pytest.raises(UserError, match=r"^optimizer\.layer_decay: the encoder is neither a ConvNeXt nor a ViT"):
        param_groups(segmentor({"name": "resnet18", "out_indices": [1, 2, 3, 4]}), cfg)
    cfg = OptimizerConfig(layer_decay=LayerDecay(rate=0.9, num_layers=12, decay_type="stage_wise"))
    with pytest.raises(UserError, match=r"^optimizer\.layer_decay\.decay_type: stage_wise .* decay_type: layer_wise$"):
        param_groups(segmentor({"name": "vit_tiny_patch16_224", "out_indices": [3]}), cfg)


# A tiny DINOv2 with registers (4 blocks, width 48) and its final norm, under a linear head: the
# shape of EoMT's encoder (timm's vit_*_patch14_reg4_dinov2) on hooktrain's names.
TINY_DINOV2 = [
    "model.encoder={name: vit_small_patch14_reg4_dinov2, pretrained: false, out_indices: [3], intermediate_norm: true, "
    "kwargs: {depth: 4, embed_dim: 48, num_heads: 2, img_size: 28}}",
    "model.decode_head={type: linear}",
]


def test_eomt_numbering_on_a_tiny_dinov2():
    """EoMT's configure_optimizers with llrd 0.8 over 4 blocks: block i gets 0.8 ** (3 - i), the
    embeddings (before the blocks) block 0's 0.8 ** 3, the final norm and the head the full lr;
    AdamW's weight decay on every parameter, biases and norms included."""
    decay = "optimizer.layer_decay={rate: 0.8, num_layers: 4, decay_type: eomt}"
    recipe = load_recipe(QUICKSTART, [*TINY_DINOV2, "optimizer.lr=1.0", "optimizer.weight_decay=0.05", decay])
    model = build_recipe_segmentor(recipe, on_meta=True)
    got = settings(model, recipe.optimizer)
    assert sorted(got) == sorted(name for name, _ in model.named_parameters())
    embeddings = ["cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    want = {f"encoder.model.{name}": 0.8**3 for name in embeddings}
    for name in got:
        if (match := re.match(r"encoder\.model\.blocks\.(\d)\.", name)) is not None:
            want[name] = 0.8 ** (3 - int(match[1]))
    want |= {name: 1.0 for name in got if name.startswith(("encoder.model.norm.", "decode_head."))}
    assert sorted(want) == sorted(got)
    assert {name: lr for name, (lr, _) in got.items()} == pytest.approx(want, rel=1e-15)
    assert {wd for _, wd in got.values()} == {0.05}
    assert len({lr for lr, _ in got.values()}) == 4  # 0.8 ** 0 is block 3's, the norm's and the head's


def test_eomt_numbering_refuses_convnexts_and_too_few_layers():
    cfg = OptimizerConfig(layer_decay=LayerDecay(rate=0.8, num_layers=6, decay_type="eomt"))
    with pytest.raises(UserError, match=r"^optimizer\.layer_decay\.decay_type: eomt numbers a ViT's blocks"):
        param_groups(segmentor({"name": "convnext_atto"}), cfg)
    recipe = load_recipe(QUICKSTART, TINY_DINOV2)
    model = build_recipe_segmentor(recipe, on_meta=True)
    cfg = OptimizerConfig(layer_decay=LayerDecay(rate=0.8, num_layers=3, decay_type="eomt"))
    with pytest.raises(UserError, match=r"^optimizer\.layer_decay\.num_layers: 3, and the ViT has block 3; "):
        param_groups(model, cfg)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("optimizer.layer_decay={rate: 1.5, num_layers: 6}", r"optimizer\.layer_decay\.rate"),
        ("optimizer.layer_decay={rate: 0.9}", r"optimizer\.layer_decay\.num_layers"),
        ("optimizer.layer_decay={rate: 0.9, num_layers: 6, decay_type: block}", r"optimizer\.layer_decay\.decay_type"),
    ],
)
def test_bad_layer_decay_values_are_one_line_errors(option, message):
    with pytest.raises(UserError, match=message) as err:
        load_recipe(RECIPES / "mmseg" / f"{CONVNEXT}.yaml", [option])
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_run_trains_with_layer_decay_and_refuses_it_before_writing(tmp_path, data_root):
    """The quickstart on ConvNeXt (atto) with stage-wise decay trains; on ResNet-18 it stops
    with one line and exit 2, with no work dir written."""
    convnext = [
        "model.encoder={name: convnext_atto, pretrained: false, out_indices: [0, 1, 2], out_norm: layer_norm}",
        "optimizer.layer_decay={rate: 0.9, num_layers: 6, decay_type: stage_wise}",
    ]
    result = run_cli(str(QUICKSTART), "--work-dir", str(tmp_path / "run"), "--cfg-options",
                     *tiny(data_root, 2), *convnext, "hooks=[{type: logger, interval: 1}]", env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter 2/2" in result.stdout
    result = run_cli(str(QUICKSTART), "--work-dir", str(tmp_path / "resnet"), "--cfg-options", *tiny(data_root, 2),
                     "model.encoder.pretrained=false", convnext[1], env=ENV)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            "hooktrain: error: optimizer.layer_decay: the encoder is neither a ConvNeXt nor a ViT, the backbones "
            "MMSegmentation's layer decay numbers; remove optimizer.layer_decay or choose such an encoder "
            "(convnext_*, vit_*)"
        )
    ]
    assert not (tmp_path / "resnet").exists()


@pytest.fixture(scope="module")
def mmseg_groups(mmseg_env, tmp_path_factory) -> Path:
    """MMSegmentation's own constructor's groups for the ConvNeXt-T and MAE-B configs."""
    out = tmp_path_factory.mktemp("mmseg_param_groups")
    script = Path(__file__).parents[1] / "mmseg_ref" / "optim_reference.py"
    mmseg_env.run(script, str(out), CONVNEXT, f"{CONVNEXT}:{LAYER_WISE}", MAE)
    return out


LAYER_WISE = "decay_type=layer_wise,num_layers=12,decay_rate=0.8"


@pytest.mark.slow
@pytest.mark.parametrize("paramwise", ["", LAYER_WISE])
def test_convnext_groups_equal_mmsegmentations(mmseg_zoo_references, mmseg_groups, paramwise):
    """mmseg's LearningRateDecayOptimizerConstructor on the config's model (its own stage_wise
    0.9 over 6 layers, and layer_wise 0.8 over 12) against the recipe's groups, parameter by
    parameter: mmseg's names are mapped by ``hooktrain convert mmseg``'s own renaming (from_mmseg,
    then fit_to_model), matched by tensor identity (the ConvNeXt renaming moves tensors without
    touching them)."""
    assert CONVNEXT in CONFIGS
    want = json.loads((mmseg_groups / f"{CONVNEXT}{':' if paramwise else ''}{paramwise}.json").read_text())
    options = ["optimizer.layer_decay={rate: 0.8, num_layers: 12, decay_type: layer_wise}"] if paramwise else []
    recipe = load_recipe(RECIPES / "mmseg" / f"{CONVNEXT}.yaml", options)
    model = build_recipe_segmentor(recipe, on_meta=True)
    state = torch.load(mmseg_zoo_references[CONVNEXT] / "checkpoint.pth", weights_only=True)["state_dict"]
    converted = fit_to_model(from_mmseg(state), model, "checkpoint.pth")
    hooktrain_name = {id(tensor): name for name, tensor in converted.items()}
    renamed = {hooktrain_name[id(state[name])]: groups for name, groups in want.items()}
    got = settings(model, recipe.optimizer)
    assert sorted(got) == sorted(renamed)
    assert {name: (lr, wd) for name, (lr, wd, _) in renamed.items()} == got
    # stage_wise: stem and downsamples, 4 stages, the rest; layer_wise: ids 0..5 (stage 2 in 3), 12, 13
    assert len({lr for lr, _ in got.values()}) == (8 if paramwise else 6)


# mmseg's MAE (a BEiT-style ViT with layer scales gamma_1/2) as timm's vit_base_patch16_224 with
# init_values (ls1/ls2.gamma).
_MAE_TO_TIMM = [
    (r"patch_embed\.projection\.", "patch_embed.proj."),
    (r"layers\.(\d+)\.ln(\d)\.", r"blocks.\1.norm\2."),
    (r"layers\.(\d+)\.attn\.", r"blocks.\1.attn."),
    (r"layers\.(\d+)\.gamma_(\d)$", r"blocks.\1.ls\2.gamma"),
    (r"layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
]


def _timm_name(mae_name: str) -> str:
    for pattern, replacement in _MAE_TO_TIMM:
        name, found = re.subn(f"^{pattern}", replacement, mae_name)
        if found:
            return name
    return mae_name


@pytest.mark.slow
def test_vit_groups_equal_mmsegmentations_mae(mmseg_groups):
    """mmseg's LayerDecayOptimizerConstructor (the MAE-B UPerNet config: 12 layers, rate 0.65) on
    its MAE backbone, against hooktrain's groups for timm's ViT-B/16 at 512 with layer scales.

    MAE (or BEiT) is what mmseg's constructor numbers; its VisionTransformer it refuses. MAE is a
    ViT with absolute position embeddings and a class token, so every timm ViT parameter has a
    counterpart, gamma_1/2 being timm's ls1/ls2. Only MAE's per-block relative position bias
    tables (zeros in MAE) have none in a timm ViT and are left out. The layer ids depend only on
    the prefixes (embeddings, block i, the rest) and the decay on shape and the .bias suffix, so
    the comparison holds for any timm ViT. mmseg's neck (Feature2Pyramid) is not hooktrain's;
    outside the backbone both sides must give the base lr."""
    want = json.loads((mmseg_groups / f"{MAE}.json").read_text())
    model = segmentor(
        {"name": "vit_base_patch16_224", "out_indices": [3, 5, 7, 11], "kwargs": {"img_size": 512, "init_values": 1.0}},
        neck={"type": "multilevel", "out_channels": 768, "scales": [4, 2, 1, 0.5]},
    )
    cfg = OptimizerConfig(lr=1e-4, weight_decay=0.05, layer_decay=LayerDecay(rate=0.65, num_layers=12))
    got = settings(model, cfg)
    backbone: dict[str, set] = {}
    for name, (lr, wd, _) in want.items():
        if name.endswith(".relative_position_bias_table"):
            continue
        if name.startswith("backbone."):
            backbone.setdefault("encoder.model." + _timm_name(name.removeprefix("backbone.")), set()).add((lr, wd))
        else:
            assert lr == 1e-4, name
    encoder = {name: value for name, value in got.items() if name.startswith("encoder.")}
    assert sorted(encoder) == sorted(backbone)
    assert {name: {value} for name, value in encoder.items()} == backbone
    assert all(lr == 1e-4 for name, (lr, _) in got.items() if not name.startswith("encoder."))
    assert len({lr for lr, _ in encoder.values()}) == 13
