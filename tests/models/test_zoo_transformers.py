"""SegFormer weights in transformers' and NVlabs' formats, against transformers' and timm's own code.

transformers' ``SegformerModel`` / ``SegformerForSemanticSegmentation`` are built locally from a
config with random weights (no download), saved with ``save_pretrained`` (the Hub's key format)
and served by the local Hub stand-in where the Hub path is under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import ROOT, run_cli, tiny
from hub_server import HubServer

from hooktrain.deploy.export import load_exported
from hooktrain.errors import UserError
from hooktrain.models.backbone_keys import mit_from_nvlabs, to_encoder_keys
from hooktrain.models.encoder import build_encoder
from hooktrain.models.mit import create_mit
from hooktrain.recipe.model import EncoderConfig

transformers = pytest.importorskip("transformers")

NUM_CLASSES = 5  # the shapes dataset's
SIZE = (97, 131)  # odd, so every stride rounds


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def randomise_batch_norms(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so a mixed-up BN key cannot go unnoticed."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.fixture(scope="session")
def segformer_dir(tmp_path_factory) -> Path:
    """A random transformers SegFormer-B0 segmentor, saved as on the Hub."""
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(num_labels=NUM_CLASSES))
    randomise_batch_norms(model)
    directory = tmp_path_factory.mktemp("segformer-b0-finetuned")
    model.eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def mit_dir(tmp_path_factory) -> Path:
    """A random transformers MiT-B0 ImageNet classifier, the layout of ``nvidia/mit-b0``."""
    torch.manual_seed(1)
    model = transformers.SegformerForImageClassification(transformers.SegformerConfig(num_labels=10))
    directory = tmp_path_factory.mktemp("mit-b0")
    model.eval().save_pretrained(directory)
    return directory


def segformer_recipe(tmp_path: Path) -> Path:
    recipe = {
        "_base_": [str(ROOT / "recipes/_base_/datasets/shapes.yaml")],
        "model": {
            "encoder": {"name": "mit_b0", "pretrained": True},
            "decode_head": {"type": "segformer_mlp", "channels": 256},
            "aux_head": None,
        },
    }
    path = tmp_path / "segformer_hf.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def converted_segformer(segformer_dir, tmp_path_factory) -> tuple[Path, Path]:
    """``hooktrain convert transformers`` of :func:`segformer_dir` with :func:`segformer_recipe`:
    the converted file and the recipe, made once for the tests that read them."""
    root = tmp_path_factory.mktemp("converted_segformer")
    recipe, out = segformer_recipe(root), root / "segformer.safetensors"
    result = run_cli("convert", "transformers", str(segformer_dir), "--recipe", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, recipe


def test_convert_transformers_segformer_computes_the_same_function(segformer_dir, converted_segformer):
    model, recipe = load_exported(converted_segformer[0])
    reference = transformers.SegformerForSemanticSegmentation.from_pretrained(segformer_dir).eval()
    image = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(pixel_values=image).logits
        got = model.decode_head(model.encoder(image))
        full = model(image)
    assert relative_error(got, want) < 1e-4
    assert full.shape == (2, NUM_CLASSES, *SIZE)  # load_exported(file)[0](image): logits at the input size
    assert recipe.model.decode_head.type == "segformer_mlp"


def test_convert_transformers_downloads_a_hub_id_through_the_hub_client(segformer_dir, tmp_path):
    """`hooktrain convert transformers nvidia/segformer-b0-finetuned-ade-512-512` fetches the
    weights with huggingface_hub (from the local Hub stand-in here); an unknown id is one line."""
    repo = "nvidia/segformer-b0-finetuned-ade-512-512"
    out = tmp_path / "hub.safetensors"
    recipe = str(segformer_recipe(tmp_path))
    with HubServer() as hub:
        hub.add(repo, segformer_dir, repo_type="model")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
        result = run_cli("convert", "transformers", repo, "--recipe", recipe, "--out", str(out), env=env)
        missing = run_cli("convert", "transformers", "nvidia/no-such-model", "--recipe", recipe, "--out",
                          str(tmp_path / "none.safetensors"), env=env)  # fmt: skip
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(path.endswith(f"{repo}/resolve/main/model.safetensors") for path in fetched), fetched
    model, _ = load_exported(out)
    reference = transformers.SegformerForSemanticSegmentation.from_pretrained(segformer_dir).eval()
    image = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(model.decode_head(model.encoder(image)), reference(pixel_values=image).logits) < 1e-4
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr[-2000:]
    assert "'nvidia/no-such-model' is neither a local path nor a downloadable Hub model" in lines[0]


def test_convert_transformers_refuses_a_recipe_that_does_not_fit(segformer_dir, tmp_path):
    """mmseg's SegformerHead in the recipe: nothing is written, the first offenders are named."""
    from hooktrain.deploy.convert import convert

    out = tmp_path / "x.safetensors"
    with pytest.raises(UserError) as raised:
        convert("transformers", str(segformer_dir), str(segformer_recipe(tmp_path)), out,
                ["model.decode_head.type=segformer"])  # fmt: skip
    message = str(raised.value)
    assert "\n" not in message and "does not fit the recipe's model" in message
    assert "decode_head.convs.0.bn.bias" in message  # the first model tensors not filled
    assert "decode_head.linear_c.0.bias" in message  # and source tensors left unused
    assert not out.exists()


