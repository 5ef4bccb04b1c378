"""bench/gpu_train.py's CPU smoke run (``--quick``): hooktrain end to end per speed switch, the
model-only step, and MMSegmentation 1.2.2 really training its own SegFormer-B0 config with its
own runner (bench/mmseg_train.py), all timed; and the docs' table rendered from the result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from mmseg_train import CONFIG, write_ade20k  # noqa: E402
from report import gpu_train as render  # noqa: E402


@pytest.mark.slow
def test_quick_run_measures_every_part_and_renders(mmseg_env, tmp_path):
    env = {**os.environ, "HOOKTRAIN_BENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--quick"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    written = json.loads((tmp_path / "gpu_train.json").read_text())
    assert written["machine"]["description"] and {**summary, "bench": "gpu_train"}.items() <= written.items()
    assert set(summary["variants"]) == {"cpu_augment", "gpu_augment"}
    for run in summary["variants"].values():
        assert run["images_per_s"] > 0 and 0 <= run["data_wait_share"] < 1 and run["model_only"] == "eager"
        assert math.isclose(
            run["data_bound_gap"],
            1 - run["images_per_s"] / summary["model_only"]["eager"]["images_per_s"],
            abs_tol=1e-3,
        )
    assert set(summary["model_only"]) == {"eager", "eager_unfused_adamw"}
    assert all(run["images_per_s"] > 0 and not run["fused_adamw"] for run in summary["model_only"].values())

    # MMSegmentation: its own config, model and data. SegFormer-B0 (MiT-B0 + SegformerHead, 150
    # classes, ~3.75M parameters), SyncBN turned into BN, the examples found in ADE20KDataset's
    # layout, the smoke run's crop written into the pipeline's own RandomResize/RandomCrop; timed
    # from the end of iteration 1 to the end of iteration 3.
    mmseg = summary["mmseg"]
    assert "unavailable" not in mmseg, mmseg
    assert mmseg["config"] == CONFIG == "segformer_mit-b0_8xb2-160k_ade20k-512x512"
    model = mmseg["model"]
    assert (model["segmentor"], model["backbone"], model["decode_head"]) == (
        "EncoderDecoder", "MixVisionTransformer", "SegformerHead"
    )  # fmt: skip
    assert (
        model["num_classes"] == 150 and 3.6e6 < model["parameters"] < 3.9e6 and model["batch_norms"] == ["BatchNorm2d"]
    )
    assert mmseg["iters_timed"] == [1, 3] and mmseg["timed_iterations"] == 2
    assert math.isclose(mmseg["images_per_s"], 2 * 1000 / mmseg["step_ms"], rel_tol=0.05)
    assert mmseg["dataset_size"] == 8 and mmseg["crop_size"] == [64, 64] and mmseg["batch"] == 2
    assert mmseg["loss_finite"] and mmseg["loss"]["first"] > 0
    assert (mmseg["device"], mmseg["precision"], mmseg["optim_wrapper"]) == ("cpu", "fp32", "OptimWrapper")
    assert mmseg["versions"]["mmsegmentation"] == "1.2.2" and mmseg["versions"]["mmengine"] == "0.10.7"
    assert summary["ratio_vs_mmseg"] == round(summary["images_per_s"] / mmseg["images_per_s"], 3)

    headline, tables = render(summary)
    assert f"{summary['images_per_s']} img/s" in headline and "MMSegmentation 1.2.2" in headline
    assert "| `gpu_augment` |" in tables and "| `eager_unfused_adamw` |" in tables
    assert "MMSegmentation 1.2.2, own runner and pipeline" in tables


def test_mmseg_gets_the_examples_hooktrain_trains_on(tmp_path):
    """The same first examples gpu_train's write_dataset draws (rng seeded 0), in mmseg's layout."""
    import numpy as np
    from data_pipeline import make_example

    root = write_ade20k(tmp_path / "ade", 2)
    images = sorted((root / "images" / "training").iterdir())
    masks = sorted((root / "annotations" / "training").iterdir())
    assert [p.suffix for p in images] == [".jpg"] * 2 and [p.suffix for p in masks] == [".png"] * 2
    rng = np.random.default_rng(0)
    for image, mask in zip(images, masks):
        assert (image.read_bytes(), mask.read_bytes()) == make_example(rng)
    stamp = images[0].stat().st_mtime_ns
    write_ade20k(tmp_path / "ade", 2)
    assert images[0].stat().st_mtime_ns == stamp  # reused, not rewritten
