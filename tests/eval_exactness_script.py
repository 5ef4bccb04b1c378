"""Evaluates one random-init model on folder datasets of several lengths and batch sizes and
writes the metrics, validation loss and confusion matrix as JSON. The test runs it under `accelerate launch` with
2 processes and compares the file with :func:`evaluate_cases` called in its own process (1 process).
Usage: python eval_exactness_script.py DATA_ROOT OUT.json"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hooktrain.engine.runner import IterRunner, make_accelerator
from hooktrain.models import build_segmentor
from hooktrain.recipe.schema import load_recipe

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
LENGTHS = (1, 2, 3, 7, 8, 9)
BATCH_SIZES = (1, 2)
NUM_CLASSES = 5


def write_folder(root: Path, length: int) -> None:
    """``length`` images of different sizes with masks that include ignore (255) pixels."""
    rng = np.random.default_rng(length)
    for split in ("images", "annotations"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(length):
        h, w = rng.integers(20, 44, size=2)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, NUM_CLASSES, size=(h, w), dtype=np.uint8)
        mask[: h // 5] = 255
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask, mode="L").save(root / "annotations" / f"{i:03d}.png")


def evaluate_cases(data_root: Path, accelerator) -> dict[str, dict]:
    """Every case's metrics (with the validation loss) and confusion matrix, keyed
    ``"{length}x{batch_size}"``; the main process writes the folders under ``data_root`` first."""
    if accelerator.is_main_process:
        for length in LENGTHS:
            if not (data_root / str(length)).exists():
                write_folder(data_root / str(length), length)
    accelerator.wait_for_everyone()
    torch.manual_seed(0)
    recipe = load_recipe(QUICKSTART)
    model = build_segmentor(recipe.model, num_classes=NUM_CLASSES, in_channels=recipe.data.in_channels)
    model = accelerator.prepare(model)
    results = {}
    for length in LENGTHS:
        for batch_size in BATCH_SIZES:
            folder = data_root / str(length)
            source = (
                f"{{type: folder, images_dir: '{folder}/images', "
                f"annotations_dir: '{folder}/annotations', num_shards: 3}}"
            )
            case = load_recipe(
                QUICKSTART,
                [f"data.val.source={source}", f"data.val.batch_size={batch_size}",
                 "data.val.pipeline.scale=[48,32]", "hooks=[{type: eval, num_samples: 0, loss: true}]"],
            )  # fmt: skip
            hooks = case.loaded_hooks()
            runner = IterRunner(
                recipe=case, accelerator=accelerator, model=model, optimizer=None,
                scheduler=None, train_stream=None, hooks=hooks, work_dir=data_root / "wd",
            )  # fmt: skip
            metrics = hooks[0].hook.evaluate(runner)
            runner.watch.close()
            results[f"{length}x{batch_size}"] = {**metrics, "confusion": hooks[0].hook.confusion_matrix.tolist()}
    return results


def main() -> None:
    data_root, out = Path(sys.argv[1]), Path(sys.argv[2])
    accelerator = make_accelerator(load_recipe(QUICKSTART).train)
    results = evaluate_cases(data_root, accelerator)
    if accelerator.is_main_process:
        out.write_text(json.dumps(results))
    accelerator.end_training()


if __name__ == "__main__":
    main()
