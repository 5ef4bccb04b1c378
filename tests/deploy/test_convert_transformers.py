"""``hooktrain convert transformers`` without ``--recipe``: the recipe derived from the checkpoint's config.json.

transformers' ``EomtForUniversalSegmentation`` (DINOv2 with registers, patch 14 and 16) and
``EomtDinov3ForUniversalSegmentation`` (two sizes), ``Mask2FormerForUniversalSegmentation`` (a tiny
Swin backbone) and ``SegformerForSemanticSegmentation`` are built with random weights from
transformers' own configs, saved with ``save_pretrained`` (EoMT and Mask2Former also served by the
local Hub stand-in under an id like the published checkpoints'), converted, loaded from the exported
file and compared with transformers' outputs: EoMT's and Mask2Former's class scores with the semantic
map of Mask2Former's inference, SegFormer's logits with transformers' logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run_cli
from eomt_reference import random_transformers_eomt, semantic_map
from hub_server import HubServer

from hooktrain.deploy.convert import convert
from hooktrain.deploy.export import load_exported
from hooktrain.deploy.segmenter import Segmenter
from hooktrain.errors import UserError

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
HUB_ID = "tue-mps/ade20k_semantic_eomt_tiny_64"
LABELS = {0: "wall", 1: "floor", 2: "sky", 3: "tree"}
EOMTS = {
    "dinov2-patch16": ("EomtConfig", dict(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, image_size=64, patch_size=16,
        num_queries=6, num_blocks=2, id2label=LABELS,
    )),
    "dinov2-patch14": ("EomtConfig", dict(
        hidden_size=64, num_hidden_layers=5, num_attention_heads=4, image_size=56, patch_size=14,
        num_queries=5, num_blocks=3, num_upscale_blocks=1, num_labels=3, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-5,
    )),
    "dinov2-swiglu": ("EomtConfig", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=28, patch_size=14,
        num_queries=4, num_blocks=2, num_labels=3, use_swiglu_ffn=True, hidden_act="silu",
    )),
    "dinov3-small": ("EomtDinov3Config", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=16,
        intermediate_size=128, num_queries=6, num_blocks=2, id2label=LABELS,  # eps 1e-6: model.encoder.norm_eps
    )),
    "dinov3-gated": ("EomtDinov3Config", dict(
        hidden_size=96, num_hidden_layers=5, num_attention_heads=6, image_size=48, patch_size=16,
        intermediate_size=100, use_gated_mlp=True, hidden_act="silu", num_queries=5, num_blocks=3, num_labels=3,
        num_register_tokens=2, layer_norm_eps=1e-5,
    )),
}  # fmt: skip
# EomtImageProcessor's normalisation, other than ImageNet's, to see it reach data.mean / data.std
PREPROCESSOR = {"image_processor_type": "EomtImageProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}  # fmt: skip


def make_eomt(case: str) -> torch.nn.Module:
    config_class, kwargs = EOMTS[case]
    return random_transformers_eomt(config_class, **kwargs).eval()


@pytest.fixture(scope="module")
def eomt_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every case saved with ``save_pretrained``; dinov2-patch16 with an image processor's config."""
    dirs = {}
    for case in EOMTS:
        dirs[case] = tmp_path_factory.mktemp(case)
        make_eomt(case).save_pretrained(dirs[case])
    (dirs["dinov2-patch16"] / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return dirs


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def eomt_error(exported: Path, directory: Path) -> float:
    """The exported model's class scores against transformers' semantic map of the same image."""
    model, _ = load_exported(exported)
    reference = make_eomt_from(directory)
    size = reference.config.image_size
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = semantic_map(reference(pixel_values=image), (size, size))
        got = model.logits(image)
    return relative_error(got, want)


def make_eomt_from(directory: Path) -> torch.nn.Module:
    config = json.loads((directory / "config.json").read_text())
    model_class = {"eomt": transformers.EomtForUniversalSegmentation,
                   "eomt_dinov3": transformers.EomtDinov3ForUniversalSegmentation}[config["model_type"]]  # fmt: skip
    return model_class.from_pretrained(directory).eval()


def test_cli_converts_an_eomt_hub_checkpoint_without_a_recipe(eomt_dirs, tmp_path):
    """Through the real CLI: a Hub id (through huggingface_hub, from the local stand-in) converts with no
    --recipe, its classes and normalisation from config.json and preprocessor_config.json."""
    out = tmp_path / "hub.safetensors"
    with HubServer() as hub:
        hub.add(HUB_ID, eomt_dirs["dinov2-patch16"], repo_type="model")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
        result = run_cli("convert", "transformers", HUB_ID, "--out", str(out), env=env)
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(path.endswith(f"{HUB_ID}/resolve/main/config.json") for path in fetched), fetched
    error = eomt_error(out, eomt_dirs["dinov2-patch16"])
    print(f"dinov2-patch16 from the Hub: EoMT class scores, max relative error {error:.2e}")
    assert error < TOLERANCE
    _, recipe = load_exported(out)
    assert recipe.data.class_names == list(LABELS.values())
    assert list(recipe.data.mean) == pytest.approx([127.5, 102.0, 76.5])
    assert list(recipe.data.std) == pytest.approx([51.0, 63.75, 76.5])
    assert recipe.model.inference.mode == "slide" and list(recipe.model.inference.crop_size) == [64, 64]
    labels = Segmenter.load(out, device="cpu")(np.zeros((50, 70, 3), dtype=np.uint8))  # what `predict` runs
    assert labels.shape == (50, 70) and labels.max() < len(LABELS)


def refused_by_cli(capsys, *args: str) -> str:
    """``hooktrain ARGS`` run in this process (the CLI's own entry point): exit 2 and one error line."""
    from hooktrain.cli import main

    capsys.readouterr()  # what ran before (transformers' progress bars)
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("hooktrain: error: "), lines
    return lines[0]


def test_a_recipe_that_disagrees_with_config_json_is_one_line(eomt_dirs, tmp_path, capsys):
    recipe = yaml.safe_load((ROOT / "recipes/quickstart_eomt.yaml").read_text())
    recipe["_base_"] = [str(ROOT / "recipes/_base_/datasets/shapes.yaml")]
    recipe["model"]["encoder"]["name"] = "vit_small_patch14_reg4_dinov2"
    recipe["model"]["encoder"]["kwargs"] = {"img_size": 64, "patch_size": 16, "embed_dim": 48, "depth": 4,
                                            "num_heads": 3}  # fmt: skip
    recipe["model"]["decode_head"].update(num_queries=6, num_blocks=2, num_upscale_blocks=2, mask_annealing=None)
    recipe["data"] = {"num_classes": 4, "class_names": None, "palette": None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    source, out = str(eomt_dirs["dinov2-patch16"]), tmp_path / "x.safetensors"
    convert("transformers", source, str(path), out)  # the recipe that fits converts
    assert eomt_error(out, eomt_dirs["dinov2-patch16"]) < TOLERANCE
    out.unlink()
    for option, fragments in {
        "model.decode_head.num_queries=8": ("on num_queries", "model.decode_head.num_queries gives 8", "checkpoint 6"),
        "data.num_classes=5": ("on num_labels", "data.num_classes gives 5", "checkpoint 4"),
        "model.encoder.kwargs.num_heads=4": ("on num_attention_heads", "gives 4", "checkpoint 3"),
        "model.encoder.name=vit_tiny_r_s16_p8_224": ("on model_type", "a ViT with a CNN stem (HybridEmbed)",
                                                     "checkpoint eomt (DINOv2's ViT)"),
    }.items():
        line = refused_by_cli(capsys, "convert", "transformers", source, "--recipe", str(path), "--out", str(out),
                              "--cfg-options", option)  # fmt: skip
        assert all(fragment in line for fragment in fragments), (fragments, line)
        assert not out.exists()


@pytest.mark.parametrize("case", ["dinov2-patch14", "dinov2-swiglu", "dinov3-small", "dinov3-gated"])
def test_other_eomt_sizes_convert_without_a_recipe(case, eomt_dirs, tmp_path):
    out = convert("transformers", str(eomt_dirs[case]), None, tmp_path / "eomt.safetensors")
    error = eomt_error(out, eomt_dirs[case])
    print(f"{case}: EoMT class scores, max relative error {error:.2e}")
    assert error < TOLERANCE
    _, recipe = load_exported(out)
    names = list(LABELS.values()) if "id2label" in EOMTS[case][1] else ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert recipe.data.class_names == names  # id2label, or transformers' default names


def test_segformer_converts_without_a_recipe(tmp_path):
    torch.manual_seed(0)
    config = transformers.SegformerConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 320, 512], num_labels=5)
    reference = transformers.SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    reference.save_pretrained(tmp_path / "segformer-b1")
    out = convert("transformers", str(tmp_path / "segformer-b1"), None, tmp_path / "segformer.safetensors")
    model, recipe = load_exported(out)
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = relative_error(model.decode_head(model.encoder(image)), reference(pixel_values=image).logits)
    print(f"SegFormer-B1 logits, max relative error {error:.2e}")
    assert error < TOLERANCE
    assert recipe.model.encoder.name == "mit_b1" and recipe.model.decode_head.channels == 256


