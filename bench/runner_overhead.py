"""Runner overhead: IterRunner (with its hooks) against a hand-written Accelerate loop.

Both train the quickstart segmentor exactly as ``recipes/quickstart.yaml`` builds it now (read
at run time: encoder, stages, head, losses, channels_last) on the same in-memory batches (by
default the recipe's own crop size and batch size) with the same optimizer, schedule and
precision, one Accelerator, in this one process. Each side gets the same warm-up (one block),
then ``--rounds`` interleaved blocks of ``--steps`` steps, the side that goes first alternating
every round; on CUDA each block is timed between two ``torch.cuda.synchronize()`` calls. Prints
the median per-step time of each and their ratio (target: at most 1.03).

    python bench/runner_overhead.py [--quick] [--precision no|bf16]

Results go to bench/results/runner_overhead.json (``bench/results.py``); the last line printed
is one line of JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import write_result

from hooktrain.engine.optim import build_optimizer, build_scheduler
from hooktrain.engine.runner import IterRunner, make_accelerator
from hooktrain.engine.step import total_loss
from hooktrain.hooks import build_hooks
from hooktrain.models import build_recipe_segmentor
from hooktrain.recipe.schema import load_recipe

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
    model = build_recipe_segmentor(recipe)
    optimizer = build_optimizer(model, recipe.optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, recipe.schedule, recipe.train.max_iters)
    return model, optimizer, scheduler


def describe_model(recipe, model) -> dict:
    """What was measured: the quickstart model's encoder, stages, head and size."""
    encoder = recipe.model.encoder
    return {
        "encoder": encoder.name,
        "out_indices": encoder.out_indices,
        "decode_head": recipe.model.decode_head.type,
        "channels_last": recipe.model.channels_last,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def hand_written_block(accelerator, model, optimizer, scheduler, batches, steps: int) -> None:
    """The loop a user would write with Accelerate directly."""
    for _ in range(steps):
        batch = next(batches)
        image = batch["image"].to(accelerator.device)
        mask = batch["mask"].to(accelerator.device)
        with accelerator.accumulate(model):
            terms = model(image, mask)
            loss = total_loss(terms)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def runner_block(runner: IterRunner, steps: int) -> None:
    runner.state.max_iters = runner.state.iter + steps
    runner.run()


def timed(block, device: torch.device) -> float:
    """Seconds ``block()`` takes, the device synchronised before and after on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    block()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--size", type=int, help="image side (default: the recipe's train crop size)")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's train batch size")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="steps per interleaved block")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.size, args.batch_size = 2, 1, 32, 2  # both orders, one step each

    recipe = load_recipe(QUICKSTART, [f"train.mixed_precision={args.precision}", "train.max_iters=100000"])
    args.size = args.size or recipe.data.train.pipeline.crop_size[0]
    args.batch_size = args.batch_size or recipe.data.train.batch_size
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
        work_dir=tempfile.mkdtemp(prefix="hooktrain-runner-overhead-"),
    )
    plain_batches = itertools.cycle(batches)
    blocks = {
        "runner": lambda: runner_block(runner, args.steps),
        "plain": lambda: hand_written_block(accelerator, model, optimizer, scheduler, plain_batches, args.steps),
    }

    # The same warm-up for both (allocator, autograd graph caches) before timing.
    for block in blocks.values():
        block()
    times = {name: [] for name in blocks}
    for round_index in range(args.rounds):
        order = list(blocks) if round_index % 2 == 0 else list(blocks)[::-1]  # alternate who goes first
        for name in order:
            times[name].append(timed(blocks[name], accelerator.device) / args.steps)
    runner.watch.close()

    runner_median, plain_median = (statistics.median(times[name]) for name in ("runner", "plain"))
    ratio = runner_median / plain_median
    measured = describe_model(recipe, model)
    print(f"model: recipes/quickstart.yaml, {measured['encoder']} stages {measured['out_indices']} + "
          f"{measured['decode_head']}, channels_last {measured['channels_last']}, "
          f"{measured['parameters']:,} parameters")
    print(f"machine threads: {torch.get_num_threads()}, precision: {args.precision}, "
          f"batch {args.batch_size}x3x{args.size}x{args.size}, {args.rounds} rounds x {args.steps} steps")
    print(f"IterRunner (hooks: {', '.join(h.name for h in hooks)}): {runner_median * 1e3:.1f} ms/step")
    print(f"hand-written Accelerate loop: {plain_median * 1e3:.1f} ms/step")
    print(f"ratio: {ratio:.3f} (target <= 1.03)")
    summary = {
        "quick": args.quick,
        "ratio": round(ratio, 4),
        "runner_ms_per_step": round(runner_median * 1e3, 2),
        "plain_ms_per_step": round(plain_median * 1e3, 2),
        "precision": args.precision,
        "device": str(accelerator.device),
        "batch": args.batch_size,
        "size": args.size,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "threads": torch.get_num_threads(),
        "model": measured,
    }
    print(f"results: {write_result('runner_overhead', summary)}")
    print(json.dumps({"bench": "runner_overhead", **summary}))


if __name__ == "__main__":
    main()
