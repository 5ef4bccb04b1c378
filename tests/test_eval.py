"""The eval hook: exact across processes, `hooktrain test`, best tracking, evaluate adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ENV, QUICKSTART, ROOT, TESTS, run_cli, run_launch
from test_train import read_probe, tiny


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12


def test_two_processes_equal_one_process_for_every_length_and_batch_size(tmp_path):
    script = str(TESTS / "eval_exactness_script.py")
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "data"), str(tmp_path / "one.json")],
        cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_launch(script, str(tmp_path / "data"), str(tmp_path / "two.json"), port=29621)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    single = json.loads((tmp_path / "one.json").read_text())
    double = json.loads((tmp_path / "two.json").read_text())
    assert set(single) == {f"{n}x{b}" for n in (1, 2, 3, 7, 8, 9) for b in (1, 2)}
    assert single.keys() == double.keys()
    for case in single:
        assert single[case].keys() == double[case].keys()
        for key, value in single[case].items():
            assert same(value, double[case][key]), (case, key, value, double[case][key])
    assert not math.isnan(single["9x2"]["mIoU"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_shapes") / "shapes"


def test_training_evaluates_at_interval_and_end_and_tracks_best(tmp_path, data_root):
    prefix = tmp_path / "p"
    hooks = (
        "hooks=[{type: logger, interval: 2}, {type: eval, interval: 4, num_samples: 0}, "
        f"{{type: 'probe_hooks:ProbeHook', prefix: '{prefix}'}}]"
    )
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root, 6), hooks, "data.val.batch_size=2", env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluations = read_probe(prefix)["val"]
    assert [e["iter"] for e in evaluations] == [4, 6]  # the interval and the last iteration
    for evaluation in evaluations:
        assert {"aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall"} <= set(evaluation["metrics"])
    best = max(evaluations, key=lambda e: e["metrics"]["mIoU"])
    assert evaluations[-1]["best"] == {"key": "mIoU", "value": best["metrics"]["mIoU"], "iter": best["iter"]}
    # The per-class table and the summary are printed by the main process.
    assert "validation at iter 4 on 4 images" in result.stdout
    assert "background" in result.stdout and "cross" in result.stdout
    assert "val/mIoU" in result.stdout


def test_unknown_best_key_and_metric_are_clear(tmp_path, data_root):
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root, 2), "hooks=[{type: eval, interval: 2, best_key: mIOU}]",
    )  # fmt: skip
    assert result.returncode == 2
    assert "best_key 'mIOU' is not a computed metric" in result.stderr
    bad = run_cli("config", str(QUICKSTART), "--cfg-options", "hooks=[{type: eval, metrics: [mIoU, mAP]}]")
    assert bad.returncode == 2 and "hooks[0].metrics[1]: Input should be 'mIoU', 'mDice' or 'mFscore'" in bad.stderr


def test_test_command_evaluates_a_checkpoint_on_one_and_two_processes(tmp_path, data_root):
    from hooktrain.models import build_segmentor
    from hooktrain.recipe import load_recipe

    recipe = load_recipe(QUICKSTART)
    torch.manual_seed(1)
    model = build_segmentor(recipe.model, num_classes=recipe.data.num_classes)
    weights = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), weights)
    options = [*tiny(data_root), "hooks=[{type: eval, num_samples: 0}]", "data.val.batch_size=3"]
    one = run_cli("test", str(QUICKSTART), "--checkpoint", str(weights),
                  "--work-dir", str(tmp_path / "one"), "--cfg-options", *options)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_launch("-m", "hooktrain", "test", str(QUICKSTART), "--checkpoint", str(weights),
                 "--work-dir", str(tmp_path / "two"), "--cfg-options", *options, port=29622)  # fmt: skip
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    single = json.loads((tmp_path / "one" / "test_metrics.json").read_text())
    double = json.loads((tmp_path / "two" / "test_metrics.json").read_text())
    assert single.keys() == double.keys() and "mIoU" in single
    assert all(same(single[k], double[k]) for k in single if k != "checkpoint")
    missing = run_cli("test", str(QUICKSTART), "--checkpoint", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "weights not found" in missing.stderr


PIXEL_ACCURACY = '''
import datasets
import evaluate
import numpy as np


class PixelAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="pixel accuracy over non-ignored pixels",
            citation="",
            inputs_description="predictions and references: 2-D label maps",
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
            }),
        )

    def _compute(self, predictions, references, num_labels, ignore_index):
        correct = total = 0
        for pred, ref in zip(predictions, references):
            pred, ref = np.asarray(pred), np.asarray(ref)
            valid = (ref != ignore_index) & (ref < num_labels)
            correct += int((pred[valid] == ref[valid]).sum())
            total += int(valid.sum())
        return {"accuracy": correct / total, "images": len(predictions)}
'''


def test_evaluate_module_adapter_gets_every_prediction(tmp_path, data_root):
    module = tmp_path / "pixel_accuracy"
    module.mkdir()
    (module / "pixel_accuracy.py").write_text(textwrap.dedent(PIXEL_ACCURACY))
    prefix = tmp_path / "p"
    hooks = (
        f"hooks=[{{type: eval, interval: 2, num_samples: 0, evaluate: [{{path: '{module}'}}]}}, "
        f"{{type: 'probe_hooks:ProbeHook', prefix: '{prefix}'}}]"
    )
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root, 2), hooks, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_probe(prefix)["val"][-1]["metrics"]
    assert metrics["pixel_accuracy/images"] == 4.0
    # Pixel accuracy over all scored pixels is exactly mmseg's aAcc.
    assert metrics["pixel_accuracy/accuracy"] == pytest.approx(metrics["aAcc"], abs=1e-12)
    broken = run_cli(
        "config", str(QUICKSTART), "--cfg-options", "hooks=[{type: eval, evaluate: [{pth: x}]}]"
    )
    assert broken.returncode == 2 and "evaluate" in broken.stderr
