"""Benchmark hooktrain.evaluation.metrics.intersect_and_union at 512x512 with 150 classes (ADE20K size).

Compares per-image area throughput, on identical inputs and with identical results asserted,
against two baselines run in the same process on one thread:

(a) MMSegmentation 0.x ``intersect_and_union``: mask out the ignore index, three ``torch.histc``.
(b) Hugging Face ``evaluate``'s ``mean_iou``, rebuilt locally from its published script as a
    real ``evaluate.Metric`` subclass (the PyPI package ships no scripts and this machine is
    offline). ``add_batch`` per image encodes both full masks as ``datasets.Image`` features
    into an Arrow file; ``compute`` decodes them and takes three ``np.histogram`` per image.
    Both ways of passing masks are timed, as int64 (argmax output; Pillow stores int32 TIFF)
    and as uint8 (PNG), and the faster one is the baseline.

Timing: every side gets the same warm-up (one pass over two images), then the rounds are
interleaved (hooktrain, histc, evaluate int64, evaluate uint8; the next round starts one side
later) and each side's median round counts. Ratios are the baseline's median / hooktrain's.

Bytes handed to the collectives, measured: the real eval hook (its core, ``hooktrain/evaluation/validation.py``) runs
in this process over N validation images (512x512 masks, 150 classes, the quickstart model at
a small input scale: predictions come back at the masks' size), with a spy that adds up the
``nbytes`` of every tensor passed to ``accelerator.reduce`` / ``gather`` / ``gather_for_metrics``
(hooktrain's path: the confusion matrix, or with ``confusion: false`` the packed areas, once
per evaluation; both are measured), and of every array the hook hands
to an ``evaluate`` module (the mask-gathering path: each prediction and reference in full; in
one process the hook passes them to ``add_batch``, with several it passes the same lists to
``gather_object``).

Memory: peak RSS growth (VmHWM, reset after setup) while accumulating the areas of 2,000
images (20 with ``--quick``) in a fresh process.

    python bench/metrics.py [--quick]

Results go to bench/results/metrics.json (``bench/results.py``); the last line printed is one
line of JSON: {"bench": "metrics", ...}.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from PIL import Image
from results import write_result

from hooktrain.engine.runner import IterRunner, make_accelerator
from hooktrain.evaluation.metrics import Areas, intersect_and_union
from hooktrain.models import build_recipe_segmentor
from hooktrain.recipe.schema import load_recipe

NUM_CLASSES, SIZE, IGNORE = 150, 512, 255
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


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


def interleaved(sides: dict, pairs, rounds: int) -> dict[str, list[float]]:
    """The same warm-up for every side (two images), then ``rounds`` interleaved rounds whose
    starting side rotates; every round of every side must give the same areas."""
    for fn in sides.values():
        fn(pairs[:2])
    names, times, expected = list(sides), {name: [] for name in sides}, None
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, areas = sides[name](pairs)
            expected = areas if expected is None else expected
            assert torch.equal(areas, expected), f"{name}: areas differ from the other sides'"
            times[name].append(seconds)
    return times


def nbytes(value) -> int:
    """Bytes of the tensors and arrays in ``value`` (nested lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.nbytes
    if isinstance(value, list | tuple):
        return sum(nbytes(item) for item in value)
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    return 0


def spy(counts: dict[str, int], key: str, fn):
    """``fn``, adding the bytes of its arguments to ``counts[key]`` on each call."""

    def counted(*args, **kwargs):
        counts[key] += nbytes(list(args)) + nbytes(kwargs)
        return fn(*args, **kwargs)

    return counted


def write_val_folder(root: Path, num_images: int) -> None:
    """``num_images`` random 512x512 images with the bench's label maps as uint8 PNG masks."""
    rng = np.random.default_rng(0)
    for split in ("images", "annotations"):
        (root / split).mkdir(parents=True)
    for i in range(num_images):
        _, label = make_pair(np.random.default_rng(i))
        image = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(label.numpy().astype(np.uint8), mode="L").save(root / "annotations" / f"{i:03d}.png")


def write_mean_iou_module(root: Path) -> Path:
    """This file's ``MeanIoU`` as a local evaluate module (``evaluate.load(path)``)."""
    module = root / "mean_iou"
    module.mkdir()
    source = "import datasets\nimport evaluate\nimport numpy as np\n\n\n" + textwrap.dedent(inspect.getsource(MeanIoU))
    (module / "mean_iou.py").write_text(source)
    return module


def eval_hook_bytes(num_images: int, confusion: bool = True) -> dict[str, int]:
    """Run the real eval hook once over ``num_images`` images with an evaluate module, counting
    the bytes handed to the accelerator's collectives and to the module. ``confusion``: the
    hook reduces the whole confusion matrix (its default), else only the area counts."""
    with tempfile.TemporaryDirectory(prefix="hooktrain-metrics-bytes-") as tmp:
        root = Path(tmp)
        write_val_folder(root, num_images)
        module = write_mean_iou_module(root)
        source = f"{{type: folder, images_dir: '{root}/images', annotations_dir: '{root}/annotations'}}"
        recipe = load_recipe(QUICKSTART, [
            f"data.val.source={source}", f"data.num_classes={NUM_CLASSES}", "data.class_names=null",
            "data.palette=null", "data.val.pipeline.scale=[64,64]", "data.val.batch_size=2",
            f"hooks=[{{type: eval, num_samples: 0, confusion: {str(confusion).lower()}, "
            f"evaluate: [{{path: '{module}'}}]}}]",
        ])  # fmt: skip
        return count_handed_bytes(recipe, root / "work_dir")


def count_handed_bytes(recipe, work_dir: Path) -> dict[str, int]:
    """One evaluation by the recipe's eval hook (the quickstart model, random weights) with spies
    on the accelerator's collectives and on the evaluate module's ``add_batch``."""
    accelerator = make_accelerator(recipe.train)
    torch.manual_seed(0)
    model = build_recipe_segmentor(recipe)
    model = accelerator.prepare(model)
    hooks = recipe.loaded_hooks()
    runner = IterRunner(recipe=recipe, accelerator=accelerator, model=model, optimizer=None, scheduler=None,
                        train_stream=None, hooks=hooks, work_dir=work_dir)  # fmt: skip
    hook, counts = hooks[0].hook, {"collectives": 0, "masks": 0}
    hook.before_run(runner)  # loads the evaluate module
    for name in ("reduce", "gather", "gather_for_metrics"):
        setattr(accelerator, name, spy(counts, "collectives", getattr(accelerator, name)))
    metric = hook.evaluation.modules[0].metric
    metric.add_batch = spy(counts, "masks", metric.add_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's int64 downcast; NaN IoU of absent classes
        metrics = hook.evaluate(runner)
    runner.watch.close()
    assert "mean_io_u/mean_iou" in metrics and counts["collectives"] and counts["masks"], (sorted(metrics), counts)
    return counts


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
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (a smoke run)")
    parser.add_argument("--rss-child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)
    torch.set_num_threads(1)
    num_images, rounds, eval_images, rss_images = (2, 1, 2, 20) if args.quick else (32, 5, 16, 2000)

    rng = np.random.default_rng(0)
    pairs = [make_pair(rng) for _ in range(num_images)]
    ignored = np.mean([float((label == IGNORE).float().mean()) for _, label in pairs])
    print(f"inputs: {num_images} images {SIZE}x{SIZE}, {NUM_CLASSES} classes, int64, "
          f"{100 * ignored:.1f}% ignored, predictions = labels + 20% noise; 1 thread; "
          f"median of {rounds} interleaved rounds after the same warm-up")

    with tempfile.TemporaryDirectory() as cache_dir:
        sides = {
            "hooktrain": time_ours,
            "histc": time_histc,
            "evaluate_int64": lambda pairs: time_evaluate(pairs, np.int64, cache_dir),
            "evaluate_uint8": lambda pairs: time_evaluate(pairs, np.uint8, cache_dir),
        }
        times = {name: statistics.median(t) for name, t in interleaved(sides, pairs, rounds).items()}
    ours = times["hooktrain"]
    eval_kind = min(("evaluate_int64", "evaluate_uint8"), key=times.get)

    def ms(t: float) -> str:
        return f"{1e3 * t / num_images:7.2f} ms/image"

    print(f"hooktrain bincount        {ms(ours)}  {num_images / ours:8.1f} images/s")
    print(f"mmseg 0.x torch.histc     {ms(times['histc'])}  ratio {times['histc'] / ours:5.2f}x")
    for name in ("evaluate_int64", "evaluate_uint8"):
        print(f"evaluate mean_iou ({name[9:]:5s}) {ms(times[name])}  ratio {times[name] / ours:5.2f}x"
              + ("  <- baseline" if name == eval_kind else ""))

    handed = eval_hook_bytes(eval_images)
    areas_only = eval_hook_bytes(eval_images, confusion=False)["collectives"]
    per_image = handed["masks"] // eval_images
    print(f"bytes handed over by the eval hook over {eval_images} images (measured): collectives "
          f"{handed['collectives']:,} B per evaluation (the confusion matrix), {areas_only:,} B with "
          f"confusion: false (packed areas); with an evaluate module, full masks {per_image:,} B per image "
          f"(prediction + reference): one image's masks are {per_image / handed['collectives']:.0f}x the "
          "whole evaluation's confusion matrix")

    rss = rss_growth(rss_images)
    reset = "worked" if rss["reset_ok"] else "FAILED: figure includes setup"
    growth = rss["growth_mb"]
    print(f"peak RSS growth over {rss_images} images accumulating areas (fresh process): {growth:.1f} MB, "
          f"of which {rss['growth_after_first_image_mb']:.1f} MB after the first image "
          f"(VmHWM minus VmRSS before; peak reset {reset})")

    summary = {
        "quick": args.quick,
        "images": num_images,
        "rounds": rounds,
        "ms_per_image": {name: round(1e3 * t / num_images, 3) for name, t in times.items()},
        "images_per_s": round(num_images / ours, 1),
        "vs_histc_ratio": round(times["histc"] / ours, 2),
        "evaluate_baseline": eval_kind,
        "vs_evaluate_ratio": round(times[eval_kind] / ours, 2),
        "eval_hook_images": eval_images,
        "collective_bytes_per_evaluation": handed["collectives"],
        "collective_bytes_per_evaluation_areas_only": areas_only,
        "evaluate_mask_bytes_per_image": per_image,
        "mask_bytes_per_image_vs_collective_bytes": round(per_image / handed["collectives"], 1),
        "rss_images": rss_images,
        "rss_growth_mb": round(growth, 1),
        "rss_growth_after_first_image_mb": round(rss["growth_after_first_image_mb"], 1),
        "rss_reset_ok": rss["reset_ok"],
    }
    print(f"results: {write_result('metrics', summary)}")
    print(json.dumps({"bench": "metrics", **summary}))


if __name__ == "__main__":
    main()
