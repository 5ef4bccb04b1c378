"""Runner overhead: IterRunner (with its hooks) against a hand-written Accelerate loop.

Both train the same model (the quickstart segmentor) on the same in-memory batches with the
same optimizer, schedule and precision, one Accelerator, interleaved in blocks in this one
process. Prints the median per-step time of each and their ratio (target: at most 1.03).

    python bench/runner_overhead.py [--quick] [--precision no|bf16]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from hooktrain.hooks import build_hooks
from hooktrain.models import build_segmentor
from hooktrain.optim import build_optimizer, build_scheduler
from hooktrain.recipe import load_recipe
from hooktrain.runner import IterRunner, make_accelerator

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def make_batches(num_classes: int, batch_size: int, size: int, count: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(batch_size, 3, size, size, generator=generator),
            "mask": torch.randint(0, num_classes, (batch_size, size, size), generator=generator),
        }
        for _ in range(count)
    ]


def build_parts(recipe, accelerator):
    torch.manual_seed(0)
    model = build_segmentor(recipe.model, num_classes=recipe.data.num_classes)
    optimizer = build_optimizer(model, recipe.optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, recipe.schedule, recipe.train.max_iters)
    return model, optimizer, scheduler


def hand_written_block(accelerator, model, optimizer, scheduler, batches, steps: int) -> None:
    """The loop a user would write with Accelerate directly."""
    for _ in range(steps):
        batch = next(batches)
        image = batch["image"].to(accelerator.device)
        mask = batch["mask"].to(accelerator.device)
        with accelerator.accumulate(model):
            terms = model(image, mask)
            loss = sum(v for k, v in terms.items() if "loss" in k)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def runner_block(runner: IterRunner, steps: int) -> None:
    runner.state.max_iters = runner.state.iter + steps
    runner.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="steps per interleaved block")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.size, args.batch_size = 3, 2, 64, 2

    recipe = load_recipe(QUICKSTART, [f"train.mixed_precision={args.precision}", "train.max_iters=100000"])
    accelerator = make_accelerator(recipe.train)
    logging.getLogger("hooktrain").setLevel(logging.WARNING)
    batches = make_batches(recipe.data.num_classes, args.batch_size, args.size)

    runner_parts = build_parts(recipe, accelerator)
    model, optimizer, scheduler = build_parts(recipe, accelerator)
    # The logger is the hook that runs every iteration; eval and checkpoint do real work at
    # their intervals (and at each block's end here), which is not runner overhead.
    hooks = build_hooks([{"type": "logger", "interval": 50}])
    runner = IterRunner(
        recipe=recipe,
        accelerator=accelerator,
        model=runner_parts[0],
        optimizer=runner_parts[1],
        scheduler=runner_parts[2],
        train_stream=itertools.cycle(batches),
        hooks=hooks,
        work_dir="work_dirs/bench_runner_overhead",
    )
    plain_batches = itertools.cycle(batches)

    # Warm up both (allocator, autograd graph caches) before timing.
    runner_block(runner, args.steps)
    hand_written_block(accelerator, model, optimizer, scheduler, plain_batches, args.steps)

    runner_times, plain_times = [], []
    for round_index in range(args.rounds):
        order = [("runner", runner_times), ("plain", plain_times)]
        if round_index % 2:
            order.reverse()  # alternate who goes first so drift hits both equally
        for name, times in order:
            start = time.perf_counter()
            if name == "runner":
                runner_block(runner, args.steps)
            else:
                hand_written_block(accelerator, model, optimizer, scheduler, plain_batches, args.steps)
            times.append((time.perf_counter() - start) / args.steps)

    runner_median = statistics.median(runner_times)
    plain_median = statistics.median(plain_times)
    ratio = runner_median / plain_median
    print(f"machine threads: {torch.get_num_threads()}, precision: {args.precision}, "
          f"batch {args.batch_size}x3x{args.size}x{args.size}, {args.rounds} rounds x {args.steps} steps")
    print(f"IterRunner (hooks: {', '.join(h.name for h in hooks)}): {runner_median * 1e3:.1f} ms/step")
    print(f"hand-written Accelerate loop: {plain_median * 1e3:.1f} ms/step")
    print(f"ratio: {ratio:.3f} (target <= 1.03)")
    print(json.dumps({
        "bench": "runner_overhead",
        "ratio": round(ratio, 4),
        "runner_ms_per_step": round(runner_median * 1e3, 2),
        "plain_ms_per_step": round(plain_median * 1e3, 2),
        "precision": args.precision,
        "device": str(accelerator.device),
    }))


if __name__ == "__main__":
    main()
