"""The procedural shapes dataset: the quickstart's data, generated locally in seconds.

Each image is a finely textured background (colour noise or stripes) with one or two
flat-filled upright shapes drawn over it. Colours are random per shape and per background, so
a model has to learn shape, not colour. Classes: 0 background, 1 circle, 2 square,
3 triangle, 4 cross.

The dataset is written once as parquet shards with ``image`` (PNG, RGB) and ``annotation``
(PNG, mode L) columns typed as ``datasets.Image()``: the same schema as ADE20K on the Hub, laid
out like a Hub repo (``root/data/{train,validation}-0000i-of-0000n.parquet``), so it streams
through exactly the code path of the real datasets.

Other channel counts and bit depths (``bands``, ``bit_depth``; the defaults 3 and 8 give the
RGB dataset above, byte for byte): ``bands: 1`` is the grey version of the RGB image;
``bands: 2`` grey plus one "NIR" band; ``bands: 4`` and more RGB plus ``bands - 3`` "NIR"
bands, in which the shapes are bright on a darker background (each band with its own levels
and noise), so a multispectral model has a cue that RGB lacks. ``bit_depth: 16`` scales every
value to 0..65535 (``v * 257`` plus noise in the low byte, so 8 bits cannot hold it). Images
with 1, 3 or 4 bands are stored as PNG (RGB/RGBA order for 3/4), others as TIFF (tifffile,
channels last). The extra bands and the noise come from their own random stream, so the RGB
content of an example is the same whatever the options.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from hooktrain.data.parquet import write_image_shard
from hooktrain.errors import UserError

SHAPES_CLASSES = ["background", "circle", "square", "triangle", "cross"]
SHAPES_PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48]]
_MANIFEST = "shapes.json"
_FORMAT_VERSION = 3  # 2: fine textures, flat contrasting shapes; 3: upright shapes, PNG images
# Generator knobs (bump _FORMAT_VERSION when changing any): sized so that the quickstart's
# ResNet-18 FPN, from scratch on 2 CPU cores, tells the shapes apart within about three
# minutes on a CPU with AVX-512 (`bench/quickstart.py` measures it).
_TEXTURE_AMPLITUDE = 90.0  # background texture swing around its base colour, per channel
_RADIUS_RANGE = (0.2, 0.34)  # shape "radius" as a fraction of the image size
_MAX_SHAPES = 2
_MIN_COLOUR_GAP = 90  # summed |RGB| distance of a shape's colour from the background's base
_GRAIN = 3  # +- per-pixel noise
_RGB_DEFAULTS = {"bands": 3, "bit_depth": 8}  # not written to (nor read from) an RGB dataset's manifest
_ROWS_PER_ROW_GROUP = 50  # row groups are the units the train stream shuffles and resumes in


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return ys, xs


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background and its base colour (float32 RGB) for picking contrasting shapes.

    Fine textures (colour noise at two grain sizes, or stripes 6-16 px apart) swing around a
    random base colour, while shapes are flat fills: "textured vs flat" is a local cue, so a
    model trained from scratch separates shapes from background early and can spend its short
    schedule on telling the shapes apart. Textures are computed on a half-size grid and upsampled.
    """
    coarse = max(size // 2, 8)
    base = rng.integers(0, 256, size=3).astype(np.float32)
    kind = rng.integers(3)
    if kind < 2:  # colour noise: blobs of 4-10 px, or 2-4 px
        cells = max(int(size / (rng.uniform(4, 10) if kind == 0 else rng.uniform(2, 4))), 3)
        tex = cv2.resize(rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32),
                         (coarse, coarse), interpolation=cv2.INTER_CUBIC)  # fmt: skip
    else:  # stripes
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = _grid(coarse)
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        t = np.sin(proj * 2 * math.pi * size / rng.uniform(6, 16))
        tex = t[..., None] * rng.uniform(-1, 1, size=3).astype(np.float32)
    small = np.clip(base + _TEXTURE_AMPLITUDE * tex, 0, 255).astype(np.float32)
    image = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(image, 0, 255).astype(np.uint8), base


