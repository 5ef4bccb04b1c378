"""Run inside the MMSegmentation environment (``MmsegEnv.run``): MMSegmentation's own binary
segmentation (one output channel), for ``tests/models/test_binary.py``.

    binary_reference.py IN.pt OUT.pt

``IN.pt`` holds ``logits`` [B, 1, H, W], ``target`` [B, H, W] (0, 1 and 255 = ignore),
``pos_weight`` (a float) and ``threshold``. ``OUT.pt`` gets:

- ``bce`` / ``bce_non_ignore`` / ``bce_weighted``: ``CrossEntropyLoss(use_sigmoid=True)`` with
  ``avg_non_ignore`` false / true, and ``class_weight=[pos_weight]``, as a decode head calls it;
- ``dice_v1``: ``DiceLoss()`` (1.x defaults: use_sigmoid, eps 1e-3) on the same logits, and
  ``dice_v1_on_background``: mmseg's own ``dice_loss`` of the sigmoid against ``target == 0`` —
  what ``DiceLoss`` computes for one channel (it one-hot encodes label 0);
- ``pred``: ``BaseSegmentor.postprocess_result`` with ``decode_head.threshold`` [B, H, W].
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
from mmseg.models.losses import CrossEntropyLoss, DiceLoss
from mmseg.models.losses.dice_loss import dice_loss
from mmseg.models.segmentors.base import BaseSegmentor


def main(src: str, dst: str) -> None:
    inputs = torch.load(src, weights_only=True)
    logits, target = inputs["logits"], inputs["target"]
    out = {}
    for key, kwargs in (("bce", {}), ("bce_non_ignore", {"avg_non_ignore": True}),
                        ("bce_weighted", {"class_weight": [float(inputs["pos_weight"])]})):  # fmt: skip
        loss = CrossEntropyLoss(use_sigmoid=True, **kwargs)
        out[key] = loss(logits, target, ignore_index=255)
    out["dice_v1"] = DiceLoss()(logits, target, ignore_index=255)
    background = (target == 0).unsqueeze(1)
    out["dice_v1_on_background"] = dice_loss(logits.sigmoid(), background, None, eps=1e-3, ignore_index=255)
    segmentor = SimpleNamespace(decode_head=SimpleNamespace(threshold=float(inputs["threshold"])), align_corners=False)
    samples = BaseSegmentor.postprocess_result(segmentor, logits)
    out["pred"] = torch.stack([s.pred_sem_seg.data[0] for s in samples]).long()
    torch.save(out, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
