"""``hooktrain plot``: curves of real runs' metrics.jsonl overlaid, and its one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import QUICKSTART, assert_refused, run_cli, tiny

from hooktrain.tools.plot import default_keys, read_history, run_labels, scalar_keys

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours (RGB)
LEGEND_PX = 50  # the legend row above the panels (plot.LEGEND_INCHES at plot.DPI)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root) -> tuple[Path, Path]:
    """Two real 4-iteration runs with different learning rates, both work dirs named ``run``."""
    root = tmp_path_factory.mktemp("plot_runs")
    work_dirs = (root / "a" / "run", root / "b" / "run")
    for work_dir, lr in zip(work_dirs, ("4e-3", "1e-3"), strict=True):
        result = run_cli(
            str(QUICKSTART), "--work-dir", str(work_dir), "--cfg-options", *tiny(data_root, 4),
            f"optimizer.lr={lr}", "hooks=[{type: logger, interval: 1}, {type: eval, interval: 2}]",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    return work_dirs


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image[..., ::-1]


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int(np.all(image == np.array(rgb, dtype=np.uint8), axis=-1).sum())


def test_default_panels_overlay_both_runs(runs, tmp_path):
    out = tmp_path / "new" / "dir" / "curves.png"  # missing parents are created
    result = run_cli("plot", *map(str, runs), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote {out}"
    # Losses (total, ce, dice), lr and the 7 scalar val metrics; not per_class, grad_norm, times.
    keys = default_keys(scalar_keys(read_history(runs[0])))
    assert keys == [
        "train/loss", "train/decode.loss_ce", "train/decode.loss_dice", "train/lr", "val/aAcc", "val/mIoU",
        "val/mAcc", "val/mDice", "val/mFscore", "val/mPrecision", "val/mRecall",
    ]  # fmt: skip
    image = read_rgb(out)
    assert image.shape == (4 * 350 + LEGEND_PX, 3 * 500, 3)  # 11 panels: 4 rows of 3, 500 x 350 px each
    panels = image[LEGEND_PX:]  # the curves themselves, not the legend's handles
    assert colour_pixels(panels, C0) > 500 and colour_pixels(panels, C1) > 500


def test_chosen_keys_on_log_axes(runs, tmp_path):
    linear, log = tmp_path / "linear.png", tmp_path / "log.png"
    for out, extra in ((linear, []), (log, ["--log-scale"])):
        result = run_cli("plot", *map(str, runs), "--keys", "train/lr", "val/mIoU", "--out", str(out), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    image = read_rgb(log)
    assert image.shape == (350 + LEGEND_PX, 2 * 500, 3)  # one row of two panels
    lr_panel = image[LEGEND_PX:, :500]  # the two runs' learning rates differ 4x: two separate curves
    assert colour_pixels(lr_panel, C0) > 100 and colour_pixels(lr_panel, C1) > 100
    assert colour_pixels(image[LEGEND_PX:, 500:], C1) > 50  # val/mIoU drawn too
    assert not np.array_equal(image, read_rgb(linear))


def test_key_missing_in_a_run_and_non_positive_values_on_log_axes(runs, tmp_path):
    other = tmp_path / "other"  # a run without val/mIoU, with a loss term that is 0 or negative
    other.mkdir()
    records = [{"iter": i, "train/loss": v, "train/aux.loss": -v, "train/lr": None} for i, v in ((1, 1.0), (2, 0.0))]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iter": 3, "tra')
    assert len(read_history(other)) == 2  # a half-written last line is left out
    out = tmp_path / "mixed.png"
    result = run_cli(
        "plot", str(runs[0]), str(other), "--keys", "val/mIoU", "train/aux.loss", "train/lr", "--log-scale",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    image = read_rgb(out)
    assert image.shape == (350 + LEGEND_PX, 3 * 500, 3)
    assert colour_pixels(image[LEGEND_PX:, :500], C0) > 50  # val/mIoU: the real run only


def test_runs_of_the_same_name_are_told_apart_by_their_parents(tmp_path):
    a, b, c = tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c" / "other"
    assert run_labels([a, b, c]) == ["a/run", "b/run", "other"]
    assert run_labels([a, a]) == [f"{a.resolve()} #1", f"{a.resolve()} #2"]


def test_unknown_key_is_refused_with_a_suggestion(runs, tmp_path):
    out = tmp_path / "x.png"
    result = run_cli("plot", *map(str, runs), "--keys", "val/miou", "--out", str(out))
    assert_refused(result, "val/miou", "did you mean 'val/mIoU'", "available: ", "train/loss")
    assert not out.exists()
    result = run_cli("plot", str(runs[0]), "--keys", "val/per_class", "--out", str(out))
    assert_refused(result, "val/per_class", "not numbers")


def test_work_dir_without_history_and_bad_out_are_refused(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("plot", str(runs[0]), str(empty), "--out", str(tmp_path / "x.png"))
    assert_refused(result, f"{empty / 'metrics.jsonl'} not found", "is this a hooktrain work dir?")
    (empty / "metrics.jsonl").write_text("")
    assert_refused(run_cli("plot", str(empty), "--out", str(tmp_path / "x.png")), "no logged steps")
    result = run_cli("plot", str(runs[0]), "--out", str(tmp_path / "x.jpg"))
    assert_refused(result, "x.jpg", ".png")
