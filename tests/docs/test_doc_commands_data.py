"""The commands of docs/checkpoints.md, plugins.md, datasets.md, data-check.md, your-own-data.md,
migrating-from-mmseg.md and benchmarks.md run here as written (see tests/doc_commands.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT
from doc_commands import (
    TINY_ADE,
    Doc,
    assert_trained_and_evaluated,
    history,
    run,
    write_ade_challenge_folder,
)

pytestmark = pytest.mark.spread  # independent runs: the test workers share them

# -- docs/checkpoints.md and docs/plugins.md -------------------------------------------------

EXPORT_BEST = Doc("hooktrain export work_dirs/run/checkpoints/best model.safetensors")
PREDICT_FILES = Doc(
    "python -m hooktrain predict model.safetensors photo.jpg more_images/ --out masks/"
)
# hooktrain and torch, the example's dependencies, are this environment's own: here pip neither
# resolves them against the index again nor builds the example in a fresh isolated environment.
PLUGIN_INSTALL = Doc("pip install ./examples/hooktrain-ema", append="--no-deps --no-build-isolation")
PLUGIN_RUN = Doc(
    "python -m hooktrain recipes/quickstart.yaml --work-dir work_dirs/plugin-test --cfg-options "
    "train.max_iters=4 data.train.num_workers=0 data.train.pipeline.crop_size=[64,64] "
    '"hooks=[{type: ema, momentum: 0.1}, {type: eval, interval: 4}]"'
)
# Shortens the quickstart to seconds for the runs that only set up what a command works on.
SHORT = (
    "--cfg-options train.max_iters=2 data.train.num_workers=0 data.train.pipeline.crop_size=[32,32]"
)


def test_plugin_commands_install_and_run_the_example(shapes_sandbox):
    sandbox = shapes_sandbox
    run(PLUGIN_INSTALL, sandbox)
    result = run(PLUGIN_RUN, sandbox)
    assert "ema(" in result.output and "validation at iter 4 on 200 images" in result.output


# -- docs/inference.md: ONNX and safetensors exports of one trained checkpoint, predict with both --

EXPORT_ONNX = Doc("hooktrain export work_dirs/run/checkpoints/latest model.onnx")
EXPORT_SAFETENSORS = Doc("hooktrain export work_dirs/run/checkpoints/latest model.safetensors")
PREDICT_ONNX = Doc("hooktrain predict model.onnx photos/ --out masks_onnx/")
PREDICT_SAFETENSORS = Doc("hooktrain predict model.safetensors photos/ --out masks/")
# docs/huge-images.md, on the same export: a small georeferenced scene, one 1024-pixel tile.
PREDICT_SCENE = Doc("hooktrain predict model.safetensors scene.tif --out predictions/ --crop-size 1024 1024 "
                    "--stride 896 896 --blend hann --batch-size 2")  # fmt: skip


def test_checkpoint_and_inference_page_commands(shapes_sandbox):
    """One two-iteration quickstart (an evaluation and a checkpoint at iteration 2, the best kept)
    serves three pages: checkpoints.md exports `best` and predicts files and a folder; inference.md
    exports `latest` both ways, and the two exports write the same labels; huge-images.md predicts
    a GeoTIFF into a georeferenced label GeoTIFF."""
    sandbox = shapes_sandbox
    setup = Doc("python -m hooktrain recipes/quickstart.yaml --work-dir work_dirs/run " + SHORT +
                ' "hooks=[{type: eval, interval: 2}, {type: checkpoint, interval: 2, save_best: mIoU}]"')  # fmt: skip
    run(setup, sandbox)
    run(EXPORT_BEST, sandbox)
    (sandbox / "more_images").mkdir()
    for name in ("photo.jpg", "more_images/a.png", "more_images/b.jpg"):
        cv2.imwrite(str(sandbox / name), np.full((24, 40, 3), 120, np.uint8))
    run(PREDICT_FILES, sandbox)
    written = sorted(p.name for p in (sandbox / "masks").iterdir())
    assert written == [
        "a.png",
        "a_label.png",
        "b.png",
        "b_label.png",
        "photo.png",
        "photo_label.png",
    ]

    assert "verified by onnxruntime" in run(EXPORT_ONNX, sandbox).output
    run(EXPORT_SAFETENSORS, sandbox)  # over checkpoints.md's export of `best`
    shutil.rmtree(sandbox / "masks")  # checkpoints.md's predictions
    (sandbox / "photos").mkdir()
    for i, (h, w) in enumerate([(96, 96), (60, 130)]):
        image = cv2.GaussianBlur(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 2)
        cv2.imwrite(str(sandbox / "photos" / f"p{i}.png"), image)
    run(PREDICT_ONNX, sandbox)
    run(PREDICT_SAFETENSORS, sandbox)
    assert sorted(p.name for p in (sandbox / "masks").iterdir()) == ["p0.png", "p0_label.png", "p1.png", "p1_label.png"]
    for i in range(2):
        labels = [cv2.imread(str(sandbox / out / f"p{i}_label.png"), cv2.IMREAD_UNCHANGED)
                  for out in ("masks_onnx", "masks")]  # fmt: skip
        np.testing.assert_array_equal(*labels)

    import rasterio
    from rasterio.transform import Affine

    scene = np.random.default_rng(0).integers(1, 256, (3, 90, 120), dtype=np.uint8)
    georeference = {"crs": "EPSG:32633", "transform": Affine(10, 0, 500000, 0, -10, 4500000)}
    with rasterio.open(sandbox / "scene.tif", "w", driver="GTiff", height=90, width=120, count=3, dtype="uint8",
                       nodata=0, **georeference) as dst:  # fmt: skip
        dst.write(scene)
    assert "1/1" in run(PREDICT_SCENE, sandbox).stderr  # one tile, on the progress bar
    with rasterio.open(sandbox / "predictions" / "scene_label.tif") as labels_tif:
        assert (labels_tif.crs.to_string(), labels_tif.transform) == (georeference["crs"], georeference["transform"])
        assert labels_tif.read(1).max() < 5


# -- docs/sharing.md: push a run and load it back, through the local Hub stand-in -------------

PUSH = Doc("hooktrain push work_dirs/quickstart alice/shapes-fpn")
PUSH_PRIVATE = Doc("hooktrain push work_dirs/quickstart alice/shapes-fpn --private")
PUSH_BRANCH = Doc('hooktrain push work_dirs/quickstart alice/shapes-fpn --revision iter-480 --checkpoint iter_480 '
                  '--commit-message "half-way checkpoint"', replace=(("iter_480", "iter_2"),))  # fmt: skip
PREDICT_HUB = Doc("hooktrain predict hf://alice/shapes-fpn photos/ --out masks/")
PREDICT_HUB_BRANCH = Doc("hooktrain predict hf://alice/shapes-fpn@iter-480 photos/ --out masks/")


@pytest.mark.slow
def test_sharing_page_commands(shapes_sandbox):
    """A 4-iteration quickstart (checkpoints iter_2 and iter_4) pushed as the page shows, to the
    stand-in with alice's write token; the page's predict commands load main and the branch."""
    import dataclasses

    from hub_server import HubServer

    sandbox = shapes_sandbox
    four_iterations = SHORT.replace("max_iters=2", "max_iters=4")  # the quickstart's logger, checkpoint, eval
    setup = Doc("python -m hooktrain recipes/quickstart.yaml --work-dir work_dirs/quickstart " + four_iterations +
                " hooks.0.interval=1 hooks.1.interval=2 hooks.2.interval=2")  # fmt: skip
    run(setup, sandbox)
    (sandbox / "photos").mkdir()
    cv2.imwrite(str(sandbox / "photos" / "p.png"), np.full((40, 56, 3), 90, np.uint8))
    with HubServer(sandbox / "hub") as hub:
        hub.add_token("hf_write_alice", "alice")
        hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_write_alice", "HF_HUB_OFFLINE": "0",
                   "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
        for doc in (PUSH, PUSH_PRIVATE, PUSH_BRANCH, PREDICT_HUB, PREDICT_HUB_BRANCH):
            run(dataclasses.replace(doc, env=hub_env), sandbox)
        repo = hub.repo("alice/shapes-fpn")
        assert repo.commits[-1]["summary"] == "half-way checkpoint" and repo.commits[-1]["revision"] == "iter-480"
        files = repo.files("iter-480")
        assert "metrics.json" in files, sorted(files)
        assert json.loads(files["metrics.json"])["iter"] == 2
    assert sorted(p.name for p in (sandbox / "masks").iterdir()) == ["p.png", "p_label.png"]


# -- docs/datasets.md: Cityscapes and VOC 2012 aug on tiny copies of the official layouts -----


def _cityscapes_source(key: str, split: str, labels: str) -> str:
    return (f'"data.{key}.source={{type: folder, root: data/cityscapes, images_dir: leftImg8bit/'
            f'{split}, annotations_dir: gtFine/{split}, img_suffix: _leftImg8bit.png, '
            f'seg_map_suffix: _gtFine_{labels}.png}}"')  # fmt: skip


TINY_DATASET = TINY_ADE + " data.val.num_workers=0"  # the copies' 32x64 and 24x40 images
CITYSCAPES_FOLDER = Doc(
    "accelerate launch -m hooktrain recipes/cityscapes.yaml --cfg-options "
    f"{_cityscapes_source('train', 'train', 'labelIds')} {_cityscapes_source('val', 'val', 'labelIds')}",
    append=TINY_DATASET,
)
CITYSCAPES_TRAIN_IDS = Doc(
    "accelerate launch -m hooktrain recipes/cityscapes.yaml --cfg-options data.label_map={} "
    f"{_cityscapes_source('train', 'train', 'labelTrainIds')} "
    f"{_cityscapes_source('val', 'val', 'labelTrainIds')}",
    append=TINY_DATASET,
)
VOC_FOLDER = Doc(
    'accelerate launch -m hooktrain recipes/voc12aug.yaml --cfg-options "data.train.source={type: '
    "folder, root: data/VOCdevkit/VOC2012, images_dir: JPEGImages, img_suffix: .jpg, "
    "annotations_dir: [SegmentationClass, SegmentationClassAug], split_file: "
    '[ImageSets/Segmentation/train.txt, ImageSets/Segmentation/aug.txt]}" "data.val.source={type: '
    "folder, root: data/VOCdevkit/VOC2012, images_dir: JPEGImages, img_suffix: .jpg, "
    'annotations_dir: SegmentationClass, split_file: ImageSets/Segmentation/val.txt}"',
    append=TINY_DATASET,
)


def test_dataset_page_commands_on_tiny_official_layouts(sandbox):
    from dataset_layouts import write_cityscapes_folder, write_voc_folder

    write_cityscapes_folder(sandbox / "data" / "cityscapes")
    write_voc_folder(sandbox / "data" / "VOCdevkit")
    for doc, name in ((CITYSCAPES_FOLDER, "cityscapes"), (CITYSCAPES_TRAIN_IDS, "cityscapes"),
                      (VOC_FOLDER, "voc12aug")):  # fmt: skip
        result = run(doc, sandbox)
        work_dir = sandbox / "work_dirs" / name
        assert_trained_and_evaluated(work_dir)
        assert "validation at iter 2 on" in result.output
        label_map = (work_dir / "recipe.yaml").read_text().split("label_map:", 1)[1].split("\n", 1)[0]
        assert (label_map.strip() == "{}") == (doc is not CITYSCAPES_FOLDER)
        work_dir.rename(work_dir.with_name(f"{name}-{id(doc)}"))  # each command starts afresh


# -- docs/data-check.md: checking the quickstart and a tiny ADE20K folder; colour masks ------

DATA_CHECK = Doc("hooktrain data check recipes/quickstart.yaml")
DATA_CHECK_VAL = Doc("hooktrain data check recipes/quickstart.yaml --split val --limit 50")
DATA_CHECK_ADE = Doc(
    'hooktrain data check recipes/ade20k.yaml --cfg-options "data.train.source={type: folder, '
    'root: data/ADEChallengeData2016, split: training}"'
)
CONVERT_PALETTE = Doc(
    "hooktrain data convert data/colour_dataset data/colour_dataset_parquet --palette "
    "recipes/quickstart.yaml"
)
CONVERT_PALETTE_FILE = Doc(
    "hooktrain data convert data/photos data/photos_parquet --annotations data/photo_masks "
    "--palette colours.json"
)


def _paint_colour_masks(images: Path, masks: Path, palette: np.ndarray, seed: int) -> dict:
    """Random images and RGB masks painted with ``palette``; returns {stem: class indices}."""
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    painted = {}
    for i in range(3):
        rng = np.random.default_rng([seed, i])
        index = cv2.resize(rng.integers(0, len(palette), (3, 4), dtype=np.uint8), (40, 24),
                           interpolation=cv2.INTER_NEAREST)  # fmt: skip
        cv2.imwrite(str(images / f"{i}.jpg"), rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
        cv2.imwrite(str(masks / f"{i}.png"), cv2.cvtColor(palette[index], cv2.COLOR_RGB2BGR))
        painted[f"{i}.png"] = index
    return painted


def _converted_masks(out: Path, split: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((out / "data").glob(f"{split}-*.parquet")))
    return {cell["path"]: cv2.imdecode(np.frombuffer(cell["bytes"], np.uint8), cv2.IMREAD_UNCHANGED)
            for cell in table.column("annotation").to_pylist()}  # fmt: skip


def test_data_check_page_commands(shapes_sandbox):
    from hooktrain.recipe.schema import load_recipe

    sandbox = shapes_sandbox
    for doc in (DATA_CHECK, DATA_CHECK_VAL):
        assert "Result: no problems" in run(doc, sandbox).stdout
    write_ade_challenge_folder(sandbox / "data" / "ADEChallengeData2016")
    checked = run(DATA_CHECK_ADE, sandbox).stdout
    assert "Classes (after reduce_zero_label; 150 classes" in checked
    assert "Result: no problems" in checked

    palette = np.asarray(load_recipe(ROOT / "recipes" / "quickstart.yaml").data.palette, np.uint8)
    root = sandbox / "data" / "colour_dataset"
    painted = {split: _paint_colour_masks(root / "images" / split, root / "annotations" / split,
                                          palette, seed)
               for seed, split in enumerate(("training", "validation"))}  # fmt: skip
    run(CONVERT_PALETTE, sandbox)
    for split, name in (("training", "train"), ("validation", "validation")):
        converted = _converted_masks(sandbox / "data" / "colour_dataset_parquet", name)
        assert converted.keys() == painted[split].keys()
        assert all((converted[k] == painted[split][k]).all() for k in converted)

    photos = _paint_colour_masks(sandbox / "data" / "photos", sandbox / "data" / "photo_masks",
                                 palette, 7)  # fmt: skip
    (sandbox / "colours.json").write_text(json.dumps(palette.tolist()))
    run(CONVERT_PALETTE_FILE, sandbox)
    converted = _converted_masks(sandbox / "data" / "photos_parquet", "train")
    assert all((converted[k] == photos[k]).all() for k in photos) and len(converted) == 3


# -- the inventory -------------------------------------------------------------------------

# -- docs/migrating-from-mmseg.md: bring your MMSegmentation checkpoint -----------------------

MMSEG_DOC_CONFIGS = [
    "upernet_r50_4xb4-160k_ade20k-512x512",
    "convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512",
    "swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512",
]


@pytest.fixture(scope="session")
def mmseg_doc_references(mmseg_env, tmp_path_factory) -> dict[str, Path]:
    """The zoo-format checkpoints (and logits at 97x131) of the three configs the pages' commands
    convert, built by MMSegmentation 1.2.2 (``reference.py build-all``, random weights) once per
    test run, in a directory the test workers share (under a file lock): the whole zoo that
    ``mmseg_zoo_references`` builds takes three times as long."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "mmseg_doc_references"
    with FileLock(str(shared / "mmseg_doc_references.lock")):
        if not (root / "done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            script = ROOT / "tests" / "mmseg_ref" / "reference.py"
            mmseg_env.run(script, "build-all", ",".join(MMSEG_DOC_CONFIGS), "--out", str(root), "--sizes", "97x131")
            (root / "done").touch()
    return {name: root / name for name in MMSEG_DOC_CONFIGS}


ZOO_CHECKPOINT = "upernet_r50_512x512_160k_ade20k_20200615_184328-8534de8d.pth"
ZOO_CONVERT = Doc(
    f"hooktrain convert mmseg {ZOO_CHECKPOINT} --recipe recipes/mmseg/upernet_r50_4xb4-160k_ade20k-512x512.yaml "
    "--out upernet_r50_ade20k.safetensors"
)
ZOO_PREDICT = Doc("hooktrain predict upernet_r50_ade20k.safetensors images/ --out masks/")


def test_bring_your_mmseg_checkpoint_commands(sandbox, mmseg_doc_references):
    """The zoo file here is MMSegmentation's own UPerNet-R50, built and saved in the zoo's format
    by MMSegmentation 1.2.2 (random weights): the page's two commands, as written."""
    upernet = mmseg_doc_references["upernet_r50_4xb4-160k_ade20k-512x512"]
    (sandbox / ZOO_CHECKPOINT).symlink_to(upernet / "checkpoint.pth")
    (sandbox / "images").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(sandbox / "images" / "room.jpg"), image)
    assert "converted" in run(ZOO_CONVERT, sandbox).output
    run(ZOO_PREDICT, sandbox)
    label = cv2.imread(str(sandbox / "masks" / "room_label.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (48, 64) and label.max() < 150
    assert (sandbox / "masks" / "room.png").is_file()


# -- docs/models.md: ConvNeXt and Swin as MMSegmentation has them -------------------------------

CONVNEXT_CHECKPOINT = "upernet_convnext_tiny_fp16_512x512_160k_ade20k_20220227_124553-cad485de.pth"
CONVNEXT_CONVERT = Doc(
    f"hooktrain convert mmseg {CONVNEXT_CHECKPOINT} --recipe "
    "recipes/mmseg/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.yaml "
    "--out upernet_convnext-tiny_ade20k.safetensors"
)
SWIN_CHECKPOINT = (
    "upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210531_112542-e380ad3e.pth"
)
SWIN_CONVERT = Doc(
    f"hooktrain convert mmseg {SWIN_CHECKPOINT} --recipe "
    "recipes/mmseg/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.yaml "
    "--out upernet_swin_tiny_ade20k.safetensors"
)


@pytest.mark.parametrize(
    ("command", "checkpoint", "config"),
    [
        (CONVNEXT_CONVERT, CONVNEXT_CHECKPOINT, "convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512"),
        (SWIN_CONVERT, SWIN_CHECKPOINT, "swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512"),
    ],
    ids=["convnext", "swin"],
)
def test_bring_your_mmseg_convnext_or_swin_checkpoint_command(sandbox, mmseg_doc_references, command, checkpoint,
                                                               config):  # fmt: skip
    """MMSegmentation's ConvNeXt-T (mmpretrain's backbone) and Swin-T UPerNets, built and saved by
    MMSegmentation 1.2.2 with random weights: the page's command, as written, gives its logits."""
    import torch

    from hooktrain.deploy.export import load_exported

    reference = mmseg_doc_references[config]
    (sandbox / checkpoint).symlink_to(reference / "checkpoint.pth")
    assert "converted" in run(command, sandbox).output
    model, _ = load_exported(sandbox / command.text.split("--out ")[1].split()[0])
    case = torch.load(reference / "logits.pt")["97x131"]
    with torch.no_grad():
        got = model(case["input"])
    assert ((got - case["logits"]).abs().max() / case["logits"].abs().max()).item() <= 1e-4


# -- docs/models.md: bring a segmentation_models_pytorch checkpoint ---------------------------

SMP_CONVERT = Doc(
    "hooktrain convert smp unet.pth --recipe recipes/smp/unet-tu-resnet34.yaml --out unet.safetensors "
    "--cfg-options data.num_classes=4"
)


def test_bring_your_smp_checkpoint_command(sandbox):
    """An smp ``Unet("tu-resnet34", classes=4)`` saved as its state dict: the page's command, as
    written, gives a file whose model has smp's logits."""
    import segmentation_models_pytorch as smp
    import torch

    from hooktrain.deploy.export import load_exported

    torch.manual_seed(0)
    reference = smp.Unet("tu-resnet34", encoder_weights=None, classes=4).eval()
    torch.save(reference.state_dict(), sandbox / "unet.pth")
    assert "converted" in run(SMP_CONVERT, sandbox).output
    model, _ = load_exported(sandbox / "unet.safetensors")
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = reference(image), model(image)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4


# -- docs/models.md: bring a transformers UperNet checkpoint -----------------------------------

UPERNET_CONVERT = Doc(
    "hooktrain convert transformers openmmlab/upernet-convnext-tiny --recipe "
    "recipes/transformers/upernet-convnext-tiny.yaml --out upernet-convnext-tiny.safetensors"
)


def test_bring_a_transformers_upernet_checkpoint_command(sandbox, monkeypatch):
    """transformers' UperNet ConvNeXt-T as on the Hub (random weights), served as
    ``openmmlab/upernet-convnext-tiny`` by the local Hub stand-in: the page's command, as written,
    downloads it and gives a file whose model has transformers' logits."""
    import torch
    import transformers
    from hub_server import HubServer

    from hooktrain.deploy.export import load_exported

    torch.manual_seed(0)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = transformers.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], out_features=stages)
    config = transformers.UperNetConfig(backbone_config=backbone, auxiliary_in_channels=384, num_labels=150)
    reference = transformers.UperNetForSemanticSegmentation(config).eval()
    reference.save_pretrained(sandbox / "upernet")
    with HubServer() as hub:
        hub.add("openmmlab/upernet-convnext-tiny", sandbox / "upernet", repo_type="model")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        assert "converted" in run(UPERNET_CONVERT, sandbox).output
    model, _ = load_exported(sandbox / "upernet-convnext-tiny.safetensors")
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, got = reference(pixel_values=image).logits, model(image)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4


