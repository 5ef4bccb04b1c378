"""hooktrain's zoo models against MMSegmentation 1.2.2's, in one run.

For each ``recipes/mmseg`` model: the training step (forward, backward, AdamW) of hooktrain's
model and of MMSegmentation's module built from the same config, on the same batch size and
image size; and, for SegFormer-B0 and UPerNet-R50, inference images/s with whole and slide
inference. MMSegmentation runs in its throwaway environment (``tests/mmseg_ref``, installed on
first use) in a subprocess; hooktrain in this process, with the same number of threads. The
ratio is hooktrain's time over MMSegmentation's: at most 1.0 means hooktrain is not slower.
Each side is measured ``--rounds`` times (each with its own equal warm-up), the side that goes
first alternating, and the medians are compared.

    python bench/mmseg_parity.py                       # CPU: 256x256, batch 2
    python bench/mmseg_parity.py --quick               # CI smoke: SegFormer-B0 only, 128x128, no slide
    python bench/mmseg_parity.py --device cuda --bf16 --size 512

Results go to bench/results/mmseg_parity.json (``bench/results.py``); the last line printed is
one JSON object.
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, device: torch.device):
    recipe = load_recipe(ROOT / "recipes" / "mmseg" / f"{name}.yaml")
    model = build_recipe_segmentor(recipe, pretrained=False)
    return model.to(device), recipe


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


def hooktrain_train_step(name: str, args, device: torch.device) -> float:
    """Median seconds of one forward + backward + AdamW step."""
    model, _ = build(name, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    mask = torch.randint(0, 150, (args.batch, args.size, args.size), generator=gen).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = total_loss(model(image, mask))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_time(step, args.iters, args.warmup, device)


def hooktrain_inference(name: str, mode: str, args, device: torch.device) -> float:
    """Images/s of ``Segmentor.predict`` on one ``size`` x ``2 * size`` image at a time."""
    model, _ = build(name, device)
    crop = (args.size, args.size)
    stride = (args.size * 2 // 3, args.size * 2 // 3)
    model.inference = InferenceConfig(mode=mode, crop_size=crop, stride=stride)
    model.eval()
    shape = (args.size, 2 * args.size)
    image = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            model.predict(image, [shape], [shape])

    return 1.0 / median_time(step, args.iters, args.warmup, device)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256, help="training crop (square); inference runs size x 2*size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="measurements per side, alternating which goes first")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--quick", action="store_true", help="SegFormer-B0 only, 128x128, one timed step, no slide")
    args = parser.parse_args()
    configs, inference_configs, modes = CONFIGS, INFERENCE_CONFIGS, ("whole", "slide")
    if args.quick:
        modes = ("whole",)
        configs, inference_configs = CONFIGS[:1], CONFIGS[:1]
        args.size, args.iters, args.warmup, args.rounds = 128, 1, 1, 1
    device = torch.device(args.device)
    env = MmsegEnv.install()
    rows = []
    for name in configs:
        ours, theirs = interleaved(
            lambda: hooktrain_train_step(name, args, device),
            lambda: mmseg_side(env, name, "train", args)["seconds_per_iter"],
            args.rounds,
        )
        rows.append({"config": name, "mode": "train", "hooktrain_s": statistics.median(ours),
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
            row = {"config": name, "mode": mode, "hooktrain_img_s": statistics.median(ours),
                   "mmseg_img_s": statistics.median(theirs)}  # fmt: skip
            row["rounds"] = {"hooktrain": ours, "mmseg": theirs}
            row["ratio"] = row["mmseg_img_s"] / row["hooktrain_img_s"]
            rows.append(row)
            print(f"{name} {mode}: hooktrain {row['hooktrain_img_s']:.2f} img/s, mmseg {row['mmseg_img_s']:.2f} img/s, "
                  f"ratio {row['ratio']:.3f}", flush=True)  # fmt: skip
    summary = {
        "quick": args.quick,
        "device": args.device,
        "precision": "bf16" if args.bf16 else "fp32",
        "size": args.size,
        "batch": args.batch,
        "iters": args.iters,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "worst_ratio": max(row["ratio"] for row in rows),
        "rows": rows,
    }
    print(f"results: {write_result('mmseg_parity', summary)}")
    print(json.dumps({"bench": "mmseg_parity", **summary}))


if __name__ == "__main__":
    main()
