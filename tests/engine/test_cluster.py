"""What real clusters do to a run, end to end with real processes: signals to the whole
process group (with DataLoader workers), non-finite losses, ranks that fail alone or fall out
of step (2 processes, gloo), and the BatchNorm choice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from checkpoint_runs import ITERS, checkpoints, options, run, start, train_command
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here trains in subprocesses and signals them
LOGGER = "{type: logger, interval: 1}"
CHECKPOINT_EVERY_ITER = "{type: checkpoint, interval: 1}"


def hooks(*specs: str) -> str:
    return f"hooks=[{', '.join(specs)}]"


def wait_for_line(process: subprocess.Popen, text: str, lines: list[str]) -> None:
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return
    raise AssertionError("".join(lines)[-4000:])


# -- signals to the process group --------------------------------------------------------


def test_sigterm_to_the_process_group_with_workers_saves_and_exits_143(tmp_path, data_root):
    """As `scancel` does: the run, its DataLoader workers and nothing else in the group."""
    work_dir = tmp_path / "run"
    slow = "{type: 'probe_hooks:ProbeHook', prefix: '" + str(tmp_path / "p") + "', sleep: 0.3}"
    args = options(data_root, "train.max_iters=40", workers=2, base=LOGGER,
                   hooks=f"{{type: checkpoint, interval: 100}}, {slow}")  # fmt: skip
    process = start(train_command(work_dir, "--cfg-options", *args))
    lines: list[str] = []
    wait_for_line(process, "iter 2/40", lines)
    os.killpg(process.pid, signal.SIGTERM)  # start() made the run a process group leader
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-4000:]
    assert output.count("SIGTERM received") == 1, output[-4000:]
    assert "DataLoader worker" not in output
    stopped = int((work_dir / "checkpoints" / "latest").read_text().strip().removeprefix("iter_"))
    assert 2 <= stopped < 40
    assert f"SIGTERM received: stopping after iteration {stopped}, then exit code 143" in output


def test_a_second_signal_after_the_repeat_window_aborts_at_once(tmp_path, data_root):
    work_dir = tmp_path / "run"
    slow = "{type: 'probe_hooks:ProbeHook', prefix: '" + str(tmp_path / "p") + "', sleep: 4}"
    args = options(data_root, "train.max_iters=40", workers=2, base=LOGGER,
                   hooks=f"{{type: checkpoint, interval: 100}}, {slow}")  # fmt: skip
    process = start(train_command(work_dir, "--cfg-options", *args))
    lines: list[str] = []
    wait_for_line(process, "iter 1/40", lines)
    os.killpg(process.pid, signal.SIGINT)  # noted: the run would stop after iteration 2
    time.sleep(2.5)  # past signals.REPEAT_S, while the probe still sleeps in iteration 1
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    output = "".join(lines) + process.communicate(timeout=60)[0]
    assert time.monotonic() - sent < 10, output[-4000:]  # not after the 4 s iterations
    assert process.returncode == 130, output[-4000:]
    assert "hooktrain: error: second SIGINT: aborting without saving" in output
    assert "Traceback" not in output
    assert not (work_dir / "checkpoints").exists()  # an aborted run saves nothing


# -- non-finite losses -------------------------------------------------------------------


def test_nonfinite_weights_stop_at_their_iteration_without_saving_them(tmp_path, data_root):
    work_dir = tmp_path / "run"
    poison = "{type: 'probe_hooks:PoisonHook', at_iter: 4}"
    args = options(data_root, base=f"{LOGGER}, {CHECKPOINT_EVERY_ITER}", hooks=poison)
    result = run(train_command(work_dir, "--cfg-options", *args))
    assert result.returncode == 3, result.output[-4000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("hooktrain: error: iteration 4: decode.loss_ce, decode.loss_dice, "
                            "loss, grad_norm not finite (train.on_nonfinite: stop)"), error  # fmt: skip
    assert "Traceback" not in result.stderr
    assert checkpoints(work_dir) == ["iter_1", "iter_2", "iter_3", "latest"]
    assert all(
        v.isfinite().all()
        for v in load_file(work_dir / "checkpoints/iter_3/model.safetensors").values()
    )


SKIP = ["train.on_nonfinite=skip", "train.max_nonfinite_skips=2"]


@pytest.fixture(scope="module")
def skipped_twice(tmp_path_factory, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-process run (train.sync_bn left at auto) whose rank 1 loss is NaN at iterations 3
    and 4, one fewer than train.max_nonfinite_skips allows: its work dir and result."""
    nan_loss = "{type: 'probe_hooks:PoisonHook', at_iter: 3, what: loss, rank: 1, times: 2}"
    work_dir = tmp_path_factory.mktemp("skip") / "run"
    args = options(data_root, *SKIP, base=f"{LOGGER}, {CHECKPOINT_EVERY_ITER}", hooks=nan_loss)
    return work_dir, run(train_command(work_dir, "--cfg-options", *args, processes=2, port=29841))


