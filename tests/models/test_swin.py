"""timm's Swin as hooktrain's encoder: any input size, NCHW levels, and window attention that
pads before it shifts (MMSegmentation's order; parity with its Swin is in test_mmseg_parity.py)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import RECIPES, train_on_ade20k_replica
from timm.models.swin_transformer import SwinTransformerBlock

from hooktrain.models.backbone_keys import to_timm
from hooktrain.models.encoder import build_encoder
from hooktrain.models.segmentor import build_segmentor
from hooktrain.models.swin import _pad_then_shift_attention
from hooktrain.recipe.model import EncoderConfig
from hooktrain.recipe.schema import load_recipe

SWIN_RECIPE = RECIPES / "mmseg" / "swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.yaml"


def test_swin_encoder_takes_any_input_size_and_returns_nchw_levels():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="swin_tiny_patch4_window7_224")).eval()
    assert encoder.feature_info.reduction() == [4, 8, 16, 32]
    assert encoder.feature_info.channels() == [96, 192, 384, 768]
    with torch.no_grad():
        levels = encoder(torch.randn(1, 3, 97, 131))
    # 'corner' padding to whole patches and PatchMerging's padding to even sizes: ceil at every stage
    shapes = [(1, 96, 25, 33), (1, 192, 13, 17), (1, 384, 7, 9), (1, 768, 4, 5)]
    assert [tuple(level.shape) for level in levels] == shapes


def _block() -> SwinTransformerBlock:
    torch.manual_seed(0)
    return SwinTransformerBlock(
        dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3, always_partition=True,
        dynamic_mask=True,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("attention", ["hooktrain", "timm"])
def test_shifted_windows_do_not_attend_across_the_wrap_around(attention):
    """With a 12-row map (not whole 7-row windows) and shift 3, the last image row and the first
    are neighbours only through the cyclic shift; the shift mask must keep them apart. timm 1.0.31
    shifts before padding to whole windows, so its mask misses that seam (timm issue #2438):
    when the timm case fails, timm pads first now and hooktrain/models/swin.py's override can go."""
    block = _block()
    forward = (lambda x: _pad_then_shift_attention(block, x)) if attention == "hooktrain" else block._attn
    x = torch.randn(1, 12, 12, 8)
    moved = x.clone()
    moved[:, -1] += 5.0  # the last image row
    with torch.no_grad():
        first_row_change = (forward(moved)[:, 0] - forward(x)[:, 0]).abs().max().item()
    if attention == "hooktrain":
        assert first_row_change <= 1e-6  # masked (-100) logits: nothing, up to the CPU's attention kernel
    else:
        assert first_row_change > 1e-3


def test_padding_order_only_matters_off_whole_windows():
    """On maps of whole windows, hooktrain's attention is timm's exactly."""
    block = _block()
    x = torch.randn(2, 14, 21, 8)
    with torch.no_grad():
        torch.testing.assert_close(_pad_then_shift_attention(block, x), block._attn(x), rtol=0, atol=0)


def test_shift_masks_are_built_once_per_size_and_are_timms():
    """The blocks of one model share their shifted-window masks across blocks and forwards: one
    per padded map size (4 for Swin-T at one input size), each exactly timm's get_attn_mask."""
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="swin_tiny_patch4_window7_224")).eval()
    blocks = [m for m in encoder.modules() if isinstance(m, SwinTransformerBlock)]
    masks = blocks[0].shift_masks
    assert all(block.shift_masks is masks for block in blocks)
    image = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        first = encoder(image)
        assert len(masks._masks) == 4  # stages 1-4, each with its own padded size
        again = encoder(image)
    assert len(masks._masks) == 4
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (height, width, *_), mask in masks._masks.items():
        torch.testing.assert_close(mask, blocks[1].get_attn_mask(torch.zeros(1, height, width, 1)), rtol=0, atol=0)