def _polygon(cls: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Corners of an upright square, triangle or plus-shaped cross of "radius" ``r``."""
    if cls == 2:  # square
        pts = [(0.75, 0.75), (-0.75, 0.75), (-0.75, -0.75), (0.75, -0.75)]
    elif cls == 3:  # triangle, apex up (image y grows downwards)
        pts = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign with arms 0.35 r wide
        w = 0.35
        pts = [(w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1), (w, -1),
               (w, -w), (1, -w), (1, w), (w, w)]  # fmt: skip
    return np.array([(cx + r * x, cy + r * y) for x, y in pts], dtype=np.int32)


def render_example(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8 RGB) and its mask (HxW uint8 class ids) drawn from ``rng``.

    One to ``_MAX_SHAPES`` shapes of radius ``_RADIUS_RANGE`` (fractions of ``size``), placed
    without overlapping each other, each in a random colour at least ``_MIN_COLOUR_GAP``
    (summed over RGB) away from the background's base colour.
    """
    image, base = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    placed: list[tuple[float, float, float]] = []
    for _ in range(rng.integers(1, _MAX_SHAPES + 1)):
        cls = int(rng.integers(1, len(SHAPES_CLASSES)))
        r = rng.uniform(*_RADIUS_RANGE) * size
        for _attempt in range(10):
            cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)
            if all(math.hypot(cx - x, cy - y) > r + other for x, y, other in placed):
                break
        else:
            continue  # no room left for this one
        placed.append((cx, cy, r))
        for _attempt in range(20):
            colour = rng.integers(0, 256, size=3)
            if np.abs(colour - base).sum() >= _MIN_COLOUR_GAP:
                break
        colour = tuple(int(v) for v in colour)
        if cls == 1:
            centre = (int(cx), int(cy))
            cv2.circle(image, centre, int(r), colour, -1, lineType=cv2.LINE_AA)
            cv2.circle(mask, centre, int(r), cls, -1)
        else:
            pts = _polygon(cls, cx, cy, r)
            cv2.fillPoly(image, [pts], colour, lineType=cv2.LINE_AA)
            cv2.fillPoly(mask, [pts], cls)
    # Grain so flat shapes are not trivially separable by a constant colour.
    grain = rng.integers(-_GRAIN, _GRAIN + 1, size=(size, size, 1), dtype=np.int16)
    image = np.clip(image.astype(np.int16) + grain, 0, 255)
    return image.astype(np.uint8), mask


def with_bands(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, bands: int, bit_depth: int) -> np.ndarray:
    """The RGB ``image`` as ``bands`` channels of ``bit_depth`` bits (see the module docstring):
    ``HxWxbands`` ``uint8`` or ``uint16``; extra bands and 16-bit noise are drawn from ``rng``."""
    size = mask.shape[0]
    base = image if bands >= 3 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    extra = []
    for _ in range(bands - base.shape[2]):
        inside, outside = rng.uniform(150, 230), rng.uniform(20, 110)
        noise = rng.normal(0, 25, size=(size, size)).astype(np.float32)
        band = np.where(mask > 0, inside, outside).astype(np.float32) + noise
        extra.append(np.clip(np.rint(band), 0, 255).astype(np.uint8)[:, :, None])
    out = np.concatenate([base, *extra], axis=2) if extra else base
    if bit_depth == 16:
        low = rng.integers(0, 257, size=out.shape, dtype=np.int32)
        out = np.minimum(out.astype(np.int32) * 257 + low, 65535).astype(np.uint16)
    return np.ascontiguousarray(out)


def encode_image(image: np.ndarray) -> tuple[bytes, str]:
    """``(bytes, suffix)`` of an ``HxWxC`` image: PNG for 1, 3 (RGB) and 4 (RGBA order)
    channels, TIFF otherwise; 8 or 16 bits as the array's dtype."""
    channels = image.shape[2]
    if channels == 3:
        return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes(), ".png"
    if channels == 4:
        return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA))[1].tobytes(), ".png"
    if channels == 1:
        return cv2.imencode(".png", image[:, :, 0])[1].tobytes(), ".png"
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, image, photometric="minisblack", planarconfig="contig")
    return buf.getvalue(), ".tiff"


