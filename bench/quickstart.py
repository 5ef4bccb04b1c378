"""The quickstart as a newcomer runs it: wall time (data generation included) and the mIoU
it ends at, against its targets (3 minutes on 2 CPU cores, mIoU >= 0.70). Results go to
bench/results/quickstart.json (``bench/results.py``).

Runs ``python -m hooktrain recipes/quickstart.yaml`` in a fresh temporary directory (so the
shapes dataset is generated, as on a first run) and reads the final evaluation from the run's
``metrics.jsonl``. Extra arguments go to the command, e.g. ``--cfg-options train.max_iters=650``.

    python bench/quickstart.py [--quick] [--cfg-options KEY=VALUE ...]

``--quick`` (a smoke run) trains 10 iterations without DataLoader workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import write_result

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS, TARGET_MIOU = 180.0, 0.70


QUICK = ["--cfg-options", "train.max_iters=10", "data.train.num_workers=0"]


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    extra = [arg for arg in argv if arg != "--quick"] + (QUICK if quick else [])
    scratch = Path(tempfile.mkdtemp(prefix="hooktrain-quickstart-"))
    try:
        (scratch / "recipes").symlink_to(ROOT / "recipes")
        command = [sys.executable, "-m", "hooktrain", "recipes/quickstart.yaml", *extra]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=scratch, env={**os.environ, "WANDB_MODE": "offline"},
                                capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"quickstart failed ({result.returncode}):\n{result.stderr[-3000:]}")
        lines = result.stdout.splitlines()
        first = max(i for i, line in enumerate(lines) if "validation at iter" in line)
        last = next(i for i in range(first, len(lines)) if "val/mIoU" in lines[i])
        print("\n".join(lines[first : last + 1]))  # the per-class table and the summary
        rows = (scratch / "work_dirs" / "quickstart" / "metrics.jsonl").read_text().splitlines()
        final = [row for row in map(json.loads, rows) if "val/mIoU" in row][-1]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    miou, iou = final["val/mIoU"], final["val/per_class"]["IoU"]
    print(f"wall time {seconds:.1f} s (target <= {TARGET_SECONDS:.0f}), val/mIoU {miou:.4f} "
          f"(target >= {TARGET_MIOU}) at iteration {final['iter']}")  # fmt: skip
    summary = {
        "quick": quick,
        "command": " ".join(["python -m hooktrain recipes/quickstart.yaml", *extra]),
        "seconds": round(seconds, 1), "miou": round(miou, 4),
        "per_class_iou": [round(v, 4) for v in iou], "iters": final["iter"],
        "time_ratio": round(seconds / TARGET_SECONDS, 3), "miou_ratio": round(miou / TARGET_MIOU, 3),
    }  # fmt: skip
    print(f"results: {write_result('quickstart', summary)}")
    print(json.dumps({"bench": "quickstart", **summary}))


if __name__ == "__main__":
    main(sys.argv[1:])
