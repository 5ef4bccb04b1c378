"""SegFormer-B0 training speed on one GPU: hooktrain end to end, hooktrain's model-only step, and
MMSegmentation 1.2.2 training the same model on the same card, in one run.

- **End to end**, per variant (``VARIANTS``): the real command

      python -m hooktrain recipes/ade20k.yaml --cfg-options train.max_iters=N ...

  on synthetic ADE20K-like examples (bench/data_pipeline.py's 683x512 JPEG + PNG, labels
  0..150) written as parquet shards in the Hub layout and streamed through the recipe's own
  ``hub`` source and full train pipeline, with random encoder weights (no download), bf16, one
  process with the global batch (``--batch``, 16 as the recipe's 8 GPUs x 2). Images/s come from
  ``bench/synced_timer.py`` (every iteration after the first logged interval, the GPU
  synchronised at both ends); data wait and peak memory from the run's metrics.jsonl. Each
  variant switches on one thing more than the one before it (photometric distortion and
  normalisation on the device, torch.compile, CUDA graphs), or one thing off (pinned memory),
  so each is measured on its own.
- **Model only**: the same model, optimizer and step (forward with the mask, backward, gradient
  clipping, AdamW) on one random batch already on the device, per compile setting, and with
  fused against unfused (foreach) AdamW. A variant's data-bound gap is ``1 - end-to-end /
  model-only`` with the same compile setting.
- **MMSegmentation 1.2.2** (``bench/mmseg_train.py``): its own config
  ``segformer_mit-b0_8xb2-160k_ade20k-512x512``, pipeline, data preprocessor and runner, in its
  throwaway environment, on the same examples (written in its ADE20K folder layout), the same
  batch, workers and bf16 (AmpOptimWrapper), timed the same way.

    python bench/gpu_train.py                      # on a CUDA machine (about 8 minutes on an H100)
    python bench/gpu_train.py --quick              # a CPU smoke run: 64 px, a few iterations, no compile

Results go to bench/results/gpu_train-cuda.json (``bench/results.py``); the last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import make_example, write_parquet  # noqa: E402
from mmseg_train import measure_mmseg_train  # noqa: E402
from results import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "ade20k.yaml"
GPU_AUGMENT = ["data.train.gpu_augment=true"]
COMPILE = ["model.compile=true"]
CUDA_GRAPHS = ["model.compile=true", "model.compile_mode=reduce-overhead"]
# name: (--cfg-options, the model-only setting it is compared with)
VARIANTS = {
    "cpu_augment": ([], "eager"),
    "gpu_augment": (GPU_AUGMENT, "eager"),
    "gpu_augment_compile": (GPU_AUGMENT + COMPILE, "compile"),
    "gpu_augment_cuda_graphs": (GPU_AUGMENT + CUDA_GRAPHS, "cuda_graphs"),
    "gpu_augment_compile_unpinned": (GPU_AUGMENT + COMPILE + ["data.train.pin_memory=false"], "compile"),
}
# name: (model overrides, fused AdamW where the device allows it)
MODEL_ONLY = {
    "eager": ({}, True),
    "eager_unfused_adamw": ({}, False),
    "compile": ({"compile": True}, True),
    "cuda_graphs": ({"compile": True, "compile_mode": "reduce-overhead"}, True),
}
QUICK_VARIANTS, QUICK_MODEL_ONLY = ("cpu_augment", "gpu_augment"), ("eager", "eager_unfused_adamw")


def write_dataset(root: Path, examples: int, shards: int) -> None:
    """`examples` training and 8 validation examples as Hub-layout parquet shards."""
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True)
    train = [make_example(rng) for _ in range(examples)]
    for shard in range(shards):
        write_parquet(data / f"train-{shard:05d}-of-{shards:05d}.parquet", train[shard::shards])
    write_parquet(data / "validation-00000-of-00001.parquet", [make_example(rng) for _ in range(8)])


def end_to_end(dataset: Path, work_dir: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One real training run; images/s, data-wait share and peak memory from its history."""
    options = [
        f"train.max_iters={args.iters}",
        "model.encoder.pretrained=false",
        f"data.train.batch_size={args.batch}",
        f"data.train.num_workers={args.workers}",
        f"data.train.source={{type: hub, path: {dataset}, split: train}}",
        f"data.val.source={{type: hub, path: {dataset}, split: validation}}",
        f"hooks=[{{type: logger, interval: {args.interval}}}, "
        f"{{type: 'synced_timer:SyncedTimer', start: {args.interval}, out: '{work_dir / 'timing.json'}'}}]",
        *args.size_options,
        *extra,
    ]
    command = [sys.executable, "-m", "hooktrain", str(RECIPE), "--work-dir", str(work_dir), "--cfg-options", *options]
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
        "images_per_s": round(args.batch / step, 1),
        "step_ms": round(1000 * step, 2),
        "data_wait_share": round(data / step, 4),
        "peak_memory_mib": round(rows[-1].get("train/memory_mb", 0.0), 1),
        "wall_s": round(wall, 1),
    }


