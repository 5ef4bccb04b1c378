"""ViT encoders (DINOv2, DINOv3), MultiLevelNeck, DINOv2's linear head, frozen encoders and
gradient checkpointing, against timm's own forward passes; the ViT recipes train."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_refused, run_cli, tiny, train_on_ade20k_replica

from hooktrain.engine.optim import param_groups
from hooktrain.errors import UserError
from hooktrain.models.encoder import build_encoder
from hooktrain.models.segmentor import build_segmentor
from hooktrain.recipe.model import EncoderConfig, ModelConfig
from hooktrain.recipe.optim import OptimizerConfig

DINOV2 = "vit_small_patch14_reg4_dinov2"  # patch 14, 4 registers, learned position embeddings
DINOV3 = "vit_small_patch16_dinov3"  # patch 16, 4 registers, RoPE (timm's Eva)


def full_model_like(encoder, name: str) -> torch.nn.Module:
    """timm's whole model with the encoder's weights, padding its input to whole patches as the
    encoder does."""
    model = timm.create_model(name, dynamic_img_size=True, dynamic_img_pad=True).eval()
    weights = {k.removeprefix("model."): v for k, v in encoder.state_dict().items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("name", [DINOV2, DINOV3])
@pytest.mark.parametrize("size", [(97, 131), (64, 64)])
def test_the_last_level_is_timms_final_patch_tokens(name, size):
    """With ``intermediate_norm`` the last block's level is what timm's ``forward_features``
    returns for the patch tokens (after the final norm), laid out as a map, at any input size;
    ``class_token`` appends the class token over the whole map."""
    torch.manual_seed(0)
    cfg = EncoderConfig(name=name, out_indices=[5, 11], intermediate_norm=True, class_token=True)
    encoder = build_encoder(cfg).eval()
    model = full_model_like(encoder, name)
    image = torch.randn(1, 3, *size)
    patch = model.patch_embed.patch_size[0]
    grid = (-(-size[0] // patch), -(-size[1] // patch))  # padded to whole patches
    with torch.no_grad():
        levels = encoder(image)
        tokens = model.forward_features(image)
    width = model.embed_dim
    assert encoder.feature_info.channels() == [2 * width] * 2 and encoder.feature_info.reduction() == [patch] * 2
    assert [tuple(x.shape) for x in levels] == [(1, 2 * width, *grid)] * 2
    want = tokens[:, model.num_prefix_tokens :].transpose(1, 2).reshape(1, width, *grid)
    torch.testing.assert_close(levels[1][:, :width], want, rtol=1e-5, atol=1e-5)
    cls = levels[1][:, width:]
    torch.testing.assert_close(cls, tokens[:, 0, :, None, None].expand_as(cls), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(levels[0][:, :width], levels[1][:, :width])


HYBRID = "vit_tiny_r_s16_p8_224"  # a ResNet stem (stride 4) under the patch embedding (timm's HybridEmbed)
HYBRID_KWARGS = {"patch_size": 2, "embed_dim": 64, "depth": 2, "num_heads": 2, "reg_tokens": 4, "no_embed_class": True}


@pytest.mark.parametrize("size", [(97, 131), (64, 64), (90, 75)])
def test_a_hybrid_vits_levels_are_its_patch_tokens_on_the_stems_grid(size):
    """A hybrid ViT's stride is its stem's times its patch size (8 here, not the patch size 2), and
    its tokens are laid out on the grid the stem and the padded patches make at any input size."""
    torch.manual_seed(0)
    cfg = EncoderConfig(name=HYBRID, out_indices=[1], intermediate_norm=True, kwargs=HYBRID_KWARGS)
    encoder = build_encoder(cfg).eval()
    model = timm.create_model(HYBRID, dynamic_img_size=True, dynamic_img_pad=True, **HYBRID_KWARGS).eval()
    weights = {k.removeprefix("model."): v for k, v in encoder.state_dict().items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    image = torch.randn(1, 3, *size)
    grid = (-(-size[0] // 8), -(-size[1] // 8))
    with torch.no_grad():
        (level,) = encoder(image)
        tokens = model.forward_features(image)
    assert encoder.feature_info.reduction() == [8]
    assert level.shape == (1, 64, *grid)
    want = tokens[:, model.num_prefix_tokens :].transpose(1, 2).reshape(1, 64, *grid)
    torch.testing.assert_close(level, want, rtol=1e-5, atol=1e-5)


def test_blocks_after_the_last_returned_one_are_pruned():
    encoder = build_encoder(EncoderConfig(name=DINOV2, out_indices=[1, 3]))
    assert len(encoder.model.blocks) == 4
    assert isinstance(encoder.model.norm, torch.nn.Identity)  # no intermediate_norm: the final norm goes too
    assert [x.shape[1] for x in encoder(torch.randn(1, 3, 28, 42))] == [384, 384]


def test_a_vit_reads_four_bands_from_rgb_weights(tmp_path):
    """``in_channels`` 4 with an RGB checkpoint: the patch embedding is adapted (timm's
    adapt_input_conv), every other tensor loads as it is."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    rgb = timm.create_model(DINOV2)
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path / "rgb.safetensors"))
    cfg = EncoderConfig(name=DINOV2, out_indices=[11], pretrained_path=str(tmp_path / "rgb.safetensors"))
    encoder = build_encoder(cfg, in_channels=4)
    weight = encoder.model.patch_embed.proj.weight
    assert weight.shape[1] == 4
    torch.testing.assert_close(weight[:, :3], rgb.patch_embed.proj.weight * 3 / 4)
    torch.testing.assert_close(encoder.model.blocks[7].attn.qkv.weight, rgb.blocks[7].attn.qkv.weight)
    assert encoder(torch.randn(2, 4, 70, 56))[0].shape == (2, 384, 5, 4)


