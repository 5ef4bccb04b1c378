"""hooktrain's zoo models against MMSegmentation 1.2.2's and transformers' UperNet, in one run.

For each ``recipes/mmseg`` model: the training step (forward, backward, AdamW) of hooktrain's
model and of MMSegmentation's module built from the same config, on the same batch size and
image size; and, for SegFormer-B0 and UPerNet-R50, inference images/s with whole and slide
inference. MMSegmentation runs in its throwaway environment (``tests/mmseg_ref``, installed on
first use) in a subprocess; hooktrain in this process, with the same number of threads.

For ``recipes/transformers/upernet-convnext-tiny.yaml`` and ``upernet-swin-tiny.yaml``: the
same training step and whole-image inference against transformers'
``UperNetForSemanticSegmentation`` built in this process from the tiny checkpoint's config (the
one transformers' converting scripts write; random weights, nothing downloaded), with the
recipe's stochastic-depth rate. What each side computes:

- train step: hooktrain ``total_loss(model(image, mask))`` (CE on the decode head's logits +
  0.4 x CE on the auxiliary FCN head's, each resized to the mask; the heads' dropout 0.1);
  transformers ``model(pixel_values=image, labels=mask).loss`` (its own CE on the decode
  logits + ``auxiliary_loss_weight`` 0.4 x CE on the auxiliary head's, both upsampled to the
  input size; its heads have no dropout). Then backward and ``torch.optim.AdamW`` on both.
- inference: hooktrain ``Segmentor.predict`` in whole mode; transformers
  ``model(pixel_values=image).logits`` with ``use_auxiliary_head=False`` (its forward would
  otherwise compute and upsample the auxiliary head's logits too, which no prediction uses):
  the backbone, UPerHead and the logits upsampled to the input size, on both sides.

The ratio is hooktrain's time over the reference's: at most 1.0 means hooktrain is not slower.
Each side is measured ``--rounds`` times (each with its own equal warm-up), the side that goes
first alternating, and the medians are compared. Each row says its ``reference``
(``mmseg`` or ``transformers``) and its ``size``.

    python bench/mmseg_parity.py                       # CPU: 256x256, batch 2
    python bench/mmseg_parity.py --quick               # CI smoke: SegFormer-B0 at 64x64 (no slide)
                                                       # and transformers' ConvNeXt-T UperNet at 32x32
    python bench/mmseg_parity.py --reference transformers   # only the transformers comparison
    python bench/mmseg_parity.py --device cuda --bf16 --size 512

Results go to bench/results/mmseg_parity.json (``bench/results.py``; a ``--reference`` run
writes only its own rows there); the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hooktrain.engine.step import total_loss
from hooktrain.models import build_recipe_segmentor
from hooktrain.recipe.model import InferenceConfig
from hooktrain.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mmseg_ref import ZOO_CONFIGS  # noqa: E402
from mmseg_ref.env import MmsegEnv  # noqa: E402
from results import write_result  # noqa: E402  (bench/ is on sys.path when run as a script)

CONFIGS = ZOO_CONFIGS
INFERENCE_CONFIGS = CONFIGS[:2]
REFERENCE = ROOT / "tests" / "mmseg_ref" / "reference.py"
# recipes/transformers/<name>.yaml, each against transformers' UperNetForSemanticSegmentation
TRANSFORMERS_CONFIGS = ["upernet-convnext-tiny", "upernet-swin-tiny"]
QUICK_SIZE, QUICK_TRANSFORMERS_SIZE = 64, 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, device: torch.device, folder: str = "mmseg"):
    recipe = load_recipe(ROOT / "recipes" / folder / f"{name}.yaml")
    model = build_recipe_segmentor(recipe, pretrained=False)
    return model.to(device), recipe


def transformers_upernet(name: str, device: torch.device, *, train: bool):
    """transformers' ``UperNetForSemanticSegmentation`` with the architecture of
    ``openmmlab/<name>`` (the config transformers' convert_{convnext,swin}_upernet_to_pytorch.py
    writes, as ``tests/models/test_upernet_transformers.py`` builds it), random weights, the
    recipe's stochastic depth; for inference without the auxiliary head (see the docstring)."""
    import transformers

    drop_path = load_recipe(ROOT / "recipes" / "transformers" / f"{name}.yaml").model.encoder.drop_path_rate
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if name == "upernet-convnext-tiny":
        backbone = transformers.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                                               drop_path_rate=drop_path, out_features=stages)  # fmt: skip
    elif name == "upernet-swin-tiny":
        backbone = transformers.SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                                           drop_path_rate=drop_path, out_features=stages)  # fmt: skip
    else:
        raise ValueError(f"no transformers UperNet config for {name}")
    config = transformers.UperNetConfig(backbone_config=backbone, auxiliary_in_channels=384, num_labels=150,
                                        use_auxiliary_head=train)  # fmt: skip
    torch.manual_seed(0)
    return transformers.UperNetForSemanticSegmentation(config).to(device)