def model_only(args: argparse.Namespace, device: torch.device, overrides: dict, fused: bool) -> dict:
    """The recipe's model and optimizer stepping on one random batch already on ``device``."""
    from hooktrain.engine.optim import build_optimizer, param_groups
    from hooktrain.engine.step import total_loss
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    options = ["model.encoder.pretrained=false", *args.size_options]
    recipe = load_recipe(RECIPE, options)
    recipe.model = recipe.model.model_copy(update=overrides)
    torch.manual_seed(0)
    model = build_recipe_segmentor(recipe).to(device).train()
    if fused:
        optimizer = build_optimizer(model, recipe.optimizer, device)
    else:
        cfg = recipe.optimizer
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)
    crop_h, crop_w = recipe.data.train.pipeline.crop_size
    image = torch.randn(args.batch, 3, crop_h, crop_w, device=device)
    mask = torch.randint(0, recipe.data.num_classes, (args.batch, crop_h, crop_w), device=device)
    mask[:, : crop_h // 8] = recipe.data.ignore_index  # some padding, as random crops have
    clip = recipe.train.clip_grad_norm or float("inf")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = total_loss(model(image, mask))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.model_warmup):  # compiles, autotunes, records CUDA graphs
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.model_rounds):
        started = time.perf_counter()
        for _ in range(args.model_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / args.model_steps)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {
        "images_per_s": round(args.batch / seconds, 1),
        "step_ms": round(1000 * seconds, 2),
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "peak_memory_mib": None if peak is None else round(peak, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 64 px, a few iterations, no compile")
    parser.add_argument("--batch", type=int, default=16, help="global batch, on one device")
    parser.add_argument("--workers", type=int, default=12, help="DataLoader workers (both frameworks)")
    parser.add_argument("--iters", type=int, default=240)
    parser.add_argument("--interval", type=int, default=40, help="timing starts after this iteration")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--model-only", default=",".join(MODEL_ONLY))
    parser.add_argument("--no-mmseg", action="store_true", help="leave MMSegmentation out")
    args = parser.parse_args(argv)
    args.size_options, args.model_warmup, args.model_steps, args.model_rounds = [], 10, 20, 5
    if args.quick:
        args.batch, args.workers, args.iters, args.interval, args.examples = 2, 0, 3, 1, 8
        args.variants, args.model_only = ",".join(QUICK_VARIANTS), ",".join(QUICK_MODEL_ONLY)
        args.size_options = ["data.train.pipeline.scale=[128,64]", "data.train.pipeline.crop_size=[64,64]"]
        args.model_warmup, args.model_steps, args.model_rounds = 1, 1, 2
    args.bf16 = torch.cuda.is_available()  # the recipe's bf16 on the GPU; emulated bf16 on most CPUs is slow
    if not args.bf16:
        args.size_options.append("train.mixed_precision=no")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_results = {}
    for name in args.model_only.split(","):
        overrides, fused = MODEL_ONLY[name]
        model_results[name] = model_only(args, device, overrides, fused)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # its memory, for the next measurement and the end-to-end runs
        print(f"model only, {name}: {model_results[name]['images_per_s']} images/s", flush=True)
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "ade20k-synthetic"
        write_dataset(dataset, args.examples, shards=16 if args.examples >= 16 else 1)
        for name in args.variants.split(","):
            options, compared_with = VARIANTS[name]
            result = end_to_end(dataset, Path(tmp) / name, args, options)
            reference = model_results.get(compared_with)
            result["model_only"] = compared_with
            result["data_bound_gap"] = (
                None if reference is None else round(1 - result["images_per_s"] / reference["images_per_s"], 4)
            )
            variants[name] = result
            wait = f"data wait {100 * result['data_wait_share']:.1f}%"
            print(f"end to end, {name}: {result['images_per_s']} images/s ({result['step_ms']} ms/it), {wait}, "
                  f"peak {result['peak_memory_mib']} MiB", flush=True)  # fmt: skip
        mmseg = None
        if not args.no_mmseg:
            crop = 64 if args.quick else None
            mmseg = measure_mmseg_train(device=device.type, batch=args.batch, workers=args.workers, iters=args.iters,
                                        start=args.interval, examples=args.examples, crop=crop, bf16=args.bf16,
                                        root=Path(tmp) / "mmseg", threads=1 if args.quick else None)  # fmt: skip
            print(f"MMSegmentation 1.2.2: {mmseg.get('images_per_s', mmseg.get('unavailable'))} images/s", flush=True)
    best = max(variants, key=lambda name: variants[name]["images_per_s"])
    summary = {
        "quick": args.quick,
        "device": device.type,
        "recipe": "ade20k",
        "batch": args.batch,
        "workers": args.workers,
        "precision": "bf16" if args.bf16 else "fp32",
        "iters": args.iters,
        "timed_from": args.interval,
        "variants": variants,
        "model_only": model_results,
        "mmseg": mmseg,
        "best": best,
        "images_per_s": variants[best]["images_per_s"],
        "ratio_vs_mmseg": round(variants[best]["images_per_s"] / mmseg["images_per_s"], 3)
        if mmseg and "images_per_s" in mmseg
        else None,
    }
    print(f"results: {write_result('gpu_train', summary)}")
    print(json.dumps({"bench": "gpu_train", **summary}))
    return summary


if __name__ == "__main__":
    main()
