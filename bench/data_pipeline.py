"""Per-core speed of hooktrain's train pipeline against a plain torchvision.transforms.v2 one.

Synthetic ADE20K-like examples (683x512 JPEG of gradients, polygons and noise, ~100 KB, with
a PNG mask of the same polygons) are written to parquet as ``datasets.Image()`` columns and
streamed back with ``datasets`` as raw bytes. Both pipelines then run the full train path on
one thread: decode JPEG + PNG, reduce_zero_label, RandomResize, RandomCrop with
cat_max_ratio, flip, photometric distortion, Normalize, Pad. A literal port of
MMSegmentation's own pipeline runs alongside as a second reference. Rounds are interleaved
so load from other processes hits all alike; the medians are compared.

The whole train stream (``build_train_stream``: sharding, shuffling, decoding, the same
pipeline) is then measured per DataLoader worker on the same shards read two ways,
interleaved: streamed over HTTP from a local Hub-compatible server (``tests/hub_server.py``,
through huggingface_hub's client, as ``recipes/ade20k.yaml`` reads the Hub) and read from the
local parquet files. The ratio is the cost of the HTTP path.

    python bench/data_pipeline.py [--quick] [--examples N] [--rounds R] [--seed S]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
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

MMSEG_REFERENCE_IMAGES_PER_S = 126  # mmseg's own OpenCV pipeline, one thread, same inputs
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
        from torchvision.io import ImageReadMode, decode_image as tv_decode
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        cfg = self.cfg
        image = tv_tensors.Image(tv_decode(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8), ImageReadMode.RGB))
        raw = tv_decode(torch.frombuffer(bytearray(mask_bytes), dtype=torch.uint8), ImageReadMode.UNCHANGED)[0]
        mask = tv_tensors.Mask(torch.where((raw == 0) | (raw == 255), 255, raw - 1).to(torch.uint8))  # reduce_zero_label
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
            image = (image.float() + rng.uniform(-cfg.brightness_delta, cfg.brightness_delta)).clamp(0, 255).to(torch.uint8)
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
        image = F.normalize(F.to_dtype(tv_tensors.Image(image), torch.float32, scale=False), IMAGENET_MEAN, IMAGENET_STD)
        pad = [0, 0, cw - image.shape[-1], ch - image.shape[-2]]
        return F.pad(image, pad, fill=0), F.pad(mask, pad, fill=self.ignore_index).long()


class MMSegStylePipeline:
    """MMSegmentation 0.x's pipeline ported literally (mmcv cv2/pillow backends, np.random
    replaced by ``rng``), to compare against in the same process rather than only against
    the 126 images/s measured once elsewhere."""

    def __init__(self, cfg: TrainPipelineConfig, ignore_index: int = 255) -> None:
        self.cfg, self.ignore_index = cfg, ignore_index
        self.mean = np.asarray(IMAGENET_MEAN, np.float64).reshape(1, -1)
        self.stdinv = 1 / np.asarray(IMAGENET_STD, np.float64).reshape(1, -1)

    def __call__(self, image_bytes: bytes, mask_bytes: bytes, rng: np.random.Generator):
        cfg = self.cfg
        img = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)  # BGR
        seg = np.array(PILImage.open(io.BytesIO(mask_bytes))).squeeze().astype(np.uint8)
        seg[seg == 0] = 255  # reduce_zero_label
        seg = seg - 1
        seg[seg == 254] = 255
        lo, hi = cfg.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        scale = int(cfg.scale[0] * ratio), int(cfg.scale[1] * ratio)
        new_h, new_w = rescaled_size(img.shape[0], img.shape[1], scale)
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        seg = cv2.resize(seg, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        ch, cw = cfg.crop_size

        def bbox():
            oy = rng.integers(0, max(img.shape[0] - ch, 0) + 1)
            ox = rng.integers(0, max(img.shape[1] - cw, 0) + 1)
            return oy, oy + ch, ox, ox + cw

        y1, y2, x1, x2 = bbox()
        for _ in range(10):
            labels, cnt = np.unique(seg[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != self.ignore_index]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cfg.cat_max_ratio:
                break
            y1, y2, x1, x2 = bbox()
        img, seg = img[y1:y2, x1:x2, ...], seg[y1:y2, x1:x2]
        if rng.random() < cfg.flip_prob:
            img, seg = np.flip(img, axis=1), np.flip(seg, axis=1)
        img = self._photometric(img, rng)
        img = img.copy().astype(np.float32)  # mmcv.imnormalize(to_rgb=True)
        cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
        cv2.subtract(img, self.mean, img)
        cv2.multiply(img, self.stdinv, img)
        padded = np.zeros((ch, cw, 3), np.float32)  # mmcv.impad
        padded[: img.shape[0], : img.shape[1]] = img
        padded_seg = np.full((ch, cw), self.ignore_index, np.uint8)
        padded_seg[: seg.shape[0], : seg.shape[1]] = seg
        image = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))  # ImageToTensor
        return image, torch.from_numpy(padded_seg.astype(np.int64))

    def _photometric(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg

        def convert(x, alpha=1, beta=0):
            return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

        def contrast(x):
            return convert(x, alpha=rng.uniform(*cfg.contrast_range)) if rng.integers(2) else x

        if rng.integers(2):
            img = convert(img, beta=rng.uniform(-cfg.brightness_delta, cfg.brightness_delta))
        mode = rng.integers(2)
        if mode == 1:
            img = contrast(img)
        if rng.integers(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 1] = convert(img[:, :, 1], alpha=rng.uniform(*cfg.saturation_range))
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        if rng.integers(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + rng.integers(-cfg.hue_delta, cfg.hue_delta)) % 180
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        if mode == 0:
            img = contrast(img)
        return img


# ---------------------------------------------------------------- timing


def images_per_second(pipeline: Pipeline, examples: Sequence[Example], seed: int) -> float:
    """Run ``pipeline`` over all examples once; return images per second."""
    start = time.perf_counter()
    for index, (image_bytes, mask_bytes) in enumerate(examples):
        pipeline(image_bytes, mask_bytes, np.random.default_rng([seed, index]))
    return len(examples) / (time.perf_counter() - start)


def decode_only(image_bytes: bytes, mask_bytes: bytes, rng: np.random.Generator):
    """hooktrain's decoding alone (the floor of any pipeline that starts from bytes)."""
    return decode_image(image_bytes), decode_mask(mask_bytes)