def test_unconvertible_configs_are_one_line(eomt_dirs, tmp_path, capsys):
    """A model_type hooktrain does not convert: exit 2 naming it, nothing written; an EoMT a recipe
    cannot describe (SwiGLU with heads not on silu) names the config key."""
    other = tmp_path / "maskformer"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "maskformer", "num_labels": 3}))
    out = tmp_path / "x.safetensors"
    line = refused_by_cli(capsys, "convert", "transformers", str(other), "--out", str(out))
    assert "model_type 'maskformer'" in line and "mask2former" in line and not out.exists()
    convnext = tmp_path / "mask2former-convnext"  # a Mask2Former backbone hooktrain does not convert
    convnext.mkdir()
    (convnext / "config.json").write_text(json.dumps({"model_type": "mask2former", "num_labels": 3,
                                                      "backbone_config": {"model_type": "convnext"}}))  # fmt: skip
    line = refused_by_cli(capsys, "convert", "transformers", str(convnext), "--out", str(out))
    assert "backbone_config.model_type 'convnext'" in line and not out.exists()
    eps = tmp_path / "swiglu"
    eps.mkdir()
    config = json.loads((eomt_dirs["dinov2-swiglu"] / "config.json").read_text())
    (eps / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(UserError, match="hidden_act 'gelu' with use_swiglu_ffn"):  # the heads' activation
        convert("transformers", str(eps), None, out)
    assert not out.exists()


STAGES = ["stage1", "stage2", "stage3", "stage4"]


def test_upernet_converts_without_a_recipe(tmp_path):
    """A ConvNeXt-T UperNet (heads narrowed to keep the test quick) converts with its derived recipe
    and gives transformers' logits."""
    backbone = transformers.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], out_features=STAGES)
    config = transformers.UperNetConfig(backbone_config=backbone, hidden_size=64, auxiliary_channels=32, num_labels=4)
    torch.manual_seed(0)
    reference = transformers.UperNetForSemanticSegmentation(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.ndim == 1 and "norm" in name:  # transformers' norms start at 1 and 0
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    reference.save_pretrained(tmp_path / "upernet")
    out = convert("transformers", str(tmp_path / "upernet"), None, tmp_path / "upernet.safetensors")
    model, recipe = load_exported(out)
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        error = relative_error(model(image), reference(pixel_values=image).logits)
    print(f"UperNet ConvNeXt-T logits, max relative error {error:.2e}")
    assert error < TOLERANCE
    assert recipe.model.encoder.name == "convnext_tiny" and recipe.model.aux_head.channels == 32


@pytest.mark.parametrize("family, backbone, encoder", [
    ("swin", dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
     "swin_tiny_patch4_window7_224"),
    ("swin", dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
     "swin_base_patch4_window12_384"),
    ("convnext", dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536]), "convnext_large"),
])  # fmt: skip
def test_upernet_hub_sizes_derive_recipes_that_fit(family, backbone, encoder):
    """The Hub's other UperNet sizes: the derived recipe's model takes every tensor (meta device: shapes)."""
    from hooktrain.deploy.convert import fit_to_model
    from hooktrain.deploy.transformers_recipe import recipe_from_transformers
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.models.segmentor_keys import from_transformers
    from hooktrain.recipe.schema import validate_recipe

    config_class = transformers.SwinConfig if family == "swin" else transformers.ConvNextConfig
    config = transformers.UperNetConfig(backbone_config=config_class(**backbone, out_features=STAGES), num_labels=150)
    with torch.device("meta"):
        state = transformers.UperNetForSemanticSegmentation(config).state_dict()
    recipe = validate_recipe(recipe_from_transformers(json.loads(config.to_json_string()), None, f"upernet-{family}"))
    assert recipe.model.encoder.name == encoder
    model = build_recipe_segmentor(recipe, on_meta=True)
    assert fit_to_model(from_transformers(state), model, encoder).keys() == model.state_dict().keys()