# -- docs/models.md: bring a transformers EoMT checkpoint -------------------------------------

EOMT_CONVERT = Doc(
    "hooktrain convert transformers tue-mps/ade20k_semantic_eomt_large_512 --out eomt-large-ade20k.safetensors"
)


def test_bring_a_transformers_eomt_checkpoint_command(sandbox, monkeypatch):
    """A tiny random transformers EoMT served as ``tue-mps/ade20k_semantic_eomt_large_512`` by the
    local Hub stand-in: the page's command, as written (no recipe), gives a file whose model has
    transformers' class scores and the checkpoint's classes."""
    import torch
    import transformers

    config = transformers.EomtConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, image_size=32,
                                     patch_size=16, num_queries=5, num_blocks=2, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.EomtForUniversalSegmentation(config).eval()
    recipe = convert_from_the_stand_in(sandbox, monkeypatch, reference, "tue-mps/ade20k_semantic_eomt_large_512",
                                       EOMT_CONVERT, "eomt-large-ade20k.safetensors", (32, 32))  # fmt: skip
    assert recipe.data.num_classes == 3 and recipe.model.decode_head.num_queries == 5


# -- docs/models.md: bring a transformers Mask2Former checkpoint ------------------------------

MASK2FORMER_CONVERT = Doc(
    "hooktrain convert transformers facebook/mask2former-swin-tiny-ade-semantic "
    "--out mask2former-swin-tiny-ade.safetensors"
)


