"""Bad input costs no work: hook option ranges, plugins that import without torch, the early
check of the validation split, `data convert`'s mask checks, `predict` never overwriting its
inputs, and one line per undecodable example (issue 16)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ENV, QUICKSTART, assert_refused, cli, export_untrained, run_cli, tiny, tree_digest

SHAPES_CLASSES = 5  # recipes/_base_/datasets/shapes.yaml
EVAL_HOOK = 2  # the eval hook's index in recipes/quickstart.yaml's hooks


def png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def random_image(height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def label_mask(height: int = 32, width: int = 32, value: int = 1) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[: height // 2] = value
    return mask


# -- 1. built-in plugins import without torch ------------------------------------------------


def test_builtin_plugins_import_without_torch_timm_or_datasets():
    modules = ["evaluation", "logger", "checkpoint", "history", "trackers"]
    code = (
        f"import sys, {', '.join(f'hooktrain_plugins.{m}' for m in modules)}\n"
        "heavy = [m for m in ('torch', 'timm', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


# -- 2. value ranges of the built-in hooks' options ------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5"])
def test_config_refuses_an_eval_interval_below_one(value):
    result = run_cli("config", str(QUICKSTART), "--cfg-options", f"hooks.{EVAL_HOOK}.interval={value}")
    assert_refused(result, f"hooks[{EVAL_HOOK}].interval", "greater than 0", f"got {value}")


@pytest.mark.parametrize(
    ("hook", "options", "key"),
    [
        ("eval", {"interval": 0}, "interval"),
        ("eval", {"beta": 0}, "beta"),
        ("eval", {"num_samples": -1}, "num_samples"),
        ("eval", {"nan_to_num": float("inf")}, "nan_to_num"),
        ("eval", {"best_key": ""}, "best_key"),
        ("checkpoint", {"interval": -5}, "interval"),
        ("checkpoint", {"max_keep": 0}, "max_keep"),
        ("checkpoint", {"save_best": ""}, "save_best"),
        ("logger", {"interval": 0}, "interval"),
    ],
)
def test_hook_options_out_of_range_are_refused(hook, options, key):
    from hooktrain.errors import UserError
    from hooktrain.hooks import resolve_hook_class, validate_hook_options

    with pytest.raises(UserError, match=rf"^hooks\[0\]\.{key}: "):
        validate_hook_options(resolve_hook_class(hook), options, "hooks[0]")


@pytest.mark.parametrize(
    ("hook", "options"),
    [
        ("eval", {"interval": 1, "num_samples": 0, "beta": 0.5, "nan_to_num": 0.0}),
        ("checkpoint", {"interval": 1, "max_keep": None}),
        ("checkpoint", {"max_keep": 1, "save_best": "mIoU"}),
        ("logger", {"interval": 1}),
    ],
)
def test_hook_options_at_the_edge_of_their_range_are_accepted(hook, options):
    from hooktrain.hooks import resolve_hook_class, validate_hook_options

    validated = validate_hook_options(resolve_hook_class(hook), options, "hooks[0]")
    assert {k: validated[k] for k in options} == options


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["hooks=[{type: eval, best_key: mIOU}]"], ["best_key 'mIOU' is not a computed metric", "did you mean 'mIoU'"]),
        (
            ["hooks=[{type: eval}, {type: checkpoint, save_best: mDice}]"],
            ["save_best is 'mDice'", "best_key is 'mIoU'"],
        ),
        (["hooks=[{type: checkpoint, save_best: mIoU}]"], ["needs an eval hook"]),
        (["hooks=[{type: eval}]", "data.val=null"], ["eval hook: the recipe has no data.val section"]),
    ],
    ids=["unknown-best-key", "save-best-is-not-best-key", "save-best-without-eval", "eval-without-val-data"],
)
def test_config_refuses_hooks_that_cannot_work_with_the_recipe(options, fragments):
    result = run_cli("config", str(QUICKSTART), "--cfg-options", *options)
    assert_refused(result, *fragments)


# -- 3. the eval hook checks the validation split before the first iteration -----------------


def write_split(root: Path, split: str, shards: list[list[tuple[str, bytes, bytes]]]) -> str:
    """Parquet shards ``root/data/<split>-*.parquet`` of ``(name, image bytes, mask bytes)``
    rows, one list per shard; returns their glob."""
    from hooktrain.data.parquet import write_image_shard

    (root / "data").mkdir(parents=True, exist_ok=True)
    for index, rows in enumerate(shards):
        columns = {
            "image": [{"bytes": image, "path": name} for name, image, _ in rows],
            "annotation": [{"bytes": mask, "path": name} for name, _, mask in rows],
        }
        path = root / "data" / f"{split}-{index:05d}-of-{len(shards):05d}.parquet"
        write_image_shard(path, columns, row_group_size=len(rows))
    return str(root / "data" / f"{split}-*.parquet")


def good_row(name: str, seed: int = 0) -> tuple[str, bytes, bytes]:
    return name, png(random_image(seed=seed)), png(label_mask())


def train_until_refused(work_dir: Path, data_root: Path, *options: str) -> subprocess.CompletedProcess:
    """Start a 2-iteration quickstart run that evaluates only at its end."""
    hooks = "hooks=[{type: logger, interval: 1}, {type: eval, interval: 100, num_samples: 0}]"
    return run_cli(str(QUICKSTART), "--work-dir", str(work_dir), "--cfg-options",
                   *tiny(data_root, 2), hooks, *options, env=ENV)  # fmt: skip


@pytest.mark.parametrize(
    ("bad_mask", "fragments"),
    [
        (png(label_mask(value=7)), ["values [7] fall outside [0, 5)"]),
        (png(np.dstack([label_mask(value=v) for v in (1, 2, 3)])), ["the annotation has shape (32, 32, 3)"]),
    ],
    ids=["label-out-of-range", "rgb-mask"],
)
def test_a_bad_validation_mask_stops_the_run_before_the_first_iteration(tmp_path, data_root, bad_mask, fragments):
    # The bad example opens the second shard: only the first example of each shard is read.
    val = write_split(tmp_path / "val", "validation", [
        [good_row("good0.png", 0), good_row("good1.png", 1)],
        [("bad.png", png(random_image(seed=2)), bad_mask), good_row("good2.png", 3)],
    ])  # fmt: skip
    source = f"data.val.source={{type: parquet, data_files: '{val}'}}"
    result = train_until_refused(tmp_path / "run", data_root, source)
    assert_refused(result, "hook 'eval' (check_run)", "bad.png", *fragments)
    assert "iter 1/" not in result.stdout + result.stderr  # no training step ran
    assert not (tmp_path / "run").exists()  # found before the work dir was made


def test_an_undecodable_validation_image_with_max_corrupt_0_stops_the_run_early(tmp_path, data_root):
    val = write_split(tmp_path / "val", "validation", [
        [("broken.png", b"not an image", png(label_mask())), good_row("good.png")],
    ])  # fmt: skip
    source = f"data.val.source={{type: parquet, data_files: '{val}'}}"
    result = train_until_refused(tmp_path / "run", data_root, "data.max_corrupt=0", source)
    assert_refused(result, "broken.png", "data.max_corrupt")
    assert "iter 1/" not in result.stdout + result.stderr
    assert "of at most 0" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_the_validation_check_reads_one_example_per_shard_and_a_folder_as_one(tmp_path):
    from hooktrain.recipe.data import DataConfig
    from hooktrain.evaluation.validation import check_val_data

    val = write_split(tmp_path / "val", "validation", [
        [good_row("a.png"), ("late_bad.png", png(random_image()), png(label_mask(value=9)))],
        [good_row("b.png", 1)],
    ])  # fmt: skip
    folder = tmp_path / "folder"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i, value in enumerate((1, 9)):  # the folder's second pair is bad: not checked early
        cv2.imwrite(str(folder / "images" / f"{i}.png"), random_image(seed=i))
        cv2.imwrite(str(folder / "masks" / f"{i}.png"), label_mask(value=value))
    for source in ({"type": "parquet", "data_files": val},
                   {"type": "folder", "images_dir": str(folder / "images"),
                    "annotations_dir": str(folder / "masks")}):  # fmt: skip
        cfg = DataConfig.model_validate({
            "num_classes": SHAPES_CLASSES,
            "train": {"source": source},
            "val": {"source": source, "pipeline": {"scale": [64, 32]}},
        })  # fmt: skip
        check_val_data(cfg)  # the bad examples are not the first of a shard


# -- 4. data convert refuses what training refuses --------------------------------------------


def write_pairs(root: Path, masks: dict[str, np.ndarray | bytes], image_shape=(32, 32)) -> tuple[Path, Path]:
    """``images/<name>.jpg`` and ``masks/<name>.png`` for each mask (bytes are written as is)."""
    images, annotations = root / "images", root / "masks"
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    for i, (name, mask) in enumerate(masks.items()):
        cv2.imwrite(str(images / f"{name}.jpg"), random_image(*image_shape, seed=i))
        (annotations / f"{name}.png").write_bytes(mask if isinstance(mask, bytes) else png(mask))
    return images, annotations


RED_GREEN = "[[0, 0, 0], [255, 0, 0], [0, 255, 0]]"


@pytest.mark.parametrize(
    ("bad", "palette", "fragments"),
    [
        (np.dstack([label_mask(value=v) for v in (1, 2, 3)]), False, ["shape (32, 32, 3)", "--palette"]),
        (label_mask(value=7), True, ["holds class indices [7]", "has 3 colours"]),
        (label_mask(16, 32), False, ["is 32x32 but its annotation", "is 16x32"]),
        (b"\x89PNG\r\n\x1a\n truncated", False, ["could not be decoded"]),
    ],
    ids=["rgb-mask", "label-beyond-palette", "size-mismatch", "undecodable-mask"],
)
@pytest.mark.parametrize("out_exists", [True, False], ids=["existing-out", "new-out"])
def test_convert_refuses_a_mask_training_refuses_and_leaves_out_as_it_was(
    tmp_path, capsys, bad, palette, fragments, out_exists
):
    # Two good pairs first, one shard each: they would be written before the bad one is read.
    images, masks = write_pairs(tmp_path / "raw", {"a": label_mask(), "b": label_mask(value=2), "z_bad": bad})
    out = tmp_path / "out"
    if out_exists:
        (out / "data").mkdir(parents=True)
        (out / "README.md").write_text("mine\n")
    (tmp_path / "colours.json").write_text(RED_GREEN)
    before, parent_before = tree_digest(out), tree_digest(tmp_path)
    extra = ["--palette", tmp_path / "colours.json"] if palette else []
    result = cli(capsys, "data", "convert", images, out, "--annotations", masks, "--shards", 3, *extra)
    assert_refused(result, "z_bad", *fragments)
    assert tree_digest(out) == before and tree_digest(tmp_path) == parent_before
    assert out.exists() == out_exists


def test_convert_of_a_broken_png_prints_only_its_error_line(tmp_path):
    """OpenCV's own decoder messages would be more lines on stderr (the real CLI, not capsys)."""
    images, masks = write_pairs(tmp_path / "raw", {"a": label_mask(), "bad": b"\x89PNG\r\n\x1a\n truncated"})
    result = run_cli("data", "convert", str(images), str(tmp_path / "out"), "--annotations", str(masks))
    assert_refused(result, "bad.png", "could not be decoded")
    assert not (tmp_path / "out").exists()


