"""One work dir, one run (hooktrain.checkpoint.lock): a second run into a running run's work dir
is refused at once and changes nothing, a lock its holder left (kill -9) is taken over with a
warning, and another host's lock counts while its heartbeat is fresh."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_runs import options, run, start, train_command
from conftest import assert_refused, run_cli

from hooktrain.checkpoint.lock import LOCK_FILE, OTHER_HOST_STALE_S, lock_work_dir
from hooktrain.errors import UserError

HOLD = """
import sys, time
from hooktrain.checkpoint.lock import lock_work_dir
lock = lock_work_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(work_dir: Path) -> subprocess.Popen:
    """Another process holding ``work_dir``'s lock (POSIX locks never conflict within one process)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def take_lock_elsewhere(work_dir: Path) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom hooktrain.checkpoint.lock import lock_work_dir\n"
            "lock_work_dir(sys.argv[1]).release()\nprint('taken')")  # fmt: skip
    return subprocess.run([sys.executable, "-c", code, str(work_dir)], capture_output=True, text=True, timeout=120)


def wait_for(predicate, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_run_into_a_running_runs_work_dir_is_refused_and_moves_nothing(data_root, tmp_path):
    work = tmp_path / "run"
    running = start(train_command(work, "--cfg-options", *options(data_root, "train.max_iters=100000")))
    try:
        wait_for(lambda: (work / "checkpoints" / "latest").exists())
        holder = json.loads((work / LOCK_FILE).read_text())
        assert holder["pid"] == running.pid and holder["host"] == socket.gethostname()
        for flag in ("--resume", "--force"):  # a requeue race; starting over in the running run's dir
            result = run(train_command(work, flag, "--cfg-options", *options(data_root)))
            assert_refused(result, f"work dir {work} is in use", f"PID {running.pid}", socket.gethostname())
        assert not list(work.glob("previous-*"))  # --force moved nothing aside
        assert running.poll() is None  # and the first run trains on
    finally:
        os.killpg(running.pid, signal.SIGTERM)
        output = running.communicate(timeout=300)[0]
    assert running.returncode == 143, output[-3000:]
    assert not (work / LOCK_FILE).exists()  # released on the way out
    latest = (work / "checkpoints" / "latest").read_text().strip()
    iteration = int(latest.removeprefix("iter_"))
    resumed = run(train_command(work, "--resume", "--cfg-options", *options(data_root, f"train.max_iters={iteration + 1}")))
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {work / 'checkpoints' / latest}" in resumed.output


def test_a_lock_left_by_a_killed_run_is_taken_over_with_one_warning(tmp_path):
    work = tmp_path / "run"
    holder = hold_lock(work)
    refused = take_lock_elsewhere(work)
    assert refused.returncode == 1 and f"PID {holder.pid}" in refused.stderr and "holds its lock" in refused.stderr
    holder.kill()
    holder.wait()
    assert json.loads((work / LOCK_FILE).read_text())["pid"] == holder.pid  # kill -9 left its record
    taken = take_lock_elsewhere(work)
    assert taken.returncode == 0 and taken.stdout.strip() == "taken", taken.stderr
    warnings = [line for line in taken.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "taking over the lock of the run of PID" in warnings[0]
    assert f"PID {holder.pid}" in warnings[0]
    assert not (work / LOCK_FILE).exists()


def test_another_hosts_lock_counts_until_its_heartbeat_is_stale(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    record = {"host": "node-17", "pid": 4242, "started": "2026-12-06 03:00:00 UTC"}
    (work / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"PID 4242 on host node-17 .* was alive \d+ s ago"):
        lock_work_dir(work)
    assert json.loads((work / LOCK_FILE).read_text()) == record  # a refusal changes nothing
    old = time.time() - OTHER_HOST_STALE_S - 5
    os.utime(work / LOCK_FILE, (old, old))
    with lock_work_dir(work) as lock:
        assert "PID 4242 on host node-17" in lock.took_over
        assert json.loads((work / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert list(work.iterdir()) == []


def test_a_run_refused_after_taking_the_lock_leaves_no_trace(tmp_path):
    work = tmp_path / "new_run"
    result = run_cli("train", "recipes/quickstart.yaml", "--work-dir", str(work),
                     "--cfg-options", "model.encoder.name=resnet181")  # fmt: skip
    assert_refused(result, "resnet181")
    assert not work.exists()
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    assert_refused(run_cli("train", "recipes/quickstart.yaml", "--work-dir", str(work),
                           "--cfg-options", "model.encoder.name=resnet181"), "resnet181")  # fmt: skip
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