def test_bring_a_transformers_mask2former_checkpoint_command(sandbox, monkeypatch):
    """A tiny random transformers Mask2Former (Swin backbone) served as
    ``facebook/mask2former-swin-tiny-ade-semantic`` by the local Hub stand-in: the page's command,
    as written (no recipe), gives a file whose model has transformers' class scores and classes."""
    import torch
    import transformers

    swin = transformers.SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                                   out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=32, hidden_dim=32, mask_feature_size=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=3, num_attention_heads=4, num_queries=5, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    repo = "facebook/mask2former-swin-tiny-ade-semantic"
    recipe = convert_from_the_stand_in(sandbox, monkeypatch, reference, repo, MASK2FORMER_CONVERT,
                                       "mask2former-swin-tiny-ade.safetensors", (64, 96))  # fmt: skip
    assert recipe.data.num_classes == 3 and recipe.model.decode_head.type == "mask2former"


def convert_from_the_stand_in(sandbox, monkeypatch, reference, repo: str, doc: Doc, out: str, size: tuple[int, int]):
    """``reference`` (a transformers mask-classification model) saved and served as ``repo`` by the local
    Hub stand-in, converted by the page's command ``doc`` into ``out``: the file's model gives the
    reference's semantic map at ``size`` (relative 1e-4). Returns the file's recipe."""
    import torch
    from eomt_reference import semantic_map
    from hub_server import HubServer

    from hooktrain.deploy.export import load_exported

    reference.save_pretrained(sandbox / "reference")
    with HubServer() as hub:
        hub.add(repo, sandbox / "reference", repo_type="model")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        assert "converted" in run(doc, sandbox).output
    model, recipe = load_exported(sandbox / out)
    image = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = semantic_map(reference(pixel_values=image), size)
        got = model.logits(image)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    return recipe