def test_convert_still_writes_valid_index_and_palette_masks(tmp_path, capsys):
    images, masks = write_pairs(tmp_path / "raw", {"a": label_mask(), "b": label_mask(value=2)})
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[:16] = (0, 0, 255)  # red in OpenCV's BGR: class 1 of the palette
    cv2.imwrite(str(masks / "b.png"), colour)
    (tmp_path / "colours.json").write_text(RED_GREEN)
    result = cli(capsys, "data", "convert", images, tmp_path / "out", "--annotations", masks,
                 "--palette", tmp_path / "colours.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"
    ]  # fmt: skip
    assert not list(tmp_path.glob(".hooktrain-convert-*"))  # the staging directory is gone


# -- 5. predict never overwrites an input ------------------------------------------------------


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> Path:
    """A quickstart model (untrained weights) exported with `hooktrain export`."""
    return export_untrained(QUICKSTART, tmp_path_factory.mktemp("exported"), "data.val.pipeline.scale=[64,32]")


@pytest.mark.parametrize(
    "names",
    [["a.png", "b.jpg"], ["a.jpg", "a_label.png"]],
    ids=["colour-png-is-an-input", "label-png-is-an-input"],
)
def test_predict_refuses_to_overwrite_an_input_image(tmp_path, exported_model, names):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(names):
        cv2.imwrite(str(images / name), random_image(seed=i))
    before = tree_digest(images)
    result = run_cli("predict", str(exported_model), str(images), "--out", str(images))
    assert_refused(result, "would overwrite the input image", "--out")
    assert tree_digest(images) == before