def compare(examples: Sequence[Example], rounds: int, seed: int) -> dict[str, float]:
    """Interleaved rounds of each pipeline; median images/s of each."""
    cfg = TrainPipelineConfig()
    pipelines = {
        "hooktrain": hooktrain_pipeline(cfg),
        "tv2": TorchvisionV2Pipeline(cfg),
        "mmseg_style": MMSegStylePipeline(cfg),
        "decode_only": decode_only,
    }
    for pipeline in pipelines.values():  # warm-up: imports, first-call allocations
        images_per_second(pipeline, examples[:2], seed)
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for r in range(rounds):
        for name, pipeline in pipelines.items():
            rates[name].append(images_per_second(pipeline, examples, seed + r))
    return {name: statistics.median(values) for name, values in rates.items()}


def quickstart_data_wait(iterations: int, workers: int) -> float:
    """Share of the quickstart's step time spent waiting for the next batch (the runner's
    ``data_time`` over its ``time``), on this machine with ``workers`` DataLoader workers."""
    import logging

    from hooktrain.recipe import load_recipe
    from hooktrain.runner import IterRunner

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(
            recipe_path,
            [f"train.max_iters={iterations}", f"data.train.num_workers={workers}", "hooks=[]",
             f"data.train.source.root={Path(tmp) / 'shapes'}", f"data.val.source.root={Path(tmp) / 'shapes'}"],
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
    from hooktrain.recipe import load_recipe

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
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    assert "huggingface_hub" not in sys.modules, "HF_ENDPOINT must be set before the client loads"
    from hub_replicas import ADE20K_ID, PARQUET_REVISION
    from hub_server import HubServer

    server = HubServer()
    server.add(ADE20K_ID, root, revision=PARQUET_REVISION)
    os.environ.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_HOME=str(root / "hf_home"))
    shards = root / "scene_parsing" / "train"
    shards.mkdir(parents=True)
    half = len(examples) // 2
    for i, part in enumerate((examples[:half], examples[half:])):
        write_parquet(shards / f"{i:04d}.parquet", part)
    return server.start()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 examples, 2 rounds (a few seconds)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quickstart-iters", type=int, default=40,
        help="iterations of the quickstart for the data-wait share (0 skips it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    n, rounds = (16, 2) if args.quick else (args.examples, args.rounds)

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
    print(f"{len(examples)} examples 683x512, JPEG mean {mean_kb:.0f} KB; datasets stream read {stream_rate:.0f} rows/s")

    medians = compare(examples, rounds, args.seed)
    ratio = medians["hooktrain"] / medians["tv2"]
    print(f"hooktrain train pipeline   {medians['hooktrain']:7.1f} images/s (one thread, median of {rounds})")
    print(f"torchvision v2 baseline    {medians['tv2']:7.1f} images/s  -> hooktrain is {ratio:.2f}x")
    print(f"mmseg-style port (same run) {medians['mmseg_style']:6.1f} images/s  -> hooktrain is "
          f"{medians['hooktrain'] / medians['mmseg_style']:.2f}x")
    print(f"decode only (JPEG + PNG)   {medians['decode_only']:7.1f} images/s")
    print(f"mmseg OpenCV reference     {MMSEG_REFERENCE_IMAGES_PER_S:7d} images/s (measured earlier, not rerun here)")
    streams = compare_streams(len(generated), rounds, args.seed, Path(served.name))
    hub.stop()
    served.cleanup()
    http, local = streams["hub_http"], streams["local_parquet"]
    stream_ratio = http["images_per_s"] / local["images_per_s"]
    print(f"train stream, 1 worker, local Hub over HTTP {http['images_per_s']:6.1f} images/s "
          f"(first batch after {http['first_batch_s']:.2f} s)")
    print(f"train stream, 1 worker, local parquet      {local['images_per_s']:6.1f} images/s "
          f"(first batch after {local['first_batch_s']:.2f} s)  -> HTTP path is {stream_ratio:.2f}x")
    handover = {"float32_int64": handover_rate(torch.float32), "uint8": handover_rate(torch.uint8)}
    print(f"worker hand-over alone, 512x512: float32 image + int64 mask "
          f"{handover['float32_int64']:.0f} batches/s, uint8 {handover['uint8']:.0f} batches/s")
    wait = None
    if args.quickstart_iters:
        iters = 8 if args.quick else args.quickstart_iters
        wait = quickstart_data_wait(iters, workers=2)
        print(f"quickstart, 2 workers: {100 * wait:.1f}% of step time waiting for data (target < 5%)")
    result = {
        "bench": "data_pipeline",
        "quickstart_data_wait_share": None if wait is None else round(wait, 4),
        "images_per_s": round(medians["hooktrain"], 1),
        "baseline_tv2_images_per_s": round(medians["tv2"], 1),
        "ratio": round(ratio, 2),
        "mmseg_style_images_per_s": round(medians["mmseg_style"], 1),
        "ratio_vs_mmseg_style": round(medians["hooktrain"] / medians["mmseg_style"], 2),
        "decode_only_images_per_s": round(medians["decode_only"], 1),
        "mmseg_reference_images_per_s": MMSEG_REFERENCE_IMAGES_PER_S,
        "stream_hub_http_images_per_s_per_worker": round(http["images_per_s"], 1),
        "stream_local_parquet_images_per_s_per_worker": round(local["images_per_s"], 1),
        "stream_ratio_hub_vs_local": round(stream_ratio, 3),
        "worker_handover_batches_per_s": {k: round(v) for k, v in handover.items()},
        "stream_first_batch_s": {"hub_http": round(http["first_batch_s"], 2),
                                 "local_parquet": round(local["first_batch_s"], 2)},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
