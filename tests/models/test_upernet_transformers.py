"""transformers' ``UperNetForSemanticSegmentation`` with ConvNext and Swin backbones (the format of
``openmmlab/upernet-convnext-*`` and ``openmmlab/upernet-swin-*``), converted by
``hooktrain convert transformers`` with the recipes under ``recipes/transformers/``.

Each reference is the tiny checkpoint's architecture exactly (the configs transformers' converting
scripts write), with random weights: every norm, BN statistic and ConvNeXt layer scale is
randomised, so a mixed-up key changes the logits. It is saved with ``save_pretrained`` and served
by the local Hub stand-in under its Hub id; the CLI downloads it through huggingface_hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_refused, run_cli, train_on_ade20k_replica
from hub_server import HubServer

from hooktrain.deploy.export import load_exported
from hooktrain.models.segmentor_keys import from_transformers

transformers = pytest.importorskip("transformers")

STAGES = ["stage1", "stage2", "stage3", "stage4"]
RECIPES = ROOT / "recipes" / "transformers"


def convnext_tiny_config():
    """transformers' convert_convnext_upernet_to_pytorch.py config for upernet-convnext-tiny."""
    backbone = transformers.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], out_features=STAGES)
    return transformers.UperNetConfig(backbone_config=backbone, auxiliary_in_channels=384, num_labels=150)


def swin_tiny_config():
    """transformers' convert_swin_upernet_to_pytorch.py config for upernet-swin-tiny."""
    backbone = transformers.SwinConfig(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, out_features=STAGES
    )
    return transformers.UperNetConfig(backbone_config=backbone, auxiliary_in_channels=384, num_labels=150)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def randomise(model: torch.nn.Module) -> None:
    """Non-trivial norms, BN statistics, layer scales and position biases (transformers initialises
    them to 1, 0 or 1e-6), so that no key can be mixed up without changing the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("norm" in name or "batch_norm" in name or "layer_scale" in name):
                if name.endswith("bias"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
                else:
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif "relative_position_bias_table" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)


def saved_reference(config, directory: Path):
    torch.manual_seed(0)
    model = transformers.UperNetForSemanticSegmentation(config)
    randomise(model)
    model.eval().save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("upernet-convnext-tiny")
    saved_reference(convnext_tiny_config(), directory)
    return directory


def convert_from_hub(repo: str, directory: Path, recipe: Path, tmp_path: Path):
    """``hooktrain convert transformers REPO`` against the local Hub stand-in serving ``directory``;
    returns the CLI's result, the output file and the files it fetched."""
    out = tmp_path / f"{repo.split('/')[-1]}.safetensors"
    with HubServer() as hub:
        hub.add(repo, directory, repo_type="model")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
        result = run_cli("convert", "transformers", repo, "--recipe", str(recipe), "--out", str(out), env=env)
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    return result, out, fetched


def assert_same_logits(model, reference, sizes) -> None:
    """The decode head's logits at the input size, at each of ``sizes``, and the auxiliary head's."""
    for size in sizes:
        image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            want = reference(pixel_values=image).logits  # upsampled to the input size, bilinear
            got = model(image)
        assert got.shape == want.shape == (1, 150, *size)
        assert relative_error(got, want) <= 1e-4, size
    with torch.no_grad():  # the auxiliary head, at its own resolution
        image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
        want = reference.auxiliary_head(reference.backbone(image).feature_maps)
        got = model.aux_head(model.features(image))
    assert relative_error(got, want) <= 1e-4


