"""Per-core speed of hooktrain's train pipeline against MMSegmentation 1.2.2's own, measured in
the same run, and against a plain torchvision.transforms.v2 one.

Synthetic ADE20K-like examples (683x512 JPEG of gradients, polygons and noise, ~100 KB, with
a PNG mask of the same polygons) are written to parquet as ``datasets.Image()`` columns and
streamed back with ``datasets`` as raw bytes. Each pipeline then turns those bytes into what a
train step consumes, on one thread (OpenCV and torch): decode JPEG + PNG, reduce_zero_label,
RandomResize(2048x512, ratio 0.5-2.0), RandomCrop(512x512, cat_max_ratio 0.75), flip,
photometric distortion, Normalize (ImageNet mean/std) and Pad to 512x512 -- a normalised
padded float32 image and a padded int64 mask.

- hooktrain: ``decode_image``, ``decode_mask``, ``LabelMapper``, ``TrainTransform``, in this
  process.
- MMSegmentation 1.2.2: its registered ``LoadImageFromFile``, ``LoadAnnotations``,
  ``RandomResize``, ``RandomCrop``, ``RandomFlip``, ``PhotoMetricDistortion``,
  ``PackSegInputs`` and ``SegDataPreProcessor`` (per image, on the CPU), run by
  ``tests/mmseg_ref/pipeline_bench.py`` in MMSegmentation's throwaway environment
  (``tests/mmseg_ref/env.py``), one fresh process per round, the encoded bytes served from
  memory as hooktrain's side gets them. Where that environment cannot be installed or run, the
  bench says so and reports no ratio.
- torchvision v2: the same steps written plainly on tv_tensors; decode only: the floor.

Rounds are interleaved (hooktrain, torchvision v2, decode only, MMSegmentation; then again),
each after the same number of untimed warm-up images, so load from other processes hits all
alike; the medians are compared. In round ``r`` image ``i`` draws every random choice from
``np.random.seed([seed + r, 0, 0, i])`` on every side, as MMSegmentation's transforms draw
them, so hooktrain and MMSegmentation do the same work; their warm-up outputs are compared by
digest (``mmseg_same_outputs``). Not timed on either side: process start-up and imports.

The whole train stream (``build_train_stream``: sharding, shuffling, decoding, the same
pipeline) is then measured per DataLoader worker on the same shards read two ways,
interleaved: streamed over HTTP from a local Hub-compatible server (``tests/hub_server.py``,
through huggingface_hub's client, as ``recipes/ade20k.yaml`` reads the Hub) and read from the
local parquet files. The ratio is the cost of the HTTP path.

    python bench/data_pipeline.py [--quick] [--examples N] [--rounds R] [--warmup W] [--seed S]

``--quick`` is a smoke run (4 examples, 1 round, 2 warm-up images, MMSegmentation included; a
5-iteration quickstart on a tiny shapes dataset; 20 hand-over batches). Results go to
``bench/results/data_pipeline.json`` (``$HOOKTRAIN_BENCH_RESULTS`` overrides the directory;
``"quick": true`` marks a smoke run). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image as PILImage

from hooktrain.data.parquet import write_image_shard
from hooktrain.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabelMapper,
    TrainPipelineConfig,
    TrainTransform,
    decode_image,
    decode_mask,
    rescaled_size,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mmseg_ref.draws import MmsegDraws  # noqa: E402
from mmseg_ref.env import MmsegEnv  # noqa: E402  (standard library only: no huggingface_hub yet)
from results import write_result  # noqa: E402  (bench/ is on sys.path when run as a script)

MMSEG_PIPELINE_BENCH = ROOT / "tests" / "mmseg_ref" / "pipeline_bench.py"
NUM_CLASSES = 150
Example = tuple[bytes, bytes]


# ---------------------------------------------------------------- data


def make_example(rng: np.random.Generator, height: int = 512, width: int = 683) -> Example:
    """One JPEG image and its PNG mask (ADE20K style: labels 0..150, 0 = "other")."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    corners = rng.uniform(0, 255, (4, 3)).astype(np.float32)
    u, v = (xx / width)[..., None], (yy / height)[..., None]
    image = (corners[0] * (1 - u) * (1 - v) + corners[1] * u * (1 - v)
             + corners[2] * (1 - u) * v + corners[3] * u * v)  # fmt: skip
    mask = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(8, 20)):
        centre = rng.uniform((0, 0), (width, height))
        points = (centre + rng.normal(0, rng.uniform(30, 150), (rng.integers(3, 8), 2))).astype(np.int32)
        label = int(rng.integers(1, NUM_CLASSES + 1))
        cv2.fillPoly(mask, [points], label)
        colour = rng.uniform(0, 255, 3)
        image[mask == label] = image[mask == label] * 0.3 + colour * 0.7
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0)
    jpeg, png = io.BytesIO(), io.BytesIO()
    PILImage.fromarray(image).save(jpeg, format="JPEG", quality=95)
    PILImage.fromarray(mask).save(png, format="PNG")
    return jpeg.getvalue(), png.getvalue()


