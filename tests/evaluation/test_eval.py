"""The eval hook: exact across processes, `hooktrain test`, best tracking, evaluate adapter."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from conftest import ENV, EVAL_COMMAND_GROUP, QUICKSTART, TESTS, read_probe, run_cli, run_launch, tiny


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12


def test_two_processes_equal_one_process_for_every_length_and_batch_size(tmp_path):
    """The script under ``accelerate launch`` with 2 processes against the same cases evaluated
    here, in this one process (through JSON as the script's file, so both sides are read alike)."""
    from eval_exactness_script import evaluate_cases

    from hooktrain.engine.runner import make_accelerator
    from hooktrain.recipe.schema import load_recipe

    one = evaluate_cases(tmp_path / "data", make_accelerator(load_recipe(QUICKSTART).train))
    single = json.loads(json.dumps(one))
    two = run_launch(str(TESTS / "eval_exactness_script.py"), str(tmp_path / "data"), str(tmp_path / "two.json"),
                     port=29621)  # fmt: skip
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    double = json.loads((tmp_path / "two.json").read_text())
    assert set(single) == {f"{n}x{b}" for n in (1, 2, 3, 7, 8, 9) for b in (1, 2)}
    assert single.keys() == double.keys()
    for case in single:
        assert single[case].keys() == double[case].keys()
        assert single[case].pop("confusion") == double[case].pop("confusion"), case
        for key, value in single[case].items():
            if "loss" in key:  # each image once on either side; its logits may differ in the last float32 bits
                assert value == pytest.approx(double[case][key], rel=1e-6), (case, key)
            else:
                assert same(value, double[case][key]), (case, key, value, double[case][key])
    assert not math.isnan(single["9x2"]["mIoU"]) and single["9x2"]["loss"] > 0


def test_training_evaluates_at_interval_and_end_and_tracks_best(tmp_path, data_root):
    """Also without the confusion matrix: the same metrics from the 4 x C area counts."""
    prefix = tmp_path / "p"
    hooks = (
        "hooks=[{type: logger, interval: 2}, {type: eval, interval: 4, num_samples: 0, confusion: false}, "
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
    assert "Top confusion" not in result.stdout and not (tmp_path / "run" / "confusion").exists()


def test_unknown_best_key_and_metric_are_clear(tmp_path, data_root):
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root, 2), "hooks=[{type: eval, interval: 2, best_key: mIOU}]",
    )  # fmt: skip
    assert result.returncode == 2
    assert "best_key 'mIOU' is not a computed metric" in result.stderr
    bad = run_cli("config", str(QUICKSTART), "--cfg-options", "hooks=[{type: eval, metrics: [mIoU, mAP]}]")
    assert bad.returncode == 2 and "hooks[0].metrics[1]: Input should be 'mIoU', 'mDice' or 'mFscore'" in bad.stderr