# -- Mask2Former ---------------------------------------------------------------------------------

MASK2FORMER_HUB_ID = "facebook/mask2former-swin-micro-ade-semantic"  # served by the stand-in only
MASK2FORMER = dict(
    feature_size=32, hidden_dim=32, mask_feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64,
    encoder_layers=1, decoder_layers=4, num_attention_heads=4, num_queries=5, id2label=LABELS,
)  # fmt: skip
MICRO_SWIN = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7, out_features=STAGES)
# Mask2FormerImageProcessor's normalisation is ImageNet's; another one here, to see it reach data.mean / data.std
M2F_PREPROCESSOR = {"image_processor_type": "Mask2FormerImageProcessor", "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.4, 0.5, 0.6],
                    "image_std": [0.2, 0.25, 0.3], "ignore_index": 255, "do_reduce_labels": True}  # fmt: skip


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory) -> Path:
    """A micro random-weight transformers Mask2Former (Swin) saved with ``save_pretrained``, its
    norms, biases and deformable sampling randomised (transformers starts them at 1, 0 or 0) so that
    a mixed-up tensor shows, with a ``preprocessor_config.json``."""
    torch.manual_seed(0)
    config = transformers.Mask2FormerConfig(backbone_config=transformers.SwinConfig(**MICRO_SWIN), **MASK2FORMER)
    reference = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            elif param.ndim == 1 and "sampling_offsets" not in name:  # norms' scales and every bias
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    directory = tmp_path_factory.mktemp("mask2former")
    reference.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(M2F_PREPROCESSOR))
    return directory


