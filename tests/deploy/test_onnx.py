"""ONNX export (every head family, verified by onnxruntime at dynamic sizes, nothing written on a
failed verification), predict from ONNX (the same labels as the .safetensors export), and the
Python API ``hooktrain.Segmenter``."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, cli, randomise, run_cli
from PIL import Image
from safetensors.torch import save_file

from hooktrain import Segmenter
from hooktrain.deploy import onnx_export
from hooktrain.deploy.export import export_checkpoint
from hooktrain.deploy.predict import predict_images
from hooktrain.errors import UserError
from hooktrain.models import ModelConfig, build_segmentor
from hooktrain.recipe.schema import dump_recipe, load_recipe

RECIPES = ROOT / "recipes"
# ResNet-18-sized quickstart heads are not needed to test the graph: timm's test_resnet, 16 wide.
SMALL = ["model.encoder.name=test_resnet", "model.decode_head.fpn_channels=16", "model.decode_head.channels=16"]
HEADS = {
    "fcn": {"channels": 16, "num_convs": 1},
    "fpn": {"channels": 16, "fpn_channels": 16},
    "upernet": {"channels": 16},
    "psp": {"channels": 16},
    "aspp": {"channels": 16, "dilations": [1, 2, 3]},
    "sep_aspp": {"channels": 16, "c1_channels": 8, "dilations": [1, 2, 3]},
    "segformer": {"channels": 16},
    "segformer_mlp": {"channels": 16},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: one thread is faster, and far faster on cores another process shares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (5, 5), 1.5).reshape(height, width, channels)


def make_checkpoint(root: Path, recipe_file: str, *options: str) -> Path:
    """A checkpoint directory (weights + recipe.yaml) of a randomised model of ``recipe_file``."""
    recipe = load_recipe(RECIPES / recipe_file, list(options))
    torch.manual_seed(0)
    model = randomise(
        build_segmentor(recipe.model, num_classes=recipe.data.num_classes, in_channels=recipe.data.in_channels)
    )
    checkpoint = root / "run" / "checkpoints" / "iter_4"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / "model.safetensors"))
    (checkpoint / "recipe.yaml").write_text(dump_recipe(recipe))
    return checkpoint


def head_model(head: str) -> torch.nn.Module:
    cfg = {"encoder": {"name": "test_resnet"}, "decode_head": {"type": head, **HEADS[head]}, "aux_head": None}
    torch.manual_seed(0)
    return randomise(build_segmentor(ModelConfig.model_validate(cfg), num_classes=4))


# -- the graph ---------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", [1, 2, 3, 6, (2, 5)])
def test_adaptive_pool_formulation_equals_pytorchs(output_size):
    """The exportable pool is PyTorch's adaptive average pool at every input size (the bins of
    sizes that do not divide the input, and inputs smaller than the output, included)."""
    pool = onnx_export.OnnxAdaptiveAvgPool2d(output_size)
    for height, width in [(1, 1), (2, 3), (5, 7), (6, 6), (13, 29), (17, 4), (64, 33)]:
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
        want = F.adaptive_avg_pool2d(x, output_size)
        torch.testing.assert_close(pool(x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_family_exports_with_dynamic_sizes(tmp_path, head):
    model = head_model(head)
    lines = []
    out = onnx_export.export_onnx(model, 3, {"format": onnx_export.FORMAT}, tmp_path / "m.onnx", report=lines.append)
    assert out == tmp_path / "m.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert "slide inference and flip/multi-scale TTA stay in Python" in lines[0] and "2x3x50x78" in lines[0]
    proto = onnx.load(str(out))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= onnx_export.OPSET
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    # Yet another size, batch 3: the graph is not tied to the export or verification sizes.
    image = torch.randn(3, 3, 45, 71)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": image.numpy()})[0]
    with torch.no_grad():
        want = model.logits(image).numpy()
    assert got.shape == (3, 4, 45, 71)
    assert np.abs(got - want).max() / np.abs(want).max() <= onnx_export.TOLERANCE


def test_a_failed_verification_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    real = onnx_export._session

    class Perturbed:  # onnxruntime gone wrong: logits 1% off
        def __init__(self, *args):
            self.session = real(*args)

        def run(self, names, feeds):
            return [out * 1.01 for out in self.session.run(names, feeds)]

    monkeypatch.setattr(onnx_export, "_session", Perturbed)
    with pytest.raises(UserError) as caught:
        onnx_export.export_onnx(head_model("fcn"), 3, {}, tmp_path / "m.onnx")
    message = str(caught.value)
    assert "\n" not in message and "2x3x50x78" in message and "differ from PyTorch's by 0.01" in message
    assert list(tmp_path.iterdir()) == []


# -- export and predict: the quickstart model, a binary one, a 4-band one -------------------------


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, Path]:
    """The quickstart model exported both ways from one checkpoint: ONNX by the CLI."""
    root = tmp_path_factory.mktemp("onnx_quickstart")
    checkpoint = make_checkpoint(root, "quickstart.yaml", "data.val.pipeline.scale=[96,48]")  # images at 48 px
    result = run_cli("export", str(checkpoint), str(root / "model.onnx"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified by onnxruntime" in result.stdout and "stay in Python" in result.stdout
    return export_checkpoint(checkpoint, root / "model.safetensors"), root / "model.onnx"


def test_onnx_metadata_holds_what_a_caller_needs(quickstart):
    metadata = {p.key: p.value for p in onnx.load(str(quickstart[1])).metadata_props}
    assert metadata["format"] == "hooktrain-onnx/1" and metadata["iter"] == "4"
    assert metadata["in_channels"] == "3" and metadata["num_classes"] == "5" and metadata["threshold"] == "0.5"
    assert metadata["mean"] == "[123.675, 116.28, 103.53]" and metadata["std"] == "[58.395, 57.12, 57.375]"
    assert '"circle"' in metadata["class_names"] and metadata["palette"].startswith("[[0, 0, 0], [230, 25, 75]")
    assert "decode_head:" in metadata["hooktrain.recipe"]


def test_predict_from_onnx_writes_the_labels_of_the_safetensors_model(quickstart, tmp_path, capsys):
    safetensors, onnx_file = quickstart
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(40, 56), (70, 50), (96, 96)]):
        cv2.imwrite(str(images / f"im{i}.png"), random_image(h, w, seed=i))
    result = cli(capsys, "predict", onnx_file, images, "--out", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    predict_images(safetensors, [str(images)], tmp_path / "torch")
    varied = 0
    for i in range(3):
        from_onnx = cv2.imread(str(tmp_path / "onnx" / f"im{i}_label.png"), cv2.IMREAD_UNCHANGED)
        from_torch = cv2.imread(str(tmp_path / "torch" / f"im{i}_label.png"), cv2.IMREAD_UNCHANGED)
        assert from_onnx.shape == cv2.imread(str(images / f"im{i}.png")).shape[:2]
        varied += len(np.unique(from_torch)) > 1  # predictions that could differ
        np.testing.assert_array_equal(from_onnx, from_torch)
        colours = [cv2.imread(str(tmp_path / d / f"im{i}.png")) for d in ("onnx", "torch")]
        np.testing.assert_array_equal(*colours)
    assert varied >= 2


def test_export_refuses_other_suffixes(quickstart, tmp_path, capsys):
    from hooktrain.cli import main

    checkpoint = quickstart[0].parent / "run" / "checkpoints" / "iter_4"
    with pytest.raises(SystemExit) as exited:
        main(["export", str(checkpoint), str(tmp_path / "model.pt")])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "must end with .safetensors" in err and ".onnx" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "recipe_file, options, channels",
    [
        # binary (one sigmoid channel), predicted in slide windows around the graph
        (
            "quickstart_binary.yaml",
            ["model.inference.mode=slide", "model.inference.crop_size=[48,48]", "model.inference.stride=[32,32]"],
            3,
        ),  # fmt: skip
        ("quickstart_4band.yaml", [], 4),
    ],
    ids=["binary-slide", "four-band"],
)
def test_binary_and_four_band_models_export_and_predict(tmp_path, recipe_file, options, channels):
    checkpoint = make_checkpoint(tmp_path, recipe_file, *SMALL, *options)
    onnx_file = export_checkpoint(checkpoint, tmp_path / "model.onnx")
    metadata = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert metadata["in_channels"] == str(channels)
    segmenters = [
        Segmenter.load(f, device="cpu") for f in (onnx_file, export_checkpoint(checkpoint, tmp_path / "m.safetensors"))
    ]
    images = [random_image(61, 83, channels, seed=1), random_image(50, 40, channels, seed=2)]
    (label_onnx, probs_onnx), (label_torch, probs_torch) = [s(images[0], probabilities=True) for s in segmenters]
    np.testing.assert_array_equal(label_onnx, label_torch)
    np.testing.assert_allclose(probs_onnx, probs_torch, atol=1e-4)
    assert label_onnx.shape == (61, 83) and label_onnx.dtype == np.uint8
    if channels == 3:  # binary: one foreground sigmoid channel against the threshold
        assert probs_onnx.shape == (1, 61, 83) and set(np.unique(label_onnx)) <= {0, 1}
        np.testing.assert_array_equal(label_onnx, (probs_onnx[0] > 0.5).astype(np.uint8))
    batched = [segmenter(images) for segmenter in segmenters]
    for a, b in zip(*batched):
        np.testing.assert_array_equal(a, b)


# -- the Python API ----------------------------------------------------------------------------


def test_segmenter_takes_paths_pil_images_arrays_and_lists(quickstart, tmp_path):
    safetensors, onnx_file = quickstart
    image, other = random_image(47, 66, seed=7), random_image(30, 90, seed=8)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    segmenter = Segmenter.load(safetensors, device="cpu", batch_size=2)
    label, probs = segmenter(image, probabilities=True)
    assert label.shape == (47, 66) and label.dtype == np.uint8 and len(np.unique(label)) > 1
    assert probs.shape == (5, 47, 66) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), label)
    many = segmenter([path, str(path), Image.fromarray(image), other])  # two batches, the second of two sizes
    assert len(many) == 4 and many[3].shape == (30, 90)
    for result in many[:3]:
        np.testing.assert_array_equal(result, label)
    from_onnx = Segmenter.load(onnx_file, batch_size=3)
    assert from_onnx.backend == "onnx"
    for a, b in zip(from_onnx([image, other, path]), [label, many[3], label]):
        np.testing.assert_array_equal(a, b)
    assert segmenter.class_names == ["background", "circle", "square", "triangle", "cross"]
    assert segmenter.colourize(label).shape == (47, 66, 3)


def test_segmenter_tta_and_precision(quickstart):
    safetensors, onnx_file = quickstart
    image = random_image(40, 52, seed=3)
    plain = Segmenter.load(safetensors, device="cpu")
    tta = Segmenter.load(safetensors, device="cpu", tta=True, scales=[0.75, 1.0])
    assert tta.inference.flip and tta.inference.scales == [0.75, 1.0]
    label, probs = tta(image, probabilities=True)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    assert (label == plain(image)).mean() > 0.5
    bf16 = Segmenter.load(safetensors, device="cpu", precision="bf16")
    assert (bf16(image) == plain(image)).mean() > 0.9
    with pytest.raises(UserError, match=r"TTA .* load the \.safetensors export"):
        Segmenter.load(onnx_file, tta=True)
    with pytest.raises(UserError, match="float32 ONNX graph"):
        Segmenter.load(onnx_file, precision="fp16")
    with pytest.raises(UserError, match="must be a .safetensors or .onnx file"):
        Segmenter.load(onnx_file.with_suffix(".pt"))


def test_the_inference_page_python_example_runs(quickstart, tmp_path, monkeypatch):
    """docs/inference.md's Python example, as written, next to the files it names."""
    safetensors, onnx_file = quickstart
    for name, source in (("model.safetensors", safetensors), ("model.onnx", onnx_file)):
        (tmp_path / name).symlink_to(source)
    cv2.imwrite(str(tmp_path / "photo.jpg"), random_image(48, 64, seed=4))
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "inference.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/inference.md", "exec"), {})
    assert (tmp_path / "photo_label.png").is_file()


def test_onnx_predict_refuses_a_model_without_a_recipe(tmp_path):
    onnx_export.export_onnx(head_model("fcn"), 3, {}, tmp_path / "bare.onnx")
    with pytest.raises(
        UserError, match=r"carries no hooktrain recipe; export it with `hooktrain export CHECKPOINT OUT.onnx`"
    ):
        Segmenter.load(tmp_path / "bare.onnx")