# -- docs/benchmarks.md: the benches' smoke run (CI) and the generated tables -----------------

RUN_ALL_QUICK = Doc("python bench/run_all.py --quick")
# As the page writes it, but only checking: a test never rewrites the committed docs.
REPORT = Doc("python bench/report.py", append="--check")


# The CPU benches of `run_all.py --quick`, one test each so that the test workers share them
# (the page's command runs them one after another: ~5 minutes on 2 cores).
QUICK_BENCHES = ["startup", "checkpoint", "metrics", "data_pipeline", "augment_exactness", "runner_overhead",
                 "model_step", "mmseg_parity", "quickstart", "quickstart_binary", "onnx_inference",
                 "grad_checkpointing", "unet_vs_fpn", "mask_matching", "eomt_vs_transformers",
                 "mask2former_vs_transformers", "fsdp_memory", "tiled_predict"]  # fmt: skip


def test_the_benchmark_tables_are_current_and_every_cpu_bench_is_run_here():
    run(REPORT, ROOT)
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from run_all import BENCHES
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert QUICK_BENCHES == [bench.name for bench in BENCHES if "cpu" in bench.devices]


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK_BENCHES)
def test_benchmark_page_commands(name, mmseg_env, tmp_path):
    """``run_all.py --quick``, one bench at a time: each CPU bench runs in its quick mode
    (nothing about speed is asserted), MMSegmentation's side included, writing its results
    file with where and when it ran."""
    quick = Doc(RUN_ALL_QUICK.text, env={"HOOKTRAIN_BENCH_RESULTS": str(tmp_path)}, append=f"--only {name}")
    summary = json.loads(run(quick, ROOT, timeout=900).stdout.strip().splitlines()[-1])
    assert [entry["bench"] for entry in summary["runs"]] == [name]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["bench"] == name and record["quick"] is True
    assert record["machine"]["cpu"]["cores"] >= 1 and record["date"] and record["revision"]
    if name == "mmseg_parity":
        modes = [(row.get("reference"), row["mode"]) for row in record["rows"]]
        assert modes == [("mmseg", "train"), ("mmseg", "whole"), ("transformers", "train"), ("transformers", "whole")]
        assert all(r["ratio"] > 0 for r in record["rows"])
    if name == "data_pipeline":
        assert record["mmseg_same_outputs"] is True  # hooktrain and MMSegmentation 1.2.2 made the same crops
    if name == "mask2former_vs_transformers":  # the converted model gives transformers' scores
        assert record["scores_max_relative_difference"] <= 1e-4 and record["same_argmax"] == 1.0
    if name == "fsdp_memory":
        ddp, fsdp2 = record["runs"]
        assert (ddp["distributed_type"], fsdp2["distributed_type"]) == ("MULTI_CPU", "FSDP")
        # DDP: every rank holds the model, its gradients and AdamW's two moments (16 bytes a
        # parameter); FSDP2 shards each by rows, so the two ranks add up to DDP's one.
        assert abs(ddp["parameters"] * 16 / 2**20 - ddp["state_mib"]) < 0.1
        assert abs(sum(rank["state_mib"] for rank in fsdp2["ranks"]) - ddp["state_mib"]) < 0.1
    if name == "tiled_predict":  # every run predicted its raster; the ratios the docs quote are there
        assert all(run["ok"] for run in record["runs"]), record["runs"]
        assert all(run["tiles"] > 0 for run in record["runs"] if run["mode"] in ("tiled", "slide"))
        quoted = {"image_memory_tall_over_short", "slide_over_tiled_image_memory", "slide_largest_side_in_ram",
                  "png_whole_over_strips_memory"}  # fmt: skip
        assert quoted <= set(record), sorted(record)


