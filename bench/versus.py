"""Timing hooktrain against another implementation on the same inputs, shared by
``eomt_vs_transformers.py`` and ``mask2former_vs_transformers.py``: both sides alternate which
goes first each round, and the rows report the fastest steps, the medians and the median of the
rounds' ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - started


def alternating(ours: Callable[[], object], theirs: Callable[[], object], rounds: int, device: torch.device):
    """One warm-up step each, then ``rounds`` timed steps each, the side that goes first alternating."""
    ours(), theirs()
    mine, other = [], []
    for index in range(rounds):
        if index % 2 == 0:
            mine.append(timed(ours, device))
            other.append(timed(theirs, device))
        else:
            other.append(timed(theirs, device))
            mine.append(timed(ours, device))
    return mine, other


def summarise(name: str, ours: list[float], theirs: list[float]) -> dict:
    row = {
        "hooktrain_s": round(min(ours), 4),
        "transformers_s": round(min(theirs), 4),
        "ratio": round(min(ours) / min(theirs), 3),
        "hooktrain_median_s": round(statistics.median(ours), 4),
        "transformers_median_s": round(statistics.median(theirs), 4),
        "median_ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
        "paired_ratio": round(statistics.median(mine / other for mine, other in zip(ours, theirs)), 3),
        "rounds": {"hooktrain": [round(t, 4) for t in ours], "transformers": [round(t, 4) for t in theirs]},
    }
    print(f"{name}: hooktrain {row['hooktrain_s']:.3f} s, transformers {row['transformers_s']:.3f} s (fastest of "
          f"{len(ours)}), ratio {row['ratio']:.3f} (medians: {row['median_ratio']:.3f}, median of the rounds' ratios: "
          f"{row['paired_ratio']:.3f})", flush=True)  # fmt: skip
    return row