@pytest.fixture(scope="session")
def swin_pretrain_files(mmseg_env, tmp_path_factory) -> Path:
    """Microsoft's layout and MMSegmentation's swin2mmseg conversion of one random Swin-T, and
    the features of MMSegmentation's Swin after loading the latter (tests/mmseg_ref)."""
    out = tmp_path_factory.mktemp("swin_pretrain")
    mmseg_env.run(Path(__file__).parents[1] / "mmseg_ref" / "swin_pretrain_reference.py", str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("file", ["swin_tiny_patch4_window7_224.pth", "swin_tiny_mmseg_pretrain.pth"])
def test_swin_pretrain_files_load_as_mmsegmentation_loads_them(swin_pretrain_files, file):
    """Microsoft's ImageNet file (timm's own checkpoint filter) and MMSegmentation's converted one
    (its config's ``init_cfg``) as model.encoder.pretrained_path of the Swin recipe give the
    features of MMSegmentation's Swin loaded with the converted file: PatchMerging's channel order
    undone, out_norms fresh as its norm0..3."""
    reference = torch.load(swin_pretrain_files / "reference.pth")
    recipe = load_recipe(SWIN_RECIPE, [f"model.encoder.pretrained_path={swin_pretrain_files / file}"])
    model = build_segmentor(recipe.model, num_classes=150).eval()
    with torch.no_grad():
        got = model.features(reference["input"])
    for level, (g, w) in enumerate(zip(got, reference["features"], strict=True)):
        assert g.shape == w.shape, level
        assert ((g - w).abs().max() / w.abs().max()).item() <= 1e-4, level


def test_swin_encoder_recomputes_its_blocks_with_grad_checkpointing():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(name="swin_tiny_patch4_window7_224", grad_checkpointing=True))
    assert all(stage.grad_checkpointing for stage in encoder.model.layers)
    sum(level.mean() for level in encoder(torch.randn(1, 3, 64, 64))).backward()
    assert encoder.model.patch_embed.proj.weight.grad is not None


def test_mmseg_swin_keys_become_timms():
    state = {
        "stages.0.blocks.0.attn.w_msa.qkv.weight": torch.zeros(288, 96),
        "stages.0.blocks.0.attn.w_msa.relative_position_index": torch.zeros(49, 49),  # timm derives its own
        "stages.0.blocks.1.attn_mask": torch.zeros(64, 49, 49),  # in swin2mmseg pretrain files
        "stages.0.downsample.reduction.weight": torch.arange(8.0).reshape(1, 8),  # 2 channels x 2x2 offsets
        "norm0.weight": torch.ones(96),
    }
    out = to_timm(state)
    assert sorted(out) == [
        "layers.0.blocks.0.attn.qkv.weight", "layers.1.downsample.reduction.weight", "out_norms.0.weight"
    ]  # fmt: skip
    # nn.Unfold's channel c, offset (row, col) is column 4c + 2row + col; timm's is 2(2col + row) + c
    assert out["layers.1.downsample.reduction.weight"].tolist() == [[0, 4, 2, 6, 1, 5, 3, 7]]
    with pytest.raises(KeyError, match="stages.0.blocks.0.attn.bogus"):
        to_timm({**state, "stages.0.blocks.0.attn.bogus": torch.zeros(1)})


@pytest.mark.slow
def test_the_swin_recipe_trains(tmp_path):
    """The Swin-T UPerNet recipe's own model trains two iterations and evaluates on the ADE20K
    replica served by the local Hub stand-in (32x32 crops: stage maps 8x8 .. 1x1, all padded)."""
    train_on_ade20k_replica(SWIN_RECIPE, tmp_path)

def test_drop_path_rate_zero_reaches_timm_whose_swin_default_is_not_zero():
    """``model.encoder.drop_path_rate: 0`` turns stochastic depth off; null keeps timm's default
    (0.1 for Swin), which would make two training forwards of the same batch differ."""

    def rates(drop_path_rate):
        encoder = build_encoder(EncoderConfig(name="swin_tiny_patch4_window7_224", drop_path_rate=drop_path_rate))
        return [getattr(m, "drop_prob", 0.0) for m in encoder.modules() if type(m).__name__ == "DropPath"]

    assert rates(0.0) == [] or max(rates(0.0)) == 0.0
    assert max(rates(None)) == pytest.approx(0.1)
