"""Run inside the MMSegmentation environment (``MmsegEnv.run``): MMSegmentation 1.2.2's own
ADE20K train pipeline and data preprocessor, for ``tests/data/test_transforms.py``.

    transforms_reference.py INPUTS.npz OUT.npz --seeds N --scale L S --ratio LO HI --crop H W
    transforms_reference.py INPUTS.npz OUT.npz --seeds N --choice-scales S1 S2 ... --max-size M --crop H W

``INPUTS.npz`` holds ``image_<k>`` (RGB uint8) and ``mask_<k>`` arrays. For seed ``s`` in
``range(N)`` the scene ``s % count`` goes through the registered transforms
``RandomResize(scale, ratio_range, keep_ratio=True)`` -> ``RandomCrop(crop, cat_max_ratio=0.75)``
-> ``RandomFlip(prob=0.5)`` -> ``PhotoMetricDistortion`` -> ``PackSegInputs`` and then
``SegDataPreProcessor`` (BGR to RGB, ImageNet mean/std, padding to the crop with 0 and 255),
after ``np.random.seed(s)``: every draw of these transforms comes from numpy's global
generator. With ``--choice-scales`` the first transform is instead the Mask2Former configs'
``RandomChoiceResize(scales, resize_type='ResizeShortestEdge', max_size=M)``. The image enters
as ``LoadImageFromFile`` leaves it (BGR). ``OUT.npz`` holds ``image_<s>`` (float32 [3, H, W])
and ``mask_<s>`` (int64 [H, W]).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from mmengine.dataset import Compose, pseudo_collate
from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.utils import register_all_modules

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--seeds", type=int, required=True)
    parser.add_argument("--scale", type=int, nargs=2)
    parser.add_argument("--ratio", type=float, nargs=2)
    parser.add_argument("--choice-scales", type=int, nargs="+")
    parser.add_argument("--max-size", type=int)
    parser.add_argument("--crop", type=int, nargs=2, required=True)
    args = parser.parse_args()
    register_all_modules()
    if args.choice_scales:
        resize = {"type": "RandomChoiceResize", "scales": args.choice_scales, "resize_type": "ResizeShortestEdge",
                  "max_size": args.max_size}  # fmt: skip
    elif args.scale and args.ratio:
        resize = {"type": "RandomResize", "scale": tuple(args.scale), "ratio_range": tuple(args.ratio),
                  "keep_ratio": True}  # fmt: skip
    else:
        parser.error("give --scale and --ratio, or --choice-scales and --max-size")
    pipeline = Compose([
        resize,
        {"type": "RandomCrop", "crop_size": tuple(args.crop), "cat_max_ratio": 0.75},
        {"type": "RandomFlip", "prob": 0.5},
        {"type": "PhotoMetricDistortion"},
        {"type": "PackSegInputs"},
    ])  # fmt: skip
    preprocessor = SegDataPreProcessor(mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
                                       size=tuple(args.crop))  # fmt: skip
    inputs = np.load(args.inputs)
    count = len([k for k in inputs.files if k.startswith("image_")])
    out = {}
    for seed in range(args.seeds):
        image, mask = inputs[f"image_{seed % count}"], inputs[f"mask_{seed % count}"]
        results = {
            "img": np.ascontiguousarray(image[:, :, ::-1]),
            "gt_seg_map": mask.copy(),
            "seg_fields": ["gt_seg_map"],
            "img_shape": image.shape[:2],
            "ori_shape": image.shape[:2],
            "reduce_zero_label": False,
            "img_path": f"scene_{seed % count}.png",
            "seg_map_path": f"scene_{seed % count}_mask.png",
        }
        np.random.seed(seed)
        packed = pipeline(results)
        with torch.no_grad():
            batch = preprocessor(pseudo_collate([packed]), training=True)
        out[f"image_{seed}"] = batch["inputs"][0].numpy()
        out[f"mask_{seed}"] = batch["data_samples"][0].gt_sem_seg.data[0].numpy().astype(np.int64)
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
