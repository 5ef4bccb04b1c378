"""Requeue-safe ``--resume``: a first start and a start after a kill before the first save
train from iteration 0; damaged checkpoints are named and passed over (``--resume`` alone) or
refused (``--resume PATH``). Checked on a real checkpoint, then end to end through the CLI
(the tests named ``test_cli_*``)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from checkpoint_runs import assert_bitwise_equal, checkpoints, run, train_command, weights
from conftest import tiny

from hooktrain.checkpoint.resume import checkpoint_problems, choose_resume
from hooktrain.checkpoint.state import expected_files
from hooktrain.errors import UserError

HOOKS = "hooks=[{type: logger, interval: 1}, {type: checkpoint, interval: 2}]"


def args(data_root: Path) -> list[str]:
    return ["--cfg-options", *tiny(data_root, 4), HOOKS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    """A 4-iteration run without --resume, saving iter_2 and iter_4."""
    work_dir = tmp_path_factory.mktemp("resume_reference") / "run"
    result = run(train_command(work_dir, *args(data_root)))
    assert result.returncode == 0, result.output[-4000:]
    assert checkpoints(work_dir) == ["iter_2", "iter_4", "latest"]
    return work_dir


@pytest.fixture
def work_dir(reference, tmp_path) -> Path:
    """A copy of the reference run's work dir, to damage."""
    return Path(shutil.copytree(reference, tmp_path / "run"))


@pytest.fixture
def checkpoint(reference, tmp_path) -> Path:
    """A copy of the reference run's last checkpoint, to damage."""
    return Path(shutil.copytree(reference / "checkpoints" / "iter_4", tmp_path / "iter_4"))


