"""End-to-end training runs through the real CLI: 1 process, 2 processes, bf16, plugins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ENV, QUICKSTART, ROOT, TESTS, ensure_installed, read_probe, run_cli, run_launch, tiny

from hooktrain.engine.optim import ScheduleConfig, scheduled_lr
from hooktrain.recipe.schema import load_recipe

BASE_LR = load_recipe(QUICKSTART).optimizer.lr


def probe(prefix: Path) -> str:
    return f"hooks=[{{type: logger, interval: 2}}, {{type: 'probe_hooks:ProbeHook', prefix: '{prefix}'}}]"


def test_one_process_run_trains_and_writes_resolved_recipe(tmp_path, data_root):
    work_dir = tmp_path / "run"
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(work_dir),
        "--cfg-options", *tiny(data_root), probe(tmp_path / "p"), env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter 6/6" in result.stdout and "loss" in result.stdout
    assert "hook order:" in result.stdout
    recorded = read_probe(tmp_path / "p")
    assert recorded["stages"] == ["before_run", "after_run"]
    assert recorded["final_iter"] == 6 and len(recorded["loss"]) == 6
    assert recorded["conv_dtype"] == "torch.float32"
    schedule = ScheduleConfig(warmup_iters=2, warmup_ratio=0.1, power=1.0)
    expected = [scheduled_lr(BASE_LR, k, 6, schedule) for k in range(6)]
    assert recorded["lr"] == pytest.approx(expected, rel=1e-9)
    resolved = (work_dir / "recipe.yaml").read_text()
    assert "max_iters: 6" in resolved and str(data_root) in resolved


def test_bf16_on_cpu_autocasts_and_trains(tmp_path, data_root):
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root), "train.mixed_precision=bf16", probe(tmp_path / "p"),
        env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = read_probe(tmp_path / "p")
    assert recorded["mixed_precision"] == "bf16"
    assert recorded["conv_dtype"] == "torch.bfloat16"
    assert all(loss == loss and loss < 100 for loss in recorded["loss"])  # finite


def test_fp16_without_gpu_is_refused_clearly(tmp_path, data_root):
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root), "train.mixed_precision=fp16",
        env={"ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "fp16 needs a CUDA GPU" in result.stderr and "bf16" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "precision, dtype", [("fp16", "torch.float16"), ("bf16", "torch.bfloat16")]
)
def test_mixed_precision_on_gpu_trains_and_logs_peak_memory(tmp_path, data_root, precision, dtype):
    work_dir = tmp_path / "run"
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(work_dir),
        "--cfg-options", *tiny(data_root, 20), f"train.mixed_precision={precision}",
        probe(tmp_path / "p"), env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = read_probe(tmp_path / "p")
    assert recorded["mixed_precision"] == precision and recorded["conv_dtype"] == dtype
    losses = recorded["loss"]
    assert all(loss == loss and loss < 100 for loss in losses)  # finite: the fp16 scaler works
    assert sum(losses[-5:]) < sum(losses[:5])
    rows = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train/memory_mb"] > 0 for row in rows if "train/loss" in row)
    assert "memory:" in result.stdout


def test_work_dir_with_checkpoints_is_not_clobbered(tmp_path, data_root):
    work_dir = tmp_path / "run"
    (work_dir / "checkpoints" / "iter_4").mkdir(parents=True)
    (work_dir / "recipe.yaml").write_text("original")
    result = run_cli(str(QUICKSTART), "--work-dir", str(work_dir), "--cfg-options", *tiny(data_root))
    assert result.returncode == 2
    assert "--resume" in result.stderr and "--force" in result.stderr
    assert (work_dir / "recipe.yaml").read_text() == "original"


def test_grad_accumulation_keeps_the_per_iteration_schedule(tmp_path, data_root):
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root, 4), "train.grad_accum_steps=2",
        "train.clip_grad_norm=1.0", probe(tmp_path / "p"), env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    schedule = ScheduleConfig(warmup_iters=2, warmup_ratio=0.1, power=1.0)
    expected = [scheduled_lr(BASE_LR, k, 4, schedule) for k in range(4)]
    assert read_probe(tmp_path / "p")["lr"] == pytest.approx(expected, rel=1e-9)
    assert "grad_norm" in result.stdout


def test_sigterm_finishes_the_iteration_runs_after_run_and_exits_143(tmp_path, data_root):
    prefix = tmp_path / "p"
    hooks = f"hooks=[{{type: 'probe_hooks:ProbeHook', prefix: '{prefix}', sleep: 0.3}}]"
    process = subprocess.Popen(
        [sys.executable, "-m", "hooktrain", str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
         "--cfg-options", *tiny(data_root, 1000), hooks],
        cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    for line in process.stdout:
        if "hook order:" in line or time.time() > deadline:
            break
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output[-3000:]
    recorded = read_probe(prefix)
    assert recorded["stages"] == ["before_run", "after_run"]
    assert 0 < recorded["final_iter"] < 1000
    assert len(recorded["lr"]) == recorded["final_iter"]  # the interrupted iteration finished


@pytest.fixture(scope="module")
def stage_recorder_installed():
    """Install the third-party plugin distribution in tests/plugin_pkg into this environment."""
    ensure_installed("hooktrain-stage-recorder", TESTS / "plugin_pkg")


def test_third_party_plugin_is_listed_and_runs_by_name(tmp_path, data_root, stage_recorder_installed):
    listing = run_cli("plugins")
    assert listing.returncode == 0
    line = next(line for line in listing.stdout.splitlines() if line.startswith("stage_recorder"))
    assert "hooktrain-stage-recorder" in line and "Records every hook stage" in line
    assert any(line.startswith("logger ") for line in listing.stdout.splitlines())

    path = tmp_path / "stages.jsonl"
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root, 3), f"hooks=[{{type: stage_recorder, path: '{path}'}}]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stages = [json.loads(line)["stage"] for line in path.read_text().splitlines()]
    assert stages == ["before_run"] + ["before_train_iter", "after_train_iter"] * 3 + ["after_run"]


def test_two_processes_end_with_identical_weights_and_the_same_schedule(tmp_path, data_root):
    prefix = tmp_path / "p"
    result = run_launch("-m", "hooktrain", str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
                        "--cfg-options", *tiny(data_root), probe(prefix), port=29613)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rank0, rank1 = read_probe(prefix, 0), read_probe(prefix, 1)
    assert rank0["world_size"] == rank1["world_size"] == 2
    # Parameters are identical; BatchNorm running statistics are per rank on CPU (SyncBN
    # needs CUDA; DDP broadcasts rank 0's buffers at each forward, and rank 0's are saved).
    assert rank0["params_sha256"] == rank1["params_sha256"]
    assert rank0["loss"] != rank1["loss"]  # each rank saw its own data
    schedule = ScheduleConfig(warmup_iters=2, warmup_ratio=0.1, power=1.0)
    expected = [scheduled_lr(BASE_LR, k, 6, schedule) for k in range(6)]
    assert rank0["lr"] == pytest.approx(expected, rel=1e-9) == rank1["lr"]
    assert result.stdout.count("hook order:") == 1  # only the main process prints