def write_parquet(path: Path, examples: Sequence[Example]) -> None:
    """Write examples as a parquet file with ``image``/``annotation`` ``datasets.Image()`` columns."""
    columns = {
        "image": [{"bytes": img, "path": None} for img, _ in examples],
        "annotation": [{"bytes": ann, "path": None} for _, ann in examples],
    }
    write_image_shard(path, columns, row_group_size=100)


def read_stream(path: Path) -> list[Example]:
    """Stream the parquet file back with ``datasets`` as raw encoded bytes."""
    from datasets import Image, load_dataset

    stream = load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    stream = stream.cast_column("image", Image(decode=False)).cast_column("annotation", Image(decode=False))
    return [(row["image"]["bytes"], row["annotation"]["bytes"]) for row in stream]


# ---------------------------------------------------------------- pipelines

Pipeline = Callable[[bytes, bytes, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


def hooktrain_pipeline(cfg: TrainPipelineConfig) -> Pipeline:
    """hooktrain's path: decode_image, decode_mask, LabelMapper, TrainTransform."""
    mapper = LabelMapper(NUM_CLASSES, reduce_zero_label=True)
    transform = TrainTransform(cfg, IMAGENET_MEAN, IMAGENET_STD, ignore_index=255)

    def run(image_bytes: bytes, mask_bytes: bytes, rng: np.random.Generator):
        return transform(decode_image(image_bytes), mapper(decode_mask(mask_bytes)), rng)

    return run


class TorchvisionV2Pipeline:
    """The same steps written plainly with torchvision.transforms.v2 on tv_tensors."""

    def __init__(self, cfg: TrainPipelineConfig, ignore_index: int = 255) -> None:
        self.cfg, self.ignore_index = cfg, ignore_index

    def __call__(self, image_bytes: bytes, mask_bytes: bytes, rng: np.random.Generator):
        from torchvision import tv_tensors
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        cfg = self.cfg
        image = tv_decode(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8), ImageReadMode.RGB)
        image = tv_tensors.Image(image)
        raw = tv_decode(torch.frombuffer(bytearray(mask_bytes), dtype=torch.uint8), ImageReadMode.UNCHANGED)[0]
        reduced = torch.where((raw == 0) | (raw == 255), 255, raw - 1)  # reduce_zero_label
        mask = tv_tensors.Mask(reduced.to(torch.uint8))
        # RandomResize
        lo, hi = cfg.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        scale = int(cfg.scale[0] * ratio), int(cfg.scale[1] * ratio)
        size = list(rescaled_size(image.shape[-2], image.shape[-1], scale))
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        mask = F.resize(mask, size, interpolation=InterpolationMode.NEAREST)
        # RandomCrop with cat_max_ratio
        ch, cw = cfg.crop_size
        margin_h, margin_w = max(size[0] - ch, 0), max(size[1] - cw, 0)
        top, left = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        for _ in range(10):
            counts = torch.bincount(mask[top : top + ch, left : left + cw].flatten().long(), minlength=256)
            counts = counts[:255][counts[:255] > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cfg.cat_max_ratio:
                break
            top, left = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        image = F.crop(image, top, left, min(ch, size[0]), min(cw, size[1]))
        mask = F.crop(mask, top, left, min(ch, size[0]), min(cw, size[1]))
        # RandomFlip
        if rng.random() < cfg.flip_prob:
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        # photometric distortion (ColorJitter's saturation and hue)
        if rng.integers(2):
            delta = rng.uniform(-cfg.brightness_delta, cfg.brightness_delta)
            image = (image.float() + delta).clamp(0, 255).to(torch.uint8)
        contrast_first = rng.integers(2) == 1
        if contrast_first and rng.integers(2):
            image = (image.float() * rng.uniform(*cfg.contrast_range)).clamp(0, 255).to(torch.uint8)
        if rng.integers(2):
            image = F.adjust_saturation(image, rng.uniform(*cfg.saturation_range))
        if rng.integers(2):
            image = F.adjust_hue(image, int(rng.integers(-cfg.hue_delta, cfg.hue_delta)) / 180)
        if not contrast_first and rng.integers(2):
            image = (image.float() * rng.uniform(*cfg.contrast_range)).clamp(0, 255).to(torch.uint8)
        # Normalize, Pad
        image = F.to_dtype(tv_tensors.Image(image), torch.float32, scale=False)
        image = F.normalize(image, IMAGENET_MEAN, IMAGENET_STD)
        pad = [0, 0, cw - image.shape[-1], ch - image.shape[-2]]
        return F.pad(image, pad, fill=0), F.pad(mask, pad, fill=self.ignore_index).long()


# ---------------------------------------------------------------- timing


def draws_key(seed: int, index: int, warmup: bool = False) -> list[int]:
    """The seed of image ``index`` in a round seeded ``seed``, as ``pipeline_bench.py`` seeds its
    round 0 (run with ``--seed seed --rounds 1``)."""
    return [seed, 0, int(warmup), index]


def run_round(pipeline: Pipeline, examples: Sequence[Example], seed: int, warmup: int) -> tuple[float, list]:
    """``warmup`` untimed images, then one timed pass over ``examples``: (images/s, the warm-up
    outputs)."""
    outputs = []
    for i in range(warmup):
        image_bytes, mask_bytes = examples[i % len(examples)]
        outputs.append(pipeline(image_bytes, mask_bytes, MmsegDraws(draws_key(seed, i, warmup=True))))
    start = time.perf_counter()
    for index, (image_bytes, mask_bytes) in enumerate(examples):
        pipeline(image_bytes, mask_bytes, MmsegDraws(draws_key(seed, index)))
    return len(examples) / (time.perf_counter() - start), outputs


def decode_only(image_bytes: bytes, mask_bytes: bytes, rng: np.random.Generator):
    """hooktrain's decoding alone (the floor of any pipeline that starts from bytes)."""
    return decode_image(image_bytes), decode_mask(mask_bytes)


def output_digest(image: torch.Tensor, mask: torch.Tensor) -> str:
    """The digest ``pipeline_bench.py`` prints for each warm-up output (float32 image, int64 mask)."""
    data = image.to(torch.float32).contiguous().numpy().tobytes() + mask.to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


class MmsegRounds:
    """MMSegmentation 1.2.2's own train pipeline, one round per call, each in a fresh process of
    its throwaway environment (``tests/mmseg_ref/env.py``). ``unavailable`` says why, once the
    environment could not be installed or a round failed; no round is run after that."""

    def __init__(self, examples: Sequence[Example], directory: Path) -> None:
        self.inputs = directory / "mmseg_inputs.npz"
        np.savez(self.inputs, **{f"image_{k}": np.frombuffer(image, np.uint8) for k, (image, _) in enumerate(examples)},
                 **{f"mask_{k}": np.frombuffer(mask, np.uint8) for k, (_, mask) in enumerate(examples)})  # fmt: skip
        self.env: MmsegEnv | None = None
        self.unavailable: str | None = None
        self.versions: dict[str, str] = {}
        try:
            self.env = MmsegEnv.install()
        except (RuntimeError, OSError) as error:
            self.unavailable = f"the MMSegmentation 1.2.2 environment could not be installed: {error}"

    def run_round(self, seed: int, warmup: int) -> tuple[float, list[str]] | None:
        """One round in a fresh process: (images/s, the warm-up digests), or None when unavailable."""
        if self.env is None or self.unavailable:
            return None
        args = (str(self.inputs), "--rounds", "1", "--warmup", str(warmup), "--seed", str(seed))
        try:
            report = MmsegEnv.last_json(self.env.run(MMSEG_PIPELINE_BENCH, *args))
        except (AssertionError, OSError, ValueError) as error:
            self.unavailable = f"a round of MMSegmentation's pipeline failed: {str(error).strip()[-2000:]}"
            return None
        self.versions = report["versions"]
        return report["images_per_s"][0], report["warmup_digests"][0]


def compare(examples: Sequence[Example], rounds: int, seed: int, warmup: int, mmseg: MmsegRounds) -> dict:
    """Interleaved rounds (hooktrain, torchvision v2, decode only, MMSegmentation), each after
    the same ``warmup`` images; round ``r`` draws from seed ``seed + r`` on every side.
    Returns each pipeline's images/s per round, and whether hooktrain's warm-up outputs equal
    MMSegmentation's (None when MMSegmentation did not run)."""
    cfg = TrainPipelineConfig()
    pipelines = {"hooktrain": hooktrain_pipeline(cfg), "tv2": TorchvisionV2Pipeline(cfg), "decode_only": decode_only}
    rates: dict[str, list[float]] = {name: [] for name in [*pipelines, "mmseg"]}
    matches = []  # per MMSegmentation round: its warm-up digests equal hooktrain's
    for r in range(rounds):
        warmup_outputs = {}
        for name, pipeline in pipelines.items():
            rate, warmup_outputs[name] = run_round(pipeline, examples, seed + r, warmup)
            rates[name].append(rate)
        measured = mmseg.run_round(seed + r, warmup)
        if measured is not None:
            rate, mmseg_digests = measured
            rates["mmseg"].append(rate)
            matches.append(mmseg_digests == [output_digest(*output) for output in warmup_outputs["hooktrain"]])
    if mmseg.unavailable:  # a round failed: report none of its rounds
        rates["mmseg"], matches = [], []
    same_outputs = all(matches) if matches else None
    return {"rates": rates, "same_outputs": same_outputs}


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def quickstart_data_wait(iterations: int, workers: int, options: Sequence[str] = ()) -> float:
    """Share of the quickstart's step time spent waiting for the next batch (the runner's
    ``data_time`` over its ``time``), on this machine with ``workers`` DataLoader workers.
    ``options``: more recipe overrides (the smoke run's tiny dataset)."""
    import logging

    from hooktrain.engine.runner import IterRunner
    from hooktrain.recipe.schema import load_recipe

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(
            recipe_path,
            [f"train.max_iters={iterations}", f"data.train.num_workers={workers}", "hooks=[]",
             f"data.train.source.root={Path(tmp) / 'shapes'}", f"data.val.source.root={Path(tmp) / 'shapes'}",
             *options],
            work_dir=str(Path(tmp) / "run"),
        )  # fmt: skip
        torch.set_num_threads(os.cpu_count() or 1)  # the trainer's own setting, not the bench's
        runner = IterRunner.from_recipe(recipe)
        logging.getLogger("hooktrain").setLevel(logging.WARNING)
        steps = [runner.train_step() for _ in range(iterations)]
        runner.accelerator.end_training()
    warm = steps[3:]  # the first batches include worker start-up
    return sum(s["data_time"] for s in warm) / sum(s["time"] for s in warm)


def stream_rate(source: dict, examples: int, seed: int) -> tuple[float, float]:
    """One pass of ``examples`` through the real train stream of ``source`` with one
    DataLoader worker: ``(images/s after the first batch, seconds to the first batch)``."""
    from hooktrain.data import DataConfig, build_train_stream
    from hooktrain.recipe.schema import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "ade20k.yaml")
    data = recipe.data.model_dump()
    data["train"].update(source=source, batch_size=1, num_workers=1, shuffle_buffer=16)
    stream = build_train_stream(DataConfig.model_validate(data), seed=seed)
    start = time.perf_counter()
    next(stream)
    first = time.perf_counter()
    for _ in range(examples - 1):
        next(stream)
    end = time.perf_counter()
    stream.close()
    return (examples - 1) / (end - first), first - start


def compare_streams(examples: int, rounds: int, seed: int, root: Path) -> dict:
    """Interleaved passes over the shards under ``root``, from the local Hub server serving
    ``root`` and from disk."""
    from hub_replicas import ADE20K_ID, PARQUET_REVISION

    sources = {
        "hub_http": {"type": "hub", "path": ADE20K_ID, "revision": PARQUET_REVISION,
                     "data_dir": "scene_parsing", "split": "train"},  # fmt: skip
        "local_parquet": {"type": "parquet", "data_files": str(root / "scene_parsing" / "train" / "*.parquet")},
    }  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in sources}
    starts: dict[str, list[float]] = {name: [] for name in sources}
    for name, source in sources.items():  # warm-up: imports, the client's first connections
        stream_rate(source, 4, seed)
    for r in range(rounds):
        for name, source in sources.items():
            rate, first = stream_rate(source, examples, seed + r)
            rates[name].append(rate)
            starts[name].append(first)
    return {
        name: {"images_per_s": statistics.median(rates[name]),
               "first_batch_s": statistics.median(starts[name])}
        for name in sources
    }  # fmt: skip


