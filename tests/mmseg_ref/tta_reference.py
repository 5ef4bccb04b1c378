"""Run inside the MMSegmentation environment (``MmsegEnv.run``): MMSegmentation's own test-time
augmentation, for ``tests/evaluation/test_tta.py``.

    tta_reference.py predict CONFIG IMAGE OUT --seed N [--slide H W SH SW] [--ratios 0.5,0.75,...]
    tta_reference.py sizes OUT.json

``predict`` builds CONFIG's model (a config in the mmseg wheel; SyncBN becomes BN, nothing is
downloaded) with random weights and BN statistics, saves it as a model-zoo checkpoint
``OUT/checkpoint.pth``, and runs the config's own ``tta_pipeline`` (``TestTimeAug``: mmcv
``Resize(scale_factor=r, keep_ratio=True)`` x ``RandomFlip`` prob 0 and 1, without
``LoadAnnotations``) on the image file and ``SegTTAModel.test_step`` on the result. It writes
``OUT/tta.pt``: ``pred`` (``pred_sem_seg`` [H, W]), ``probs`` (the mean softmax ``merge_preds``
takes the argmax of, [C, H, W]) and ``variants`` (each variant's ``(img_shape, flip)``, in order),
with the config's ``test_cfg`` (whole). ``--slide`` also writes ``OUT/tta_slide.pt``, the same
with ``test_cfg`` sliding windows of H x W at stride SH x SW.

``sizes`` writes mmcv ``Resize(scale_factor=r, keep_ratio=True)``'s output ``[h, w]`` for a grid
of image sizes and ratios, as ``{"HxW@r": [h, w]}``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from mmengine import Config, ConfigDict
from mmengine.dataset import Compose, pseudo_collate
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from reference import plain_batch_norm, randomise  # the launcher puts this directory on sys.path

CONFIGS = Path(__import__("mmseg").__file__).parent / ".mim" / "configs"
SIZE_GRID = [(97, 131), (21, 22), (61, 45), (333, 500), (480, 640), (512, 683), (7, 9)]
RATIO_GRID = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 0.6, 0.9, 1.1, 2.0]


def tta_pipeline(cfg: Config, ratios: list[float] | None) -> list[dict]:
    """The config's tta_pipeline without LoadAnnotations (no ground truth here), with ``ratios``."""
    pipeline = copy.deepcopy(cfg.to_dict()["tta_pipeline"])
    tta = pipeline[-1]
    assert tta["type"] == "TestTimeAug", tta
    stages = [s for s in tta["transforms"] if not any(t["type"] == "LoadAnnotations" for t in s)]
    if ratios is not None:
        stages[0] = [{"type": "Resize", "scale_factor": r, "keep_ratio": True} for r in ratios]
    tta["transforms"] = stages
    return pipeline


def predict(args) -> None:
    register_all_modules(init_default_scope=True)
    found = sorted(CONFIGS.glob(f"*/{args.config}.py"))
    if not found:
        raise SystemExit(f"no config {args.config!r} under {CONFIGS}")
    cfg = Config.fromfile(found[0])
    model_cfg = plain_batch_norm(copy.deepcopy(cfg.to_dict()["model"]))
    model_cfg["pretrained"] = None
    model_cfg["backbone"]["init_cfg"] = None
    torch.manual_seed(args.seed)
    model = MODELS.build(ConfigDict(model_cfg))  # test_cfg.mode is read as an attribute
    randomise(model)
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"config": cfg.pretty_text, "seed": args.seed}, "state_dict": model.state_dict()},
               out / "checkpoint.pth")  # fmt: skip

    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else None
    sample = Compose(tta_pipeline(cfg, ratios))({"img_path": args.image, "seg_fields": [], "reduce_zero_label": False})
    torch.save(run_tta(model, sample), out / "tta.pt")
    if args.slide:
        h, w, sh, sw = args.slide
        model.test_cfg = ConfigDict(mode="slide", crop_size=(h, w), stride=(sh, sw))
        torch.save(run_tta(model, sample), out / "tta_slide.pt")


def run_tta(model, sample: dict) -> dict:
    """``SegTTAModel.test_step`` on one TestTimeAug sample; its prediction and mean softmax."""
    tta_model = MODELS.build({"type": "SegTTAModel", "module": model})
    merged_inputs = []
    merge_preds = tta_model.merge_preds

    def capture(data_samples_list):
        merged_inputs.append(data_samples_list)
        return merge_preds(data_samples_list)

    tta_model.merge_preds = capture
    with torch.no_grad():
        result = tta_model.test_step(pseudo_collate([sample]))[0]
    (variants,) = merged_inputs[0]  # one image
    # merge_preds's own sum, kept (it only returns the argmax)
    probs = sum(v.seg_logits.data.softmax(dim=0) for v in variants) / len(variants)
    return {
        "pred": result.pred_sem_seg.data[0].long(),
        "probs": probs.float(),
        "variants": [(tuple(int(x) for x in v.img_shape), bool(v.flip)) for v in variants],
    }


def sizes(args) -> None:
    from mmcv.transforms import Resize

    found = {}
    for h, w in SIZE_GRID:
        image = np.zeros((h, w, 3), np.uint8)
        for r in RATIO_GRID:
            resized = Resize(scale_factor=r, keep_ratio=True)({"img": image})["img"]
            found[f"{h}x{w}@{r}"] = list(resized.shape[:2])
    Path(args.out).write_text(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("predict")
    run.add_argument("config")
    run.add_argument("image")
    run.add_argument("out")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--slide", type=int, nargs=4, metavar=("H", "W", "SH", "SW"))
    run.add_argument("--ratios", help="comma-separated; default: the config's img_ratios")
    grid = sub.add_parser("sizes")
    grid.add_argument("out")
    args = parser.parse_args()
    {"predict": predict, "sizes": sizes}[args.command](args)


if __name__ == "__main__":
    main()
