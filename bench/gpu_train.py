"""End-to-end training speed of recipes/ade20k.yaml on one GPU, and how many DataLoader
workers keep it fed.

Synthetic ADE20K-like examples (bench/data_pipeline.py's 683x512 JPEG + PNG, labels 0..150) are
written as parquet shards in the Hub layout and streamed through the recipe's own `hub` source
and full train pipeline. For each (batch size, workers) pair the real command runs,

    python -m hooktrain recipes/ade20k.yaml --cfg-options train.max_iters=N ...

with random encoder weights (no download) and the recipe's bf16 autocast, and its
metrics.jsonl gives the share of iteration time spent waiting for data and the peak GPU memory;
images/s come from ``bench/synced_timer.py``, which times every iteration after the first
logged interval (cuDNN autotuning, workers starting) with the GPU synchronised at both ends.

    python bench/gpu_train.py                      # on a CUDA machine
    python bench/gpu_train.py --quick              # a CPU smoke run (2 iterations at 64 px)

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import make_example, write_parquet  # noqa: E402
from results import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, examples: int, shards: int) -> None:
    """`examples` training and 8 validation examples as Hub-layout parquet shards."""
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True)
    train = [make_example(rng) for _ in range(examples)]
    for shard in range(shards):
        write_parquet(data / f"train-{shard:05d}-of-{shards:05d}.parquet", train[shard::shards])
    write_parquet(data / "validation-00000-of-00001.parquet", [make_example(rng) for _ in range(8)])


def train(dataset: Path, work_dir: Path, *, batch: int, workers: int, iters: int, interval: int,
          extra: list[str]) -> dict:  # fmt: skip
    """One real training run; images/s, data-wait share and peak memory from its history."""
    options = [
        f"train.max_iters={iters}",
        "model.encoder.pretrained=false",
        f"data.train.batch_size={batch}",
        f"data.train.num_workers={workers}",
        f"data.train.source={{type: hub, path: {dataset}, split: train}}",
        f"data.val.source={{type: hub, path: {dataset}, split: validation}}",
        f"hooks=[{{type: logger, interval: {interval}}}, "
        f"{{type: 'synced_timer:SyncedTimer', start: {interval}, out: '{work_dir / 'timing.json'}'}}]",
        *extra,
    ]
    command = [sys.executable, "-m", "hooktrain", str(ROOT / "recipes" / "ade20k.yaml"),
               "--work-dir", str(work_dir), "--cfg-options", *options]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=work_dir.parent, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "train/time" in row][1:] or rows[-1:]
    timing = json.loads((work_dir / "timing.json").read_text())  # after the first interval, synchronised
    step = timing["seconds"] / (timing["iters"][1] - timing["iters"][0])
    data = sum(row["train/data_time"] for row in rows) / len(rows)
    return {
        "batch": batch,
        "workers": workers,
        "images_per_s": round(batch / step, 1),
        "step_ms": round(1000 * step, 1),
        "data_wait_share": round(data / step, 4),
        "peak_memory_mib": round(rows[-1].get("train/memory_mb", 0.0), 1),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 2 iterations at 64 px")
    parser.add_argument("--runs", default="2:1,2:2,8:2,8:4,8:8", help="batch:workers pairs")
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args()
    extra = []
    if args.quick:
        args.runs, args.iters, args.interval, args.examples = "2:0", 2, 1, 8
        extra = ["data.train.pipeline.scale=[128,64]", "data.train.pipeline.crop_size=[64,64]"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "ade20k-synthetic"
        write_dataset(dataset, args.examples, shards=16 if args.examples >= 16 else 1)
        results = []
        for pair in args.runs.split(","):
            batch, workers = (int(x) for x in pair.split(":"))
            work_dir = Path(tmp) / f"b{batch}w{workers}"
            result = train(dataset, work_dir, batch=batch, workers=workers, iters=args.iters,
                           interval=args.interval, extra=extra)  # fmt: skip
            print(
                f"batch {batch}, {workers} workers: {result['images_per_s']} images/s "
                f"({result['step_ms']} ms/it), data wait {100 * result['data_wait_share']:.1f}%, "
                f"peak {result['peak_memory_mib']} MiB",
                flush=True,
            )
            results.append(result)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = {"quick": args.quick, "device": device, "recipe": "ade20k", "iters": args.iters, "runs": results}
    print(f"results: {write_result('gpu_train', summary)}")
    print(json.dumps({"bench": "gpu_train", **summary}))


if __name__ == "__main__":
    main()