def mask2former_errors(exported: Path, directory: Path) -> list[float]:
    """The exported model's class scores against transformers' semantic map, at two input sizes."""
    model, _ = load_exported(exported)
    reference = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(directory).eval()
    errors = []
    for size in [(64, 64), (96, 128)]:
        image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            errors.append(relative_error(model.logits(image), semantic_map(reference(pixel_values=image), size)))
    return errors


def test_cli_converts_a_mask2former_hub_checkpoint_without_a_recipe(mask2former_dir, tmp_path):
    """Through the real CLI, a Hub id from the local stand-in: the derived recipe (Swin encoder with
    its sizes and per-level norms, the head's widths, classes, normalisation, Mask2Former's
    whole-image evaluation at short side 512) gives transformers' semantic scores; ``Segmenter``
    (what ``predict`` runs) loads the file."""
    out = tmp_path / "hub.safetensors"
    with HubServer() as hub:
        hub.add(MASK2FORMER_HUB_ID, mask2former_dir, repo_type="model")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
        result = run_cli("convert", "transformers", MASK2FORMER_HUB_ID, "--out", str(out), env=env)
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(path.endswith(f"{MASK2FORMER_HUB_ID}/resolve/main/config.json") for path in fetched), fetched
    errors = mask2former_errors(out, mask2former_dir)
    print(f"Mask2Former from the Hub: class scores, max relative error {max(errors):.2e}")
    assert max(errors) < TOLERANCE
    _, recipe = load_exported(out)
    encoder, head = recipe.model.encoder, recipe.model.decode_head
    assert encoder.name == "swin_tiny_patch4_window7_224" and encoder.kwargs["depths"] == [1, 1, 2, 1]
    assert encoder.out_norm == "layer_norm" and head.type == "mask2former" and head.decoder_layers == 3
    assert recipe.data.class_names == list(LABELS.values())
    assert list(recipe.data.mean) == pytest.approx([102.0, 127.5, 153.0])
    assert list(recipe.data.std) == pytest.approx([51.0, 63.75, 76.5])
    assert recipe.model.inference.mode == "whole" and tuple(recipe.data.val.pipeline.scale) == (2048, 512)
    labels = Segmenter.load(out, device="cpu")(np.zeros((50, 70, 3), dtype=np.uint8))
    assert labels.shape == (50, 70) and labels.max() < len(LABELS)


def test_a_mask2former_directory_converts_and_a_disagreeing_recipe_is_one_line(mask2former_dir, tmp_path, capsys):
    """The CLI's entry point on a ``save_pretrained`` directory, no recipe: transformers' scores. The
    recipe written into the file converts it again; one that differs from config.json in the class
    count, the queries, the decoder's depth or the backbone's widths is one line (exit 2) naming the
    config key and both values, and nothing is written."""
    from hooktrain.cli import main
    from hooktrain.recipe.schema import dump_recipe

    out, source = tmp_path / "m2f.safetensors", str(mask2former_dir)
    with pytest.raises(SystemExit) as exited:
        main(["convert", "transformers", source, "--out", str(out)])
    assert exited.value.code == 0 and max(mask2former_errors(out, mask2former_dir)) < TOLERANCE
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(load_exported(out)[1]))
    out.unlink()
    convert("transformers", source, str(path), out)  # the recipe that fits converts
    assert max(mask2former_errors(out, mask2former_dir)) < TOLERANCE
    out.unlink()
    for options, fragments in {
        ("data.num_classes=5", "data.class_names=null"): ("on num_labels", "data.num_classes gives 5", "checkpoint 4"),
        ("model.decode_head.num_queries=8",): ("on num_queries", "gives 8", "checkpoint 5"),
        ("model.decode_head.decoder_layers=2",): ("on decoder_layers - 1", "decoder_layers gives 2", "checkpoint 3"),
        ("model.encoder.kwargs.embed_dim=64",): ("on backbone_config", "[64, 128, 256, 512]", "[32, 64, 128, 256]"),
    }.items():
        line = refused_by_cli(capsys, "convert", "transformers", source, "--recipe", str(path), "--out", str(out),
                              "--cfg-options", *options)  # fmt: skip
        assert all(fragment in line for fragment in fragments), (fragments, line)
        assert not out.exists()
