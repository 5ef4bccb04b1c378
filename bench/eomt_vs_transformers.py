"""hooktrain's EoMT (``hooktrain.models.eomt``) against transformers' ``EomtForUniversalSegmentation``,
same weights, same inputs, in the same process.

The model: a ViT-S-like EoMT-DINOv2 (hidden 384, 12 layers, 6 heads, patch 16, 4 registers, 100
queries, the last 4 blocks masked, 150 classes) at 512x512, batch 1, random weights. transformers'
model is built from its ``EomtConfig`` (its default attention, SDPA); hooktrain's from the same config
through ``hooktrain.models.eomt_keys`` (``eomt_settings_from_transformers``, ``build_eomt_from_settings``,
``eomt_keys_from_transformers``), so the two hold the same weights (a timm ``VisionTransformer`` on
hooktrain's side). Before timing, the bench checks that the two give the same semantic scores.

The inputs: random images and semantic maps of ~20 Voronoi cells per image, each a different class,
with a band of ignored pixels (``bench/mask_matching.py``'s maps).

Measured:

- training step (forward + loss + backward, both in train mode, ``attn_mask_probs`` 1: every masked
  block masks): hooktrain ``total_loss(model(image, semantic_map))``; transformers
  ``model(pixel_values, mask_labels=..., class_labels=...).loss`` with the segments
  ``hooktrain.models.mask_criterion.semantic_to_segments`` makes of the same maps, inside the timed
  step on both sides (hooktrain's model makes them itself). Both criteria are Mask2Former's: Hungarian
  matching and the losses at 12544 points (the default of both), on all 5 predictions (4 masked
  blocks and the final one). torch's global generator is seeded alike before each step, so both
  draw their random points with the same seed. The gradients are dropped after each step (no
  optimizer step).
- inference (eval mode, ``attn_mask_probs`` 0, as after the masks are annealed away: no block masks
  and only the final prediction is made): hooktrain ``model(image)`` (the semantic scores at the input
  size); transformers' forward, then the same semantic map: the mask logits resized (bilinear) to
  the input, ``einsum("bqc,bqhw->bchw", softmax(class_logits)[..., :-1], sigmoid(masks))``.

Timing: after one warm-up step each, ``--rounds`` rounds, each running one step of each model, the
model that goes first alternating, so that load from other processes on the machine hits both alike.
Each side's figure is its fastest step (the one least slowed by other load); the medians are recorded
too. The ratio is hooktrain's seconds over transformers': at most 1.0 means hooktrain is not slower.
Where other load comes and goes within the run, one side's fastest step may have caught a quiet
moment the other's did not; the median over the rounds of each round's ratio (``paired_ratio``: two
steps run back to back see much the same load) is the steadier figure then.

    python bench/eomt_vs_transformers.py            # CPU, ViT-S-like at 512x512, batch 1 (~6 minutes on 2 busy cores)
    python bench/eomt_vs_transformers.py --quick    # smoke run: a tiny EoMT at 64x64 (seconds)
    python bench/eomt_vs_transformers.py --device cuda

Results go to bench/results/eomt_vs_transformers.json (``-cuda.json`` on CUDA); the last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mask_matching import IGNORE, voronoi_maps  # noqa: E402
from results import write_result  # noqa: E402
from versus import alternating, summarise  # noqa: E402

from hooktrain.engine.step import total_loss  # noqa: E402
from hooktrain.models.eomt_keys import (  # noqa: E402
    build_eomt_from_settings,
    eomt_keys_from_transformers,
    eomt_settings_from_transformers,
)
from hooktrain.models.mask_criterion import semantic_to_segments  # noqa: E402

# transformers EomtConfig keys: a ViT-S/16 with 4 registers (DINOv2-S's width, depth and heads)
FULL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=16, num_register_tokens=4,
            num_queries=100, num_blocks=4, num_labels=150, image_size=512)  # fmt: skip
QUICK = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, patch_size=16, num_register_tokens=4,
             num_queries=10, num_blocks=2, num_labels=150, image_size=64, train_num_points=1024)  # fmt: skip


def build_models(config_kwargs: dict, device: torch.device):
    """transformers' EoMT (random weights, seed 0) and hooktrain's with the same weights."""
    import transformers

    config = transformers.EomtConfig(**config_kwargs)
    torch.manual_seed(0)
    reference = transformers.EomtForUniversalSegmentation(config).float()
    diff = config.to_diff_dict()  # what save_pretrained writes to config.json
    model = build_eomt_from_settings(eomt_settings_from_transformers(diff))
    model.criterion.num_points = config.train_num_points
    model.load_state_dict(eomt_keys_from_transformers(reference.state_dict(), diff), strict=True)
    return model.to(device), reference.to(device)


def reference_scores(reference, image: torch.Tensor) -> torch.Tensor:
    """transformers' forward, then Mask2Former's semantic scores at the input size."""
    output = reference(pixel_values=image)
    masks = F.interpolate(output.masks_queries_logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return torch.einsum("bqc,bqhw->bchw", output.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, help="image side (default: the config's image_size, 512)")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per side, alternating which goes first")
    parser.add_argument("--segments", type=int, default=20, help="segments per image")
    parser.add_argument("--quick", action="store_true", help="a tiny EoMT at 64x64, batch 2, 1024 points, 1 round")
    args = parser.parse_args()
    config = dict(QUICK if args.quick else FULL)
    if args.quick:
        args.batch, args.rounds, args.segments = 2, 1, 5
    if args.size:
        config["image_size"] = args.size
    size = config["image_size"]
    device = torch.device(args.device)
    model, reference = build_models(config, device)

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, size, size, generator=generator).to(device)
    semantic = voronoi_maps(args.batch, size, args.segments, config["num_labels"], generator).to(device)

    # The same weights: the same semantic scores in eval mode, with and without masking.
    model.eval(), reference.eval()
    with torch.no_grad():
        errors = []
        for probs in (1.0, 0.0):
            model.attn_mask_probs.fill_(probs), reference.attn_mask_probs.fill_(probs)
            want = reference_scores(reference, image)
            errors.append(((model(image) - want).abs().max() / want.abs().max()).item())
    print(f"semantic scores, hooktrain vs transformers: max relative difference {max(errors):.2e}", flush=True)

    # training step: forward + loss + backward, the masks on
    model.train(), reference.train()
    model.attn_mask_probs.fill_(1.0), reference.attn_mask_probs.fill_(1.0)
    losses = {}

    def our_train_step() -> None:
        torch.manual_seed(1)
        loss = total_loss(model(image, semantic))
        loss.backward()
        losses["hooktrain"] = loss.item()
        model.zero_grad(set_to_none=True)

    def their_train_step() -> None:
        torch.manual_seed(1)
        segments = semantic_to_segments(semantic, IGNORE)
        loss = reference(pixel_values=image, mask_labels=[masks for _, masks in segments],
                         class_labels=[classes for classes, _ in segments]).loss  # fmt: skip
        loss.backward()
        losses["transformers"] = loss.item()
        reference.zero_grad(set_to_none=True)

    train = summarise("train step", *alternating(our_train_step, their_train_step, args.rounds, device))

    # inference: the masks annealed away
    model.eval(), reference.eval()
    model.attn_mask_probs.zero_(), reference.attn_mask_probs.zero_()

    @torch.no_grad()
    def our_inference() -> None:
        model(image)

    @torch.no_grad()
    def their_inference() -> None:
        reference_scores(reference, image)

    inference = summarise("inference", *alternating(our_inference, their_inference, args.rounds, device))
    inference["hooktrain_img_s"] = round(args.batch / inference["hooktrain_s"], 2)
    inference["transformers_img_s"] = round(args.batch / inference["transformers_s"], 2)

    summary = {
        "quick": args.quick,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "config": config,
        "size": size,
        "batch": args.batch,
        "segments_per_image": [len(classes) for classes, _ in semantic_to_segments(semantic, IGNORE)],
        "points": model.criterion.num_points,
        "rounds": args.rounds,
        "attention": reference.config._attn_implementation,
        "transformers_version": metadata.version("transformers"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "scores_max_relative_difference": float(f"{max(errors):.3g}"),
        "loss": {side: round(value, 4) for side, value in losses.items()},
        "train": train,
        "inference": inference,
    }
    print(f"results: {write_result('eomt_vs_transformers', summary)}")
    print(json.dumps({"bench": "eomt_vs_transformers", **summary}))


if __name__ == "__main__":
    main()