def handover_rate(dtype: torch.dtype, batches: int = 200) -> float:
    """Batches/s a DataLoader worker hands over when each batch is one 512x512 example as the
    train stream yields it (image [1,3,H,W] and mask [1,H,W]) in ``dtype``, doing nothing else:
    the ceiling the hand-over alone puts on one worker."""

    class Constant(torch.utils.data.IterableDataset):
        def __iter__(self):
            image_dtype, mask_dtype = (dtype, torch.int64) if dtype.is_floating_point else (dtype, dtype)
            while True:
                yield torch.zeros(3, 512, 512, dtype=image_dtype), torch.zeros(512, 512, dtype=mask_dtype)

    batches_iter = iter(torch.utils.data.DataLoader(Constant(), batch_size=1, num_workers=1))
    next(batches_iter)
    start = time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    return batches / (time.perf_counter() - start)


def serve_shards(examples: Sequence[Example], root: Path):
    """Write ``examples`` as the ADE20K parquet conversion's ``scene_parsing/train`` shards under
    ``root`` and serve that folder from a local Hub server; returns the started server. The
    environment points huggingface_hub at it, so this runs before the client is imported."""
    assert "huggingface_hub" not in sys.modules, "HF_ENDPOINT must be set before the client loads"
    from hub_replicas import ADE20K_ID, PARQUET_REVISION
    from hub_server import HubServer

    server = HubServer()
    server.add(ADE20K_ID, root, revision=PARQUET_REVISION)
    # Online towards this local server, even where the caller runs offline (the test suite does).
    os.environ.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0")
    os.environ["HF_HOME"] = str(root / "hf_home")
    shards = root / "scene_parsing" / "train"
    shards.mkdir(parents=True)
    half = len(examples) // 2
    for i, part in enumerate((examples[:half], examples[half:])):
        write_parquet(shards / f"{i:04d}.parquet", part)
    return server.start()


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 examples, 1 round: a smoke run")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=4, help="untimed images before every round of every pipeline")
    parser.add_argument(
        "--quickstart-iters", type=int, default=40,
        help="iterations of the quickstart for the data-wait share (0 skips it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    n, rounds = (4, 1) if args.quick else (args.examples, args.rounds)
    if args.quick:
        args.warmup = 2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(args.seed)
    generated = [make_example(rng) for _ in range(n)]
    served = tempfile.TemporaryDirectory()
    hub = serve_shards(generated, Path(served.name))  # only 127.0.0.1 is ever contacted
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train-00000.parquet"
        write_parquet(path, generated)
        start = time.perf_counter()
        examples = read_stream(path)
        stream_rate = len(examples) / (time.perf_counter() - start)
    mean_kb = statistics.mean(len(img) for img, _ in examples) / 1024
    print(f"{len(examples)} examples 683x512, JPEG mean {mean_kb:.0f} KB; "
          f"datasets stream read {stream_rate:.0f} rows/s")

    with tempfile.TemporaryDirectory() as tmp:
        mmseg = MmsegRounds(examples, Path(tmp))
        compared = compare(examples, rounds, args.seed, args.warmup, mmseg)
    rates = compared["rates"]
    medians = {name: median_or_none(values) for name, values in rates.items()}
    ratio_vs_tv2 = medians["hooktrain"] / medians["tv2"]
    ratio_vs_mmseg = None if medians["mmseg"] is None else medians["hooktrain"] / medians["mmseg"]
    print(f"hooktrain train pipeline         {medians['hooktrain']:7.1f} images/s "
          f"(one thread, median of {rounds} rounds, {args.warmup} warm-up images before each)")
    if ratio_vs_mmseg is None:
        print(f"MMSegmentation 1.2.2 pipeline    not measured, so no ratio: {mmseg.unavailable}")
    else:
        print(f"MMSegmentation 1.2.2 pipeline    {medians['mmseg']:7.1f} images/s "
              f"(its own environment, rounds interleaved)  -> hooktrain is {ratio_vs_mmseg:.2f}x")
        print(f"  same outputs on the warm-up images (normalised padded image and mask): {compared['same_outputs']}")
    print(f"torchvision v2 baseline          {medians['tv2']:7.1f} images/s  -> hooktrain is {ratio_vs_tv2:.2f}x")
    print(f"decode only (JPEG + PNG)         {medians['decode_only']:7.1f} images/s")
    streams = compare_streams(len(generated), rounds, args.seed, Path(served.name))
    hub.stop()
    served.cleanup()
    http, local = streams["hub_http"], streams["local_parquet"]
    stream_ratio = http["images_per_s"] / local["images_per_s"]
    print(f"train stream, 1 worker, local Hub over HTTP {http['images_per_s']:6.1f} images/s "
          f"(first batch after {http['first_batch_s']:.2f} s)")
    print(f"train stream, 1 worker, local parquet      {local['images_per_s']:6.1f} images/s "
          f"(first batch after {local['first_batch_s']:.2f} s)  -> HTTP path is {stream_ratio:.2f}x")
    batches = 20 if args.quick else 200
    handover = {"float32_int64": handover_rate(torch.float32, batches), "uint8": handover_rate(torch.uint8, batches)}
    print(f"worker hand-over alone, 512x512: float32 image + int64 mask "
          f"{handover['float32_int64']:.0f} batches/s, uint8 {handover['uint8']:.0f} batches/s")
    wait = None
    if args.quickstart_iters:
        iters = 5 if args.quick else args.quickstart_iters
        tiny = [f"data.{split}.source.{key}" for split in ("train", "val")
                for key in ("num_train=32", "num_val=2", "train_shards=2", "val_shards=1")]  # fmt: skip
        wait = quickstart_data_wait(iters, workers=2, options=tiny if args.quick else ())
        print(f"quickstart, 2 workers: {100 * wait:.1f}% of step time waiting for data (target < 5%)")
    result = {
        "bench": "data_pipeline",
        "quick": args.quick,
        "examples": len(examples), "rounds": rounds, "warmup_images": args.warmup,
        "quickstart_data_wait_share": None if wait is None else round(wait, 4),
        "images_per_s": round(medians["hooktrain"], 1),
        "mmseg_images_per_s": None if medians["mmseg"] is None else round(medians["mmseg"], 1),
        "ratio_vs_mmseg": None if ratio_vs_mmseg is None else round(ratio_vs_mmseg, 2),
        "mmseg_same_outputs": compared["same_outputs"],
        "mmseg_unavailable": mmseg.unavailable,
        "mmseg_versions": mmseg.versions or None,
        "baseline_tv2_images_per_s": round(medians["tv2"], 1),
        "ratio_vs_tv2": round(ratio_vs_tv2, 2),
        "decode_only_images_per_s": round(medians["decode_only"], 1),
        "images_per_s_per_round": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "stream_hub_http_images_per_s_per_worker": round(http["images_per_s"], 1),
        "stream_local_parquet_images_per_s_per_worker": round(local["images_per_s"], 1),
        "stream_ratio_hub_vs_local": round(stream_ratio, 3),
        "worker_handover_batches_per_s": {k: round(v) for k, v in handover.items()},
        "stream_first_batch_s": {"hub_http": round(http["first_batch_s"], 2),
                                 "local_parquet": round(local["first_batch_s"], 2)},
    }  # fmt: skip
    print(f"results: {write_result('data_pipeline', {k: v for k, v in result.items() if k != 'bench'})}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
