"""MMSegmentation's own Mask2Former (mmdet 3.3.0's head): run INSIDE its environment (``MmsegEnv.run``).

    mask2former_reference.py --mmdet DIR CONFIG[,CONFIG...] --out OUT [--sizes 64x64,96x128]

``reference.py build-all`` for configs whose head is mmdet's ``Mask2FormerHead``
(``mask2former_r50_8xb2-160k_ade20k-512x512``, ``mask2former_swin-t_8xb2-160k_ade20k-512x512``),
with mmdet put on the path from DIR as ``optim_reference.py --mmdet`` does it (mmcv's pure-PyTorch
``MultiScaleDeformableAttention``, which on CPU samples with ``multi_scale_deformable_attn_pytorch``;
placeholders for pycocotools, shapely, terminaltables). Each config's model is built from its own
config file, unchanged but for SyncBN -> BN and no pretrained weights; OUT/<config> gets what
``reference.py build`` writes (``checkpoint.pth`` in the zoo's format, ``logits.pt`` with
``encode_decode``'s output, i.e. ``Mask2FormerHead.predict``'s ``seg_logits`` at the input size
before any argmax, ``info.json``), each config seeded with its position in the list.

On top of ``reference.randomise``: the deformable attention's sampling-offset biases ~ N(0, 2)
(points a pixel or two off, often between pixels and off the map: the bilinear sampling and its
zero padding are used), its attention-weight biases ~ N(0, 1), and the learned query and level
embeddings ~ N(0, 1) (as their initialisation; ``randomise`` would make them ~ N(0, 1/256)).

``attention_masks.json`` records, for every size, the masked-attention masks each
``_forward_head`` call made (the initial queries' and one per decoder layer): the share of
(query, pixel) pairs masked, how many queries' masks cover no pixel (the "all masked" rule then
lets them attend everywhere) and the smallest |mask logit| at the level's size (how far the
closest pixel is from the 0.5 threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import reference
import torch
import torch.nn.functional as F
from optim_reference import build_mmdet_model, enable_mmdet

_randomise = reference.randomise
# ~ N(0, 1) after randomise: the attention weights' biases, the learned query and level embeddings
UNIT_NORMAL = ("attention_weights.bias", "query_embed.weight", "query_feat.weight", "level_embed.weight",
               "level_encoding.weight")  # fmt: skip


def build_model(name: str, num_classes: int | None = None):
    if num_classes is not None:
        raise SystemExit("--num-classes: the Mask2Former configs are built with their own")
    model, cfg, _ = build_mmdet_model(name)
    return model, cfg, reference.model_config(cfg)


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    _randomise(model)
    for name, param in model.named_parameters():
        if name.endswith("sampling_offsets.bias"):
            param.normal_(0, 2.0)
        elif name.endswith(UNIT_NORMAL):
            param.normal_(0, 1.0)
    record_attention_masks(model.decode_head)


STATS: dict[str, list[dict]] = {}


def record_attention_masks(head) -> None:
    """Wrap ``head._forward_head`` to record its attention masks' statistics in :data:`STATS`,
    under the size of the mask features (``H/4 x W/4``)."""
    forward_head = head._forward_head

    def recorded(decoder_out, mask_feature, size):
        cls_pred, mask_pred, attn_mask = forward_head(decoder_out, mask_feature, size)
        logits = F.interpolate(mask_pred, size, mode="bilinear", align_corners=False)
        masked = attn_mask.view(mask_pred.shape[0], head.num_heads, *attn_mask.shape[1:])[:, 0]
        key = "x".join(str(4 * s) for s in mask_feature.shape[-2:])
        STATS.setdefault(key, []).append({
            "level_size": list(size),
            "masked_share": masked.float().mean().item(),
            "queries_all_masked": int(masked.all(-1).sum()),
            "queries_none_masked": int((~masked).all(-1).sum()),
            "min_abs_mask_logit": logits.abs().min().item(),
        })  # fmt: skip
        return cls_pred, mask_pred, attn_mask

    head._forward_head = recorded


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mmdet", required=True, help="the pip --target directory holding mmdet 3.3.0 and six")
    parser.add_argument("configs", help="comma-separated config names")
    parser.add_argument("--out", required=True, help="one subdirectory per config")
    parser.add_argument("--sizes", default="64x64,96x128", help="HxW[,HxW...]")
    args = parser.parse_args(argv)
    enable_mmdet(args.mmdet)
    reference.build_model, reference.randomise = build_model, randomise
    for seed, name in enumerate(args.configs.split(",")):
        STATS.clear()
        out = Path(args.out) / name
        reference.build(argparse.Namespace(config=name, out=str(out), seed=seed, sizes=args.sizes, num_classes=None))
        (out / "attention_masks.json").write_text(json.dumps(STATS, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
