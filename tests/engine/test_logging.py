"""The logger hook end to end: console, metrics.jsonl, offline wandb and TensorBoard, resume,
two processes, and the errors a user sees when a tracker cannot start."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ENV, QUICKSTART, run_cli, run_launch, tiny
from matplotlib import colormaps
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_reader import offline_runs, read_run

from hooktrain.errors import UserError
from hooktrain.hooks import build_hooks
from hooktrain_plugins.history import HistoryFile, read_history

CLASSES = ["background", "circle", "square", "triangle", "cross"]
VAL_KEYS = {"val/aAcc", "val/mIoU", "val/mAcc", "val/mDice", "val/mFscore"}


LOGGER = (
    "{type: logger, interval: 2, log_with: [wandb, tensorboard], "
    "wandb: {project: hooktrain-tests, name: tiny, tags: [ci, shapes], group: logging}}"
)


def hooks(*extra: str) -> str:
    return f"hooks=[{LOGGER}, {{type: eval, interval: 2, num_samples: 2}}, {', '.join(extra)}]"


# The first run's hooks; the resumed run keeps them (hook states are matched by position).
FIRST_RUN_HOOKS = hooks("{type: checkpoint, interval: 2}", "{type: 'probe_hooks:LateLog'}")


def scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every event of ``tag`` in the directory's event files, in order."""
    accumulator = EventAccumulator(str(tb_dir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def expected(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["iter"], pytest.approx(r[key])) for r in records]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_root):
    """4 iterations with every sink, checkpoints at 2 and 4, and a late log at step 1."""
    work_dir = tmp_path_factory.mktemp("logging") / "run"
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(work_dir),
        "--cfg-options", *tiny(data_root, 4), FIRST_RUN_HOOKS, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return work_dir, result.stdout


def test_console_prints_progress_tables_and_summaries(first_run):
    _, stdout = first_run
    lines = stdout.splitlines()
    progress = [line for line in lines if " iter 2/4 " in line or " iter 4/4 " in line]
    assert len(progress) == 2, stdout[-3000:]
    for field in ("decode.loss_ce:", "loss:", "lr:", "time:", "data_time:", "eta:"):
        assert field in progress[0]
    assert stdout.count("validation at iter") == 2
    assert all(name in stdout for name in CLASSES)  # the per-class table
    summary = next(line for line in lines if "iter 2  val/aAcc" in line)
    assert "val/mIoU:" in summary
    assert "not sending ['probe/late'] at step 1 to wandb" in stdout
    assert "not written to metrics.jsonl" in stdout


def test_history_has_one_line_per_step_with_train_and_val(first_run):
    work_dir, _ = first_run
    records = read_history(work_dir / "metrics.jsonl")
    assert [r["iter"] for r in records] == [2, 4]  # the late step 1 was refused
    for record in records:
        assert VAL_KEYS <= record.keys()
        assert {"train/loss", "train/decode.loss_ce", "train/lr", "train/time"} <= record.keys()
        assert len(record["val/per_class"]["IoU"]) == len(CLASSES)
        assert "val/samples" not in record


