"""What ``model.encoder.grad_checkpointing`` saves and costs: the ViT-B/16 + MultiLevelNeck +
UPerNet of ``recipes/mmseg/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.yaml`` (150 classes,
random weights), one training step (forward, backward, AdamW) at 512x512, with the ViT's 12
blocks recomputed in the backward pass (timm's ``set_grad_checkpointing``) and without.

Each measurement runs in a fresh process (``--child off|on``): the model is built, one step
warms up, then ``--steps`` steps are timed (median). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps; on the CPU the process's peak resident
set (``ru_maxrss``), which includes the weights and AdamW's state, identical on both sides, so
the difference between the sides is the activation memory saved. The sides alternate
(off, on, off, on, ... for ``--rounds``) so that a machine's background load hits both; each
side's figure is the median over its processes.

    python bench/grad_checkpointing.py                # CPU, 512x512, batch 2
    python bench/grad_checkpointing.py --quick        # smoke run: ViT-Ti, 64x64, 1 step, 1 round
    python bench/grad_checkpointing.py --device cuda  # batch 8, bf16 autocast

Results go to bench/results/grad_checkpointing.json (``-cuda.json`` on CUDA); the last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mmseg" / "vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.yaml"


def child(args) -> dict:
    """One process's measurement: median step seconds and peak memory in GiB."""
    import torch

    from hooktrain.engine.optim import build_optimizer
    from hooktrain.engine.step import total_loss
    from hooktrain.models.segmentor import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    options = [f"model.encoder.grad_checkpointing={args.child == 'on'}"]
    if args.quick:  # a smoke run of the same code path with a small ViT
        options += ["model.encoder.name=vit_tiny_patch16_224", "model.neck.out_channels=48",
                    "model.decode_head.channels=32", "model.aux_head.channels=16"]  # fmt: skip
    recipe = load_recipe(RECIPE, options)
    device = torch.device(args.device)
    model = build_recipe_segmentor(recipe, pretrained=False).to(device).train()
    optimizer = build_optimizer(model, recipe.optimizer)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    mask = torch.randint(0, 150, (args.batch, args.size, args.size), generator=generator).to(device)
    dtype = torch.bfloat16 if args.bf16 else None

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = total_loss(model(image, mask))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(step() for _ in range(args.steps))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"side": args.child, "step_s": seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 8 if args.device == "cuda" else 2  # BatchNorm after 1x1 pooling needs 2
    if args.device == "cuda":
        args.bf16 = True
    if args.quick and not args.child:
        args.size, args.steps, args.rounds = 64, 1, 1
    if args.child:
        print(json.dumps(child(args)))
        return

    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for side in ("off", "on"):
            argv = [sys.executable, __file__, "--child", side, "--device", args.device, "--size", str(args.size),
                    "--batch", str(args.batch), "--steps", str(args.steps)]  # fmt: skip
            argv += (["--bf16"] if args.bf16 else []) + (["--quick"] if args.quick else [])
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"the {side} process failed:\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"checkpointing {side}: {runs[side][-1]}", flush=True)
    step = {side: statistics.median(r["step_s"] for r in runs[side]) for side in runs}
    peak = {side: statistics.median(r["peak_gib"] for r in runs[side]) for side in runs}
    summary = {
        "device": args.device,
        "model": ("ViT-Ti/16 (smoke)" if args.quick else "ViT-B/16")
        + " + MultiLevelNeck + UPerNet (recipes/mmseg/vit_vit-b16_mln_upernet_...)",
        "size": args.size,
        "batch": args.batch,
        "precision": "bf16" if args.bf16 else "fp32",
        "steps": args.steps,
        "rounds": args.rounds,
        "peak_memory": "cuda max_memory_allocated" if args.device == "cuda" else "process peak RSS (ru_maxrss)",
        "step_s_off": round(step["off"], 3),
        "step_s_on": round(step["on"], 3),
        "step_time_ratio": round(step["on"] / step["off"], 3),
        "peak_gib_off": round(peak["off"], 3),
        "peak_gib_on": round(peak["on"], 3),
        "peak_saved_gib": round(peak["off"] - peak["on"], 3),
        "peak_ratio": round(peak["on"] / peak["off"], 3),
        "quick": args.quick,
    }
    sys.path.insert(0, str(Path(__file__).parent))
    from results import write_result

    write_result("grad_checkpointing", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
