"""A full disk loses nothing: the run ends with one line naming the file system and what could
not be written, nothing partial stays under a name that looks whole, the earlier checkpoints
stay whole, and ``--resume`` once there is room again ends where an uninterrupted run does.
The work dir is a real tmpfs of a few MiB (mounting one needs root: skipped otherwise)."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from checkpoint_runs import HOOKS_NO_EVAL, assert_bitwise_equal, options, run, train_command, weights

from hooktrain.checkpoint.state import complete_checkpoints, expected_files

# The tiny quickstart's checkpoint is ~41 MiB (weights ~14 MiB, AdamW state ~27 MiB).


@pytest.fixture
def small_disk(tmp_path):
    """An empty 64 MiB tmpfs (:func:`resize` changes its size in place)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def resize(mount: Path, mib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={mib}m", str(mount)], check=True)


def assert_one_line_disk_full(result, *fragments: str) -> str:
    assert result.returncode == 1, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("hooktrain: error: ")]
    assert len(errors) == 1 and "no space left on the file system at" in errors[0], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_nothing_partial(work: Path) -> None:
    """Only whole checkpoints under checkpoint names, no save in progress left behind (none at all
    when the disk filled before the first save)."""
    root = work / "checkpoints"
    if not root.exists():
        return
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], sorted(p.name for p in root.iterdir())
    for checkpoint in complete_checkpoints(work):
        missing = [name for name in expected_files(1) if not (checkpoint / name).is_file()]
        assert not missing, (checkpoint.name, missing)
    latest = root / "latest"
    if latest.exists():
        assert (root / latest.read_text().strip()).is_dir()


@pytest.mark.slow
def test_a_save_the_disk_has_no_room_for_is_refused_before_writing_then_resume_is_exact(data_root, small_disk, tmp_path):
    opts = options(data_root, base=HOOKS_NO_EVAL)
    work = small_disk / "run"
    refused = run(train_command(work, "--cfg-options", *opts))  # 64 MiB: iter_2 fits, iter_4 does not
    line = assert_one_line_disk_full(refused, str(small_disk), "checkpoint iter_4", "nothing was written", "--resume")
    assert "MiB (the size of iter_2)" in line
    assert [p.name for p in complete_checkpoints(work)] == ["iter_2"]
    assert_nothing_partial(work)
    resize(small_disk, 256)  # room again
    resumed = run(train_command(work, "--resume", "--cfg-options", *opts))
    assert resumed.returncode == 0, resumed.output[-3000:]
    reference = run(train_command(tmp_path / "reference", "--cfg-options", *opts))
    assert reference.returncode == 0, reference.output[-3000:]
    assert_bitwise_equal(weights(work / "checkpoints" / "iter_6"), weights(tmp_path / "reference" / "checkpoints" / "iter_6"))


@pytest.mark.slow
def test_a_save_that_runs_out_of_space_midway_leaves_nothing_partial(data_root, small_disk):
    resize(small_disk, 24)  # the first checkpoint's weights fit, its optimizer state does not
    work = small_disk / "run"
    result = run(train_command(work, "--cfg-options", *options(data_root, base=HOOKS_NO_EVAL)))
    assert_one_line_disk_full(result, f"checkpoint {work / 'checkpoints' / 'iter_2'} could not be written",
                              "nothing partial is left")  # fmt: skip
    assert complete_checkpoints(work) == [] and not (work / "checkpoints" / "latest").exists()
    assert_nothing_partial(work)
    assert (work / "recipe.yaml").is_file() and (work / "metrics.jsonl").is_file()  # the rest of the work dir stays


@pytest.mark.slow
def test_a_disk_filled_by_something_else_at_a_random_moment(data_root, small_disk, tmp_path):
    """Another program fills the disk while the run trains, evaluates and saves (with best/),
    after a random iteration, before or after the run's own hooks in it: whatever write meets
    the full disk first ends the run in one line; after the filler is deleted, ``--resume``
    ends where an uninterrupted run does."""
    resize(small_disk, 200)
    rng = random.Random()
    at_iter, priority = rng.randint(1, 12), rng.choice(["HIGHEST", "LOWEST"])
    print(f"the draw, to replay a failure: at_iter={at_iter}, priority={priority}")  # shown when it fails
    work, filler = small_disk / "run", small_disk / "filler"
    opts = options(data_root, "train.max_iters=14")
    fill = f"{{type: 'probe_hooks:FillDiskHook', path: '{filler}', at_iter: {at_iter}, priority: {priority}}}"
    result = run(train_command(work, "--cfg-options", *options(data_root, "train.max_iters=14", hooks=fill)))
    assert_one_line_disk_full(result, str(small_disk))
    assert_nothing_partial(work)
    filler.unlink()
    resumed = run(train_command(work, "--resume", "--cfg-options", *opts))
    assert resumed.returncode == 0, (at_iter, priority, resumed.output[-3000:])
    reference = run(train_command(tmp_path / "reference", "--cfg-options", *opts))
    assert reference.returncode == 0, reference.output[-3000:]
    last = "iter_14"
    assert_bitwise_equal(weights(work / "checkpoints" / last), weights(tmp_path / "reference" / "checkpoints" / last))


def test_what_counts_as_a_full_disk(tmp_path):
    """Without root as well: a write that says it ran out of space becomes one line naming the
    file and its file system; other errors stay what they are."""
    import errno

    from hooktrain.errors import DiskFull, disk_full

    said = disk_full(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl")))
    assert isinstance(said, DiskFull) and str(tmp_path / "metrics.jsonl") in str(said) and "\n" not in str(said)
    assert "the file system at /" in str(said) and "MiB free of" in str(said)
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full(wrapped, tmp_path / "model.safetensors") is not None  # safetensors' own words
    assert disk_full(RuntimeError("unexpected pos 1234"), tmp_path / "optimizer.bin") is None  # there is room here
    assert disk_full(ValueError("bad value"), tmp_path) is None


def test_an_atomic_write_that_runs_out_of_space_keeps_the_old_file(tmp_path):
    import errno

    from hooktrain.checkpoint.files import atomic_path
    from hooktrain.errors import DiskFull

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(DiskFull, match="model.safetensors could not be written"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