# -- docs/your-own-data.md: binary, 4-band and 16-bit quickstarts ------------------------------


def _few_examples(iters: int) -> str:
    """A seconds-long run on a small generated dataset (the pages' recipes generate 2,200 images)."""
    sources = " ".join(f"data.{split}.source.{key}={value}" for split in ("train", "val")
                       for key, value in (("num_train", 16), ("num_val", 4), ("train_shards", 2)))  # fmt: skip
    return (f"--cfg-options train.max_iters={iters} schedule.warmup_iters=1 data.train.num_workers=0 "
            f"data.train.batch_size=2 hooks.0.interval={iters} hooks.1.interval={iters} hooks.2.interval={iters} "
            f"{sources}")  # fmt: skip


BINARY_QUICKSTART = Doc("python -m hooktrain recipes/quickstart_binary.yaml", append=_few_examples(4))
FOUR_BAND_QUICKSTART = Doc("python -m hooktrain recipes/quickstart_4band.yaml", append=_few_examples(2))
SIXTEEN_BIT_QUICKSTART = Doc(
    "python -m hooktrain recipes/quickstart_4band.yaml --cfg-options data.train.source.bit_depth=16 "
    "data.val.source.bit_depth=16 data.train.source.root=data/shapes_4band16 data.val.source.root=data/shapes_4band16 "
    "'data.mean=[32800,33400,30700,23100]' 'data.std=[19400,19500,19700,16100]'",
    append=_few_examples(2) + " --work-dir work_dirs/four_band_16",
)


