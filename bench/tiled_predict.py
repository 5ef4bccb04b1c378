"""``hooktrain predict`` on huge rasters: peak memory and tiles/s of tiled prediction, against
MMSegmentation-style slide inference, which holds the whole image, its logits and every window.

Generated 4-band uint8 GeoTIFFs (DEFLATE, 512 px internal tiles, a nodata strip on the left,
cached under ``~/.cache/hooktrain/bench``) are predicted by the ``recipes/quickstart_4band.yaml``
model (FPN on ResNet-18, 5 classes, initial weights: the speed and memory do not depend on
them), each run its own process (``--worker``), measured in the same run:

- ``tiled``: ``hooktrain predict``'s path (``hooktrain.deploy.predict.predict_images``,
  ``--blend hann``), writing the label GeoTIFF, on 20,000 x 20,000, and on 5,000 rows and
  5,000 columns of the same raster: memory must not grow with the height, and grows with the
  width only by the rows in flight;
- ``read_strips`` / ``read_whole``: a 12,000 x 20,000 RGB PNG decoded as tiled prediction
  reads it (bands of ``stride`` new rows through rasterio, forward only) and whole (OpenCV);
- ``slide``: the whole image read into memory, normalised, and MMSegmentation's slide
  inference over it (``hooktrain.models.inference.slide_logits``: every window in one batch,
  the logits of the whole image), on images up to ``--slide-max``; from its memory per pixel
  the bench estimates the largest image slide holds on this machine.

Per run: ``peak_rss_gib`` (the process's ``VmHWM``), ``model_rss_gib`` (after loading the
model, before the image: the interpreter, torch and the weights), ``peak_over_model_gib`` (what
the image cost: the difference), ``tiles`` and ``tiles_per_s`` (tiles run over the seconds of the
prediction, writing included).

    python bench/tiled_predict.py            # crop 1024, stride 896; ~20 min on 2 cores
    python bench/tiled_predict.py --quick    # smoke run: 800 px, crop 128

Results go to bench/results/tiled_predict.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart_4band.yaml"
CACHE = Path(os.environ.get("HOOKTRAIN_CACHE", Path.home() / ".cache" / "hooktrain")) / "bench"
GIB = 2**30


def _status_gib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def peak_rss_gib() -> float:
    """The process's peak resident set: ``VmHWM``, not ``ru_maxrss``, which Linux carries over
    from the parent across fork and exec (the bench's own process holds torch and a model)."""
    return _status_gib("VmHWM:")


def rss_gib() -> float:
    return _status_gib("VmRSS:")


def raster(height: int, width: int) -> Path:
    """A cached ``height x width`` 4-band GeoTIFF, written a band of rows at a time."""
    import numpy as np
    import rasterio
    from rasterio.transform import Affine
    from rasterio.windows import Window

    path = CACHE / f"raster_{height}x{width}.tif"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    profile = dict(driver="GTiff", height=height, width=width, count=4, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(10, 0, 500000, 0, -10, 4500000), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate", nodata=0, BIGTIFF="IF_SAFER")  # fmt: skip
    with rasterio.open(partial, "w", **profile) as dst:
        for top in range(0, height, 512):
            rows = min(512, height - top)
            yy, xx = np.mgrid[top : top + rows, 0:width].astype(np.float32)
            base = np.sin(yy / 37.0) * np.cos(xx / 53.0) * 100 + 128
            bands = np.stack([base, 255 - base, (base + xx % 97) % 254, (xx + yy) % 200 + 20]).clip(1, 255)
            bands[:, :, :256] = 0  # a nodata strip
            dst.write(bands.astype(np.uint8), window=Window(0, top, width, rows))
    partial.rename(path)
    return path


def png(height: int, width: int) -> Path:
    """A cached ``height x width`` RGB PNG (OpenCV writes it from memory, once)."""
    import cv2
    import numpy as np

    path = CACHE / f"image_{height}x{width}.png"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        yy, xx = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
        base = (np.sin(yy / 37.0) * np.cos(xx / 53.0) * 100 + 128).astype(np.uint8)
        image = np.dstack([base, 255 - base, base // 2 + 60])
        cv2.imwrite(str(path.with_suffix(".partial.png")), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        path.with_suffix(".partial.png").rename(path)
    return path


def read_worker(args) -> None:
    """Decode a PNG as tiled prediction reads it (through rasterio, a band of ``stride`` new rows
    at a time, forward only) or whole (OpenCV), and report the peak memory."""
    import cv2

    from hooktrain.deploy.raster import RasterSource, bounded_cache, rasterio_module

    rasterio_module()
    model_rss = rss_gib()  # the same imports in both modes, before the image
    started = time.perf_counter()
    if args.mode == "read_strips":
        with bounded_cache():
            source = RasterSource(args.image, 3)  # the rows tiled prediction reads: each row once, forward
            for top in range(0, source.height, args.stride):
                source.read(top, min(top + args.stride, source.height))
            height, width = source.height, source.width
    else:
        height, width = cv2.imread(args.image).shape[:2]
    seconds = time.perf_counter() - started
    print(json.dumps({"mode": args.mode, "height": height, "width": width, "tiles": 0, "seconds": round(seconds, 1),
                      "tiles_per_s": 0, "model_rss_gib": round(model_rss, 3), "peak_rss_gib": round(peak_rss_gib(), 3),
                      "peak_over_model_gib": round(peak_rss_gib() - model_rss, 3)}))  # fmt: skip


def export_model(root: Path) -> Path:
    """The recipe's model with its initial weights, through ``hooktrain export``."""
    import torch
    from safetensors.torch import save_file

    from hooktrain.models import build_segmentor
    from hooktrain.recipe.schema import dump_recipe, load_recipe

    recipe = load_recipe(RECIPE)
    torch.manual_seed(0)
    data = recipe.data
    model = build_segmentor(recipe.model, num_classes=data.num_classes, ignore_index=data.ignore_index,
                            in_channels=data.in_channels)  # fmt: skip
    checkpoint = root / "checkpoints" / "iter_1"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / "model.safetensors"))
    (checkpoint / "recipe.yaml").write_text(dump_recipe(recipe))
    subprocess.run([sys.executable, "-m", "hooktrain", "export", str(checkpoint), str(root / "model.safetensors")],
                   check=True, capture_output=True)  # fmt: skip
    return root / "model.safetensors"


def worker(args) -> None:
    import torch

    from hooktrain.deploy.segmenter import Segmenter
    from hooktrain.models.inference import predicted_labels, slide_logits, slide_windows

    torch.set_grad_enabled(False)
    crop, stride = (args.crop, args.crop), (args.stride, args.stride)
    segmenter = Segmenter.load(args.model, device="cpu", batch_size=args.batch)
    model_rss = rss_gib()
    started = time.perf_counter()
    if args.mode == "tiled":
        from hooktrain.deploy.predict import TileOptions, predict_images

        tiles = TileOptions(tiled=True, crop_size=crop, stride=stride, blend="hann", progress=False)
        predict_images(args.model, [args.image], args.out, tiles, batch_size=args.batch)
        import rasterio

        with rasterio.open(args.image) as dataset:
            height, width = dataset.height, dataset.width
    else:
        import rasterio

        with rasterio.open(args.image) as dataset:
            image = dataset.read().transpose(1, 2, 0).copy()
        height, width = image.shape[:2]
        normalised = segmenter._transform.normalised(image)[None]
        del image
        logits = slide_logits(segmenter._logits_fn, normalised, crop, stride)
        predicted_labels(logits[0], segmenter.inference)
    seconds = time.perf_counter() - started
    tiles = len(slide_windows(height, width, crop, stride))
    record = {"mode": args.mode, "height": height, "width": width, "tiles": tiles, "seconds": round(seconds, 1),
              "tiles_per_s": round(tiles / seconds, 3), "model_rss_gib": round(model_rss, 3),
              "peak_rss_gib": round(peak_rss_gib(), 3),
              "peak_over_model_gib": round(peak_rss_gib() - model_rss, 3)}  # fmt: skip
    print(json.dumps(record))


def run(mode: str, image: Path, model: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--worker", "--mode", mode, "--image", str(image), "--model", str(model),
                   "--out", out, "--crop", str(args.crop), "--stride", str(args.stride),
                   "--batch", str(args.batch)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        return {"mode": mode, "image": image.name, "ok": False, "error": result.stderr[-2000:]}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "image": image.name, "ok": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="side of the largest raster")
    parser.add_argument("--crop", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=896)
    parser.add_argument("--batch", type=int, default=2, help="tiles per forward pass (tiled)")
    parser.add_argument("--slide-max", type=int, default=4096, help="side of the largest image slide runs on")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("tiled", "slide", "read_strips", "read_whole"), help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (read_worker if args.mode.startswith("read") else worker)(args)
        return
    if args.quick:  # slide on the largest raster too: its tiled run serves both comparisons
        args.size, args.crop, args.stride, args.slide_max = 800, 128, 96, 800
    short = args.size // 4
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = export_model(Path(tmp))
        plan = [("tiled", raster(args.size, args.size)), ("tiled", raster(short, args.size)),
                *([] if args.quick else [("tiled", raster(args.size, short))]),  # the width: not quoted
                ("tiled", raster(args.slide_max, args.slide_max)),
                ("slide", raster(args.slide_max // 2, args.slide_max // 2)),
                ("slide", raster(args.slide_max, args.slide_max)),
                ("read_strips", png(args.size * 3 // 5, args.size)),
                ("read_whole", png(args.size * 3 // 5, args.size))]  # fmt: skip
        plan = list(dict.fromkeys(plan))  # a raster planned twice for one mode runs once
        runs = []
        for mode, image in plan:
            record = run(mode, image, model, args)
            status = (f"{record['tiles_per_s']} tiles/s, peak RSS {record['peak_rss_gib']} GiB, {record['seconds']} s"
                      if record["ok"] else "FAILED")  # fmt: skip
            print(f"{mode} {image.name}: {status}", flush=True)
            runs.append(record)
    summary = summarise(runs, args)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    sys.path.insert(0, str(Path(__file__).parent))
    from results import write_result

    write_result("tiled_predict", summary)
    print(json.dumps(summary))
    if not all(r["ok"] for r in runs):
        sys.exit(1)


def summarise(runs: list[dict], args) -> dict:
    """The runs, with the ratios the docs quote, measured in this run."""
    ok = {(r["mode"], r["height"], r["width"]): r for r in runs if r["ok"]}
    big, short, side = args.size, args.size // 4, args.slide_max
    summary = {
        "device": "cpu", "model": "recipes/quickstart_4band.yaml (FPN, ResNet-18, 4 bands, 5 classes)",
        "crop": args.crop, "stride": args.stride, "batch": args.batch, "blend": "hann", "runs": runs,
        "quick": args.quick,
    }  # fmt: skip
    tall, wide_short, narrow = ok.get(("tiled", big, big)), ok.get(("tiled", short, big)), ok.get(("tiled", big, short))
    if tall and wide_short:  # the same width, 4x the rows: flat memory means a ratio of ~1
        summary["peak_rss_tall_over_short"] = round(tall["peak_rss_gib"] / wide_short["peak_rss_gib"], 3)
        summary["image_memory_tall_over_short"] = round(
            tall["peak_over_model_gib"] / wide_short["peak_over_model_gib"], 3
        )
    if tall and narrow:
        summary["peak_rss_wide_over_narrow"] = round(tall["peak_rss_gib"] / narrow["peak_rss_gib"], 3)
        summary["image_memory_wide_over_narrow"] = round(
            tall["peak_over_model_gib"] / narrow["peak_over_model_gib"], 3
        )
    slide_small, slide_big = ok.get(("slide", side // 2, side // 2)), ok.get(("slide", side, side))
    tiled_same = ok.get(("tiled", side, side))
    if slide_big and tiled_same:
        summary["slide_over_tiled_peak_rss"] = round(slide_big["peak_rss_gib"] / tiled_same["peak_rss_gib"], 2)
        summary["slide_over_tiled_image_memory"] = round(
            slide_big["peak_over_model_gib"] / tiled_same["peak_over_model_gib"], 2
        )
        summary["tiled_over_slide_tiles_per_s"] = round(tiled_same["tiles_per_s"] / slide_big["tiles_per_s"], 3)
    strips, whole = ok.get(("read_strips", big * 3 // 5, big)), ok.get(("read_whole", big * 3 // 5, big))
    if strips and whole:  # decoding a large PNG: strip by strip against all at once
        summary["png_whole_over_strips_memory"] = round(whole["peak_over_model_gib"] / strips["peak_over_model_gib"], 1)
    if slide_small and slide_big:  # slide's memory grows with the pixels: the largest image it holds here
        per_pixel = (slide_big["peak_rss_gib"] - slide_small["peak_rss_gib"]) / (side**2 - (side // 2) ** 2)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        summary["slide_gib_per_megapixel"] = round(per_pixel * 1e6, 4)
        pixels = (total - slide_small["peak_rss_gib"]) / per_pixel + (side // 2) ** 2
        summary["slide_largest_side_in_ram"] = int(pixels**0.5)
        summary["ram_gib"] = round(total, 1)
    return summary


if __name__ == "__main__":
    main()