def test_skip_drops_nonfinite_steps_on_any_rank_then_stops_after_too_many(
    tmp_path, data_root, skipped_twice
):
    """Two processes; only rank 1's loss is NaN. Its NaN gradients reach every rank through
    the all-reduce, and the ranks agree to skip the step, then to stop."""
    work_dir, result = skipped_twice
    assert result.returncode == 0, result.output[-4000:]
    for iteration, count in ((3, 1), (4, 2)):
        assert (f"iteration {iteration}: grad_norm on rank 0; decode.loss_ce, decode.loss_dice, "
                f"loss, grad_norm on rank 1 not finite: optimizer step skipped ({count} in a row") in result.stdout  # fmt: skip
    final = load_file(work_dir / "checkpoints" / f"iter_{ITERS}" / "model.safetensors")
    assert all(v.isfinite().all() for v in final.values())

    three = "{type: 'probe_hooks:PoisonHook', at_iter: 3, what: loss, rank: 1, times: 3}"
    work_dir = tmp_path / "stop"
    args = options(data_root, *SKIP, base=f"{LOGGER}, {CHECKPOINT_EVERY_ITER}", hooks=three)
    result = run(train_command(work_dir, "--cfg-options", *args, processes=2, port=29842))
    # accelerate launch (torchrun) itself exits with 1 when a rank failed; it names the codes
    assert result.returncode == 1 and "(exitcode: 3)" in result.output, result.output[-4000:]
    assert result.stderr.count("hooktrain: error: iteration 5:") == 1  # the main process only
    assert "more than train.max_nonfinite_skips=2 iterations in a row" in result.stderr
    assert checkpoints(work_dir)[-2:] == ["iter_4", "latest"]


# -- ranks that fail alone or fall out of step --------------------------------------------


@pytest.mark.parametrize(
    ("how", "port", "expected"),
    [
        ("raise", 29843, ["rank 0 stopped in hook 'logger' (after_train_iter) at iteration 3: "
                          "rank 1 raised in hook 'probe_hooks:MisbehaveHook' (after_train_iter) "
                          "at iteration 3: HookError"]),
        ("hang", 29844, ["rank 0 stopped in hook 'logger' (after_train_iter) at iteration 3: a "
                         "collective timed out after 4 s (train.collective_timeout) waiting for "
                         "the other ranks; rank 1 is in hook 'probe_hooks:MisbehaveHook' "
                         "(after_train_iter) at iteration 3",
                         "[rank 1] rank 0 timed out after 4 s in hook 'logger' (after_train_iter) "
                         "at iteration 3; this rank was in hook 'probe_hooks:MisbehaveHook' "
                         "(after_train_iter) at iteration 3, so it never arrived"]),
        ("extra_loss", 29845, ["iteration 4 (train step): the ranks' models returned different "
                               "loss terms: rank 0 ['decode.loss_ce', 'decode.loss_dice', "
                               "'loss'], rank 1 ['decode.loss_ce', 'decode.loss_dice', "
                               "'extra.loss', 'loss']"]),
    ],
)  # fmt: skip
def test_a_rank_out_of_step_ends_every_rank_naming_the_stage(tmp_path, data_root, how, port,
                                                             expected):  # fmt: skip
    misbehave = f"{{type: 'probe_hooks:MisbehaveHook', at_iter: 3, how: {how}}}"
    args = options(data_root, "train.collective_timeout=4", base=LOGGER, hooks=misbehave)
    began = time.monotonic()
    result = run(train_command(tmp_path / "run", "--cfg-options", *args, processes=2, port=port),
                 timeout=180)  # fmt: skip
    assert result.returncode != 0, result.output[-4000:]
    assert time.monotonic() - began < 90, result.output[-4000:]
    errors = [line.removeprefix("hooktrain: error: ") for line in result.stderr.splitlines()
              if line.startswith("hooktrain: error: ")]  # fmt: skip
    for line in expected:
        assert any(e.startswith(line) for e in errors), (line, errors, result.output[-4000:])


# -- BatchNorm ---------------------------------------------------------------------------


def test_sync_bn_auto_keeps_batch_norm_on_cpu_processes_and_true_is_refused_there(
    tmp_path, data_root, skipped_twice
):
    result = skipped_twice[1]  # a 2-process run with train.sync_bn at its default, auto
    assert result.returncode == 0, result.output[-4000:]
    assert (
        "batch norm: BatchNorm per process (train.sync_bn: auto, 2 cpu processes)" in result.stdout
    )

    args = options(data_root, "train.max_iters=1", base=LOGGER)
    forced = [*args, "train.sync_bn=true"]
    result = run(
        train_command(tmp_path / "true2", "--cfg-options", *forced, processes=2, port=29847)
    )
    assert result.returncode == 1 and "(exitcode: 2)" in result.output, result.output[-4000:]
    assert "train.sync_bn: true needs CUDA processes" in result.stderr

    result = run(train_command(tmp_path / "true1", "--cfg-options", *forced))
    assert result.returncode == 0, result.output[-4000:]
    assert (
        "batch norm: SyncBatchNorm across processes (train.sync_bn: True, 1 cpu process)"
        in result.stdout
    )
