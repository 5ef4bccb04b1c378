"""The early_stop hook: the rule, real tiny runs that stop early, resume, and recipe refusals.

The runs are made deterministic with ``min_delta: 1.0`` on mIoU: only the first evaluation
can improve it (from nothing), so with evaluations every 2 iterations and ``patience: P`` a
run stops after iteration ``2 + 2 * P``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import QUICKSTART, assert_refused, run_cli, tiny

from hooktrain.checkpoint.resume import checkpoint_problems
from hooktrain.errors import UserError
from hooktrain_plugins.early_stop import EarlyStopHook


def hooks(patience: int, *extra: str) -> str:
    early = ", ".join([f"patience: {patience}", "min_delta: 1.0", *extra])
    return (
        "hooks=[{type: logger, interval: 2}, {type: checkpoint, interval: 100}, "
        f"{{type: eval, interval: 2, num_samples: 0, confusion: false}}, {{type: early_stop, {early}}}]"
    )


def train(work_dir: Path, data_root: Path, iters: int, patience: int, *args: str):
    return run_cli(
        str(QUICKSTART), "--work-dir", str(work_dir),
        "--cfg-options", *tiny(data_root, iters), hooks(patience), *args,
    )  # fmt: skip


def checkpoints(work_dir: Path) -> dict[str, float]:
    """Each checkpoint's name and the time its train state was written."""
    root = work_dir / "checkpoints"
    return {p.name: (p / "train_state.json").stat().st_mtime_ns for p in sorted(root.glob("iter_*"))}


def history_iters(work_dir: Path) -> list[int]:
    return [json.loads(line)["iter"] for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def early_stop_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "hooks.pt", weights_only=True)["early_stop"]


# -- the rule, without training -----------------------------------------------------------


class FakeRunner:
    def __init__(self) -> None:
        self.state = SimpleNamespace(iter=0)
        self.accelerator = SimpleNamespace(is_main_process=True)
        self.hooks: list = []
        self.finished: list[str] = []

    def request_finish(self, reason: str) -> None:
        self.finished.append(reason)

    def evaluate(self, hook: EarlyStopHook, iteration: int, value: float) -> None:
        self.state.iter = iteration
        hook.after_val(self, {"mIoU": value, "loss": value})


@pytest.mark.parametrize(
    "rule, min_delta, values, counts",
    [
        ("greater", 0.0, [0.5, 0.5, 0.6, 0.4], [0, 1, 0, 1]),  # equal is no improvement
        ("greater", 0.1, [0.5, 0.55, 0.59, 0.61], [0, 1, 2, 0]),  # must beat the best by more than 0.1
        ("less", 0.0, [2.0, 1.5, 1.5, 3.0], [0, 0, 1, 2]),
        ("less", 0.5, [2.0, 1.6, 1.4, 1.0], [0, 1, 0, 1]),
        ("greater", 0.0, [math.nan, 0.1, math.nan, 0.2], [1, 0, 1, 0]),  # NaN never improves
        ("less", 0.0, [1.0, math.nan, math.nan, 0.5], [0, 1, 2, 0]),
    ],
)
def test_rule_counts_evaluations_without_improvement(rule, min_delta, values, counts):
    hook = EarlyStopHook(key="mIoU", rule=rule, patience=10, min_delta=min_delta)
    runner = FakeRunner()
    seen = []
    for i, value in enumerate(values):
        runner.evaluate(hook, 100 * (i + 1), value)
        seen.append(hook.count)
    assert seen == counts
    assert runner.finished == []
    assert hook.best_value is None or not math.isnan(hook.best_value)


def test_patience_reached_requests_finish_and_state_round_trips():
    hook = EarlyStopHook(key="loss", rule="less", patience=2, min_delta=0.0)
    runner = FakeRunner()
    for iteration, value in [(10, 1.0), (20, 0.8), (30, 0.9)]:
        runner.evaluate(hook, iteration, value)
    assert runner.finished == []
    runner.evaluate(hook, 40, math.nan)
    assert runner.finished == [
        "early stop: val loss did not improve by more than 0.0 for 2 evaluations; best 0.8000 at iteration 20"
    ]
    state = hook.state_dict()
    assert state == {"key": "loss", "rule": "less", "best_value": 0.8, "best_iter": 20, "count": 2}

    same = EarlyStopHook(key="loss", rule="less", patience=2)
    same.load_state_dict(state)
    resumed = FakeRunner()
    same.before_run(resumed)  # resumed after it stopped: stops again at once
    assert len(resumed.finished) == 1 and "resumed after it had stopped early" in resumed.finished[0]

    larger = EarlyStopHook(key="loss", rule="less", patience=3)
    larger.load_state_dict(state)
    resumed = FakeRunner()
    larger.before_run(resumed)
    assert resumed.finished == [] and larger.count == 2
    resumed.evaluate(larger, 50, 0.85)
    assert resumed.finished and "for 3 evaluations; best 0.8000 at iteration 20" in resumed.finished[0]

    other_key = EarlyStopHook(key="mIoU", patience=2)
    other_key.load_state_dict(state)  # another metric: counting starts over
    assert other_key.count == 0 and other_key.best_value is None


