"""Training runs through the real CLI that checkpoint tests start, kill and resume, and what
they compare: a tiny quickstart run with checkpoint and eval hooks, in 1 or 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ENV, QUICKSTART, ROOT, launch_command, tiny
from safetensors.torch import load_file

ITERS = 6
HOOKS = (
    "{type: logger, interval: 1}, {type: eval, interval: 3, num_samples: 0}, "
    "{type: checkpoint, interval: 2, max_keep: 2, save_best: mIoU}"
)
HOOKS_NO_EVAL = "{type: logger, interval: 1}, {type: checkpoint, interval: 2}"


def options(data_root: Path, *extra: str, workers=0, hooks="", base=HOOKS) -> list[str]:
    """Tiny-run --cfg-options with the hooks ``base`` plus ``hooks``, then ``extra``."""
    hook_list = f"hooks=[{base}{', ' + hooks if hooks else ''}]"
    return [*tiny(data_root, ITERS), f"data.train.num_workers={workers}", hook_list, *extra]


def train_command(work_dir: Path, *args: str, processes: int = 1, port: int = 0) -> list[str]:
    if processes > 1:
        launch = launch_command("-m", "hooktrain", processes=processes, port=port)
    else:
        launch = [sys.executable, "-m", "hooktrain"]
    return [*launch, str(QUICKSTART), "--work-dir", str(work_dir), *args]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    result.output = result.stdout + result.stderr
    return result


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, to signal the launcher and its ranks
    )  # fmt: skip


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def checkpoints(work_dir: Path) -> list[str]:
    return sorted(p.name for p in (work_dir / "checkpoints").iterdir())
