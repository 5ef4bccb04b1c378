"""The machine a benchmark ran on, as recorded in bench/results/*.json."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine(device: str = "cpu") -> str:
    """``AMD EPYC, no AVX-512, 2 cores`` (the CPU's model and AVX-512 support), or the CUDA
    device's name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    cpu, flags = platform.processor() or platform.machine(), ""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    avx512 = ", AVX-512" if "avx512f" in flags.split() else ", no AVX-512"
    return f"{cpu}{avx512 if flags else ''}, {os.cpu_count()} cores"