# -- real runs ------------------------------------------------------------------------------


def test_stops_after_patience_saves_final_checkpoint_and_resumes(tmp_path, data_root):
    work_dir = tmp_path / "run"
    result = train(work_dir, data_root, 20, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "early stop: val mIoU did not improve by more than 1.0 for 2 evaluations; best " in result.stdout, (
        result.stdout[-3000:]
    )
    assert " at iteration 2; stopping after iteration 6" in result.stdout
    assert "iter 7/" not in result.stdout
    saved = checkpoints(work_dir)
    assert list(saved) == ["iter_6"]
    assert checkpoint_problems(work_dir / "checkpoints" / "iter_6") == []
    assert (work_dir / "checkpoints" / "latest").read_text().strip() == "iter_6"
    assert early_stop_state(work_dir / "checkpoints" / "iter_6")["count"] == 2
    assert history_iters(work_dir)[-1] == 6

    # Resumed with the same patience: stops again at once, nothing trained, nothing saved.
    again = train(work_dir, data_root, 20, 2, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after it had stopped early" in again.stdout, again.stdout[-3000:]
    assert "stopping at iteration 6 without training" in again.stdout
    assert "iter 7/" not in again.stdout
    assert checkpoints(work_dir) == saved
    assert history_iters(work_dir)[-1] == 6

    # Resumed with a larger patience: goes on from the saved count (2), stops after one more evaluation.
    larger = train(work_dir, data_root, 20, 3, "--resume")
    assert larger.returncode == 0, larger.stderr[-3000:]
    assert "for 3 evaluations; best " in larger.stdout and "stopping after iteration 8" in larger.stdout
    assert list(checkpoints(work_dir)) == ["iter_6", "iter_8"]
    assert history_iters(work_dir)[-1] == 8


def test_count_survives_resume(tmp_path, data_root):
    work_dir = tmp_path / "run"
    first = train(work_dir, data_root, 4, 3)  # evaluations at 2 (best) and 4 (count 1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "early stop: val mIoU" in first.stdout and "for 1 of 3 evaluations" in first.stdout
    assert "stopping" not in first.stdout
    state = early_stop_state(work_dir / "checkpoints" / "iter_4")
    assert (state["key"], state["rule"], state["best_iter"], state["count"]) == ("mIoU", "greater", 2, 1)
    assert 0 <= state["best_value"] <= 1

    resumed = train(work_dir, data_root, 20, 3, "--resume")  # counts 2 at 6, 3 at 8: stops at 8, not 10
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "for 3 evaluations; best " in resumed.stdout and " at iteration 2; stopping after iteration 8" in resumed.stdout
    )
    assert list(checkpoints(work_dir)) == ["iter_4", "iter_8"]
    assert checkpoint_problems(work_dir / "checkpoints" / "iter_8") == []
    assert history_iters(work_dir)[-1] == 8


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hook_list, fragments",
    [
        ("[{type: logger}, {type: early_stop}]", ["early_stop hook", "no eval hook", "{type: eval"]),
        (
            "[{type: eval}, {type: early_stop, key: mIOU}]",
            ["early_stop hook", "key 'mIOU'", "did you mean 'mIoU'"],
        ),
        ("[{type: eval}, {type: early_stop, patience: 0}]", ["hooks[1].patience", "greater than or equal to 1"]),
        ("[{type: eval}, {type: early_stop, key: loss}]", ["key 'loss'", "loss: true"]),
        ("[{type: eval, loss: true}, {type: early_stop, key: loss}]", ["key 'loss' is a loss", "rule: less"]),
    ],
)
def test_bad_recipes_are_refused_before_anything_is_written(tmp_path, hook_list, fragments):
    work_dir = tmp_path / "run"
    result = run_cli(str(QUICKSTART), "--work-dir", str(work_dir), "--cfg-options", f"hooks={hook_list}")
    assert_refused(result, *fragments)
    assert not work_dir.exists()


def test_options_checked_when_built_in_python():
    with pytest.raises(UserError, match="patience must be at least 1"):
        EarlyStopHook(patience=0)