def test_wandb_run_holds_config_scalars_table_and_images(first_run):
    work_dir, _ = first_run
    (run_dir,) = offline_runs(work_dir / "wandb")
    run = read_run(run_dir)
    assert (run.project, run.name, run.group) == ("hooktrain-tests", "tiny", "logging")
    assert run.tags == ["ci", "shapes"]
    assert run.config["train"]["max_iters"] == 4 and run.config["data"]["class_names"] == CLASSES
    assert run.config["hooks"][0]["type"] == "logger"

    history = read_history(work_dir / "metrics.jsonl")
    assert run.series("train/loss") == {r["iter"]: pytest.approx(r["train/loss"]) for r in history}
    assert run.series("val/mIoU") == {r["iter"]: pytest.approx(r["val/mIoU"]) for r in history}
    assert run.series("iter") == {2: 2, 4: 4}
    assert "probe/late" not in {key for row in run.history for key in row}  # the guard held
    best = max(r["val/mIoU"] for r in history)
    assert run.summary["val/mIoU"] == {"max": pytest.approx(best)}
    defined = {m.glob_name or m.name: m for m in run.metrics}
    assert defined["train/*"].step_metric == defined["val/*"].step_metric == "iter"
    assert defined["val/mIoU"].summary.max

    table_ref = run.series("val/per_class")[4]
    assert table_ref["_type"] == "table-file" and table_ref["nrows"] == len(CLASSES)
    table = json.loads((run_dir / "files" / table_ref["path"]).read_text())
    assert table["columns"][:2] == ["class", "IoU"]
    assert [row[0] for row in table["data"]] == CLASSES
    assert [row[1] for row in table["data"]] == pytest.approx(history[-1]["val/per_class"]["IoU"])

    images = run.series("val/samples")[4]
    assert images["count"] == 2 and images["captions"] == ["sample 0", "sample 1"]
    masks = images["all_masks"][0]
    assert set(masks) == {"prediction", "ground_truth"}
    image = Image.open(run_dir / "files" / images["filenames"][0])
    mask = Image.open(run_dir / "files" / masks["ground_truth"]["path"])
    assert image.size == mask.size == (32, 32)
    assert set(mask.getdata()) <= set(range(len(CLASSES))) | {255}
    labels = run.config["_wandb"]["mask/class_labels"]
    prediction_labels = next(v["value"] for k, v in labels.items() if k.endswith("prediction"))
    assert prediction_labels == {**{str(i): n for i, n in enumerate(CLASSES)}, "255": "ignore"}


def test_tensorboard_holds_the_scalars(first_run):
    work_dir, _ = first_run
    history = read_history(work_dir / "metrics.jsonl")
    tb_dir = work_dir / "tensorboard"
    assert scalars(tb_dir, "train/loss") == expected(history, "train/loss")
    assert scalars(tb_dir, "val/mIoU") == expected(history, "val/mIoU")


def test_confusion_matrix_on_disk_in_the_table_on_wandb_and_tensorboard(first_run):
    """Each evaluation's confusion matrix agrees with its metrics, and its heatmap reaches
    the work dir, wandb and TensorBoard."""
    from hooktrain.evaluation.confusion import read_confusion_csv

    work_dir, stdout = first_run
    history = {r["iter"]: r for r in read_history(work_dir / "metrics.jsonl")}
    assert "Top confusion" in stdout
    (run_dir,) = offline_runs(work_dir / "wandb")
    logged = read_run(run_dir).series("val/confusion_matrix")
    tensorboard = EventAccumulator(str(work_dir / "tensorboard"), size_guidance={"images": 0})
    tensorboard.Reload()
    tb_images = {event.step: event for event in tensorboard.Images("val/confusion_matrix")}
    for step in (2, 4):
        matrix, names = read_confusion_csv(work_dir / "confusion" / f"confusion_iter_{step}.csv")
        assert names == CLASSES and matrix.shape == (5, 5)
        per_class = history[step]["val/per_class"]
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.diag(matrix) / matrix.sum(1)
            iou = np.diag(matrix) / (matrix.sum(1) + matrix.sum(0) - np.diag(matrix))
        assert np.allclose(acc, np.array(per_class["Acc"], dtype=float), equal_nan=True)
        assert np.allclose(iou, np.array(per_class["IoU"], dtype=float), equal_nan=True)

        heatmap = np.asarray(Image.open(work_dir / "confusion" / f"confusion_iter_{step}.png").convert("RGB"))
        assert heatmap.shape == (400, 500, 3)  # 5 classes: a 5 x 4 inch figure at 100 dpi
        # Each cell is a ~60 x 60 px square of one colour (the colour bar has ~2 px per level):
        # the largest share's colour fills a whole cell.
        from hooktrain.evaluation.confusion import row_normalised

        largest = colormaps["Blues"](row_normalised(matrix).max())[:3]
        close = np.abs(heatmap.astype(int) - np.round(np.array(largest) * 255)).max(-1) <= 2
        assert close.sum() > 1500, close.sum()
        assert logged[step]["_type"] == "image-file"
        assert (logged[step]["width"], logged[step]["height"]) == (500, 400)
        assert (tb_images[step].width, tb_images[step].height) == (500, 400)


