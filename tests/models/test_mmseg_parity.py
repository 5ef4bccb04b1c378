"""hooktrain's zoo models against MMSegmentation 1.2.2's own modules.

Each of the six ``recipes/mmseg`` configs is built by MMSegmentation itself (in the throwaway
environment of ``tests/mmseg_ref``), with random weights and BN statistics, and saved as a zoo
checkpoint. ``hooktrain convert mmseg`` turns that into hooktrain's model, whose logits must
match MMSegmentation's ``encode_decode`` on odd input sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import RECIPES
from mmseg_ref.fixtures import CONFIGS, DEEPLABV3, DEEPLABV3_HEAD, SIZES

from hooktrain.deploy.convert import convert
from hooktrain.deploy.export import load_exported
from hooktrain.errors import UserError
from hooktrain.models.encoder import build_encoder
from hooktrain.models.segmentor import build_segmentor
from hooktrain.recipe.model import EncoderConfig
from hooktrain.recipe.schema import load_recipe

TOLERANCE = 1e-4


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CONFIGS, DEEPLABV3])
def test_converted_zoo_model_computes_mmsegmentations_function(mmseg_zoo_references, name, tmp_path):
    reference = mmseg_zoo_references[name]
    recipe, options = (CONFIGS[3], [DEEPLABV3_HEAD]) if name == DEEPLABV3 else (name, [])
    out = convert("mmseg", str(reference / "checkpoint.pth"), str(RECIPES / "mmseg" / f"{recipe}.yaml"),
                  tmp_path / "model.safetensors", options)  # fmt: skip
    model, recipe = load_exported(out)
    info = json.loads((reference / "info.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == info["num_params"]
    cases = torch.load(reference / "logits.pt")
    assert sorted(cases) == sorted(SIZES.split(","))
    for size, case in cases.items():
        with torch.no_grad():
            got = model(case["input"])  # logits at the input size, as encode_decode's
        assert got.shape == case["logits"].shape, size
        assert relative_error(got, case["logits"]) <= TOLERANCE, size


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "encoder"),
    [
        (CONFIGS[0], {"name": "mit_b0"}),
        (CONFIGS[1], {"name": "resnet50c", "out_indices": [1, 2, 3, 4]}),
        (CONFIGS[3], {"name": "resnet50c", "out_indices": [1, 2, 3, 4], "kwargs": {"output_stride": 8}}),
        (
            "vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512",
            {"name": "vit_base_patch16_224", "out_indices": [2, 5, 8, 11], "kwargs": {"img_size": 512},
             "pos_embed_resize": "mmseg", "patch_bias": False},
        ),  # fmt: skip
    ],
)
def test_mmseg_backbone_checkpoints_load_as_pretrained_path(mmseg_zoo_references, name, encoder):
    """A backbone file in MMSegmentation's format (as its pretrain mit_bX / resnet50_v1c files)
    loads into the timm encoder, whose features are the MMSegmentation backbone's."""
    reference = mmseg_zoo_references[name]
    model = build_encoder(EncoderConfig(**encoder, pretrained_path=str(reference / "backbone.pth"))).eval()
    want = torch.load(reference / "backbone_features.pt")
    image = torch.load(reference / "logits.pt")["97x131"]["input"]
    with torch.no_grad():
        got = model(image)
    assert len(got) == len(want) == 4
    for level, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, level
        assert relative_error(g, w) <= TOLERANCE, level


@pytest.mark.slow
def test_a_checkpoint_into_another_architecture_names_the_offenders(mmseg_zoo_references, tmp_path):
    upernet = mmseg_zoo_references[CONFIGS[1]] / "checkpoint.pth"
    out = tmp_path / "x.safetensors"
    # PSPNet's head is UPerNet's PPM + bottleneck, so those fill; UPerNet's FPN part is left over.
    with pytest.raises(
        UserError, match=r"does not fit the recipe's model: .*source tensors unused \(decode_head\.fpn_"
    ):
        convert("mmseg", str(upernet), str(RECIPES / "mmseg" / f"{CONFIGS[3]}.yaml"), out)
    assert not out.exists()


@pytest.mark.slow
def test_every_source_key_must_be_used(mmseg_zoo_references, tmp_path):
    """Leaving the aux head out of the recipe would drop the checkpoint's auxiliary_head: refused."""
    upernet = mmseg_zoo_references[CONFIGS[1]] / "checkpoint.pth"
    recipe = str(RECIPES / "mmseg" / f"{CONFIGS[1]}.yaml")
    with pytest.raises(UserError, match=r"source tensors unused \(aux_head\.conv_seg\.bias"):
        convert("mmseg", str(upernet), recipe, tmp_path / "x.safetensors", ["model.aux_head=null"])
    checkpoint = torch.load(upernet, weights_only=True)
    checkpoint["state_dict"]["extra_head.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"1 keys hooktrain has no counterpart for \(extra_head\.weight\)"):
        convert("mmseg", str(tmp_path / "extra.pth"), recipe, tmp_path / "x.safetensors")


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"convert mmseg: could not read .*model\.pth"):
        convert("mmseg", str(bad), str(RECIPES / "mmseg" / f"{CONFIGS[0]}.yaml"), tmp_path / "x.safetensors")


