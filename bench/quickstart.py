"""A quickstart as a newcomer runs it: wall time (data generation included) and the score it
ends at, against its targets. Results go to bench/results/<recipe>.json (``bench/results.py``).

- ``recipes/quickstart.yaml`` (the default): 3 minutes on 2 CPU cores, mIoU >= 0.70.
- ``recipes/quickstart_binary.yaml`` (``--recipe quickstart_binary``): 90 s, foreground IoU >= 0.85.
- ``recipes/quickstart_eomt.yaml`` (``--recipe quickstart_eomt``): 5 minutes, mIoU >= 0.70.

Runs ``python -m hooktrain recipes/<recipe>.yaml`` in a fresh temporary directory (so the
shapes dataset is generated, as on a first run) and reads the final evaluation from the run's
``metrics.jsonl``. Extra arguments go to the command, e.g. ``--cfg-options train.max_iters=650``.

    python bench/quickstart.py [--recipe quickstart|quickstart_binary|quickstart_eomt] [--quick] [--cfg-options ...]

``--quick`` (a smoke run) trains 2 iterations without DataLoader workers on a tiny generated dataset.
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
# recipe: (seconds, score name, score target); binary scores the foreground class's IoU.
TARGETS = {
    "quickstart": (180.0, "miou", 0.70),
    "quickstart_binary": (90.0, "foreground_iou", 0.85),
    "quickstart_eomt": (300.0, "miou", 0.70),
}


# --quick: 2 iterations on a tiny generated dataset (16 train, 4 val images), evaluated at the end
QUICK = ["--cfg-options", "train.max_iters=2", "data.train.num_workers=0", "data.train.batch_size=2",
         "hooks.0.interval=1", "hooks.1.interval=2", "hooks.2.interval=2",
         *(f"data.{split}.source.{key}" for split in ("train", "val")
           for key in ("num_train=16", "num_val=4", "train_shards=2"))]  # fmt: skip


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    recipe = "quickstart"
    if "--recipe" in argv:
        at = argv.index("--recipe")
        recipe = argv[at + 1]
        argv = argv[:at] + argv[at + 2 :]
    if recipe not in TARGETS:
        sys.exit(f"--recipe {recipe}: choose one of {sorted(TARGETS)}")
    target_seconds, score_name, target_score = TARGETS[recipe]
    extra = [arg for arg in argv if arg != "--quick"] + (QUICK if quick else [])
    scratch = Path(tempfile.mkdtemp(prefix=f"hooktrain-{recipe}-"))
    try:
        (scratch / "recipes").symlink_to(ROOT / "recipes")
        command = [sys.executable, "-m", "hooktrain", f"recipes/{recipe}.yaml", *extra]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=scratch, env={**os.environ, "WANDB_MODE": "offline"},
                                capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"{recipe} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        lines = result.stdout.splitlines()
        first = max(i for i, line in enumerate(lines) if "validation at iter" in line)
        last = next(i for i in range(first, len(lines)) if "val/mIoU" in lines[i])
        print("\n".join(lines[first : last + 1]))  # the per-class table and the summary
        rows = (scratch / "work_dirs" / recipe / "metrics.jsonl").read_text().splitlines()
        final = [row for row in map(json.loads, rows) if "val/mIoU" in row][-1]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    miou, iou = final["val/mIoU"], final["val/per_class"]["IoU"]
    score = miou if score_name == "miou" else iou[1]
    print(f"wall time {seconds:.1f} s (target <= {target_seconds:.0f}), {score_name} {score:.4f} "
          f"(target >= {target_score}) at iteration {final['iter']}")  # fmt: skip
    summary = {
        "quick": quick,
        "command": " ".join([f"python -m hooktrain recipes/{recipe}.yaml", *extra]),
        "seconds": round(seconds, 1), "miou": round(miou, 4),
        "per_class_iou": [round(v, 4) for v in iou], "iters": final["iter"],
        "score": score_name, score_name: round(score, 4),
        "target_seconds": target_seconds, "target_score": target_score,
        "time_ratio": round(seconds / target_seconds, 3), "score_ratio": round(score / target_score, 3),
    }  # fmt: skip
    if score_name == "miou":
        summary["miou_ratio"] = summary["score_ratio"]
    print(f"results: {write_result(recipe, summary)}")
    print(json.dumps({"bench": recipe, **summary}))


if __name__ == "__main__":
    main(sys.argv[1:])