def test_the_linear_head_is_batchnorm_and_a_1x1_conv_over_the_resized_levels():
    torch.manual_seed(2)
    cfg = ModelConfig.model_validate(
        {
            "encoder": {"name": DINOV2, "out_indices": [8, 11], "intermediate_norm": True},
            "decode_head": {"type": "linear"},
        }
    )
    model = build_segmentor(cfg, num_classes=7).eval()
    head = model.decode_head
    head.bn.running_mean.normal_()
    head.bn.running_var.uniform_(0.5, 2)
    levels = [torch.randn(2, 384, 5, 6), torch.randn(2, 384, 3, 4)]
    joined = torch.cat([levels[0], F.interpolate(levels[1], size=(5, 6), mode="bilinear", align_corners=False)], 1)
    bn = head.bn
    want = (joined - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    want = want * bn.weight[:, None, None] + bn.bias[:, None, None]
    want = F.conv2d(want, head.conv_seg.weight, head.conv_seg.bias)
    with torch.no_grad():
        torch.testing.assert_close(head(levels), want, rtol=1e-5, atol=1e-5)
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 7, 97, 131)
    assert sorted(k for k in model.state_dict() if k.startswith("decode_head.")) == [
        "decode_head.bn.bias", "decode_head.bn.num_batches_tracked", "decode_head.bn.running_mean",
        "decode_head.bn.running_var", "decode_head.bn.weight", "decode_head.conv_seg.bias",
        "decode_head.conv_seg.weight",
    ]  # fmt: skip  (DINOv2's BNHead's names)


def test_the_multilevel_neck_turns_one_stride_into_a_pyramid():
    cfg = ModelConfig.model_validate(
        {
            "encoder": {"name": DINOV3, "out_indices": [11]},
            "neck": {"type": "multilevel", "out_channels": 32, "scales": [4, 2, 1, 0.5]},
            "decode_head": {"type": "upernet", "channels": 16},
        }
    )
    model = build_segmentor(cfg, num_classes=3).eval()
    with torch.no_grad():
        levels = model.features(torch.randn(1, 3, 64, 96))
    assert [tuple(x.shape[1:]) for x in levels] == [(32, 16, 24), (32, 8, 12), (32, 4, 6), (32, 2, 3)]
    assert len(model.neck.lateral_convs) == 1 and len(model.neck.convs) == 4  # one level feeds all four