@pytest.fixture(scope="session")
def backbone_references(mmseg_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mmseg_backbones")
    mmseg_env.run(Path(__file__).parents[1] / "mmseg_ref" / "backbone_reference.py", str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "encoder"),
    [
        ("mit_b1", {"name": "mit_b1"}),
        ("mit_b2", {"name": "mit_b2"}),
        ("resnet101_v1c", {"name": "resnet101c", "out_indices": [1, 2, 3, 4]}),
        ("resnet101_v1c_d8", {"name": "resnet101c", "out_indices": [1, 2, 3, 4], "kwargs": {"output_stride": 8}}),
    ],
)
def test_larger_backbones_match_mmsegmentation(backbone_references, name, encoder):
    """MiT-B1/B2 (B3..B5 differ from B2 only in depth) and ResNetV1c-101, plain and D8."""
    reference = torch.load(backbone_references / f"{name}.pth", weights_only=True)
    model = build_encoder(EncoderConfig(**encoder, pretrained_path=str(backbone_references / f"{name}.pth"))).eval()
    assert sum(p.numel() for p in model.parameters()) == reference["params"]
    with torch.no_grad():
        got = model(reference["input"])
    for level, (g, w) in enumerate(zip(got, reference["features"], strict=True)):
        assert g.shape == w.shape, level
        assert relative_error(g, w) <= TOLERANCE, level


SWIN = "swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512"


def recipe_features(config: str, image: torch.Tensor, options: list[str]) -> list[torch.Tensor]:
    """The levels the heads of recipes/mmseg/<config>.yaml read (encoder, out_norms, neck)."""
    recipe = load_recipe(RECIPES / "mmseg" / f"{config}.yaml", options)
    model = build_segmentor(recipe.model, num_classes=150).eval()
    with torch.no_grad():
        return model.features(image)


@pytest.mark.slow
def test_swin_backbone_file_loads_as_pretrained_path_with_its_level_norms(mmseg_zoo_references):
    """MMSegmentation's Swin backbone file (norm0..3 included) as model.encoder.pretrained_path:
    the encoder and hooktrain's out_norms give the backbone's features, at 97x131 (stage maps
    25x33 .. 4x5: padded to whole patches, to even sizes and to whole windows)."""
    reference = mmseg_zoo_references[SWIN]
    image = torch.load(reference / "logits.pt")["97x131"]["input"]
    got = recipe_features(SWIN, image, [f"model.encoder.pretrained_path={reference / 'backbone.pth'}"])
    want = torch.load(reference / "backbone_features.pt")
    assert len(got) == len(want) == 4
    for level, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, level
        assert relative_error(g, w) <= TOLERANCE, level


@pytest.mark.slow
def test_swin_level_norms_that_do_not_fit_out_indices_are_refused(mmseg_zoo_references):
    options = [f"model.encoder.pretrained_path={mmseg_zoo_references[SWIN] / 'backbone.pth'}",
               "model.encoder.out_indices=[1, 2, 3]"]  # fmt: skip
    message = (
        r"model\.encoder\.pretrained_path: .*per-level norms of \[96, 192, 384, 768\] channels, "
        r"the model's out_norm levels \[192, 384, 768\]; set model\.encoder\.out_indices"
    )
    with pytest.raises(UserError, match=message):
        recipe_features(SWIN, torch.zeros(1, 3, 64, 64), options)


CONVNEXT = "convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512"


@pytest.mark.slow
def test_mmpretrain_convnext_backbone_file_loads_as_pretrained_path(mmseg_zoo_references, tmp_path):
    """mmpretrain's ConvNeXt backbone file as model.encoder.pretrained_path: with norm0..3, the
    encoder and out_norms give the backbone's features; with norm3 only (mmpretrain's ImageNet
    files) the last level's norm is loaded and the others keep their initialisation."""
    reference = mmseg_zoo_references[CONVNEXT]
    image = torch.load(reference / "logits.pt")["97x131"]["input"]
    got = recipe_features(CONVNEXT, image, [f"model.encoder.pretrained_path={reference / 'backbone.pth'}"])
    want = torch.load(reference / "backbone_features.pt")
    assert len(got) == len(want) == 4
    for level, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, level
        assert relative_error(g, w) <= TOLERANCE, level

    state = torch.load(reference / "backbone.pth", weights_only=True)["state_dict"]
    imagenet = {k: v for k, v in state.items() if not k.startswith(("norm0.", "norm1.", "norm2."))}
    torch.save({"state_dict": imagenet}, tmp_path / "convnext_in1k.pth")
    option = f"model.encoder.pretrained_path={tmp_path / 'convnext_in1k.pth'}"
    recipe = load_recipe(RECIPES / "mmseg" / f"{CONVNEXT}.yaml", [option])
    model = build_segmentor(recipe.model, num_classes=150)
    assert torch.equal(model.out_norms[3].weight, state["norm3.weight"])
    assert torch.equal(model.out_norms[0].weight, torch.ones(96))