def test_convert_upernet_convnext_tiny_from_the_hub_gives_transformers_logits(convnext_dir, tmp_path):
    repo = "openmmlab/upernet-convnext-tiny"
    result, out, fetched = convert_from_hub(repo, convnext_dir, RECIPES / "upernet-convnext-tiny.yaml", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(path.endswith(f"{repo}/resolve/main/model.safetensors") for path in fetched), fetched
    model, recipe = load_exported(out)
    assert recipe.model.encoder.out_norm == "layer_norm" and recipe.data.num_classes == 150
    reference = transformers.UperNetForSemanticSegmentation.from_pretrained(convnext_dir).eval()
    assert_same_logits(model.eval(), reference, [(97, 131), (64, 64), (160, 96)])


@pytest.fixture(scope="module")
def swin_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("upernet-swin-tiny")
    saved_reference(swin_tiny_config(), directory)
    return directory


def test_convert_upernet_swin_tiny_from_the_hub_gives_transformers_logits(swin_dir, tmp_path):
    """Odd sizes included: the maps are then no whole number of windows (padded before the
    shift, as transformers' SwinLayer does), and the deepest ones are smaller than a window."""
    repo = "openmmlab/upernet-swin-tiny"
    result, out, fetched = convert_from_hub(repo, swin_dir, RECIPES / "upernet-swin-tiny.yaml", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(path.endswith(f"{repo}/resolve/main/model.safetensors") for path in fetched), fetched
    model, _ = load_exported(out)
    reference = transformers.UperNetForSemanticSegmentation.from_pretrained(swin_dir).eval()
    assert_same_logits(model.eval(), reference, [(97, 131), (33, 47), (160, 96)])


def test_swin_keys_of_every_transformers_layout_convert_alike(swin_dir):
    """The Hub files (and save_pretrained) name Swin's tensors as transformers 4 did, with the
    ``relative_position_index`` buffers transformers' converting script kept; transformers 5's
    ``model.state_dict()`` names them otherwise. All convert to the same tensors."""
    from safetensors.torch import load_file

    saved = load_file(str(swin_dir / "model.safetensors"))
    block = "backbone.encoder.layers.0.blocks.0.attention.self."
    assert f"{block}query.weight" in saved
    with_index = {**saved, f"{block}relative_position_index": torch.zeros(49, 49, dtype=torch.long)}
    in_memory = transformers.UperNetForSemanticSegmentation.from_pretrained(swin_dir).state_dict()
    assert "backbone.swin.encoder.layers.0.blocks.0.attention.q_proj.weight" in in_memory
    want = from_transformers(saved)
    for state in (with_index, in_memory):
        got = from_transformers(state)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert "encoder.layers.1.downsample.reduction.weight" in want  # stage 0's patch merging
    assert "out_norms.3.weight" in want and "aux_head.convs.0.bn.running_var" in want


# The other Hub sizes, as transformers' converting scripts configure them: backbone, auxiliary
# head input, and the timm encoder that takes them with the tiny recipe.
HUB_SIZES = {
    "convnext-small": ("convnext", dict(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768]), 384, "convnext_small"),
    "convnext-base": ("convnext", dict(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024]), 512, "convnext_base"),
    "convnext-large": ("convnext", dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536]), 768, "convnext_large"),
    "convnext-xlarge": ("convnext", dict(depths=[3, 3, 27, 3], hidden_sizes=[256, 512, 1024, 2048]), 1024,
                        "convnext_xlarge"),
    "swin-small": ("swin", dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7), 384,
                   "swin_small_patch4_window7_224"),
    "swin-base": ("swin", dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12), 512,
                  "swin_base_patch4_window12_384"),
    "swin-large": ("swin", dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12), 768,
                   "swin_large_patch4_window12_384"),
}  # fmt: skip


@pytest.mark.parametrize("size", HUB_SIZES)
def test_every_hub_size_fits_the_tiny_recipe_with_its_encoder(size):
    """``openmmlab/upernet-{size}`` converts with the tiny recipe and ``model.encoder.name`` set:
    every tensor lands in one of the same shape (on the meta device: shapes only)."""
    from hooktrain.deploy.convert import fit_to_model
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    family, backbone, aux_in, encoder = HUB_SIZES[size]
    config_class = transformers.ConvNextConfig if family == "convnext" else transformers.SwinConfig
    config = transformers.UperNetConfig(backbone_config=config_class(**backbone, out_features=STAGES),
                                        auxiliary_in_channels=aux_in, num_labels=150)  # fmt: skip
    with torch.device("meta"):
        state = transformers.UperNetForSemanticSegmentation(config).state_dict()
    recipe = load_recipe(RECIPES / f"upernet-{family}-tiny.yaml", [f"model.encoder.name={encoder}"])
    model = build_recipe_segmentor(recipe, on_meta=True)
    assert fit_to_model(from_transformers(state), model, size).keys() == model.state_dict().keys()


def test_convert_upernet_with_the_wrong_recipe_is_one_line(convnext_dir, tmp_path):
    """A ConvNeXt UperNet with the Swin recipe: exit 2, one line naming what does not fit."""
    out = tmp_path / "x.safetensors"
    result = run_cli("convert", "transformers", str(convnext_dir), "--recipe", str(RECIPES / "upernet-swin-tiny.yaml"),
                     "--out", str(out))  # fmt: skip
    assert_refused(result, "does not fit the recipe's model", "model tensors not filled", "attn.qkv.weight",
                   "source tensors unused", "encoder.stages.0.blocks.0.conv_dw.bias",
                   "pick the recipe of the checkpoint's architecture")  # fmt: skip
    assert not out.exists()


def test_convert_a_upernet_of_another_backbone_is_one_line(tmp_path):
    """transformers' UperNet on a ResNet (its default backbone) has no hooktrain counterpart: exit 2,
    one line naming its backbone keys and what does convert; nothing is written."""
    backbone = transformers.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=16,
                                         out_features=STAGES)  # fmt: skip
    config = transformers.UperNetConfig(backbone_config=backbone, hidden_size=32, auxiliary_channels=16, num_labels=150)
    transformers.UperNetForSemanticSegmentation(config).save_pretrained(tmp_path / "upernet-resnet")
    out = tmp_path / "x.safetensors"
    result = run_cli("convert", "transformers", str(tmp_path / "upernet-resnet"), "--recipe",
                     str(RECIPES / "upernet-convnext-tiny.yaml"), "--out", str(out))  # fmt: skip
    assert_refused(result, "keys hooktrain has no counterpart for (backbone.embedder.",
                   "hooktrain converts transformers' UperNet with a ConvNext or Swin backbone only")  # fmt: skip
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["upernet-convnext-tiny.yaml", "upernet-swin-tiny.yaml"])
def test_the_transformers_upernet_recipes_train(recipe, tmp_path):
    """Each recipe's own model trains two iterations and evaluates on the ADE20K replica served
    by the local Hub stand-in (32x32 crops; the ConvNeXt recipe's slide windows clamp to the image)."""
    train_on_ade20k_replica(RECIPES / recipe, tmp_path)