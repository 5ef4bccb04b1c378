"""How long a command takes to refuse bad input, and to reach its first training iteration.

Each case runs ``python -m hooktrain ...`` in a fresh process (the best of ``--repeat`` runs;
the first iteration is timed once) against two baselines measured in the same run: a bare
``python -c pass``, and importing torch, timm and datasets, which every error used to pay
before the recipe was read. Results go to bench/results/startup.json (``bench/results.py``);
the last line printed is one line of JSON.

    python bench/startup.py [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import write_result

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
TINY = ["train.max_iters=1", "data.train.num_workers=0", "data.train.shuffle_buffer=8", "hooks[2].interval=1000"]
# --quick: a smoke run also generates a tiny shapes dataset instead of the recipe's 2,200 images
QUICK_DATA = [f"data.{split}.source.{key}" for split in ("train", "val")
              for key in ("num_train=16", "num_val=2", "image_size=32", "train_shards=2", "val_shards=1")]  # fmt: skip

# (name, arguments, what the one error line must contain)
ERRORS = [
    ("recipe key typo", ["config", QUICKSTART, "--cfg-options", "train.max_iter=5"], "did you mean 'max_iters'"),
    ("hook option out of range", ["config", QUICKSTART, "--cfg-options", "hooks[0].interval=0"], "hooks[0].interval"),
    ("work dir is a file", ["train", QUICKSTART, "--work-dir", QUICKSTART], "is a file"),
    ("checkpoint not safetensors", ["test", QUICKSTART, "--checkpoint", QUICKSTART], "not a safetensors file"),
    ("unknown timm encoder", ["config", QUICKSTART, "--cfg-options", "model.encoder.name=resnet181"], "timm"),
]


def timed(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - started, result


def best_of(repeat: int, command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    runs = [timed(command, cwd) for _ in range(repeat)]
    return min(runs, key=lambda run: run[0])


def error_case(name: str, args: list[str], expected: str, repeat: int, cwd: Path) -> float:
    seconds, result = best_of(repeat, [sys.executable, "-m", "hooktrain", *args], cwd)
    lines = result.stderr.strip().splitlines()
    if result.returncode != 2 or len(lines) != 1 or expected not in lines[0]:
        sys.exit(f"{name}: expected one error line with {expected!r}, got {result.returncode}:\n{result.stderr}")
    return seconds


def first_iteration(cwd: Path, quick: bool = False) -> tuple[float, float]:
    """(wall seconds until the first iteration's log line, what the run itself reports)."""
    command = [sys.executable, "-u", "-m", "hooktrain", QUICKSTART, "--work-dir", str(cwd / "run"),
               "--cfg-options", *TINY, *(QUICK_DATA if quick else [])]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall, reported = None, None
    for line in process.stdout:
        if match := re.search(r"starting iteration 1, ([0-9.]+) s after the command started", line):
            wall, reported = time.perf_counter() - started, float(match.group(1))
    if process.wait() != 0 or wall is None:
        sys.exit(f"the quickstart run failed or never logged its first iteration ({process.returncode})")
    return wall, reported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    parser.add_argument("--quick", action="store_true", help="one run per case")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    cwd = Path(tempfile.mkdtemp(prefix="hooktrain-startup-"))
    python, _ = best_of(repeat, [sys.executable, "-c", "pass"], cwd)
    heavy, _ = best_of(repeat, [sys.executable, "-c", "import torch, timm, datasets"], cwd)
    print(f"baselines: python -c pass {python:.2f} s; import torch, timm, datasets {heavy:.2f} s")
    rows = []
    for name, command, expected in ERRORS:
        seconds = error_case(name, command, expected, repeat, cwd)
        rows.append({"case": name, "seconds": round(seconds, 3), "vs_heavy_imports": round(seconds / heavy, 3)})
        print(f"{name:<28} {seconds:6.2f} s  ({seconds / heavy:.2f} x the heavy imports)")
    wall, reported = first_iteration(cwd, args.quick)
    print(f"{'first iteration (quickstart)':<28} {wall:6.2f} s  (the run reports {reported:.1f} s)")
    summary = {
        "quick": args.quick,
        "python_s": round(python, 3),
        "heavy_imports_s": round(heavy, 3),
        "errors": rows,
        "worst_recipe_error_s": max(row["seconds"] for row in rows[:-1]),
        "first_iteration_s": round(wall, 2),
        "first_iteration_vs_heavy_imports": round(wall / heavy, 3),
    }
    print(f"results: {write_result('startup', summary)}")
    print(json.dumps({"bench": "startup", **summary}))


if __name__ == "__main__":
    main()
