"""How far ``data.train.gpu_augment``'s device PhotoMetricDistortion is from the OpenCV path.

OpenCV picks its HSV kernels by the CPU at run time, so this is measured on the machine at hand
against both of its paths: the optimised kernels (what training runs) and the baseline ones
(``cv2.setUseOptimized(False)``), with one OpenCV thread. For each path:

- RGB -> HSV for all 2^24 colours: values that differ (0 expected everywhere);
- HSV -> RGB for every 8-bit HSV value, in rows of 256 pixels (whole vector steps for every
  SIMD width) and of 250 (row tails, which OpenCV rounds): values that differ and the largest
  difference (at most ``device_augment.HSV_STEP`` = 1 expected everywhere);
- whole draws: the CPU path's PhotoMetricDistortion + Normalize (``TrainTransform``) against
  ``photometric_normalise`` with the same draws (``draw_photometric``, mmseg's distribution)
  on random scenes 512 and 75 pixels wide: the largest difference in uint8 steps, overall and
  of the draws with a saturation and then a hue step (whose bound, ``opencv_step_bound``, is
  11 or 17 steps; the bench fails when any draw exceeds its bound), the share of values that
  differ and of those more than one step off.

    python bench/augment_exactness.py [--quick]

Results go to bench/results/augment_exactness.json (``bench/results.py``); the last line
printed is one line of JSON: {"bench": "augment_exactness", ...}.
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import torch
from results import write_result

from hooktrain.data import transforms
from hooktrain.data.device_augment import hsv_to_rgb, opencv_step_bound, photometric_normalise, rgb_to_hsv
from hooktrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainPipelineConfig, TrainTransform

STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def rgb_to_hsv_off(every: int = 1) -> int:
    """Values that differ over every ``every``-th 24-bit colour."""
    colours = np.arange(0, 2**24, every, dtype=np.uint32)
    rgb = np.ascontiguousarray(colours.view(np.uint8).reshape(-1, 4096 // every, 4)[:, :, :3])
    h, s, v = rgb_to_hsv(torch.from_numpy(rgb).permute(2, 0, 1))
    return int((torch.cat([h, s, v]).permute(1, 2, 0).numpy() != cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)).sum())


def hsv_to_rgb_off(width: int, every: int = 1) -> tuple[int, int, int]:
    """(values that differ, largest difference, values) over every 8-bit HSV value (of every
    ``every``-th hue)."""
    h, s, v = np.meshgrid(np.arange(0, 180, every), np.arange(256), np.arange(256), indexing="ij")
    hsv = np.stack([h, s, v], -1).astype(np.uint8).reshape(-1, 3)
    hsv = np.concatenate([hsv, hsv[: -len(hsv) % width]]).reshape(-1, width, 3)
    planes = torch.from_numpy(hsv).permute(2, 0, 1).to(torch.int32)
    ours = hsv_to_rgb(planes[0:1], planes[1:2], planes[2:3]).permute(1, 2, 0).numpy().astype(np.int64)
    diff = np.abs(ours - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    return int((diff > 0).sum()), int(diff.max()), int(diff.size)


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random colours, half of the rows bright and saturated (where H's units weigh most)."""
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    image[: height // 2] = np.clip(rng.normal(200, 60, (height // 2, width, 3)), 0, 255).astype(np.uint8)
    return image


def whole_draws(draws: int, width: int, height: int = 32) -> dict:
    """The CPU path against the device function over ``draws`` draws of mmseg's distribution."""
    cfg = TrainPipelineConfig(crop_size=(height, width))
    transform = TrainTransform(cfg)
    rng = np.random.default_rng(width)
    steps, largest, chained, drawn = [], 0, 0, transforms.draw_photometric
    try:
        for _ in range(draws):
            image, draw = scene(rng, height, width), drawn(rng, cfg)
            transforms.draw_photometric = lambda _rng, _cfg, draw=draw: draw
            out, pending = transform._photometric(image, None)
            table = transform._norm if pending is None else np.ascontiguousarray(transform._norm[:, pending])
            want, _ = transform._normalise_and_pad(out, np.zeros((height, width), np.uint8), table)
            row = torch.from_numpy(draw.as_row())
            got = photometric_normalise(torch.from_numpy(image).permute(2, 0, 1)[None].contiguous(), row[None],
                                        IMAGENET_MEAN, IMAGENET_STD)[0]  # fmt: skip
            diff = ((got - want).abs() * STD).round().long()
            steps.append(diff)
            largest = max(largest, int(diff.max()))
            bound = opencv_step_bound(row)
            if int(diff.max()) > bound:
                raise AssertionError(f"a draw is {int(diff.max())} steps off, over its bound {bound}")
            if draw.saturation is not None and draw.hue is not None:
                chained = max(chained, int(diff.max()))
    finally:
        transforms.draw_photometric = drawn
    values = torch.stack(steps)
    return {"width": width, "draws": draws, "max_steps": largest, "max_steps_saturation_then_hue": chained,
            "share_off": round(float((values > 0).float().mean()), 5),
            "share_over_one_step": round(float((values > 1).float().mean()), 6)}  # fmt: skip


def measure(optimised: bool, draws: int, every: int) -> dict:
    cv2.setUseOptimized(optimised)
    rows = {}
    for width in (256, 250):
        off, largest, total = hsv_to_rgb_off(width, every)
        rows[f"rows_{width}"] = {"values_off": off, "values": total, "max_steps": largest}
    return {"path": "optimised" if optimised else "baseline", "rgb_to_hsv_values_off": rgb_to_hsv_off(every),
            "hsv_to_rgb": rows, "whole_draws": [whole_draws(draws, width) for width in (512, 75)]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="20 draws per width instead of 300, every 16th colour and hue")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    features = cv2.getCPUFeaturesLine()  # before setUseOptimized(False) marks them unused
    draws, every = (20, 16) if args.quick else (300, 1)
    paths = [measure(optimised, draws, every) for optimised in (True, False)]
    for path in paths:
        for row in path["whole_draws"]:
            print(f"{path['path']:>9} width {row['width']:>3}: max {row['max_steps']} steps, "
                  f"{row['share_off']:.2%} of values off, {row['share_over_one_step']:.4%} more than one step")  # fmt: skip
    summary = {"opencv": cv2.__version__, "opencv_cpu_features": features, "quick": args.quick,
               "paths": paths}  # fmt: skip
    write_result("augment_exactness", summary)
    print(json.dumps({"bench": "augment_exactness", **summary}))


if __name__ == "__main__":
    main()