def test_your_own_data_page_commands(sandbox):
    run(BINARY_QUICKSTART, sandbox)
    final = history(sandbox / "work_dirs" / "quickstart_binary")[-1]
    assert final["iter"] == 4 and len(final["val/per_class"]["IoU"]) == 2 and "val/fgIoU" in final
    run(FOUR_BAND_QUICKSTART, sandbox)
    assert "in_channels: 4" in (sandbox / "work_dirs" / "quickstart_4band" / "recipe.yaml").read_text()
    run(SIXTEEN_BIT_QUICKSTART, sandbox)
    assert "val/mIoU" in history(sandbox / "work_dirs" / "four_band_16")[-1]
    import pyarrow.parquet as pq

    from hooktrain.data.labels import decode_image

    shard = pq.read_table(next((sandbox / "data" / "shapes_4band16").rglob("*.parquet")))
    image = decode_image(shard.column("image")[0].as_py(), channels=4)
    assert image.dtype == np.uint16 and image.shape[2] == 4 and image.max() > 255


RUN_HERE = [
    EXPORT_BEST, PREDICT_FILES, PLUGIN_INSTALL, PLUGIN_RUN,
    CITYSCAPES_FOLDER, CITYSCAPES_TRAIN_IDS, VOC_FOLDER,
    DATA_CHECK, DATA_CHECK_VAL, DATA_CHECK_ADE, CONVERT_PALETTE, CONVERT_PALETTE_FILE,
    ZOO_CONVERT, ZOO_PREDICT, CONVNEXT_CONVERT, SWIN_CONVERT, SMP_CONVERT, UPERNET_CONVERT, EOMT_CONVERT,
    MASK2FORMER_CONVERT,
    RUN_ALL_QUICK, REPORT,
    BINARY_QUICKSTART, FOUR_BAND_QUICKSTART, SIXTEEN_BIT_QUICKSTART,
    EXPORT_ONNX, EXPORT_SAFETENSORS, PREDICT_ONNX, PREDICT_SAFETENSORS, PREDICT_SCENE,
    PUSH, PUSH_PRIVATE, PUSH_BRANCH, PREDICT_HUB, PREDICT_HUB_BRANCH,
]  # fmt: skip
