"""The U-Net decoder against segmentation_models_pytorch's own ``Unet`` (a test dependency):
smp's random weights converted by ``from_smp`` give the same logits, on a ResNet (levels from
stride 2) and a ConvNeXt (from stride 4, where smp stands in a level of no channels)."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import assert_refused, randomise, run_cli, tiny

from hooktrain.deploy.export import load_exported
from hooktrain.errors import UserError
from hooktrain.models.segmentor import build_segmentor
from hooktrain.models.segmentor_keys import from_smp
from hooktrain.recipe.model import ModelConfig

pytestmark = pytest.mark.spread  # independent tests: pytest-xdist may share them out

NUM_CLASSES = 5
# smp's encoders: out_indices 0..4 (strides 2..32), or 0..3 for those that start at stride 4
OUT_INDICES = {"resnet18": [0, 1, 2, 3, 4], "convnext_atto": [0, 1, 2, 3]}


def unet(encoder: str, **head) -> ModelConfig:
    return ModelConfig.model_validate({
        "encoder": {"name": encoder, "out_indices": OUT_INDICES[encoder]},
        "decode_head": {"type": "unet", **head},
    })  # fmt: skip


def max_relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def assert_same_logits(reference: torch.nn.Module, cfg: ModelConfig, sizes=((64, 64), (96, 160))) -> None:
    """``reference`` (an smp model, given weights and BN statistics of order 1) converted by
    ``from_smp`` into the segmentor ``cfg`` describes gives its logits at each of ``sizes``."""
    randomise(reference)
    ours = build_segmentor(cfg, num_classes=NUM_CLASSES).eval()
    ours.load_state_dict(from_smp(reference.state_dict()), strict=True)
    for size in sizes:
        image = torch.randn(2, 3, *size)
        with torch.no_grad():
            theirs, mine = reference(image), ours(image)
        assert mine.shape == theirs.shape == (2, NUM_CLASSES, *size)
        assert max_relative_error(mine, theirs) <= 1e-4, size


@pytest.mark.parametrize("encoder", ["resnet18", "convnext_atto"])
@pytest.mark.parametrize("attention", [None, "scse"])
def test_smp_unet_converts_to_the_same_logits(encoder, attention):
    torch.manual_seed(0)
    reference = smp.Unet(f"tu-{encoder}", encoder_weights=None, classes=NUM_CLASSES,
                         decoder_attention_type=attention)  # fmt: skip
    assert_same_logits(reference, unet(encoder, attention=attention))


def test_smps_own_resnet_encoder_converts_to_timms():
    """smp's default encoder, ``resnet34`` (torchvision's ResNet), has timm's ResNet names."""
    torch.manual_seed(4)
    assert_same_logits(smp.Unet("resnet18", encoder_weights=None, classes=NUM_CLASSES), unet("resnet18"))


def test_other_widths_and_bilinear_upsampling_match_smp():
    torch.manual_seed(1)
    widths = [64, 48, 32, 16, 8]
    reference = smp.Unet("tu-resnet18", encoder_weights=None, classes=NUM_CLASSES, decoder_channels=widths,
                         decoder_interpolation="bilinear")  # fmt: skip
    assert_same_logits(reference, unet("resnet18", decoder_channels=widths, interpolation="bilinear"))


def test_the_center_block_matches_smps_decoder():
    """smp's ``Unet`` adds the center block for VGG encoders only; its decoder takes it for any."""
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

    torch.manual_seed(2)
    ours = build_segmentor(unet("resnet18", center=True), num_classes=NUM_CLASSES).eval()
    channels = list(ours.encoder.feature_info.channels())
    decoder = UnetDecoder([3, *channels], (256, 128, 64, 32, 16), add_center_block=True)
    randomise(decoder)
    state = from_smp({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(not k.startswith("decode_head.") or "conv_seg" in k for k in missing)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = ours.encoder(image)
        expected, got = decoder([image, *features]), ours.decode_head.fuse(features)
    assert max_relative_error(got, expected) <= 1e-4


def test_any_input_size_gives_logits_at_that_size():
    """smp refuses sizes not divisible by 32; hooktrain's blocks upsample to each skip's size."""
    model = build_segmentor(unet("resnet18", decoder_channels=[32, 16, 16, 8, 8]), num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 101)).shape == (1, 3, 75, 101)


def test_levels_that_skip_a_stride_are_refused():
    cfg = ModelConfig.model_validate({"encoder": {"name": "resnet18", "out_indices": [1, 3, 4]},
                                      "decode_head": {"type": "unet"}})  # fmt: skip
    with pytest.raises(UserError, match="model.decode_head: U-Net needs encoder levels that each halve"):
        build_segmentor(cfg, num_classes=3)


@pytest.mark.slow
def test_hooktrain_convert_smp_brings_a_checkpoint_with_its_logits(tmp_path):
    """``hooktrain convert smp`` on ``torch.save(model.state_dict())`` and on a Lightning
    checkpoint of the same model, through recipes/smp/unet-tu-resnet34.yaml."""
    torch.manual_seed(3)
    reference = smp.Unet("tu-resnet34", encoder_weights=None, classes=4)
    randomise(reference)
    torch.save(reference.state_dict(), tmp_path / "unet.pth")
    lightning = {"state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3}
    torch.save(lightning, tmp_path / "unet.ckpt")
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = reference(image)
    for source in ("unet.pth", "unet.ckpt"):
        out = tmp_path / f"{source}.safetensors"
        result = run_cli("convert", "smp", str(tmp_path / source), "--recipe", "recipes/smp/unet-tu-resnet34.yaml",
                         "--out", str(out), "--cfg-options", "data.num_classes=4")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        model, _ = load_exported(out)
        with torch.no_grad():
            assert max_relative_error(model(image), expected) <= 1e-4, source


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    reference = smp.Unet("tu-resnet34", encoder_weights=None, classes=4)
    torch.save(reference.state_dict(), tmp_path / "unet.pth")
    result = run_cli("convert", "smp", str(tmp_path / "unet.pth"), "--recipe", "recipes/smp/unet-tu-resnet34.yaml",
                     "--out", str(tmp_path / "out.safetensors"))  # the recipe's 5 classes, not 4  # fmt: skip
    line = assert_refused(result, "does not fit the recipe's model")
    assert "decode_head.conv_seg.weight" in line and not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["recipes/smp/unet-tu-resnet34.yaml", "recipes/smp/unet-tu-convnext_tiny.yaml"])
def test_the_smp_recipes_train(recipe, data_root, tmp_path):
    result = run_cli(recipe, "--work-dir", str(tmp_path / "run"), "--cfg-options", *tiny(data_root, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "iter_2" / "model.safetensors").is_file()


def test_a_unet_exports_to_onnx_for_any_image_size(tmp_path):
    """Each block's size comes from its skip, so the traced graph keeps dynamic sizes:
    onnxruntime agrees with PyTorch at sizes other than the traced one (export verifies)."""
    from hooktrain.deploy.onnx_export import export_onnx

    model = build_segmentor(unet("resnet18", attention="scse"), num_classes=3).eval()
    said = []
    export_onnx(model, 3, {}, tmp_path / "unet.onnx", report=said.append)
    assert (tmp_path / "unet.onnx").is_file() and "verified by onnxruntime" in said[0]