@pytest.mark.xdist_group(EVAL_COMMAND_GROUP)
def test_test_command_evaluates_a_checkpoint_on_one_and_two_processes(eval_command_runs, tmp_path):
    """A weights file (no recipe in it) scored by ``hooktrain test`` on 1 process and under
    ``accelerate launch`` on 2: the same metrics and confusion matrix (the 1-process run is the
    one test_tta.py compares its ``--tta`` run with)."""
    single, double = eval_command_runs.metrics(1, tta=False), eval_command_runs.metrics(2, tta=False)
    assert single.keys() == double.keys() and "mIoU" in single
    assert all(same(single[k], double[k]) for k in single if k != "checkpoint")
    one, two = eval_command_runs.work_dir(1, tta=False), eval_command_runs.work_dir(2, tta=False)
    one_matrix = (one / "confusion" / "confusion_test.csv").read_text()
    assert one_matrix == (two / "confusion" / "confusion_test.csv").read_text()
    assert (two / "confusion" / "confusion_test.png").is_file()
    missing = run_cli("test", str(QUICKSTART), "--checkpoint", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "weights not found" in missing.stderr


@pytest.mark.parametrize("flip", [False, True])
def test_validation_loss_is_the_mean_of_each_images_loss_on_the_scored_prediction(tmp_path, flip):
    """``loss: true``: val/loss is the mean over images of mmseg's cross-entropy (divided by
    all pixels, avg_non_ignore false) of the very scores that are evaluated; with flip, of the
    log of the averaged probabilities."""
    import torch.nn.functional as F
    from eval_exactness_script import NUM_CLASSES, write_folder

    from hooktrain.data import build_val_loader
    from hooktrain.engine.runner import IterRunner, make_accelerator
    from hooktrain.models import build_segmentor
    from hooktrain.recipe.schema import load_recipe

    write_folder(tmp_path / "data", 5)
    source = f"{{type: folder, images_dir: '{tmp_path}/data/images', annotations_dir: '{tmp_path}/data/annotations'}}"
    recipe = load_recipe(QUICKSTART, [
        f"data.val.source={source}", "data.val.batch_size=2", "data.val.num_workers=0",
        "data.val.pipeline.scale=[48,32]", f"model.inference.flip={str(flip).lower()}",
        "model.decode_head.losses=[{type: cross_entropy, avg_non_ignore: false}]",
        "data.class_names=[a,b,c,d,e]", "hooks=[{type: eval, num_samples: 0, loss: true}]",
    ])  # fmt: skip
    accelerator = make_accelerator(recipe.train)
    torch.manual_seed(0)
    model = build_segmentor(recipe.model, num_classes=NUM_CLASSES, in_channels=recipe.data.in_channels).eval()
    hooks = recipe.loaded_hooks()
    runner = IterRunner(recipe=recipe, accelerator=accelerator, model=model, optimizer=None, scheduler=None,
                        train_stream=None, hooks=hooks, work_dir=tmp_path / "wd")  # fmt: skip
    metrics = hooks[0].hook.evaluate(runner)
    runner.watch.close()

    losses = []
    for batch in build_val_loader(recipe.data, rank=0, world_size=1):
        for scores, (h, w), mask in zip(model.predict(batch["image"], batch["img_shapes"], batch["ori_shapes"]),
                                        batch["ori_shapes"], batch["mask"], strict=True):  # fmt: skip
            label = mask[:h, :w]
            log_probs = scores.log() if flip else scores.log_softmax(0)
            per_pixel = F.nll_loss(log_probs[None], label[None], ignore_index=255, reduction="sum")
            losses.append(float(per_pixel) / label.numel())
    assert len(losses) == 5
    assert metrics["loss"] == pytest.approx(sum(losses) / 5, rel=1e-5)
    assert metrics["decode.loss_ce"] == metrics["loss"]
    assert "loss" in hooks[0].hook.tracked_metrics()


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


def test_the_evaluation_core_computes_and_logs_what_the_eval_hook_does(tmp_path):
    """``hooktrain test`` runs the core (``Evaluation`` with the eval entry's options) the eval
    hook runs: the same metrics, stages, logged keys and confusion files; only the hook tracks
    the best value."""
    import numpy as np
    from eval_exactness_script import NUM_CLASSES, write_folder

    from hooktrain.engine.runner import IterRunner, make_accelerator
    from hooktrain.errors import UserError
    from hooktrain.evaluation.validation import EvalOptions, Evaluation
    from hooktrain.hooks import Hook, LoadedHook, _arguments_model, build_hooks
    from hooktrain.models import build_segmentor
    from hooktrain.recipe.schema import load_recipe
    from hooktrain_plugins.evaluation import EvalHook

    class Recorder(Hook):
        def __init__(self) -> None:
            self.seen: list = []

        def before_val(self, runner) -> None:
            self.seen.append("before_val")

        def after_val(self, runner, metrics) -> None:
            self.seen.append(("after_val", dict(metrics), dict(runner.state.best)))

        def on_log(self, runner, values, step) -> None:
            self.seen.append(("log", values))

    write_folder(tmp_path / "data", 3)
    source = f"{{type: folder, images_dir: '{tmp_path}/data/images', annotations_dir: '{tmp_path}/data/annotations'}}"
    recipe = load_recipe(QUICKSTART, [
        f"data.val.source={source}", "data.val.batch_size=2", "data.val.num_workers=0",
        "data.val.pipeline.scale=[48,32]", "data.class_names=[a,b,c,d,e]",
        "hooks=[{type: eval, interval: 7, best_key: mDice, metrics: [mIoU, mDice], num_samples: 1, loss: true}]",
    ])  # fmt: skip
    accelerator = make_accelerator(recipe.train)
    torch.manual_seed(0)
    model = build_segmentor(recipe.model, num_classes=NUM_CLASSES, in_channels=recipe.data.in_channels).eval()
    hook = build_hooks([spec.model_dump(exclude_none=True) for spec in recipe.hooks])[0].hook
    seen = {}
    for who in ("hook", "core"):
        recorder = Recorder()
        runner = IterRunner(recipe=recipe, accelerator=accelerator, model=model, optimizer=None, scheduler=None,
                            train_stream=None, hooks=[LoadedHook("recorder", recorder, 50)],
                            work_dir=tmp_path / who)  # fmt: skip
        if who == "hook":
            metrics = hook.evaluate(runner, name="test")
        else:
            options = EvalOptions.from_hook_options(recipe.hooks[0].model_extra)  # as test_command
            metrics = Evaluation(options).run(runner, name="test")
        runner.watch.close()
        seen[who] = (metrics, recorder.seen, runner.state.best)

    (hook_metrics, hook_seen, hook_best), (core_metrics, core_seen, core_best) = seen["hook"], seen["core"]
    assert core_metrics == hook_metrics
    tracked = hook.tracked_metrics(recipe)
    assert list(core_metrics)[: len(tracked)] == tracked
    assert {key.split(".")[0] for key in list(core_metrics)[len(tracked) :]} == {"decode"}  # the loss terms
    assert [s if isinstance(s, str) else s[0] for s in core_seen] == ["before_val", "after_val", "log"]
    assert [s if isinstance(s, str) else s[0] for s in hook_seen] == ["before_val", "after_val", "log"]
    assert hook_seen[1][2]["key"] == "mDice" and core_seen[1][2] == {}  # the hook's best is set before after_val
    assert hook_best["value"] == hook_metrics["mDice"] and core_best == {}
    logged_hook, logged_core = hook_seen[2][1], core_seen[2][1]
    assert list(logged_core) == list(logged_hook) == [
        *(f"val/{key}" for key in core_metrics), "val/confusion_matrix", "val/per_class", "val/samples",
    ]
    assert len(logged_core["val/samples"]) == 1
    assert np.array_equal(logged_core["val/confusion_matrix"], logged_hook["val/confusion_matrix"])
    for suffix in ("csv", "png"):
        files = [tmp_path / who / "confusion" / f"confusion_test.{suffix}" for who in ("hook", "core")]
        assert files[0].read_bytes() == files[1].read_bytes()

    # The core's options are the eval hook's of the same names and types; the others are left out.
    hook_fields = _arguments_model(EvalHook).model_fields
    assert all(repr(hook_fields[name]) == repr(field) for name, field in EvalOptions.model_fields.items())
    options = EvalOptions.from_hook_options({"interval": 5, "rule": "less", "confusion": False})
    assert options == EvalOptions(confusion=False)
    with pytest.raises(UserError, match=r"'eval hook\.beta': Input should be greater than 0"):
        EvalOptions.from_hook_options({"beta": 0})
