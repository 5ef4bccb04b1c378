"""What ``train.strategy`` saves per process: peak memory and step time of the ViT-B/16 +
MultiLevelNeck + UPerNet of ``recipes/mmseg/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.yaml``
(150 classes, random weights, AdamW) under DDP, FSDP (FSDP1) and FSDP2, each with and without
the ViT's activation checkpointing (``model.encoder.grad_checkpointing``): six configurations,
each its own ``accelerate launch`` of 2 CPU processes (gloo; ``ACCELERATE_USE_CPU=1``, one
thread each), measured in the same run.

Each process (``--worker``) builds its accelerator and model as the runner does
(``make_accelerator(recipe.train)``, ``build_recipe_segmentor``, ``prepare_model``), then runs
``--warmup`` + ``--steps`` optimizer steps of ``hooktrain.engine.step.train_step`` on random
images and masks. Per rank it records:

- ``state_mib``: the bytes of parameters + gradients + AdamW state it holds, counted exactly
  from the tensors' local shards (``DTensor.to_local()`` under FSDP2; under FSDP1 the original
  parameters, views of the rank's FlatParameter shard; the gradients as the optimizer sees them
  at its step). The clean evidence of sharding: the process's RSS on the CPU is noisy. DDP's
  gradient buckets (a second copy of the gradients, inside DDP's reducer) are not counted;
- ``rss_before_model_gib``: the resident set after the imports and the accelerator, before the
  model is built (the interpreter, torch and gloo: the same in every configuration);
- ``peak_rss_gib``: the process's peak resident set (``ru_maxrss``) over the whole run, model
  building included (every rank builds the whole model before FSDP shards it), and
  ``peak_over_baseline_gib``, the peak minus the resident set before the model;
- ``step_s``: the median of the timed steps.

The table shows the larger of the two ranks' figures and the ratios to DDP with the same
checkpointing setting, measured in the same run.

    python bench/fsdp_memory.py                 # 256x256, batch 2 per process, 1 warm-up + 3 steps
    python bench/fsdp_memory.py --size 512      # the recipe's crop (minutes per step on 2 cores)
    python bench/fsdp_memory.py --quick         # smoke run: ViT-Ti, 64x64, 1 step, DDP and FSDP2 with checkpointing

Batch 2 per process: UPerNet's pyramid pooling has a 1x1 scale followed by BatchNorm, which
refuses one value per channel in training. Results go to bench/results/fsdp_memory.json; the
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mmseg" / "vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.yaml"
STRATEGIES = ("ddp", "fsdp", "fsdp2")
CHECKPOINTING = ("off", "on")
QUICK_CONFIGS = (("ddp", "on"), ("fsdp2", "on"))
QUICK_OPTIONS = ["model.encoder.name=vit_tiny_patch16_224", "model.neck.out_channels=48",
                 "model.decode_head.channels=32", "model.aux_head.channels=16"]  # fmt: skip
PROCESSES = 2
MIB, GIB = 2**20, 2**30


def rss_bytes() -> int:
    """The process's resident set now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def local_bytes(tensor) -> int:
    """Bytes this rank holds of ``tensor`` (its local shard for a DTensor)."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def worker(args) -> None:
    """One rank of one configuration; writes ``<out>/rank<N>.json``."""
    import torch
    from accelerate.utils import set_seed

    from hooktrain.engine.accelerator import make_accelerator, prepare_model
    from hooktrain.engine.step import train_step
    from hooktrain.models.segmentor import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    options = [f"train.strategy={args.strategy}", f"model.encoder.grad_checkpointing={args.checkpointing == 'on'}",
               "train.mixed_precision=no"]  # fmt: skip
    recipe = load_recipe(RECIPE, options + (QUICK_OPTIONS if args.quick else []))
    accelerator = make_accelerator(recipe.train)
    rank = accelerator.process_index
    rss_before_model, peak_before_model = rss_bytes(), peak_rss_bytes()

    set_seed(recipe.train.seed)  # every rank builds the same model (FSDP does not broadcast it)
    model = build_recipe_segmentor(recipe, pretrained=False).train()
    parameters = sum(p.numel() for p in model.parameters())
    model, optimizer, _ = prepare_model(accelerator, model, recipe)
    rss_after_prepare = rss_bytes()

    inner = optimizer.optimizer  # Accelerate's wrapper holds torch's AdamW
    grad_bytes: list[int] = []

    def count_grads(opt, *_) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        grad_bytes.append(sum(local_bytes(g) for g in grads))

    inner.register_step_pre_hook(count_grads)
    generator = torch.Generator().manual_seed(1000 + rank)
    batch = {
        "image": torch.randn(args.batch, 3, args.size, args.size, generator=generator),
        "mask": torch.randint(0, 150, (args.batch, args.size, args.size), generator=generator),
    }
    seconds, losses = [], []
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        terms, _ = train_step(accelerator, model, optimizer, [batch])
        seconds.append(time.perf_counter() - started)
        losses.append(float(terms["loss"]))
    timed = seconds[args.warmup :]

    seen, param_bytes = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            param_bytes += local_bytes(p)
    optimizer_bytes = sum(local_bytes(v) for state in inner.state.values() for v in state.values()
                          if torch.is_tensor(v))  # fmt: skip
    state = param_bytes + grad_bytes[-1] + optimizer_bytes
    peak = peak_rss_bytes()
    record = {
        "rank": rank,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "parameters": parameters,
        "param_mib": round(param_bytes / MIB, 2),
        "grad_mib": round(grad_bytes[-1] / MIB, 2),
        "optimizer_state_mib": round(optimizer_bytes / MIB, 2),
        "state_mib": round(state / MIB, 2),
        "rss_before_model_gib": round(rss_before_model / GIB, 3),
        "peak_before_model_gib": round(peak_before_model / GIB, 3),
        "rss_after_prepare_gib": round(rss_after_prepare / GIB, 3),
        "peak_rss_gib": round(peak / GIB, 3),
        "peak_over_baseline_gib": round((peak - rss_before_model) / GIB, 3),
        "step_s": round(statistics.median(timed), 3),
        "steps_s": [round(s, 3) for s in seconds],
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "threads": torch.get_num_threads(),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(strategy: str, checkpointing: str, args) -> dict:
    """One configuration: ``accelerate launch`` of 2 CPU processes; their records, or the error."""
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as out:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), __file__, "--worker", "--strategy", strategy,
            "--checkpointing", checkpointing, "--size", str(args.size), "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", out,
        ] + (["--quick"] if args.quick else [])  # fmt: skip
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout, check=False)  # fmt: skip
        wall = round(time.perf_counter() - started, 1)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    config = {"strategy": strategy, "grad_checkpointing": checkpointing == "on", "wall_s": wall}
    if done.returncode != 0 or len(ranks) != PROCESSES:
        tail = (done.stderr or done.stdout)[-4000:]
        return {**config, "ok": False, "error": tail, "command": " ".join(command)}
    worst = lambda key: max(r[key] for r in ranks)
    return {
        **config,
        "ok": True,
        "distributed_type": ranks[0]["distributed_type"],
        "parameters": ranks[0]["parameters"],
        "state_mib": worst("state_mib"),
        "rss_before_model_gib": worst("rss_before_model_gib"),
        "peak_rss_gib": worst("peak_rss_gib"),
        "peak_over_baseline_gib": worst("peak_over_baseline_gib"),
        "step_s": worst("step_s"),
        "ranks": ranks,
    }


def add_ratios(runs: list[dict]) -> None:
    """Each run's figures over DDP's with the same checkpointing setting (same run)."""
    ddp = {r["grad_checkpointing"]: r for r in runs if r["strategy"] == "ddp" and r["ok"]}
    for run in runs:
        base = ddp.get(run["grad_checkpointing"])
        if run["ok"] and base is not None:
            run["vs_ddp"] = {key: round(run[key] / base[key], 3)
                             for key in ("state_mib", "peak_rss_gib", "peak_over_baseline_gib", "step_s")}  # fmt: skip


def print_table(runs: list[dict]) -> None:
    header = ("strategy", "ckpt", "state MiB/rank", "x DDP", "RSS before model", "peak RSS GiB", "peak-base GiB",
              "x DDP", "step s", "x DDP")  # fmt: skip
    print(" | ".join(header))
    for r in runs:
        ckpt = "on" if r["grad_checkpointing"] else "off"
        if not r["ok"]:
            print(f"{r['strategy']} | {ckpt} | FAILED (see the JSON's error)")
            continue
        ratio = r.get("vs_ddp", {})
        cells = (r["strategy"], ckpt, f"{r['state_mib']:.1f}", f"{ratio.get('state_mib', float('nan')):.3f}",
                 f"{r['rss_before_model_gib']:.2f}", f"{r['peak_rss_gib']:.2f}", f"{r['peak_over_baseline_gib']:.2f}",
                 f"{ratio.get('peak_over_baseline_gib', float('nan')):.3f}", f"{r['step_s']:.2f}",
                 f"{ratio.get('step_s', float('nan')):.3f}")  # fmt: skip
        print(" | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="images per process")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=CHECKPOINTING, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.size, args.steps, args.warmup = 64, 1, 0
    configs = QUICK_CONFIGS if args.quick else [(s, c) for s in STRATEGIES for c in CHECKPOINTING]

    started = time.perf_counter()
    runs = []
    for strategy, checkpointing in configs:
        run = launch(strategy, checkpointing, args)
        status = f"step {run['step_s']:.2f} s, state {run['state_mib']:.1f} MiB/rank" if run["ok"] else "FAILED"
        print(f"{strategy} checkpointing {checkpointing}: {status} ({run['wall_s']} s)", flush=True)
        if not run["ok"]:
            print(run["error"], file=sys.stderr)
        runs.append(run)
    add_ratios(runs)
    print_table(runs)
    parameters = next((r["parameters"] for r in runs if r["ok"]), None)
    summary = {
        "device": "cpu",
        "model": ("ViT-Ti/16 (smoke)" if args.quick else "ViT-B/16")
        + " + MultiLevelNeck + UPerNet (recipes/mmseg/vit_vit-b16_mln_upernet_...), AdamW",
        "parameters": parameters,
        "size": args.size,
        "batch_per_process": args.batch,
        "processes": PROCESSES,
        "threads_per_process": args.threads,
        "precision": "fp32",
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_memory": "process peak RSS (ru_maxrss), the larger rank; state: exact local bytes of parameters, "
        "gradients and AdamW state, the larger rank",
        "runs": runs,
        "wall_s": round(time.perf_counter() - started, 1),
        "quick": args.quick,
    }
    sys.path.insert(0, str(Path(__file__).parent))
    from results import write_result

    write_result("fsdp_memory", summary)
    print(json.dumps(summary))
    if not all(r["ok"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