def test_mit_pretrained_downloads_nvidia_mit_through_the_hub_client(mit_dir, tmp_path):
    """``pretrained: true`` on mit_b0 fetches ``nvidia/mit-b0`` with huggingface_hub (here from
    the local Hub stand-in) and converts it: the features are transformers' hidden states."""
    image = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    torch.save(image, tmp_path / "image.pt")
    script = (
        "import sys, torch\n"
        "from hooktrain.recipe.model import EncoderConfig\n"
        "from hooktrain.models.encoder import build_encoder\n"
        "encoder = build_encoder(EncoderConfig(name='mit_b0', pretrained=True)).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(encoder(torch.load(sys.argv[1])), sys.argv[2])\n"
    )
    with HubServer() as hub:
        hub.add("nvidia/mit-b0", mit_dir, repo_type="model")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
        result = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "image.pt"), str(tmp_path / "features.pt")],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(path.endswith("nvidia/mit-b0/resolve/main/model.safetensors") for path in fetched), fetched
    reference = transformers.SegformerModel.from_pretrained(mit_dir).eval()
    with torch.no_grad():
        want = reference(pixel_values=image, output_hidden_states=True).hidden_states
    got = torch.load(tmp_path / "features.pt")
    assert len(got) == len(want) == 4
    for level, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, level
        assert relative_error(g, w) < 1e-4, level


def test_mit_pretrained_offline_and_uncached_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(
        UserError, match=r"'mit_b0' \(nvidia/mit-b0\) could not be downloaded \(the Hugging Face Hub is offline"
    ):
        build_encoder(EncoderConfig(name="mit_b0", pretrained=True))


def test_pvt_v2_imagenet_weights_do_not_fit_mit(tmp_path):
    """timm's pvt_v2_b0 (FFN ratios 8, 8, 4, 4) is not MiT-B0: a clear error, not a silent mix."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model("pvt_v2_b0").state_dict().items()}
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "pvt.safetensors"))
    with pytest.raises(UserError, match=r"does not fit encoder 'mit_b0'.*tensors of another shape.*mlp\."):
        build_encoder(EncoderConfig(name="mit_b0", pretrained_path=str(tmp_path / "pvt.safetensors")))


def official_mit_state(timm_state: dict) -> dict:
    """timm pvt_v2 keys back to the NVlabs SegFormer layout (patch_embedN, blockN, normN)."""
    out = {}
    for key, value in timm_state.items():
        if key.startswith("patch_embed."):
            out["patch_embed1." + key.removeprefix("patch_embed.")] = value
            continue
        _, stage, rest = key.split(".", 2)
        n = int(stage) + 1
        if rest.startswith("downsample."):
            out[f"patch_embed{n}." + rest.removeprefix("downsample.")] = value
        elif rest.startswith("blocks."):
            out[f"block{n}." + rest.removeprefix("blocks.").replace("mlp.dwconv.", "mlp.dwconv.dwconv.")] = value
        else:
            out[f"norm{n}." + rest.removeprefix("norm.")] = value
    return out


def test_official_segformer_backbone_loads_as_timm_converts_it(tmp_path):
    """The NVlabs layout is PVTv2's, which timm's own pvt_v2 checkpoint filter converts: our
    renaming agrees with timm's on every key, and such a file loads as pretrained_path."""
    torch.manual_seed(4)
    full = timm.create_model("pvt_v2_b0", mlp_ratios=(4, 4, 4, 4)).eval()
    timm_state = {k: v for k, v in full.state_dict().items() if not k.startswith("head.")}
    official = official_mit_state(timm_state)
    official["head.weight"] = torch.zeros(1000, 256)
    by_timm = timm.models.pvt_v2.checkpoint_filter_fn(dict(official), full)
    by_timm = {k: v for k, v in by_timm.items() if not k.startswith("head.")}
    ours = mit_from_nvlabs({k: v for k, v in official.items() if not k.startswith("head.")})
    assert ours.keys() == by_timm.keys() == timm_state.keys()
    assert all(torch.equal(ours[k], by_timm[k]) for k in ours)

    torch.save(official, tmp_path / "mit_b0.pth")
    encoder = build_encoder(EncoderConfig(name="mit_b0", pretrained_path=str(tmp_path / "mit_b0.pth"))).eval()
    expected = to_encoder_keys(timm_state, set(create_mit("mit_b0").state_dict()))
    loaded = encoder.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_converted_file_names_its_source(tmp_path, segformer_dir):
    """The converted file names its source in the metadata and carries the resolved recipe."""
    from safetensors import safe_open

    from hooktrain.deploy.convert import convert

    out = convert("transformers", str(segformer_dir), str(segformer_recipe(tmp_path)), tmp_path / "m.safetensors")
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "hooktrain-export/1"
    assert metadata["converted_from"] == f"transformers:{segformer_dir.name}"
    assert yaml.safe_load(metadata["hooktrain.recipe"])["model"]["decode_head"]["type"] == "segformer_mlp"


def test_converted_file_works_with_test_checkpoint_and_load_from(converted_segformer, tmp_path, data_root):
    """The converted file is an exported file: `hooktrain test --checkpoint` evaluates it and a
    training run starts from it with `load_from` (strict: all keys match)."""
    out, recipe = converted_segformer
    options = [*tiny(data_root, 2), "model.encoder.pretrained=false", "hooks=[{type: eval, num_samples: 0}]"]
    tested = run_cli("test", str(recipe), "--checkpoint", str(out), "--work-dir", str(tmp_path / "test"),
                     "--cfg-options", *options)  # fmt: skip
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "mIoU" in json.loads((tmp_path / "test" / "test_metrics.json").read_text())
    trained = run_cli(str(recipe), "--work-dir", str(tmp_path / "train"), "--cfg-options", *options,
                      f"load_from={out}")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "loaded weights from" in trained.stdout + trained.stderr