def median_time(step, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_batch(args, device: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    mask = torch.randint(0, 150, (args.batch, size, size), generator=gen).to(device)
    return image, mask


def hooktrain_train_step(name: str, args, device: torch.device, folder: str = "mmseg",
                         size: int | None = None) -> float:  # fmt: skip
    """Median seconds of one forward + backward + AdamW step."""
    model, _ = build(name, device, folder)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image, mask = train_batch(args, device, size or args.size)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = total_loss(model(image, mask))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_time(step, args.iters, args.warmup, device)


def hooktrain_inference(name: str, mode: str, args, device: torch.device, folder: str = "mmseg",
                        size: int | None = None) -> float:  # fmt: skip
    """Images/s of ``Segmentor.predict`` on one ``size`` x ``2 * size`` image at a time."""
    model, _ = build(name, device, folder)
    size = size or args.size
    crop = (size, size)
    stride = (size * 2 // 3, size * 2 // 3)
    model.inference = InferenceConfig(mode=mode, crop_size=crop, stride=stride)
    model.eval()
    shape = (size, 2 * size)
    image = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            model.predict(image, [shape], [shape])

    return 1.0 / median_time(step, args.iters, args.warmup, device)


def transformers_train_step(name: str, args, device: torch.device, size: int) -> float:
    """Median seconds of transformers' forward with ``labels=`` (its own loss, the auxiliary
    head's included) + backward + AdamW, on the batch hooktrain's side gets."""
    model = transformers_upernet(name, device, train=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image, mask = train_batch(args, device, size)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(pixel_values=image, labels=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_time(step, args.iters, args.warmup, device)


def transformers_inference(name: str, args, device: torch.device, size: int) -> float:
    """Images/s of transformers' whole-image logits (upsampled to the input) on one ``size`` x
    ``2 * size`` image at a time."""
    model = transformers_upernet(name, device, train=False)
    model.eval()
    image = torch.randn(1, 3, size, 2 * size, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            model(pixel_values=image).logits.float()

    return 1.0 / median_time(step, args.iters, args.warmup, device)


def transformers_version() -> str:
    from importlib import metadata

    return metadata.version("transformers")


def interleaved(ours, theirs, rounds: int) -> tuple[list[float], list[float]]:
    """``rounds`` measurements of each side (each with its own equal warm-up), alternating which
    side goes first, so that load from other processes hits both alike."""
    mine, other = [], []
    for index in range(rounds):
        if index % 2 == 0:
            mine.append(ours())
            other.append(theirs())
        else:
            other.append(theirs())
            mine.append(ours())
    return mine, other


def mmseg_side(env: MmsegEnv, name: str, mode: str, args) -> dict:
    extra = ["--bf16"] if args.bf16 else []
    size = f"{args.size}x{args.size}" if mode == "train" else f"{args.size}x{2 * args.size}"
    result = env.run(REFERENCE, "bench", name, "--mode", mode, "--size", size, "--batch",
                     str(args.batch if mode == "train" else 1), "--iters", str(args.iters), "--warmup",
                     str(args.warmup), "--crop", str(args.size), *extra)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def keep_other_rows(summary: dict, reference: str) -> None:
    """A ``--reference`` run replaces only its own rows in the results file: the other
    reference's rows stay, with the date and revision of the run that measured them."""
    from results import results_dir

    try:
        previous = json.loads((results_dir() / "mmseg_parity.json").read_text())
    except (OSError, ValueError):
        return
    kept = [row for row in previous.get("rows", []) if row.get("reference") != reference]
    if not kept:
        return
    origin = previous.get("kept_rows_from", {})
    source = {"date": previous.get("date"), "revision": previous.get("revision")}
    summary["kept_rows_from"] = {ref: origin.get(ref, source) for ref in {row["reference"] for row in kept}}
    summary["rows"] = kept + summary["rows"] if reference == "transformers" else summary["rows"] + kept
    summary["references"] = sorted({row["reference"] for row in summary["rows"]}, key=["mmseg", "transformers"].index)
    summary["worst_ratio"] = max(row["ratio"] for row in summary["rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256, help="training crop (square); inference runs size x 2*size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="measurements per side, alternating which goes first")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--quick", action="store_true",
                        help=f"SegFormer-B0 only at {QUICK_SIZE}x{QUICK_SIZE} (no slide) and transformers' "
                             f"ConvNeXt-T UperNet only at {QUICK_TRANSFORMERS_SIZE}x{QUICK_TRANSFORMERS_SIZE}; "
                             "one timed step, no warm-up")  # fmt: skip
    parser.add_argument("--reference", choices=("all", "mmseg", "transformers"), default="all",
                        help="compare against MMSegmentation only, transformers' UperNet only, or both")  # fmt: skip
    args = parser.parse_args()
    configs, inference_configs, modes = CONFIGS, INFERENCE_CONFIGS, ("whole", "slide")
    transformers_configs, transformers_size = TRANSFORMERS_CONFIGS, args.size
    if args.quick:
        modes = ("whole",)
        configs, inference_configs = CONFIGS[:1], CONFIGS[:1]
        transformers_configs, transformers_size = TRANSFORMERS_CONFIGS[:1], QUICK_TRANSFORMERS_SIZE
        args.size, args.iters, args.warmup, args.rounds = QUICK_SIZE, 1, 0, 1
    if args.reference == "transformers":
        configs, inference_configs = [], []
    elif args.reference == "mmseg":
        transformers_configs = []
    device = torch.device(args.device)
    env = MmsegEnv.install() if configs or inference_configs else None
    rows = []
    for name in configs:
        ours, theirs = interleaved(
            lambda: hooktrain_train_step(name, args, device),
            lambda: mmseg_side(env, name, "train", args)["seconds_per_iter"],
            args.rounds,
        )
        rows.append({"config": name, "reference": "mmseg", "size": args.size, "mode": "train",
                     "hooktrain_s": statistics.median(ours),
                     "mmseg_s": statistics.median(theirs), "rounds": {"hooktrain": ours, "mmseg": theirs}})  # fmt: skip
        rows[-1]["ratio"] = rows[-1]["hooktrain_s"] / rows[-1]["mmseg_s"]
        print(f"{name} train step: hooktrain {rows[-1]['hooktrain_s']:.3f} s, mmseg {rows[-1]['mmseg_s']:.3f} s, "
              f"ratio {rows[-1]['ratio']:.3f}", flush=True)  # fmt: skip
    for name in inference_configs:
        for mode in modes:
            ours, theirs = interleaved(
                lambda: hooktrain_inference(name, mode, args, device),
                lambda: mmseg_side(env, name, mode, args)["images_per_s"],
                args.rounds,
            )
            row = {"config": name, "reference": "mmseg", "size": args.size, "mode": mode,
                   "hooktrain_img_s": statistics.median(ours), "mmseg_img_s": statistics.median(theirs)}  # fmt: skip
            row["rounds"] = {"hooktrain": ours, "mmseg": theirs}
            row["ratio"] = row["mmseg_img_s"] / row["hooktrain_img_s"]
            rows.append(row)
            print(f"{name} {mode}: hooktrain {row['hooktrain_img_s']:.2f} img/s, mmseg {row['mmseg_img_s']:.2f} img/s, "
                  f"ratio {row['ratio']:.3f}", flush=True)  # fmt: skip
    size = transformers_size
    for name in transformers_configs:
        ours, theirs = interleaved(
            lambda: hooktrain_train_step(name, args, device, "transformers", size),
            lambda: transformers_train_step(name, args, device, size),
            args.rounds,
        )
        row = {"config": name, "reference": "transformers", "size": size, "mode": "train",
               "hooktrain_s": statistics.median(ours), "transformers_s": statistics.median(theirs),
               "rounds": {"hooktrain": ours, "transformers": theirs}}  # fmt: skip
        row["ratio"] = row["hooktrain_s"] / row["transformers_s"]
        rows.append(row)
        print(f"{name} {size}x{size} train step: hooktrain {row['hooktrain_s']:.3f} s, transformers "
              f"{row['transformers_s']:.3f} s, ratio {row['ratio']:.3f}", flush=True)  # fmt: skip
    for name in transformers_configs:
        ours, theirs = interleaved(
            lambda: hooktrain_inference(name, "whole", args, device, "transformers", size),
            lambda: transformers_inference(name, args, device, size),
            args.rounds,
        )
        row = {"config": name, "reference": "transformers", "size": size, "mode": "whole",
               "hooktrain_img_s": statistics.median(ours), "transformers_img_s": statistics.median(theirs),
               "rounds": {"hooktrain": ours, "transformers": theirs}}  # fmt: skip
        row["ratio"] = row["transformers_img_s"] / row["hooktrain_img_s"]
        rows.append(row)
        print(f"{name} {size}x{2 * size} whole: hooktrain {row['hooktrain_img_s']:.2f} img/s, transformers "
              f"{row['transformers_img_s']:.2f} img/s, ratio {row['ratio']:.3f}", flush=True)  # fmt: skip
    summary = {
        "quick": args.quick,
        "device": args.device,
        "precision": "bf16" if args.bf16 else "fp32",
        "size": args.size,
        "batch": args.batch,
        "iters": args.iters,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "references": ["mmseg"] * bool(configs) + ["transformers"] * bool(transformers_configs),
        "transformers_version": transformers_version() if transformers_configs else None,
        "worst_ratio": max(row["ratio"] for row in rows),
        "rows": rows,
    }
    if args.reference != "all" and not args.quick:
        keep_other_rows(summary, args.reference)
    print(f"results: {write_result('mmseg_parity', summary)}")
    print(json.dumps({"bench": "mmseg_parity", **summary}))


if __name__ == "__main__":
    main()
