"""The run's console log: info from the main process, warnings from every rank."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("hooktrain")


def setup_logging(is_main_process: bool) -> None:
    """Info lines from the main process only; warnings from every rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if is_main_process else logging.WARNING)
    logger.propagate = False


@contextlib.contextmanager
def main_process_logs(accelerator: Accelerator):
    """Log what every rank finds alike from the main process only."""
    if accelerator.is_main_process:
        yield
        return
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def process_age() -> float:
    """Seconds since this process started (imports, data and model set-up included)."""
    try:  # Linux: start time in clock ticks since boot, against the uptime (10 ms resolution)
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        import psutil

        return time.time() - psutil.Process().create_time()
