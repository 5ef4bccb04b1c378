"""hooktrain's Mask2Former (``hooktrain.models.mask2former``) against transformers'
``Mask2FormerForUniversalSegmentation``, same weights, same inputs, in the same process.

The model: ``facebook/mask2former-swin-tiny-ade-semantic``'s sizes (transformers' own ``SwinConfig``
backbone: embed dim 96, depths 2, 2, 6, 2, heads 3, 6, 12, 24, window 7; 6 deformable encoder
layers, 10 decoder predictions (the initial queries' and 9 layers'), 100 queries, 150 classes,
widths 256, 12544 points) at 512x512, batch 1, random weights of transformers' own initialisation.
Drop path is 0 on both sides (the checkpoint's config has 0.3; hooktrain's conversion sets 0, and
the random drops would make the two sides' work differ). transformers' model is built from its
``Mask2FormerConfig``; hooktrain's from the same ``config.json`` dict through
``hooktrain.models.mask2former_keys`` (``mask2former_model_from_transformers``,
``mask2former_keys_from_transformers``, fitted by ``hooktrain.deploy.convert.fit_to_model``) and
``build_segmentor``: timm's ``swin_tiny_patch4_window7_224``
with transformers' per-level norms, hooktrain's pixel decoder and masked-attention decoder. Before
timing, the bench checks that the two give the same semantic scores and class logits.

The inputs: random images and semantic maps of ~20 Voronoi cells per image, each a different class,
with a band of ignored pixels (``bench/mask_matching.py``'s maps).

Measured:

- training step (train mode): forward with the criterion, backward and an AdamW step (torch's
  ``AdamW``, lr 1e-4, weight decay 0.05, the same on both sides). hooktrain
  ``total_loss(model(image, semantic_map))``; transformers
  ``model(pixel_values, mask_labels=..., class_labels=...).loss`` with the segments
  ``hooktrain.models.mask_criterion.semantic_to_segments`` makes of the same maps, inside the timed
  step on both sides (hooktrain's model makes them itself). Both criteria are Mask2Former's:
  Hungarian matching and the losses at 12544 importance-sampled points, on all 10 predictions.
  torch's global generator is seeded alike before each step, so both draw their random points
  with the same seed (the draws differ in order; the losses are not compared here, the criterion's
  equality is tested in tests/models/test_mask_criterion.py).
- inference (eval mode): hooktrain ``model(image)`` (the semantic scores at the input size);
  transformers' forward, then the same semantic map ``post_process_semantic_segmentation`` computes
  before its argmax: the final mask logits resized (bilinear) to the input,
  ``einsum("bqc,bqhw->bchw", softmax(class_logits)[..., :-1], sigmoid(masks))``.

Timing: after one warm-up step each, ``--rounds`` rounds, each running one step of each model, the
model that goes first alternating, so that load from other processes on the machine hits both alike.
Each side's figure is its fastest step (the one least slowed by other load); the medians are recorded
too. The ratio is hooktrain's seconds over transformers': at most 1.0 means hooktrain is not slower.
Where other load comes and goes within the run, one side's fastest step may have caught a quiet
moment the other's did not; the median over the rounds of each round's ratio (``paired_ratio``: two
steps run back to back see much the same load) is the steadier figure then.

    python bench/mask2former_vs_transformers.py            # CPU, Swin-T at 512x512, batch 1 (~3 min, 2 quiet cores)
    python bench/mask2former_vs_transformers.py --quick    # smoke run: a tiny Mask2Former at 64x64 (seconds)
    python bench/mask2former_vs_transformers.py --device cuda

Results go to bench/results/mask2former_vs_transformers.json (``-cuda.json`` on CUDA); the last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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

from hooktrain.deploy.convert import fit_to_model  # noqa: E402
from hooktrain.engine.step import total_loss  # noqa: E402
from hooktrain.models.mask2former_keys import (  # noqa: E402
    mask2former_keys_from_transformers,
    mask2former_model_from_transformers,
)
from hooktrain.models.mask_criterion import semantic_to_segments  # noqa: E402
from hooktrain.models.segmentor import build_segmentor  # noqa: E402
from hooktrain.recipe.model import ModelConfig  # noqa: E402

STAGES = ["stage1", "stage2", "stage3", "stage4"]
# facebook/mask2former-swin-tiny-ade-semantic's sizes (transformers' SwinConfig / Mask2FormerConfig keys)
FULL_SWIN = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.0,
                 out_features=STAGES)  # fmt: skip
FULL = dict(feature_size=256, hidden_dim=256, mask_feature_size=256, encoder_feedforward_dim=1024,
            dim_feedforward=2048, encoder_layers=6, decoder_layers=10, num_attention_heads=8, num_queries=100,
            num_labels=150, train_num_points=12544)  # fmt: skip
# tests/models/test_mask2former.py's tiny model
QUICK_SWIN = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7, drop_path_rate=0.0,
                  out_features=STAGES)  # fmt: skip
QUICK = dict(feature_size=32, hidden_dim=32, mask_feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64,
             encoder_layers=2, decoder_layers=5, num_attention_heads=4, num_queries=5, num_labels=150,
             train_num_points=1024)  # fmt: skip


def build_models(swin_kwargs: dict, config_kwargs: dict, device: torch.device):
    """transformers' Mask2Former (random weights, seed 0) and hooktrain's with the same weights."""
    import transformers

    config = transformers.Mask2FormerConfig(backbone_config=transformers.SwinConfig(**swin_kwargs), **config_kwargs)
    torch.manual_seed(0)
    reference = transformers.Mask2FormerForUniversalSegmentation(config).float()
    diff = config.to_diff_dict()  # what save_pretrained writes to config.json
    model_cfg = ModelConfig.model_validate(mask2former_model_from_transformers(diff))
    model = build_segmentor(model_cfg, num_classes=config.num_labels)
    converted = mask2former_keys_from_transformers(reference.state_dict())
    model.load_state_dict(fit_to_model(converted, model, "transformers' model"), strict=True)
    return model.to(device), reference.to(device)


def reference_scores(reference, image: torch.Tensor):
    """transformers' forward, then Mask2Former's semantic scores at the input size (and the class logits)."""
    output = reference(pixel_values=image)
    masks = F.interpolate(output.masks_queries_logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    classes = output.class_queries_logits
    return torch.einsum("bqc,bqhw->bchw", classes.softmax(-1)[..., :-1], masks.sigmoid()), classes


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=512, help="image side")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per side, alternating which goes first")
    parser.add_argument("--segments", type=int, default=20, help="segments per image")
    parser.add_argument("--threads", type=int, help="torch threads on both sides (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny Mask2Former at 64x64, batch 2, 1024 points, 1 round")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    swin, config = (dict(QUICK_SWIN), dict(QUICK)) if args.quick else (dict(FULL_SWIN), dict(FULL))
    if args.quick:
        args.batch, args.rounds, args.segments, args.size = 2, 1, 5, 64
    size = args.size
    device = torch.device(args.device)
    model, reference = build_models(swin, config, device)

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, size, size, generator=generator).to(device)
    semantic = voronoi_maps(args.batch, size, args.segments, config["num_labels"], generator).to(device)

    # The same weights: the same semantic scores and class logits in eval mode.
    model.eval(), reference.eval()
    with torch.no_grad():
        want, want_classes = reference_scores(reference, image)
        got = model(image)
        got_classes = model.predictions(image)[-1][1]
    scores_error, classes_error = relative_error(got, want), relative_error(got_classes, want_classes)
    same_argmax = (got.argmax(1) == want.argmax(1)).float().mean().item()
    print(f"hooktrain vs transformers: semantic scores max relative difference {scores_error:.2e}, class logits "
          f"{classes_error:.2e}; same argmax at {same_argmax:.2%} of pixels", flush=True)  # fmt: skip

    # training step: forward + loss + backward + AdamW step
    model.train(), reference.train()
    our_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    their_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4, weight_decay=0.05)
    losses = {}

    def our_train_step() -> None:
        torch.manual_seed(1)
        loss = total_loss(model(image, semantic))
        loss.backward()
        our_optimizer.step()
        our_optimizer.zero_grad(set_to_none=True)
        losses["hooktrain"] = loss.item()

    def their_train_step() -> None:
        torch.manual_seed(1)
        segments = semantic_to_segments(semantic, IGNORE)
        loss = reference(pixel_values=image, mask_labels=[masks for _, masks in segments],
                         class_labels=[classes for classes, _ in segments]).loss  # fmt: skip
        loss.backward()
        their_optimizer.step()
        their_optimizer.zero_grad(set_to_none=True)
        losses["transformers"] = loss.item()

    train = summarise("train step", *alternating(our_train_step, their_train_step, args.rounds, device))

    model.eval(), reference.eval()

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
        "backbone": {k: v for k, v in swin.items() if k != "out_features"},
        "config": config,
        "size": size,
        "batch": args.batch,
        "segments_per_image": [len(classes) for classes, _ in semantic_to_segments(semantic, IGNORE)],
        "points": model.criterion.num_points,
        "predictions": len(model.predictions(image[:1])),
        "rounds": args.rounds,
        "optimizer": "AdamW(lr=1e-4, weight_decay=0.05)",
        "transformers_version": metadata.version("transformers"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "transformers_parameters": sum(p.numel() for p in reference.parameters()),
        "scores_max_relative_difference": float(f"{scores_error:.3g}"),
        "class_logits_max_relative_difference": float(f"{classes_error:.3g}"),
        "same_argmax": round(same_argmax, 6),
        "loss": {side: round(value, 4) for side, value in losses.items()},
        "train": train,
        "inference": inference,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"results: {write_result('mask2former_vs_transformers', summary)}")
    print(json.dumps({"bench": "mask2former_vs_transformers", **summary}))


if __name__ == "__main__":
    main()
