"""The mask-classification family (EoMT, Mask2Former) through the same runner, hooks, metrics,
TTA, export and predict as the encoder-decoder family: ``recipes/quickstart_eomt.yaml`` trains on
tiny shapes images, resumes exactly, anneals its masked attention on the runner's iterations, and
its exported model predicts the same labels from PyTorch and from ONNX; the same recipe with a
Mask2Former model (a micro Swin with per-level norms) trains with every decoder layer supervised
and exports to an ONNX graph that follows the input size (its deformable attention's level shapes)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import RECIPES, assert_refused, cli, run_cli, tiny
from safetensors.torch import load_file

from hooktrain.models.eomt import EoMT
from hooktrain.models.mask_classifier import semantic_scores
from hooktrain.models.segmentor import build_segmentor
from hooktrain.recipe.model import ModelConfig

RECIPE = RECIPES / "quickstart_eomt.yaml"
ITERS = 4
# The quickstart's hybrid ViT (a ResNet stem at stride 4, 2x2 patches over it: stride 8), small enough
# for seconds-long runs on 32 px images; blocks 2 and 3 carry the queries.
TINY_EOMT = [
    "model.encoder.kwargs={img_size: 32, patch_size: 2, reg_tokens: 4, no_embed_class: true, embed_dim: 48, "
    "depth: 4, num_heads: 2}",
    "model.decode_head.num_queries=8",
    "model.decode_head.num_blocks=2",
    "model.decode_head.loss.num_points=64",
    "model.decode_head.mask_annealing={starts: [1, 2], ends: [2, 4]}",
    "hooks.1.interval=2",
    f"hooks.2.interval={ITERS}",
]
# Mask2Former in place of the quickstart's EoMT: a micro Swin (4 levels, strides 4..32, 1 block each)
# with transformers' per-level norms, a 1-layer deformable pixel decoder and 2 masked-attention layers. The
# pixel decoder has 2 channels per GroupNorm group: with 1, a 1x1 level (TTA's half scale) has 1 value a group.
MASK2FORMER_LAYERS = 2
TINY_MASK2FORMER = [
    "model={encoder: {name: swin_tiny_patch4_window7_224, pretrained: false, out_norm: layer_norm, kwargs: "
    "{embed_dim: 32, depths: [1, 1, 1, 1], num_heads: [1, 2, 4, 8]}}, decode_head: {type: mask2former, "
    "num_queries: 8, channels: 64, hidden_dim: 32, mask_feature_size: 32, num_heads: 4, encoder_layers: 1, "
    f"encoder_feedforward: 64, decoder_layers: {MASK2FORMER_LAYERS}, decoder_feedforward: 64, "
    "loss: {num_points: 64}}, inference: {mode: whole}}",
    "hooks.1.interval=2",
    f"hooks.2.interval={ITERS}",
]
FAMILIES = {"eomt": TINY_EOMT, "mask2former": TINY_MASK2FORMER}


@pytest.fixture(scope="module")
def eomt_run(data_root, tmp_path_factory):
    """The EoMT quickstart, trained for :data:`ITERS` iterations with a checkpoint every 2."""
    work_dir = tmp_path_factory.mktemp("eomt") / "run"
    result = run_cli(str(RECIPE), "--work-dir", str(work_dir), "--cfg-options", *tiny(data_root, ITERS, *TINY_EOMT))
    assert result.returncode == 0, result.stderr[-3000:]
    return work_dir


@pytest.fixture(scope="module")
def mask2former_run(data_root, tmp_path_factory):
    """The quickstart with :data:`TINY_MASK2FORMER`'s model, trained for :data:`ITERS` iterations."""
    work_dir = tmp_path_factory.mktemp("mask2former") / "run"
    options = tiny(data_root, ITERS, *TINY_MASK2FORMER)
    result = run_cli(str(RECIPE), "--work-dir", str(work_dir), "--cfg-options", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    return work_dir


def records(work_dir) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_eomt_trains_with_deep_supervision_and_evaluates(eomt_run):
    """Every masked block's predictions and the final ones are supervised (mmdet's names), and
    the eval hook scores the semantic map like any segmentor's."""
    logged = records(eomt_run)
    terms = {key for record in logged for key in record if key.startswith("train/decode.")}
    layers, kinds = ("", "d0.", "d1."), ("cls", "mask", "dice")
    assert terms == {f"train/decode.{layer}loss_{kind}" for layer in layers for kind in kinds}
    final = [record for record in logged if "val/mIoU" in record]
    assert final and final[-1]["iter"] == ITERS and 0 <= final[-1]["val/mIoU"] <= 1


def test_mask2former_trains_with_deep_supervision_and_evaluates(mask2former_run):
    """Mask2Former through the CLI: the initial queries' and every decoder layer's predictions are
    supervised (``d0`` .. ``d{n-1}``, the last layer's unnumbered), and the eval hook scores it."""
    logged = records(mask2former_run)
    terms = {key for record in logged for key in record if key.startswith("train/decode.")}
    layers = ("", *(f"d{i}." for i in range(MASK2FORMER_LAYERS)))
    assert terms == {f"train/decode.{layer}loss_{kind}" for layer in layers for kind in ("cls", "mask", "dice")}
    assert all(torch.isfinite(torch.tensor(record[term])) for record in logged for term in terms if term in record)
    final = [record for record in logged if "val/mIoU" in record]
    assert final and final[-1]["iter"] == ITERS and 0 <= final[-1]["val/mIoU"] <= 1


def test_the_runner_anneals_the_masked_attention_as_eomt_does(eomt_run):
    """The checkpoint after iteration ``k`` holds EoMT's ``mask_annealing`` at ``k`` steps done:
    block 0 anneals over iterations 1-2, block 1 over 2-4, with power 0.9."""
    probs = {k: load_file(eomt_run / "checkpoints" / f"iter_{k}" / "model.safetensors")["attn_mask_probs"]
             for k in (2, 4)}  # fmt: skip
    torch.testing.assert_close(probs[2], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(probs[4], torch.tensor([0.0, 0.0]))
    model = tiny_eomt({"starts": [10, 20], "ends": [20, 40]})
    expected = {0: [1.0, 1.0], 15: [0.5**0.9, 1.0], 20: [0.0, 1.0], 30: [0.0, 0.5**0.9], 40: [0.0, 0.0]}
    for iteration, want in expected.items():
        model.schedule(iteration)
        torch.testing.assert_close(model.attn_mask_probs, torch.tensor(want), rtol=1e-6, atol=0)


def test_a_resumed_run_ends_bitwise_where_the_uninterrupted_one_ends(eomt_run, data_root, tmp_path):
    """The stream position, the random state of the point sampling and the annealing all carry
    over: resuming from iteration 2 gives iteration 4's weights exactly."""
    resumed = tmp_path / "resumed"
    result = run_cli(str(RECIPE), "--work-dir", str(resumed), "--resume", str(eomt_run / "checkpoints" / "iter_2"),
                     "--cfg-options", *tiny(data_root, ITERS, *TINY_EOMT))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final = f"checkpoints/iter_{ITERS}/model.safetensors"
    ours, theirs = load_file(resumed / final), load_file(eomt_run / final)
    assert ours.keys() == theirs.keys()
    assert [name for name in ours if not ours[name].equal(theirs[name])] == []


@pytest.mark.parametrize("family", ["eomt", pytest.param("mask2former", marks=pytest.mark.slow)])
def test_test_tta_export_onnx_and_predict(family, request, data_root, tmp_path, capsys):
    """``hooktrain test --tta`` scores it, ``export`` writes an ONNX graph that onnxruntime
    verifies, whose logits are PyTorch's at two input sizes (Mask2Former: the pixel decoder's level
    shapes follow the input, not the export size), and ``predict`` from ONNX writes the labels the
    PyTorch export predicts."""
    from hooktrain.deploy.export import export_checkpoint, load_exported
    from hooktrain.deploy.onnx_export import TOLERANCE, OnnxLogits
    from hooktrain.deploy.predict import predict_images

    checkpoint = request.getfixturevalue(f"{family}_run") / "checkpoints" / f"iter_{ITERS}"
    tested = run_cli("test", str(RECIPE), "--checkpoint", str(checkpoint), "--tta", "--work-dir", str(tmp_path / "t"),
                     "--cfg-options", *tiny(data_root, ITERS, *FAMILIES[family]))  # fmt: skip
    assert tested.returncode == 0, tested.stderr[-3000:]
    metrics = json.loads((tmp_path / "t" / "test_metrics.json").read_text())
    assert metrics["tta"]["flip"] is True and 0 <= metrics["mIoU"] <= 1
    exported = cli(capsys, "export", checkpoint, tmp_path / "model.onnx")  # in this process: no second start-up
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "verified by onnxruntime" in exported.stdout
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 32), (40, 56)]):
        cv2.imwrite(str(images / f"im{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    result = cli(capsys, "predict", tmp_path / "model.onnx", images, "--out", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = export_checkpoint(checkpoint, tmp_path / "model.safetensors")
    predict_images(exported, [str(images)], tmp_path / "torch")
    model, graph = load_exported(exported)[0].eval(), OnnxLogits(tmp_path / "model.onnx")
    for size in [(32, 32), (45, 77)]:
        image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        with torch.no_grad():
            want = model.logits(image)
        got = graph(image)
        assert got.shape == want.shape and ((got - want).abs().max() / want.abs().max()).item() <= TOLERANCE, size
    for i in range(2):
        labels = [cv2.imread(str(tmp_path / d / f"im{i}_label.png"), cv2.IMREAD_UNCHANGED) for d in ("onnx", "torch")]
        np.testing.assert_array_equal(*labels)


def tiny_eomt(annealing: dict | None = None) -> EoMT:
    cfg = ModelConfig.model_validate({
        "encoder": {"name": "vit_small_patch14_reg4_dinov2",
                    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 2}},
        "decode_head": {"type": "eomt", "num_queries": 8, "num_blocks": 2, "mask_annealing": annealing,
                        "loss": {"num_points": 64}},
    })  # fmt: skip
    return build_segmentor(cfg, num_classes=3)


def test_the_scores_are_mask2formers_semantic_inference():
    """``forward(image)`` is ``einsum("qc,qhw->chw", softmax(class)[:, :-1], sigmoid(masks))`` with
    the final layer's masks resized bilinearly (align_corners=False) to the input size."""
    torch.manual_seed(0)
    model = tiny_eomt().eval()
    image = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        mask_logits, class_logits = model.predictions(image)[-1]
        scores = model(image)
    assert scores.shape == (2, 3, 32, 48)
    for b in range(2):
        masks = torch.nn.functional.interpolate(mask_logits[b : b + 1], size=(32, 48), mode="bilinear")[0]
        probs = class_logits[b].softmax(-1)[:, :-1]
        want = (probs[:, :, None, None] * masks.sigmoid()[:, None]).sum(0)
        torch.testing.assert_close(scores[b], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(semantic_scores(mask_logits, class_logits, (32, 48)), scores)


def test_recipe_mistakes_are_refused_in_one_line(tmp_path):
    """Per-pixel extras (through the CLI: exit 2, one line, nothing written), a non-ViT encoder
    and a schedule for the wrong number of blocks."""
    from hooktrain.errors import UserError
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    result = run_cli(str(RECIPE), "--work-dir", str(tmp_path / "run"), "--cfg-options", "model.aux_head={type: fcn}")
    assert_refused(result, "model.aux_head does not apply to decode_head type eomt")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="needs a timm ViT"):
        build_recipe_segmentor(load_recipe(RECIPE, ["model.encoder.name=resnet18"]), on_meta=True)
    with pytest.raises(UserError, match="one start and end per block"):
        load_recipe(RECIPE, ["model.decode_head.mask_annealing={starts: [1], ends: [2]}"])


def test_the_eval_hooks_per_pixel_loss_is_refused_for_mask_classification(tmp_path):
    result = run_cli(str(RECIPE), "--work-dir", str(tmp_path / "run"), "--cfg-options", "hooks.2.loss=true")
    assert_refused(result, "loss: true scores per-pixel losses")


def test_the_paper_recipes_build():
    """Every EoMT recipe resolves and builds on the meta device (no download)."""
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    recipes = sorted((RECIPES / "eomt").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        model = build_recipe_segmentor(load_recipe(path), on_meta=True)
        assert isinstance(model, EoMT), path