@pytest.fixture
def log_lines() -> list[str]:
    """The messages logged to the ``hooktrain`` logger during the test."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(f"{record.levelname} {record.getMessage()}")
    logger = logging.getLogger("hooktrain")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def truncate(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


def set_train_state(checkpoint: Path, **changes) -> None:
    state = json.loads((checkpoint / "train_state.json").read_text())
    (checkpoint / "train_state.json").write_text(json.dumps({**state, **changes}))


# -- checking a checkpoint ---------------------------------------------------------------


def test_a_whole_checkpoint_has_no_problems(reference):
    checkpoint = reference / "checkpoints" / "iter_4"
    checkpoint_problems(checkpoint)  # warm the page cache, as the runner finds it after a save
    start = time.perf_counter()
    assert checkpoint_problems(checkpoint) == []
    elapsed = time.perf_counter() - start
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    print(f"checked {size / 1e6:.1f} MB in {elapsed * 1e3:.1f} ms")  # not asserted: shared CPUs


@pytest.mark.parametrize("name", ["train_state.json", *expected_files(1)])
def test_each_missing_file_is_named(checkpoint, name):
    (checkpoint / name).unlink()
    assert checkpoint_problems(checkpoint) == [f"{name} is missing"]


@pytest.mark.parametrize("name", expected_files(1))
def test_each_empty_file_is_named(checkpoint, name):
    (checkpoint / name).write_bytes(b"")
    assert checkpoint_problems(checkpoint) == [f"{name} is empty"]


def test_truncated_weights_say_how_much_is_there(checkpoint):
    file = checkpoint / "model.safetensors"
    size = file.stat().st_size
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    truncate(file, size // 2)
    assert checkpoint_problems(file.parent) == [
        f"model.safetensors is truncated ({size // 2:,} of {size:,} bytes)"
    ]
    truncate(file, 1000)
    assert checkpoint_problems(file.parent) == [
        f"model.safetensors is truncated (1,000 bytes, less than its {header:,}-byte header)"
    ]
    truncate(file, 5)
    assert checkpoint_problems(file.parent) == ["model.safetensors is truncated (5 bytes)"]


def test_weights_that_are_not_safetensors_or_too_long_are_named(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data + b"\0" * 10)
    longer = f"has {len(data) + 10:,} bytes, more than the {len(data):,} its header describes"
    assert checkpoint_problems(file.parent) == [f"model.safetensors {longer}"]
    file.write_bytes(b"\xff" * 100)
    assert checkpoint_problems(file.parent) == [
        "model.safetensors has no safetensors header (100 bytes)"
    ]
    file.write_bytes((4).to_bytes(8, "little") + b"{no}" + b"\0" * 100)
    assert checkpoint_problems(file.parent) == [
        "model.safetensors has no valid safetensors header (112 bytes)"
    ]


@pytest.mark.parametrize(
    "name", ["optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl",
             "data_state_rank0.pt", "hooks.pt"],
)  # fmt: skip
def test_each_truncated_torch_file_is_named(checkpoint, name):
    file = checkpoint / name
    truncate(file, file.stat().st_size - 1)
    size = file.stat().st_size
    assert checkpoint_problems(file.parent) == [
        f"{name} is truncated or not a torch file ({size:,} bytes)"
    ]


def test_several_problems_are_all_named(checkpoint):
    truncate(checkpoint / "optimizer.bin", 100)
    (checkpoint / "hooks.pt").unlink()
    assert checkpoint_problems(checkpoint) == [
        "optimizer.bin is truncated or not a torch file (100 bytes)",
        "hooks.pt is missing",
    ]


def test_train_state_must_be_json_with_iter_and_world_size(checkpoint):
    (checkpoint / "train_state.json").write_text('{"iter": 4, "world_s')
    assert checkpoint_problems(checkpoint) == ["train_state.json is not valid JSON"]
    (checkpoint / "train_state.json").write_text("[4]")
    assert checkpoint_problems(checkpoint) == ["train_state.json is not a JSON object"]
    for state in ('{"iter": 4}', '{"iter": 4, "world_size": 0}'):
        (checkpoint / "train_state.json").write_text(state)
        assert checkpoint_problems(checkpoint) == ["train_state.json has no valid world_size"]
    (checkpoint / "train_state.json").write_text('{"iter": "4", "world_size": 1}')
    assert checkpoint_problems(checkpoint) == ["train_state.json has no valid iter"]


def test_every_rank_of_the_saved_world_size_must_be_there(checkpoint):
    set_train_state(checkpoint, world_size=2)
    assert checkpoint_problems(checkpoint) == [
        "random_states_1.pkl is missing",
        "data_state_rank1.pt is missing",
    ]


def test_fp16_checkpoints_need_their_scaler(checkpoint):
    recipe = checkpoint / "recipe.yaml"
    assert "mixed_precision: 'no'" in recipe.read_text()
    recipe.write_text(recipe.read_text().replace("mixed_precision: 'no'", "mixed_precision: fp16"))
    assert checkpoint_problems(checkpoint) == ["scaler.pt is missing"]
    shutil.copy(checkpoint / "hooks.pt", checkpoint / "scaler.pt")  # any torch file will do
    assert checkpoint_problems(checkpoint) == []
    truncate(checkpoint / "scaler.pt", 50)
    assert checkpoint_problems(checkpoint) == [
        "scaler.pt is truncated or not a torch file (50 bytes)"
    ]


# -- choosing the checkpoint -------------------------------------------------------------


def test_auto_takes_the_checkpoint_latest_names_then_the_newest(work_dir, log_lines):
    root = work_dir / "checkpoints"
    assert choose_resume(work_dir, "auto") == root / "iter_4"
    (root / "latest").write_text("iter_2\n")  # resumed from iter_2 and saved it again
    assert choose_resume(work_dir, "auto") == root / "iter_2"
    (root / "latest").unlink()
    assert choose_resume(work_dir, "auto") == root / "iter_4"
    assert log_lines == []


def test_auto_passes_over_damaged_checkpoints_with_one_warning(work_dir, log_lines):
    root = work_dir / "checkpoints"
    shutil.copytree(root / "iter_4", root / "iter_6")
    (root / "latest").write_text("iter_6\n")
    (root / "iter_6" / "train_state.json").unlink()
    size = (root / "iter_4" / "model.safetensors").stat().st_size
    truncate(root / "iter_4" / "model.safetensors", size // 2)
    assert choose_resume(work_dir, "auto") == root / "iter_2"
    truncated = f"model.safetensors is truncated ({size // 2:,} of {size:,} bytes)"
    damaged = f"iter_6 is damaged (train_state.json is missing); iter_4 is damaged ({truncated})"
    assert log_lines == [f"WARNING --resume: {damaged}; resuming from iter_2"]


@pytest.mark.parametrize("layout", ["missing", "empty", "killed-before-the-first-save"])
def test_auto_without_a_checkpoint_starts_from_zero_with_one_line(tmp_path, log_lines, layout):
    root = tmp_path / "checkpoints"
    if layout != "missing":
        root.mkdir()
    if layout == "killed-before-the-first-save":
        (root / ".tmp-iter_2").mkdir()
        (tmp_path / "recipe.yaml").write_text("train: {}\n")
    assert choose_resume(tmp_path, "auto") is None
    assert log_lines == [
        f"INFO --resume: no complete checkpoint in {root}; starting from iteration 0"
    ]


def test_auto_with_only_damaged_checkpoints_starts_from_zero_saying_why(work_dir, log_lines):
    root = work_dir / "checkpoints"
    (root / "iter_4" / "optimizer.bin").unlink()
    (root / "iter_2" / "hooks.pt").write_bytes(b"")
    assert choose_resume(work_dir, "auto") is None
    damaged = "iter_4 is damaged (optimizer.bin is missing); iter_2 is damaged (hooks.pt is empty)"
    assert log_lines == [
        f"WARNING --resume: no complete checkpoint in {root} ({damaged}); starting from iteration 0"
    ]


def test_a_path_or_latest_file_must_name_a_whole_checkpoint(work_dir, log_lines):
    root = work_dir / "checkpoints"
    assert choose_resume(work_dir, str(root / "iter_2")) == root / "iter_2"
    assert choose_resume(work_dir, str(root / "latest")) == root / "iter_4"
    truncate(root / "iter_4" / "optimizer.bin", 10)
    for given in (root / "iter_4", root / "latest"):
        with pytest.raises(UserError) as error:
            choose_resume(work_dir, str(given))
        assert str(error.value) == (
            f"--resume {root / 'iter_4'}: not a whole hooktrain checkpoint: optimizer.bin is "
            f"truncated or not a torch file (10 bytes); pick a whole one such as "
            f"{root / 'iter_2'}, or pass --resume alone to continue from the newest whole "
            "checkpoint of the work dir"
        )
    assert log_lines == []


def test_resume_path_to_a_missing_checkpoint_stays_an_error(tmp_path):
    missing = tmp_path / "checkpoints" / "iter_7"
    with pytest.raises(
        UserError,
        match=r"iter_7: not a whole hooktrain checkpoint: it does not exist; pick a whole one, ",
    ):
        choose_resume(tmp_path, str(missing))


# -- through the CLI ---------------------------------------------------------------------


def resume_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if "--resume:" in line]


def test_cli_resume_on_a_first_start_trains_from_zero_like_a_plain_run(
    reference, data_root, tmp_path
):
    work_dir = tmp_path / "never_started"
    result = run(train_command(work_dir, "--resume", *args(data_root)))
    assert result.returncode == 0, result.output[-4000:]
    line = (
        f"--resume: no complete checkpoint in {work_dir / 'checkpoints'}; starting from iteration 0"
    )
    lines = resume_lines(result.stdout)
    assert len(lines) == 1 and lines[0].endswith(line), result.stdout[-4000:]
    assert "resumed from" not in result.stdout
    assert_bitwise_equal(weights(work_dir / "checkpoints" / "iter_4"),
                         weights(reference / "checkpoints" / "iter_4"))  # fmt: skip


def test_cli_resume_after_a_kill_before_the_first_save_starts_from_zero(
    reference, data_root, tmp_path
):
    work_dir = tmp_path / "killed"
    (work_dir / "checkpoints" / ".tmp-iter_2").mkdir(parents=True)  # what kill -9 mid-save leaves
    (work_dir / "recipe.yaml").write_text((reference / "recipe.yaml").read_text())
    result = run(train_command(work_dir, "--resume", *args(data_root)))
    assert result.returncode == 0, result.output[-4000:]
    lines = resume_lines(result.stdout)
    assert len(lines) == 1 and lines[0].endswith("; starting from iteration 0"), lines
    assert "removed .tmp-iter_2, left by an interrupted save" in result.stdout
    assert_bitwise_equal(weights(work_dir / "checkpoints" / "iter_4"),
                         weights(reference / "checkpoints" / "iter_4"))  # fmt: skip


def _truncate_weights(checkpoint: Path) -> str:
    file = checkpoint / "model.safetensors"
    size = file.stat().st_size
    truncate(file, size // 2)
    return f"model.safetensors is truncated ({size // 2:,} of {size:,} bytes)"


def _remove_train_state(checkpoint: Path) -> str:
    (checkpoint / "train_state.json").unlink()
    return "train_state.json is missing"


@pytest.mark.parametrize(
    "damage", [_truncate_weights, _remove_train_state], ids=["truncated-weights", "no-train-state"]
)
def test_cli_auto_resume_passes_over_a_damaged_newest_checkpoint(
    reference, data_root, work_dir, damage
):
    problem = damage(work_dir / "checkpoints" / "iter_4")
    result = run(train_command(work_dir, "--resume", *args(data_root)))
    assert result.returncode == 0, result.output[-4000:]
    lines = resume_lines(result.stdout)
    assert len(lines) == 1, result.stdout[-4000:]
    assert lines[0].endswith(f"--resume: iter_4 is damaged ({problem}); resuming from iter_2")
    assert f"resumed from {work_dir / 'checkpoints' / 'iter_2'} at iteration 2" in result.stdout
    # Training iterations 3 and 4 again from iter_2 gives the uninterrupted run's weights.
    assert_bitwise_equal(weights(work_dir / "checkpoints" / "iter_4"),
                         weights(reference / "checkpoints" / "iter_4"))  # fmt: skip


def test_cli_resume_path_to_a_damaged_checkpoint_is_one_line_exit_2(data_root, work_dir):
    damaged = work_dir / "checkpoints" / "iter_4"
    truncate(damaged / "optimizer.bin", 10)
    before = checkpoints(work_dir)
    result = run(train_command(work_dir, "--resume", str(damaged), *args(data_root)))
    assert result.returncode == 2, result.output[-4000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-4000:]
    assert lines[0].startswith(f"hooktrain: error: --resume {damaged}: ")
    assert "optimizer.bin is truncated or not a torch file (10 bytes)" in lines[0]
    assert f"pick a whole one such as {work_dir / 'checkpoints' / 'iter_2'}" in lines[0]
    assert checkpoints(work_dir) == before
