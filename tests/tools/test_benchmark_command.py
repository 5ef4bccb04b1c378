"""`hooktrain benchmark`: parameters, FLOPs, images/s and memory of a recipe's model, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUICKSTART, assert_refused, run_cli, tiny


@pytest.fixture(scope="module")
def unread_root(tmp_path_factory) -> Path:
    """The data root the benchmarks are given: it must still not exist after them."""
    return tmp_path_factory.mktemp("bench") / "never_read"


def bench_options(root: Path, crop: int, *extra: str) -> list[str]:
    """--cfg-options for the quickstart at a square ``crop``; val images come out ``crop`` too."""
    return [
        f"data.train.pipeline.crop_size=[{crop},{crop}]",
        f"data.train.pipeline.scale=[{2 * crop},{crop}]",
        f"data.val.pipeline.scale=[{2 * crop},{crop}]",
        "data.train.batch_size=2",
        "data.val.batch_size=2",
        f"data.train.source.root={root}",
        f"data.val.source.root={root}",
        *extra,
    ]


def last_json(result) -> dict:
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root) -> Path:
    """The final checkpoint of a 2-iteration tiny quickstart run (no evaluation)."""
    work_dir = tmp_path_factory.mktemp("trained") / "run"
    options = tiny(data_root, 2, "hooks=[{type: checkpoint}]")
    result = run_cli(str(QUICKSTART), "--work-dir", str(work_dir), "--cfg-options", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    path = work_dir / "checkpoints" / "iter_2"
    assert (path / "model.safetensors").is_file(), sorted(p.name for p in path.parent.iterdir())
    return path


@pytest.fixture(scope="module")
def bf16_run(checkpoint, unread_root):
    """The trained weights at a 32x32 crop in bf16 (autocast on CPU): fp32 and bf16 figures."""
    options = bench_options(unread_root, 32, "train.mixed_precision=bf16")
    result = run_cli("benchmark", str(QUICKSTART), "--cfg-options", *options,
                     "--checkpoint", str(checkpoint), "--iters", "2", "--warmup", "1")  # fmt: skip
    return result, options


def test_reports_every_figure_and_ends_with_a_json_line(bf16_run, checkpoint, unread_root):
    import torch

    from hooktrain.models import build_segmentor
    from hooktrain.recipe.schema import load_recipe
    from hooktrain.tools.benchmark import count_flops

    result, options = bf16_run
    report = last_json(result)
    recipe = load_recipe(QUICKSTART, options)
    model = build_segmentor(
        recipe.model,
        num_classes=recipe.data.num_classes,
        ignore_index=recipe.data.ignore_index,
        in_channels=recipe.data.in_channels,
    )
    total = sum(p.numel() for p in model.parameters())
    assert report["params"] == {"total": total, "trainable": total}
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    assert report["precision"] == "bf16" and report["crop"] == [32, 32] and report["gflops"] > 0
    # FLOPs grow with the crop's area (convolutions dominate): 4x for twice the side.
    cpu = torch.device("cpu")
    assert report["gflops"] * 1e9 == count_flops(model, (32, 32), cpu)
    assert count_flops(model, (64, 64), cpu) / (report["gflops"] * 1e9) == pytest.approx(4.0, rel=0.1)
    assert "multiply-add counts as 2 FLOPs" in report["flops_note"] and "random" in report["inputs"]
    assert str(checkpoint / "model.safetensors") in report["weights"] and "iteration 2" in report["weights"]
    assert "VmHWM" in report["memory"] or "ru_maxrss" in report["memory"]
    assert report["iters"] == 2 and report["warmup"] == 1
    for row in report["measurements"]:
        assert row["skipped"] is None and row["images_per_s"] > 0 and row["peak_memory_mib"] >= 0, row
        assert row["size"] == [32, 32] and row["batch"] == 2 and row["seconds"] > 0, row
    # The readable table comes first, saying how FLOPs count and that inputs are random.
    table = result.stdout.split("\n{")[0]
    assert "GFLOPs" in table and "multiply-add counts as 2 FLOPs" in table and "random tensors" in table
    assert "inference slide" in table and "train step" in table
    assert not unread_root.exists()  # random inputs: the dataset was never generated nor read


def test_bf16_on_cpu_reports_fp32_and_bf16(bf16_run):
    measured = {(m["name"], m["precision"]) for m in last_json(bf16_run[0])["measurements"]}
    inference = {(mode, precision) for mode in ("inference whole", "inference slide") for precision in ("fp32", "bf16")}
    assert measured == inference | {("train step", "bf16")}


def test_checkpoint_of_another_model_is_refused(checkpoint, unread_root):
    options = bench_options(unread_root, 32, "model.decode_head.channels=32")
    result = run_cli("benchmark", str(QUICKSTART), "--cfg-options", *options, "--checkpoint", str(checkpoint))
    assert_refused(result, "does not fit the recipe's model", "decode_head", "benchmark with the recipe")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--iters", "0"], "--iters 0"),
        (["--warmup", "-1"], "--warmup -1"),
        (["--checkpoint", "no/such/dir"], "weights not found"),
    ],
)
def test_bad_arguments_are_refused(args, fragment, unread_root):
    result = run_cli("benchmark", str(QUICKSTART), "--cfg-options", *bench_options(unread_root, 32), *args)
    assert_refused(result, fragment)
