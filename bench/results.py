"""Where benchmark results go: ``bench/results/<bench>.json`` (``<bench>-cuda.json`` for a run
whose summary says ``"device": "cuda"``), each with the machine it ran on
(CPU model and flags, cores, GPU), the package versions, the date and the git revision.

``HOOKTRAIN_BENCH_RESULTS`` names another directory (``bench/run_all.py --quick`` writes its
smoke results there, never over the committed ones).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "torchvision", "accelerate", "timm", "datasets", "numpy", "opencv-python-headless")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def results_dir() -> Path:
    return Path(os.environ.get("HOOKTRAIN_BENCH_RESULTS") or RESULTS)


def cpu() -> dict[str, Any]:
    """The CPU's model name, the vector-extension flags that matter for torch, and the cores."""
    model, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"model": model, "flags": [flag for flag in CPU_FLAGS if flag in flags], "cores": os.cpu_count()}


# Device files a GPU torch can use shows (NVIDIA's driver, ROCm's): where none exists there is no
# GPU, and a bench process that never needed torch (startup, quickstart) is spared importing it.
GPU_DEVICE_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def gpu() -> str | None:
    if "torch" not in sys.modules and not any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        return None
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def describe_machine() -> str:
    """One line for the console and the docs: ``AMD EPYC, no AVX-512, 2 cores`` (+ the GPU)."""
    info = cpu()
    parts = [info["model"], "AVX-512" if "avx512f" in info["flags"] else "no AVX-512"]
    if "avx512_bf16" in info["flags"]:
        parts.append("bf16")
    if "amx_tile" in info["flags"]:
        parts.append("AMX")
    parts.append(f"{info['cores']} cores")
    if gpu():
        parts.append(gpu())
    return ", ".join(parts)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_revision() -> str:
    """The checked-out commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)  # noqa: E731
        revision = run("rev-parse", "--short=12", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + ("+dirty" if dirty else "")


def write_result(bench: str, summary: dict[str, Any]) -> Path:
    """Write ``summary`` with the machine, versions, date and revision to ``<bench>.json``, or to
    ``<bench>-cuda.json`` when ``summary["device"]`` is ``cuda`` (CPU and GPU figures live side
    by side)."""
    record = {
        "bench": bench,
        **summary,
        "machine": {"description": describe_machine(), "cpu": cpu(), "gpu": gpu()},
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(),
    }
    directory = results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    suffix = "-cuda" if summary.get("device") == "cuda" else ""
    path = directory / f"{bench}{suffix}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
