"""Benchmark hooktrain.metrics.intersect_and_union at 512x512 with 150 classes (ADE20K size).

Compares per-image area throughput, on identical inputs and with identical results asserted,
against two baselines run in the same process on one thread:

(a) MMSegmentation 0.x ``intersect_and_union``: mask out the ignore index, three ``torch.histc``.
(b) Hugging Face ``evaluate``'s ``mean_iou``, rebuilt locally from its published script as a
    real ``evaluate.Metric`` subclass (the PyPI package ships no scripts and this machine is
    offline). ``add_batch`` per image encodes both full masks as ``datasets.Image`` features
    into an Arrow file; ``compute`` decodes them and takes three ``np.histogram`` per image.
    Both ways of passing masks are timed, as int64 (argmax output; Pillow stores int32 TIFF)
    and as uint8 (PNG), and the faster one is the baseline.

Also reports the bytes that cross ranks per image (areas vs full masks) and the peak RSS growth
while accumulating the areas of 2,000 validation images.

    python bench/metrics.py [--quick]

Ends with one JSON line: {"bench": "metrics", ...}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch

from hooktrain.metrics import Areas, intersect_and_union

NUM_CLASSES, SIZE, IGNORE = 150, 512, 255


def make_pair(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An ADE20K-like label map (a background class, ~15 blobs, an ignored region) and a
    prediction equal to it with 20 % of pixels replaced by random classes."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    classes = rng.choice(NUM_CLASSES, size=16, replace=False)
    label = np.full((SIZE, SIZE), classes[0], dtype=np.int64)
    for cls in classes[1:]:
        cy, cx = rng.uniform(0, SIZE, 2)
        ry, rx = rng.uniform(20, 160, 2)
        label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = cls
    cy, cx, r = *rng.uniform(0, SIZE, 2), rng.uniform(30, 90)
    label[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = IGNORE
    label[:, : rng.integers(0, 24)] = IGNORE  # padding-like border
    pred = np.where(label == IGNORE, classes[0], label)
    noise = rng.random(label.shape) < 0.2
    pred[noise] = rng.integers(0, NUM_CLASSES, int(noise.sum()))
    return torch.from_numpy(pred), torch.from_numpy(label)


def histc_areas(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """MMSegmentation 0.x ``intersect_and_union`` (torch branch), as a [4, C] tensor."""
    mask = label != IGNORE
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    hist = [
        torch.histc(x.float(), bins=NUM_CLASSES, min=0, max=NUM_CLASSES - 1)
        for x in (intersect, pred, label)
    ]
    area_intersect, area_pred, area_label = hist
    return torch.stack([area_intersect, area_pred + area_label - area_intersect, area_pred, area_label])


class MeanIoU(evaluate.Metric):
    """evaluate's ``mean_iou`` metric script (features and algorithm), returning total areas."""

    def _info(self):
        return evaluate.MetricInfo(
            description="mean_iou, rebuilt locally",
            citation="",
            inputs_description="",
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references, num_labels, ignore_index):
        total = np.zeros((4, num_labels), dtype=np.float64)
        for pred, label in zip(predictions, references):
            pred, label = np.array(pred), np.array(label)
            mask = np.not_equal(label, ignore_index)
            pred, label = pred[mask], label[mask]
            intersect = pred[pred == label]
            bins = {"bins": num_labels, "range": (0, num_labels - 1)}
            area_intersect = np.histogram(intersect, **bins)[0]
            area_pred = np.histogram(pred, **bins)[0]
            area_label = np.histogram(label, **bins)[0]
            total += [area_intersect, area_pred + area_label - area_intersect, area_pred, area_label]
        iou = total[0] / total[1]
        return {"mean_iou": np.nanmean(iou), "total_areas": total}


