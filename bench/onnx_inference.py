"""ONNX Runtime against PyTorch: whole-image inference, images/s on the CPU.

Two models, both measured in this one run: the quickstart segmentor as ``recipes/quickstart.yaml``
builds it (96x96 images) and SegFormer-B0 as ``recipes/ade20k.yaml`` builds it
(``model.encoder.pretrained=false``, random weights, 512x512). PyTorch runs ``Segmentor.logits``
under ``torch.inference_mode()``; ONNX Runtime runs the graph ``hooktrain export`` writes
(:func:`hooktrain.deploy.onnx_export.export_onnx`, verified against PyTorch first) with its default
CPU session options. Batch 1, the same random normalised image; one warm-up image each, then
``--rounds`` interleaved rounds (the side that goes first alternates) of ``--images`` images per
side; prints the median images/s of each and the ratio ONNX Runtime / PyTorch (> 1: ONNX Runtime
is faster).

    python bench/onnx_inference.py [--quick] [--rounds N]

Results go to bench/results/onnx_inference.json (``bench/results.py``); the last line printed
is one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from results import write_result

from hooktrain.deploy.onnx_export import export_onnx
from hooktrain.models import build_recipe_segmentor
from hooktrain.recipe.schema import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# name: (recipe, options, size, quick size, images per round)
MODELS = {
    "quickstart": ("quickstart.yaml", [], 96, 32, 20),
    "segformer_b0": ("ade20k.yaml", ["model.encoder.pretrained=false"], 512, 64, 3),
}


def images_per_s(run, image, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        run(image)
    return count / (time.perf_counter() - started)


def measure(name: str, size: int, count: int, rounds: int, directory: Path) -> dict:
    recipe_file, options, _, _, _ = MODELS[name]
    recipe = load_recipe(RECIPES / recipe_file, options)
    torch.manual_seed(0)
    model = build_recipe_segmentor(recipe)
    model.eval()
    path = export_onnx(model, recipe.data.in_channels, {}, directory / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.randn(1, recipe.data.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    array = image.numpy()

    def run_torch(x):
        with torch.inference_mode():
            model.logits(x)

    sides = {"pytorch": (run_torch, image), "onnxruntime": (lambda x: session.run(["logits"], {"image": x}), array)}
    for run, x in sides.values():  # warm-up: oneDNN primitives, ORT's arena
        run(x)
    speeds: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            run, x = sides[side]
            speeds[side].append(images_per_s(run, x, count))
    torch_speed, ort_speed = (statistics.median(speeds[s]) for s in ("pytorch", "onnxruntime"))
    return {
        "model": name,
        "recipe": f"recipes/{recipe_file}",
        "size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pytorch_images_per_s": round(torch_speed, 2),
        "onnxruntime_images_per_s": round(ort_speed, 2),
        "ratio": round(ort_speed / torch_speed, 3),
        "images_per_round": count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 round of 1 image")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, _, size, quick_size, count) in MODELS.items():
            row = measure(name, quick_size if args.quick else size, 1 if args.quick else count, rounds, Path(tmp))
            print(f"{name} {row['size']}x{row['size']}: PyTorch {row['pytorch_images_per_s']} images/s, "
                  f"ONNX Runtime {row['onnxruntime_images_per_s']} images/s, ratio {row['ratio']:.2f}")  # fmt: skip
            rows.append(row)
    summary = {
        "quick": args.quick,
        "device": "cpu",
        "rounds": rounds,
        "batch": 1,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "rows": rows,
    }
    write_result("onnx_inference", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
