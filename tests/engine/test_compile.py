"""``model.compile: true`` in a real run: the compiled training step and the compiled
inference give the eager run's losses and validation figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, tiny

pytestmark = pytest.mark.slow  # inductor compiles its kernels on the CPU
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
# A small graph: inductor compiles C++ kernels for every op, slowly on 2 cores.
SMALL_MODEL = [
    "model.encoder.name=test_resnet",
    "model.encoder.out_indices=[0,1]",
    "model.encoder.pretrained=false",
    "model.channels_last=false",
    "model.decode_head={type: fcn, channels: 8, num_convs: 1, concat_input: false, dropout: 0.0}",
]


def history(work_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row["iter"], {}).update(row)
    return merged


def test_compiled_run_matches_the_eager_run(tmp_path, data_root):
    """Four iterations with gpu_augment (uint8 crops and masks handed over), logged every
    iteration and evaluated with val/loss at the end, eager and compiled."""
    options = [
        *tiny(data_root, 4),
        *SMALL_MODEL,
        "data.train.gpu_augment=true",
        "hooks=[{type: logger, interval: 1}, {type: eval, interval: 4, loss: true}]",
    ]
    runs = {}
    for name, extra in {"eager": [], "compiled": ["model.compile=true"]}.items():
        work_dir = tmp_path / name
        result = run_cli(str(QUICKSTART), "--work-dir", str(work_dir), "--cfg-options", *options, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = history(work_dir)
    eager, compiled = runs["eager"], runs["compiled"]
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    for iteration in range(1, 5):
        assert compiled[iteration]["train/loss"] == pytest.approx(eager[iteration]["train/loss"], rel=1e-4)
    for key in ("val/loss", "val/aAcc"):
        assert compiled[4][key] == pytest.approx(eager[4][key], rel=1e-3, abs=1e-4)