def time_ours(pairs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    total = Areas.zeros(NUM_CLASSES)
    for pred, label in pairs:
        total += intersect_and_union(pred, label, NUM_CLASSES, IGNORE)
    return time.perf_counter() - start, total.as_tensor()


def time_histc(pairs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    total = torch.zeros(4, NUM_CLASSES)
    for pred, label in pairs:
        total += histc_areas(pred, label)
    return time.perf_counter() - start, total.long()


def time_evaluate(pairs, dtype, cache_dir) -> tuple[float, torch.Tensor]:
    metric = MeanIoU(cache_dir=cache_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow downcast int64 -> int32
        start = time.perf_counter()
        for pred, label in pairs:
            metric.add_batch(
                predictions=[pred.numpy().astype(dtype)], references=[label.numpy().astype(dtype)]
            )
        result = metric.compute(num_labels=NUM_CLASSES, ignore_index=IGNORE)
        elapsed = time.perf_counter() - start
    return elapsed, torch.from_numpy(result["total_areas"]).long()


def best_of(rounds: int, fn, *args) -> tuple[float, torch.Tensor]:
    """Fastest of several rounds (this VM's timings are noisy); results must agree."""
    runs = [fn(*args) for _ in range(rounds)]
    assert all(torch.equal(r[1], runs[0][1]) for r in runs)
    return min(r[0] for r in runs), runs[0][1]


def proc_status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def rss_child(num_images: int) -> None:
    """Run in a fresh interpreter: accumulate areas over ``num_images`` images (cycling a
    small pool) and print the peak-RSS figures as JSON. The peak (VmHWM) is reset through
    /proc/self/clear_refs after the inputs exist, so the growth counts the computation's own
    working set plus anything that accumulates, and nothing from setting up."""
    torch.set_num_threads(1)
    pairs = [make_pair(np.random.default_rng(i)) for i in range(4)]
    Path("/proc/self/clear_refs").write_text("5")
    before = proc_status_kb("VmRSS")
    # Valid when no earlier peak above the current RSS is left in VmHWM.
    reset_ok = proc_status_kb("VmHWM") <= before
    total = Areas.zeros(NUM_CLASSES)
    for i in range(num_images):
        pred, label = pairs[i % len(pairs)]
        total += intersect_and_union(pred, label, NUM_CLASSES, IGNORE)
        if i == 0:
            after_one = proc_status_kb("VmHWM")
    assert int(total.label.sum()) > 0
    after_all = proc_status_kb("VmHWM")
    print(json.dumps({
        "growth_mb": (after_all - before) / 1024,
        "growth_after_first_image_mb": (after_all - after_one) / 1024,
        "reset_ok": reset_ok,
    }))


def rss_growth(num_images: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(num_images)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    parser.add_argument("--rss-child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)
    torch.set_num_threads(1)
    num_images, rounds = (8, 2) if args.quick else (32, 3)

    rng = np.random.default_rng(0)
    pairs = [make_pair(rng) for _ in range(num_images)]
    ignored = np.mean([float((label == IGNORE).float().mean()) for _, label in pairs])
    print(f"inputs: {num_images} images {SIZE}x{SIZE}, {NUM_CLASSES} classes, int64, "
          f"{100 * ignored:.1f}% ignored, predictions = labels + 20% noise; 1 thread; best of {rounds}")

    time_ours(pairs[:2]), time_histc(pairs[:2])  # warm-up
    t_ours, areas = best_of(rounds, time_ours, pairs)
    t_histc, areas_histc = best_of(rounds, time_histc, pairs)
    assert torch.equal(areas, areas_histc), "histc areas differ"
    with tempfile.TemporaryDirectory() as cache_dir:
        t_eval = {}
        for name, dtype in (("int64", np.int64), ("uint8", np.uint8)):
            t_eval[name], areas_eval = best_of(max(1, rounds - 1), time_evaluate, pairs, dtype, cache_dir)
            assert torch.equal(areas, areas_eval), f"evaluate ({name}) areas differ"
    eval_kind = min(t_eval, key=t_eval.get)

    def ms(t: float) -> str:
        return f"{1e3 * t / num_images:7.2f} ms/image"

    print(f"hooktrain bincount        {ms(t_ours)}  {num_images / t_ours:8.1f} images/s")
    print(f"mmseg 0.x torch.histc     {ms(t_histc)}  ratio {t_histc / t_ours:5.2f}x")
    for name, t in t_eval.items():
        print(f"evaluate mean_iou ({name:5s}) {ms(t)}  ratio {t / t_ours:5.2f}x"
              + ("  <- baseline" if name == eval_kind else ""))

    area_bytes = 4 * NUM_CLASSES * 8
    mask_u8, mask_i64 = SIZE * SIZE, SIZE * SIZE * 8
    print(f"bytes per image: areas {area_bytes} (4 x {NUM_CLASSES} int64) vs full prediction mask "
          f"{mask_u8} (uint8) / {mask_i64} (int64): "
          f"{mask_u8 / area_bytes:.0f}x / {mask_i64 / area_bytes:.0f}x; "
          f"with per-rank summing, one {area_bytes + 8}-byte all-reduce per evaluation")

    rss = rss_growth(2000)
    reset = "worked" if rss["reset_ok"] else "FAILED: figure includes setup"
    growth = rss["growth_mb"]
    print(f"peak RSS growth over 2000 images accumulating areas (fresh process): {growth:.1f} MB, "
          f"of which {rss['growth_after_first_image_mb']:.1f} MB after the first image "
          f"(VmHWM minus VmRSS before; peak reset {reset}); "
          f"keeping uint8 masks instead would hold {2000 * mask_u8 / 2**20:.0f} MB")

    print(json.dumps({
        "bench": "metrics",
        "vs_histc_ratio": round(t_histc / t_ours, 2),
        "vs_evaluate_ratio": round(t_eval[eval_kind] / t_ours, 2),
        "images_per_s": round(num_images / t_ours, 1),
        "bytes_per_image": area_bytes,
        "full_mask_bytes_per_image": mask_u8,
        "rss_growth_mb_2000": round(growth, 1),
    }))


if __name__ == "__main__":
    main()
