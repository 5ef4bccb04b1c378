"""Requeue-safe ``--resume``: a first start and a start after a kill before the first save
train from iteration 0; damaged checkpoints are named and passed over (auto) or refused
(PATH). Checked on a real checkpoint, and end to end through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hooktrain.checkpoint_check import checkpoint_problems
from test_checkpoint import assert_bitwise_equal, checkpoints, run, train_command, weights
from test_train import tiny

HOOKS = "hooks=[{type: logger, interval: 1}, {type: checkpoint, interval: 2}]"


def args(data_root: Path) -> list[str]:
    return ["--cfg-options", *tiny(data_root, 4), HOOKS]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume_shapes") / "shapes"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    """A 4-iteration run without --resume, saving iter_2 and iter_4."""
    work_dir = tmp_path_factory.mktemp("resume_reference") / "run"
    result = run(train_command(work_dir, *args(data_root)))
    assert result.returncode == 0, result.output[-4000:]
    return work_dir


def copy_run(reference: Path, tmp_path: Path) -> Path:
    work_dir = tmp_path / "run"
    shutil.copytree(reference, work_dir)
    return work_dir


def truncate(file: Path, keep: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:keep])


# -- checking a checkpoint ---------------------------------------------------------------


def test_a_whole_checkpoint_has_no_problems_and_each_damage_is_named(reference, tmp_path):
    checkpoint = copy_run(reference, tmp_path) / "checkpoints" / "iter_4"
    assert checkpoint_problems(checkpoint) == []
    size = (checkpoint / "model.safetensors").stat().st_size

    truncate(checkpoint / "model.safetensors", size // 2)
    truncate(checkpoint / "optimizer.bin", 100)
    (checkpoint / "data_state_rank0.pt").unlink()
    (checkpoint / "hooks.pt").write_bytes(b"")
    problems = checkpoint_problems(checkpoint)
    assert problems[0].startswith(f"model.safetensors is truncated ({size // 2:,} of ")
    assert problems[0].endswith(f"{size:,} bytes)")
    assert "optimizer.bin is truncated or not a torch file (100 bytes)" in problems
    assert "data_state_rank0.pt is missing" in problems
    assert "hooks.pt is empty" in problems

    state = json.loads((checkpoint / "train_state.json").read_text())
    (checkpoint / "train_state.json").write_text(json.dumps({**state, "world_size": 2}))
    assert "random_states_1.pkl is missing" in checkpoint_problems(checkpoint)
    (checkpoint / "train_state.json").write_text("{not json")
    assert checkpoint_problems(checkpoint) == [
        "train_state.json is not valid (JSON with iter and world_size)"
    ]
    (checkpoint / "train_state.json").unlink()
    assert checkpoint_problems(checkpoint) == ["train_state.json is missing"]


# -- through the CLI ---------------------------------------------------------------------


def test_resume_on_a_first_start_trains_from_zero_like_a_plain_run(reference, data_root, tmp_path):
    work_dir = tmp_path / "never_started"
    result = run(train_command(work_dir, "--resume", *args(data_root)))
    assert result.returncode == 0, result.output[-4000:]
    line = (
        f"--resume: no complete checkpoint in {work_dir / 'checkpoints'}; starting from iteration 0"
    )
    assert result.stdout.count("--resume:") == 1 and line in result.stdout
    assert_bitwise_equal(weights(work_dir / "checkpoints" / "iter_4"),
                         weights(reference / "checkpoints" / "iter_4"))  # fmt: skip


def test_resume_after_a_kill_before_the_first_save_starts_from_zero(reference, data_root, tmp_path):
    work_dir = tmp_path / "killed"
    (work_dir / "checkpoints" / ".tmp-iter_2").mkdir(parents=True)  # what kill -9 mid-save leaves
    (work_dir / "recipe.yaml").write_text((reference / "recipe.yaml").read_text())
    result = run(train_command(work_dir, "--resume", *args(data_root)))
    assert result.returncode == 0, result.output[-4000:]
    assert "starting from iteration 0" in result.stdout
    assert "removed .tmp-iter_2, left by an interrupted save" in result.stdout
    assert_bitwise_equal(weights(work_dir / "checkpoints" / "iter_4"),
                         weights(reference / "checkpoints" / "iter_4"))  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda c: truncate(c / "model.safetensors", 1000), "model.safetensors is truncated"),
        (lambda c: (c / "train_state.json").unlink(), "train_state.json is missing"),
    ],
    ids=["truncated-weights", "no-train-state"],
)
def test_auto_resume_passes_over_a_damaged_newest_checkpoint(reference, data_root, tmp_path,
                                                             damage, named):  # fmt: skip
    work_dir = copy_run(reference, tmp_path)
    damage(work_dir / "checkpoints" / "iter_4")
    result = run(train_command(work_dir, "--resume", *args(data_root)))
    assert result.returncode == 0, result.output[-4000:]
    warnings = [line for line in result.stdout.splitlines() if "--resume:" in line]
    assert len(warnings) == 1 and f"--resume: iter_4 is damaged ({named}" in warnings[0]
    assert warnings[0].endswith("; resuming from iter_2"), warnings
    # Training iterations 3 and 4 again from iter_2 gives the uninterrupted run's weights.
    assert_bitwise_equal(weights(work_dir / "checkpoints" / "iter_4"),
                         weights(reference / "checkpoints" / "iter_4"))  # fmt: skip


def test_resume_path_to_a_damaged_checkpoint_is_one_line_exit_2(reference, data_root, tmp_path):
    work_dir = copy_run(reference, tmp_path)
    damaged = work_dir / "checkpoints" / "iter_2"
    truncate(damaged / "optimizer.bin", 10)
    before = checkpoints(work_dir)
    result = run(train_command(work_dir, "--resume", str(damaged), *args(data_root)))
    assert result.returncode == 2, result.output[-4000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hooktrain: error: --resume {damaged}: ")
    assert "optimizer.bin is truncated or not a torch file (10 bytes)" in lines[0]
    assert checkpoints(work_dir) == before


def test_resume_path_to_a_missing_checkpoint_stays_an_error(tmp_path):
    from hooktrain.checkpoint_check import choose_resume
    from hooktrain.errors import UserError

    missing = tmp_path / "checkpoints" / "iter_7"
    with pytest.raises(UserError, match=r"iter_7: not a whole hooktrain checkpoint: it does not exist"):
        choose_resume(tmp_path, str(missing))