def test_a_frozen_encoder_gets_no_gradients_and_no_optimizer_group():
    torch.manual_seed(3)
    cfg = ModelConfig.model_validate(
        {"encoder": {"name": DINOV2, "out_indices": [11], "frozen": True}, "decode_head": {"type": "linear"}}
    )
    model = build_segmentor(cfg, num_classes=4)
    in_groups = {id(p) for group in param_groups(model, OptimizerConfig()) for p in group["params"]}
    assert not any(id(p) in in_groups for p in model.encoder.parameters())
    assert all(id(p) in in_groups for p in model.decode_head.parameters())
    loss = sum(model(torch.randn(2, 3, 56, 56), torch.randint(0, 4, (2, 56, 56))).values())
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decode_head.conv_seg.weight.grad is not None


@pytest.mark.parametrize("name", [DINOV2, "convnext_atto"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(4)
        encoder = {"name": name, "grad_checkpointing": checkpointing}
        if name == DINOV2:
            encoder["out_indices"] = [3, 11]
        head = {"type": "fpn", "channels": 16, "fpn_channels": 16, "dropout": 0}
        cfg = ModelConfig.model_validate({"encoder": encoder, "decode_head": head})
        model = build_segmentor(cfg, num_classes=3)
        block = model.encoder.model.blocks[2] if name == DINOV2 else model.encoder.stages_1.blocks[0]
        calls = []
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # (a recompute may stop early)
        torch.manual_seed(5)
        loss = sum(model(torch.randn(2, 3, 56, 56), torch.randint(0, 3, (2, 56, 56))).values())
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        (
            {"encoder": {"name": "resnet18", "class_token": True}},
            "model.encoder.class_token applies to ViT encoders only",
        ),
        ({"encoder": {"name": DINOV3, "pos_embed_resize": "mmseg"}}, "pos_embed_resize 'mmseg' needs a ViT"),
        (
            {"encoder": {"name": "resnet18"}, "neck": {"type": "multilevel", "scales": [2, 1]}},
            "model.neck.scales: 2 scales for the encoder's 4 levels",
        ),
    ],
)
def test_misconfigured_vits_are_refused_in_one_line(model, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        build_segmentor(ModelConfig.model_validate(model), num_classes=3)


def test_a_misconfigured_vit_recipe_exits_2(tmp_path):
    result = run_cli("recipes/quickstart.yaml", "--work-dir", str(tmp_path / "run"), "--cfg-options",
                     "model.encoder.intermediate_norm=true")  # fmt: skip
    assert_refused(result, "model.encoder.intermediate_norm applies to ViT encoders only", "resnet18")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        "recipes/ade20k_dinov2_linear.yaml",
        "recipes/ade20k_dinov2_upernet.yaml",
    ],
)
def test_the_vit_ade20k_recipes_train(recipe, tmp_path):
    """Each recipe's own model (ViT-S/14 linear probe, ViT-B/14 + MLN + UPerNet) trains two
    iterations and evaluates on the ADE20K replica served by the local Hub stand-in. (MMSegmentation's
    ViT-B/16 + MLN + UPerNet recipe is the same code path; tests/models/test_mmseg_parity.py
    builds it from its recipe and checks its logits.)"""
    train_on_ade20k_replica(recipe, tmp_path, "model.inference.mode=whole")


@pytest.mark.slow
def test_the_remote_sensing_recipe_trains_on_four_bands(tmp_path):
    """The DINOv3 satellite recipe's model, with the small DINOv3 in place of ViT-L (same family,
    same code path; ViT-L's 300M parameters are a GPU's job), on generated 4-band shapes."""
    options = tiny(tmp_path / "shapes_4band", 2, "model.encoder.name=vit_small_patch16_dinov3",
                   "model.encoder.out_indices=[2,5,8,11]", "model.encoder.pretrained=false",
                   "model.neck.out_channels=64", "model.decode_head.channels=32",
                   "train.mixed_precision=no")  # fmt: skip
    result = run_cli("recipes/remote_sensing_dinov3_sat.yaml", "--work-dir", str(tmp_path / "run"),
                     "--cfg-options", *options)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "iter_2" / "model.safetensors").is_file()
