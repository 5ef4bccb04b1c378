"""What Mask2Former's Hungarian matching costs inside its criterion
(``hooktrain.models.mask_criterion``): 512x512 targets of 150 classes with ~20 segments per image
(Voronoi cells, a band of ignored pixels), batch 2, mask logits at 128x128, 100 and 200 queries,
12544 points, ``--layers`` decoder layers (10: Mask2Former's 9 layers and the prediction before
them, each supervised).

Measured, per number of queries, in the same run:

- the matching (``hungarian_match`` on one layer's predictions): seconds per image, the seconds
  of its ``linear_sum_assignment`` alone, and its peak tensor memory;
- the loss's point sampling (uncertainty-sampled points of one layer's matched masks, and the
  predicted and target values there): its peak tensor memory and seconds;
- one criterion step: forward and backward of ``MaskClassificationLoss`` over all layers, with
  the time spent in the matching during that step; the matching's share of the step (the median
  over the steps) is the ratio printed, its baseline measured in the same steps.
  transformers' ``Mask2FormerLoss`` step on the same inputs (when installed), alternated with
  ours, is the second baseline.

Times are the fastest of ``--repeats`` runs, the run least slowed by other load on the machine.

Peak memory is the tensor memory torch allocated above what was allocated at the start: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the allocation events ``torch.profiler`` records
with ``profile_memory=True`` (each allocation and free of torch's CPU allocator, summed in time
order; the peak of that sum). ``tracemalloc`` only sees Python's allocator, not torch's, and the
process's peak RSS (``ru_maxrss``) is a high-water mark of the whole process that a region under
an earlier peak never moves, and which freed-and-reused heap pages blur. The profiler's events are
exact tensor bytes; what scipy allocates (the small cost matrix copy) is left out.

    python bench/mask_matching.py                # CPU, 100 and 200 queries (~2 minutes on 2 busy cores)
    python bench/mask_matching.py --quick        # smoke run: 128x128 targets, 20 queries, 2 layers
    python bench/mask_matching.py --device cuda

Results go to bench/results/mask_matching.json (``-cuda.json`` on CUDA); the last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hooktrain.models import mask_criterion  # noqa: E402
from hooktrain.models.mask_criterion import (  # noqa: E402
    MaskClassificationLoss,
    sample_matched_targets,
    sample_points_by_uncertainty,
    semantic_to_segments,
)
from hooktrain.models.matching import hungarian_match, matching_cost, sample_at_points  # noqa: E402

IGNORE = 255
MiB = 2**20


def voronoi_maps(batch: int, size: int, segments: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` maps of ``segments`` Voronoi cells, each of a different class, the top 5% ignored."""
    maps = []
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(batch):
        seeds = torch.randint(0, size, (segments, 2), generator=generator)
        classes = torch.randperm(num_classes, generator=generator)[:segments]
        distance = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2
        semantic = classes[distance.argmin(0)]
        semantic[: size // 20] = IGNORE
        maps.append(semantic)
    return torch.stack(maps)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_tensor_mib(run: Callable[[], object], device: torch.device) -> float:
    """The peak of the tensor memory ``run`` allocates, above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - before) / MiB
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak / MiB


def fastest_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` runs: the one least slowed by other load on the machine."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def measure(queries: int, targets, args, device: torch.device) -> dict:
    """The matching, the point sampling and the criterion step at ``queries`` queries."""
    generator = torch.Generator().manual_seed(queries)
    predictions = [
        (
            (2 * torch.randn(args.batch, queries, args.mask_size, args.mask_size, generator=generator)).to(device),
            torch.randn(args.batch, queries, args.classes + 1, generator=generator).to(device),
        )
        for _ in range(args.layers)
    ]
    weights = {"class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0}
    mask_logits, class_logits = predictions[-1]

    def match():
        return hungarian_match(mask_logits, class_logits, targets, num_points=args.points, **weights)

    match()  # warm-up
    match_s = fastest_seconds(match, args.repeats, device) / args.batch
    match_mib = peak_tensor_mib(match, device)
    costs = [
        matching_cost(logits, classes_logits, classes, masks, torch.rand(1, args.points, 2, device=device), **weights)
        .cpu()
        .numpy()
        for logits, classes_logits, (classes, masks) in zip(mask_logits, class_logits, targets)
    ]
    from scipy.optimize import linear_sum_assignment

    assignment_s = fastest_seconds(lambda: [linear_sum_assignment(cost) for cost in costs], args.repeats, device)

    matches = match()
    images = torch.cat([torch.full_like(q, image) for image, (q, _) in enumerate(matches)])
    matched_logits = mask_logits[images, torch.cat([q for q, _ in matches])][:, None]

    def sample_points():
        points = sample_points_by_uncertainty(matched_logits, args.points, 3.0, 0.75)
        return sample_at_points(matched_logits, points), sample_matched_targets(targets, matches, points)

    sampling_s = fastest_seconds(sample_points, args.repeats, device)
    sampling_mib = peak_tensor_mib(sample_points, device)

    our_step = criterion_step(predictions, targets, args, device)
    their_step = transformers_step(predictions, targets, args, device)
    # Alternated, so that other load on the machine hits both sides alike.
    ours, theirs, shares = [], [], []
    for _ in range(args.repeats):
        seconds, matching_s = timed_with_matching(our_step, device)
        ours.append(seconds)
        shares.append(matching_s / seconds)
        if their_step is not None:
            theirs.append(fastest_seconds(their_step, 1, device))
    step_s = min(ours)
    result = {
        "queries": queries,
        "matching_s_per_image": round(match_s, 5),
        "assignment_s_per_image": round(assignment_s / args.batch, 6),
        "matching_peak_mib": round(match_mib, 2),
        "point_sampling_s": round(sampling_s, 5),
        "point_sampling_peak_mib": round(sampling_mib, 2),
        "criterion_step_s": round(step_s, 4),
        "criterion_step_peak_mib": round(peak_tensor_mib(our_step, device), 1),
        "matching_share_of_step": round(statistics.median(shares), 3),
    }
    if theirs:
        result.update(transformers_step_s=round(min(theirs), 4), step_vs_transformers=round(step_s / min(theirs), 3))
    return result


def criterion_step(predictions, targets, args, device: torch.device) -> Callable[[], None]:
    """Forward and backward of ``MaskClassificationLoss`` over all layers (warmed up)."""
    criterion = MaskClassificationLoss(args.classes, num_points=args.points).to(device)
    leaves = [(masks.clone().requires_grad_(), classes.clone().requires_grad_()) for masks, classes in predictions]

    def step():
        sum(criterion(leaves, targets).values()).backward()
        for masks, classes in leaves:
            masks.grad = classes.grad = None

    step()
    return step


def timed_with_matching(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """The seconds of one ``step``, and of the matching in it."""
    matching_seconds = []

    def timed_match(*match_args, **match_kwargs):
        synchronize(device)
        started = time.perf_counter()
        found = hungarian_match(*match_args, **match_kwargs)
        synchronize(device)
        matching_seconds.append(time.perf_counter() - started)
        return found

    mask_criterion.hungarian_match = timed_match
    try:
        seconds = fastest_seconds(step, 1, device)
    finally:
        mask_criterion.hungarian_match = hungarian_match
    return seconds, sum(matching_seconds)


def transformers_step(predictions, targets, args, device: torch.device) -> Callable[[], None] | None:
    """transformers' ``Mask2FormerLoss``, forward and backward on the same inputs (warmed up), or
    None without transformers."""
    try:
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss
    except ImportError:
        return None
    config = Mask2FormerConfig(num_labels=args.classes, train_num_points=args.points)
    loss = Mask2FormerLoss(config, {}).to(device)
    leaves = [(masks.clone().requires_grad_(), classes.clone().requires_grad_()) for masks, classes in predictions]
    auxiliary = [{"masks_queries_logits": masks, "class_queries_logits": classes} for masks, classes in leaves[:-1]]
    mask_labels, class_labels = [masks for _, masks in targets], [classes for classes, _ in targets]

    def step():
        terms = loss(*leaves[-1], mask_labels, class_labels, auxiliary)
        sum(terms.values()).backward()
        for masks, classes in leaves:
            masks.grad = classes.grad = None

    step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", type=int, default=512, help="the targets' side")
    parser.add_argument("--mask-size", type=int, default=128, help="the mask logits' side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--segments", type=int, default=20, help="segments per image")
    parser.add_argument("--queries", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--points", type=int, default=12544)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.size, args.mask_size, args.queries, args.layers, args.points, args.repeats = 128, 32, [20], 2, 1024, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    maps = voronoi_maps(args.batch, args.size, args.segments, args.classes, torch.Generator().manual_seed(0))
    targets = [(classes.to(device), masks.to(device)) for classes, masks in semantic_to_segments(maps, IGNORE)]

    runs = []
    for queries in args.queries:
        runs.append(measure(queries, targets, args, device))
        print(f"{queries} queries: {runs[-1]}", flush=True)
    summary = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "target_size": args.size,
        "mask_logits_size": args.mask_size,
        "batch": args.batch,
        "classes": args.classes,
        "segments_per_image": [len(classes) for classes, _ in targets],
        "layers": args.layers,
        "points": args.points,
        "repeats": args.repeats,
        "peak_memory": "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler memory events",
        "runs": runs,
        "quick": args.quick,
    }
    sys.path.insert(0, str(Path(__file__).parent))
    from results import write_result

    write_result("mask_matching", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