def _write_split(
    out: Path, split: str, count: int, shards: int, size: int, seed: int, bands: int = 3, bit_depth: int = 8
) -> None:
    split_key = 0 if split == "train" else 1
    bounds = np.linspace(0, count, shards + 1).astype(int)
    for shard in range(shards):
        images, masks = [], []
        for i in range(bounds[shard], bounds[shard + 1]):
            image, mask = render_example(np.random.default_rng([seed, split_key, i]), size)
            if (bands, bit_depth) != (3, 8):
                image = with_bands(image, mask, np.random.default_rng([seed, split_key, i, 1]), bands, bit_depth)
            # PNG, not JPEG: JPEG's 8x8 blocks blur the fine background texture that tells
            # shapes from background, and measurably slowed learning in the short schedule.
            encoded, suffix = encode_image(image)
            images.append({"bytes": encoded, "path": f"{split}_{i:06d}{suffix}"})
            masks.append({"bytes": cv2.imencode(".png", mask)[1].tobytes(),
                          "path": f"{split}_{i:06d}.png"})  # fmt: skip
        name = f"{split}-{shard:05d}-of-{shards:05d}.parquet"
        write_image_shard(out / "data" / name, {"image": images, "annotation": masks},
                          row_group_size=_ROWS_PER_ROW_GROUP)  # fmt: skip


def shapes_files(root: str | os.PathLike, split: str) -> list[str]:
    """The parquet shards of ``split`` in a generated shapes dataset, in order."""
    return sorted(str(p) for p in (Path(root) / "data").glob(f"{split}-*.parquet"))


def generate_shapes(
    root: str | os.PathLike,
    *,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 128,
    train_shards: int = 8,
    val_shards: int = 2,
    seed: int = 0,
    bands: int = 3,
    bit_depth: int = 8,
) -> Path:
    """Generate the shapes dataset into ``root`` unless it is already there; return its path.

    Idempotent and safe to call from several processes at once: the dataset is written
    into a temporary sibling directory and renamed into place, so ``root`` either does not
    exist or holds a complete dataset. An existing ``root`` generated with other parameters
    is a ``UserError``; an empty ``root`` directory is filled.
    """
    params = {
        "version": _FORMAT_VERSION, "num_train": num_train, "num_val": num_val,
        "image_size": image_size, "train_shards": train_shards, "val_shards": val_shards,
        "seed": seed, "bands": bands, "bit_depth": bit_depth,
    }  # fmt: skip
    if bands < 1 or bit_depth not in (8, 16):
        raise UserError(f"shapes: bands is {bands} and bit_depth {bit_depth}; use bands >= 1 and bit_depth 8 or 16")
    if num_train < train_shards or num_val < val_shards:
        raise UserError(
            f"shapes: cannot cut {num_train} train / {num_val} val images into "
            f"{train_shards} / {val_shards} shards; lower train_shards/val_shards"
        )
    root = Path(root).absolute()
    if not _is_complete(root, params):
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            (tmp / "data").mkdir()
            _write_split(tmp, "train", num_train, train_shards, image_size, seed, bands, bit_depth)
            _write_split(tmp, "validation", num_val, val_shards, image_size, seed, bands, bit_depth)
            meta = {**params, "classes": SHAPES_CLASSES, "palette": SHAPES_PALETTE}
            for key, default in _RGB_DEFAULTS.items():  # the RGB dataset's manifest as before
                if meta[key] == default:
                    del meta[key]
            (tmp / _MANIFEST).write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, root)
            except OSError:
                if not root.exists():  # a real failure, not a lost race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _is_complete(root, params)  # a concurrent writer with other parameters is an error
    return root


def _is_complete(root: Path, params: dict) -> bool:
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False  # an empty directory is replaced by the rename
    manifest = root / _MANIFEST
    if not manifest.is_file():
        raise UserError(
            f"{root} exists but is not a generated shapes dataset (no {_MANIFEST}); "
            "remove it or point data.*.source.root at another directory"
        )
    stored = {**_RGB_DEFAULTS, **json.loads(manifest.read_text())}
    found = {k: v for k, v in stored.items() if k in params}
    if found != params:
        diff = ", ".join(f"{k}={found.get(k)} (recipe: {v})" for k, v in params.items()
                         if found.get(k) != v)  # fmt: skip
        raise UserError(
            f"{root} holds a shapes dataset generated with other parameters ({diff}); "
            "delete it to regenerate or set data.*.source.root to another directory"
        )
    return True
