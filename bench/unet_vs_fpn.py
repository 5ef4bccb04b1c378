"""U-Net against the quickstarts' FPN for the same training time, on the binary and the 4-band
quickstart data.

For each pair (``quickstart_binary`` / ``quickstart_binary_unet``, ``quickstart_4band`` /
``quickstart_4band_unet``), measured in the same run:

1. calibration: each recipe trains ``--calibrate`` iterations (no evaluation, no checkpoint),
   and its iteration time is the median of the logger's ``train/time`` after the first interval;
2. the FPN recipe trains as it is (its ``train.max_iters``); the U-Net recipe trains
   ``max_iters x t_fpn / t_unet`` iterations (its schedule stretched or shrunk to that length),
   so both get the same training time; when the two runs' training times still differ by more
   than 10%, U-Net trains again with its iterations scaled by the measured ratio;
3. both evaluate at the end; the score is the foreground's IoU (binary) or the mIoU (4-band).

Each run is ``python -m hooktrain recipes/<recipe>.yaml`` in a fresh directory, with the same
seed. Reported: each side's iterations, measured training seconds (the sum of its iteration
times), the score, and U-Net's score minus FPN's.

    python bench/unet_vs_fpn.py            # both pairs (~12 minutes on 2 cores)
    python bench/unet_vs_fpn.py --quick    # smoke run: 2 iterations each on 16 images, binary pair only,
                                           # no calibration

Results go to bench/results/unet_vs_fpn.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results import write_result

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.1  # how far U-Net's training time may be from FPN's before its run is redone
PAIRS = {
    "binary": ("quickstart_binary", "quickstart_binary_unet"),
    "4band": ("quickstart_4band", "quickstart_4band_unet"),
}
# --quick: the runs on a tiny generated dataset (16 train, 4 val images) at batch 2
QUICK_DATA = ["data.train.batch_size=2", *(f"data.{split}.source.{key}" for split in ("train", "val")
                                           for key in ("num_train=16", "num_val=4", "train_shards=2"))]  # fmt: skip


def train(recipe: str, options: list[str]) -> list[dict]:
    """Run ``recipe`` in a fresh directory with ``--cfg-options options``; its metrics rows."""
    scratch = Path(tempfile.mkdtemp(prefix=f"hooktrain-{recipe}-"))
    try:
        (scratch / "recipes").symlink_to(ROOT / "recipes")
        command = [sys.executable, "-m", "hooktrain", f"recipes/{recipe}.yaml", "--cfg-options", *options]
        result = subprocess.run(command, cwd=scratch, env={**os.environ, "WANDB_MODE": "offline"},
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            sys.exit(f"{recipe} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        metrics = scratch / "work_dirs" / recipe / "metrics.jsonl"
        return [json.loads(line) for line in metrics.read_text().splitlines()]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def iteration_seconds(recipe: str, iters: int) -> float:
    interval = max(1, iters // 4)
    rows = train(recipe, [f"train.max_iters={iters}", f"hooks=[{{type: logger, interval: {interval}}}]"])
    times = [row["train/time"] for row in rows if "train/time" in row]
    return statistics.median(times[1:] if len(times) > 1 else times)


def full_run(recipe: str, iters: int, binary: bool, extra: list[str] | None = None) -> dict:
    """Train ``iters`` iterations, evaluate at the end; iterations, training seconds and score.
    ``extra``: more ``--cfg-options`` (the smoke run's tiny dataset)."""
    interval = max(1, iters // 8)
    hooks = f"[{{type: logger, interval: {interval}}}, {{type: eval, interval: {iters}}}]"
    rows = train(recipe, [f"train.max_iters={iters}", f"hooks={hooks}", *(extra or [])])
    logged = [row for row in rows if "train/time" in row]
    seconds = sum(row["train/time"] * interval for row in logged)
    final = [row for row in rows if "val/mIoU" in row][-1]
    score = final["val/per_class"]["IoU"][1] if binary else final["val/mIoU"]
    return {"recipe": recipe, "iters": iters, "train_seconds": round(seconds, 1), "score": round(score, 4)}


def max_iters(recipe: str) -> int:
    sys.path.insert(0, str(ROOT))
    from hooktrain.recipe.schema import load_recipe

    return load_recipe(ROOT / "recipes" / f"{recipe}.yaml").train.max_iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calibrate", type=int, default=40, help="iterations of each calibration run")
    args = parser.parse_args()
    pairs = {"binary": PAIRS["binary"]} if args.quick else PAIRS
    summary: dict = {"quick": args.quick, "pairs": {}}
    for name, (fpn, unet) in pairs.items():
        if args.quick:  # the runs themselves, without the calibration
            t_fpn = t_unet = 1.0
        else:
            t_fpn, t_unet = iteration_seconds(fpn, args.calibrate), iteration_seconds(unet, args.calibrate)
        fpn_iters = 2 if args.quick else max_iters(fpn)
        unet_iters = max(2, round(fpn_iters * t_fpn / t_unet))
        binary = name == "binary"
        extra = QUICK_DATA if args.quick else None
        fpn_run, unet_run = full_run(fpn, fpn_iters, binary, extra), full_run(unet, unet_iters, binary, extra)
        ratio = unet_run["train_seconds"] / fpn_run["train_seconds"]
        if not args.quick and abs(ratio - 1) > TOLERANCE:  # the calibration missed: scale by the runs themselves
            unet_run = full_run(unet, max(2, round(unet_iters / ratio)), binary)
        pair = {
            "score": "foreground IoU" if binary else "mIoU",
            "iteration_s": {"fpn": round(t_fpn, 4), "unet": round(t_unet, 4)},
            "fpn": fpn_run,
            "unet": unet_run,
            "unet_minus_fpn": round(unet_run["score"] - fpn_run["score"], 4),
            "time_ratio": round(unet_run["train_seconds"] / fpn_run["train_seconds"], 3),
        }
        summary["pairs"][name] = pair
        print(f"{name}: {json.dumps(pair)}", flush=True)
    write_result("unet_vs_fpn", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