def test_resume_continues_history_wandb_run_and_tensorboard(tmp_path, first_run, data_root):
    """Resuming from iteration 2 of a run that had logged up to 4 (as if it had crashed after
    logging step 4 and before checkpointing it) logs step 4 once more, once, and goes on."""
    original, _ = first_run
    work_dir = tmp_path / "run"
    shutil.copytree(original, work_dir)
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(work_dir), "--resume", str(work_dir / "checkpoints" / "iter_2"),
        "--cfg-options", *tiny(data_root, 6), FIRST_RUN_HOOKS, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "resumed from" in result.stdout

    records = read_history(work_dir / "metrics.jsonl")
    assert [r["iter"] for r in records] == [2, 4, 6]
    assert records[0] == read_history(original / "metrics.jsonl")[0]  # kept as it was
    assert all(VAL_KEYS <= r.keys() and "train/loss" in r for r in records)

    first, second = (read_run(d) for d in offline_runs(work_dir / "wandb"))
    assert second.run_id == first.run_id  # the same wandb run continues
    assert sorted(second.series("train/loss")) == [4, 6]
    assert second.series("train/loss") == {r["iter"]: pytest.approx(r["train/loss"]) for r in records[1:]}

    # TensorBoard drops what the first process logged after the checkpoint (purge_step).
    assert scalars(work_dir / "tensorboard", "train/loss") == expected(records, "train/loss")


def test_two_processes_write_one_history_and_one_wandb_run(tmp_path, data_root):
    work_dir = tmp_path / "run"
    result = run_launch("-m", "hooktrain", str(QUICKSTART), "--work-dir", str(work_dir),
                        "--cfg-options", *tiny(data_root, 2), hooks(), port=29640)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert result.stdout.count("iter 2/2") == 1
    (run_dir,) = offline_runs(work_dir / "wandb")
    run = read_run(run_dir)
    records = read_history(work_dir / "metrics.jsonl")
    assert [r["iter"] for r in records] == [2]
    assert run.series("train/loss") == {2: pytest.approx(records[0]["train/loss"])}
    assert run.series("val/mIoU") == {2: pytest.approx(records[0]["val/mIoU"])}
    assert len(list((work_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in work_dir.iterdir() if p.name.startswith("metrics")) == ["metrics.jsonl"]


def test_wandb_without_login_is_one_clear_line(tmp_path, data_root):
    no_account = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path)}
    env = {"WANDB_MODE": "online", **no_account}
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root, 2), f"hooks=[{LOGGER}]", env=env,
    )  # fmt: skip
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "wandb login" in result.stderr and "WANDB_MODE=offline" in result.stderr
    assert "Traceback" not in result.stderr


# -- in-process: options and the history file ------------------------------------------------


def test_missing_tracker_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(UserError, match="pip install wandb"):
        build_hooks([{"type": "logger", "log_with": ["wandb"]}])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"log_with": ["tensorbord"]}, "log_with"),
        ({"wandb": {"project": "x"}}, "add log_with: \\[wandb\\]"),
        ({"log_with": ["wandb"], "wandb": {"projct": "x"}}, "projct"),
        ({"interval": 0}, r"hooks\[0\]\.interval: Input should be greater than 0"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        build_hooks([{"type": "logger", **options}])


def test_history_merges_a_step_refuses_lower_ones_and_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    history = HistoryFile(path)
    history.open(resume_iter=None)
    assert history.write(2, {"train/loss": 1.0})
    sample = {"image": np.zeros((4, 4, 3), np.uint8), "prediction": np.zeros((4, 4), np.int64)}
    assert history.write(2, {"val/mIoU": float("nan"), "val/samples": [sample], "val/n": np.int64(4)})
    assert history.write(4, {"train/loss": 0.5})
    assert not history.write(3, {"train/loss": 9.0})
    history.close()
    records = read_history(path)
    assert records == [
        {"iter": 2, "train/loss": 1.0, "val/mIoU": None, "val/n": 4},  # no images
        {"iter": 4, "train/loss": 0.5},
    ]

    with open(path, "a") as f:
        f.write('{"iter": 6, "train/lo')  # a write cut short by a kill
    resumed = HistoryFile(path)
    resumed.open(resume_iter=2)
    assert resumed.write(2, {"extra": 1})  # same step as the kept last line: merged
    assert resumed.write(4, {"train/loss": 0.4})
    resumed.close()
    assert [r["iter"] for r in read_history(path)] == [2, 4]
    assert read_history(path)[0]["extra"] == 1 and read_history(path)[1]["train/loss"] == 0.4