def test_predict_writes_into_an_input_directory_when_no_name_collides(tmp_path, exported_model):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(["a.jpg", "b.jpg"]):
        cv2.imwrite(str(images / name), random_image(24, 40, seed=i))
    inputs = tree_digest(images)
    result = run_cli("predict", str(exported_model), str(images), "--out", str(images))
    assert result.returncode == 0, result.stderr[-3000:]
    after = tree_digest(images)
    assert {k: after[k] for k in inputs} == inputs  # the inputs are untouched
    assert sorted(after) == ["a.jpg", "a.png", "a_label.png", "b.jpg", "b.png", "b_label.png"]


# -- 6. undecodable examples: named once, and max_corrupt: 0 is one error line ----------------


def corrupt_source(tmp_path: Path) -> str:
    rows = [good_row("ok0.png", 0), ("broken.png", b"not an image", png(label_mask())), good_row("ok1.png", 1)]
    return write_split(tmp_path, "train", [rows])


def data_config(train_glob: str, **data):
    from hooktrain.recipe.data import DataConfig

    pipeline = {"scale": [32, 32], "ratio_range": [1.0, 1.0], "crop_size": [32, 32], "photometric": False}
    return DataConfig.model_validate({
        "num_classes": SHAPES_CLASSES,
        "train": {"source": {"type": "parquet", "data_files": train_glob}, "batch_size": 2,
                  "num_workers": 0, "shuffle_buffer": 3, "pipeline": pipeline},
        **data,
    })  # fmt: skip


def test_the_corrupt_example_warning_names_the_example_once(tmp_path, caplog):
    from hooktrain.data import build_train_stream

    stream = build_train_stream(data_config(corrupt_source(tmp_path), max_corrupt=1), seed=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # two passes over the three rows: the second pass skips it silently
            next(stream)
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].count("broken.png") == 1 and "(1 of at most 1)" in warnings[0]


def test_max_corrupt_0_is_one_error_naming_the_example_without_a_warning(tmp_path, caplog):
    from hooktrain.data import build_train_stream
    from hooktrain.errors import UserError

    stream = build_train_stream(data_config(corrupt_source(tmp_path), max_corrupt=0), seed=0)
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as error:
        next(stream)
        next(stream)
    message = str(error.value)
    assert message.count("broken.png") == 1 and "could not be decoded" in message
    assert "data.max_corrupt" in message and "\n" not in message
    assert not [r for r in caplog.records if "undecodable" in r.getMessage()]
