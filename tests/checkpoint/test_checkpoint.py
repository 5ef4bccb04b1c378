"""Checkpoints end to end through the real CLI: atomic saves, max_keep and best, exact resume
after SIGTERM and after kill -9 mid-save (1 and 2 processes), refusal and --force, load_from,
export and predict."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from checkpoint_runs import (
    HOOKS_NO_EVAL, ITERS, assert_bitwise_equal, checkpoints, options, run, start, train_command, weights,
)  # fmt: skip
from conftest import QUICKSTART, cli, run_cli, tiny
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    """An uninterrupted 1-process run with DataLoader workers: eval every 3, checkpoints every
    2 with max_keep 2 and save_best mIoU."""
    work_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run(train_command(work_dir, "--cfg-options", *options(data_root, workers=2)))
    assert result.returncode == 0, result.output[-4000:]
    return work_dir


def test_interval_saves_keep_the_newest_and_the_best(reference):
    assert checkpoints(reference) == ["best", "iter_4", "iter_6", "latest"]
    assert (reference / "checkpoints" / "latest").read_text().strip() == "iter_6"
    files = {p.name for p in (reference / "checkpoints" / "iter_6").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl",
            "random_states_0.pkl", "train_state.json", "hooks.pt", "data_state_rank0.pt",
            "recipe.yaml"} <= files  # fmt: skip
    best = json.loads((reference / "checkpoints" / "best" / "best.json").read_text())
    assert best["key"] == "mIoU" and best["iter"] in (3, 6) and 0 <= best["value"] <= 100
    state = json.loads((reference / "checkpoints" / "iter_6" / "train_state.json").read_text())
    assert state["iter"] == ITERS and state["best"] == best
    assert not any(k.startswith("module.") for k in weights(reference / "checkpoints" / "best"))


def test_kill_9_mid_save_then_sigterm_then_resume_matches_the_uninterrupted_run(
    tmp_path, data_root, reference
):
    work_dir = tmp_path / "run"
    marker = tmp_path / "saving"
    stall = f"{{type: 'probe_hooks:StallSaveHook', marker: '{marker}', at_iter: 4}}"
    args = options(data_root, workers=2, hooks=stall)
    process = start(train_command(work_dir, "--cfg-options", *args))
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), process.communicate()[0][-4000:]
    os.killpg(process.pid, signal.SIGKILL)  # the run and its DataLoader workers, mid-save
    process.communicate(timeout=60)
    assert checkpoints(work_dir) == [".tmp-iter_4", "best", "iter_2", "latest"]
    assert (work_dir / "checkpoints" / "latest").read_text().strip() == "iter_2"

    # Resume from iter_2 (the half-written iter_4 is ignored and removed), stop with SIGTERM.
    stop = "{type: 'probe_hooks:SignalSelfHook', at_iter: 5, signal: SIGTERM}"
    result = run(train_command(work_dir, "--resume", "--cfg-options",
                               *options(data_root, workers=2, hooks=stop)))  # fmt: skip
    assert result.returncode == 143, result.output[-4000:]
    assert "removed .tmp-iter_4, left by an interrupted save" in result.stdout
    assert f"resumed from {work_dir / 'checkpoints' / 'iter_2'} at iteration 2" in result.stdout
    assert result.stdout.count("SIGTERM received") == 1
    assert "SIGTERM received: stopping after iteration 5, then exit code 143" in result.stdout
    assert checkpoints(work_dir) == ["best", "iter_4", "iter_5", "latest"]

    args = options(data_root, workers=2)
    result = run(train_command(work_dir, "--resume", "--cfg-options", *args))
    assert result.returncode == 0, result.output[-4000:]
    assert "at iteration 5" in result.stdout
    assert_bitwise_equal(weights(work_dir / "checkpoints" / "iter_6"),
                         weights(reference / "checkpoints" / "iter_6"))  # fmt: skip
    best, ref_best = (json.loads((w / "checkpoints" / "best" / "best.json").read_text())
                      for w in (work_dir, reference))  # fmt: skip
    assert best == ref_best


def test_two_processes_sigterm_resume_exact_with_force_and_load_from(
    tmp_path, data_root, reference
):
    # load_from: the reference's weights with one key dropped and one foreign key added.
    start_weights = weights(reference / "checkpoints" / "best")
    dropped = sorted(start_weights)[-1]
    del start_weights[dropped]
    start_weights["extra.weight"] = torch.zeros(2)
    init = tmp_path / "init.safetensors"
    save_file(start_weights, str(init))
    common = [f"load_from={init}"]

    # A work dir that already holds checkpoints is refused, then --force moves them aside.
    reference_dir = tmp_path / "ref2"
    (reference_dir / "checkpoints" / "iter_9").mkdir(parents=True)
    refused = run_cli(
        str(QUICKSTART), "--work-dir", str(reference_dir), "--cfg-options", *tiny(data_root)
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--force" in refused.stderr
    args = options(data_root, *common, base=HOOKS_NO_EVAL, workers=2)
    result = run(train_command(reference_dir, "--force", "--cfg-options", *args, processes=2,
                               port=29631))  # fmt: skip
    assert result.returncode == 0, result.output[-4000:]
    aside = [p for p in reference_dir.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "iter_9").is_dir()
    assert "--force: moved the previous run's files" in result.output
    module = dropped.rsplit(".", 1)[0]
    assert f"kept the model's own {module}.* (not in the file); ignored extra.* (not in the model)" in result.stdout

    # The same run, stopped by SIGTERM delivered to the launcher's whole process group (as a
    # terminal's Ctrl-C or a scheduler's scancel does), then resumed with --resume.
    work_dir = tmp_path / "run"
    slow = "{type: 'probe_hooks:ProbeHook', prefix: '" + str(tmp_path / "p") + "', sleep: 0.5}"
    slow_args = options(data_root, *common, hooks=slow, base=HOOKS_NO_EVAL, workers=2)
    process = start(train_command(work_dir, "--cfg-options", *slow_args, processes=2, port=29632))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.split()[1:3] == ["iter", f"2/{ITERS}"]:
            os.killpg(process.pid, signal.SIGTERM)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    stopped = int((work_dir / "checkpoints" / "latest").read_text().strip().removeprefix("iter_"))
    assert 2 <= stopped < ITERS, output[-4000:]
    assert output.count("SIGTERM received") == 1, output[-4000:]  # from the main process
    assert f"SIGTERM received: stopping after iteration {stopped}," in output, output[-4000:]
    saved = {p.name for p in (work_dir / "checkpoints" / f"iter_{stopped}").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "data_state_rank0.pt",
            "data_state_rank1.pt"} <= saved  # fmt: skip
    stopped_weights = weights(work_dir / "checkpoints" / f"iter_{stopped}")
    assert not any(k.startswith("module.") for k in stopped_weights)  # loads at any world size

    result = run(train_command(work_dir, "--resume", "--cfg-options", *args, processes=2,
                               port=29633))  # fmt: skip
    assert result.returncode == 0, result.output[-4000:]
    assert f"at iteration {stopped}" in result.stdout
    assert_bitwise_equal(weights(work_dir / "checkpoints" / f"iter_{ITERS}"),
                         weights(reference_dir / "checkpoints" / f"iter_{ITERS}"))  # fmt: skip


def test_export_then_predict_writes_colour_and_label_masks(tmp_path, data_root, reference, capsys):
    import cv2
    import numpy as np
    import yaml
    from safetensors import safe_open

    from hooktrain.deploy.export import export_checkpoint

    best = reference / "checkpoints" / "best"
    exported = export_checkpoint(best, tmp_path / "model.safetensors")
    assert_bitwise_equal(load_file(str(exported)), weights(best))

    with safe_open(str(exported), framework="pt") as f:
        recipe = yaml.safe_load(f.metadata()["hooktrain.recipe"])
    assert recipe["train"]["max_iters"] == ITERS

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "a.png"), rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "b.jpg"), rng.integers(0, 255, (33, 27, 3), dtype=np.uint8))
    out = tmp_path / "masks"
    result = cli(capsys, "predict", exported, images, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    palette = np.asarray(recipe["data"]["palette"], dtype=np.uint8)
    for stem, shape in (("a", (40, 56)), ("b", (33, 27))):
        label = cv2.imread(str(out / f"{stem}_label.png"), cv2.IMREAD_UNCHANGED)
        colour = cv2.cvtColor(cv2.imread(str(out / f"{stem}.png")), cv2.COLOR_BGR2RGB)
        assert label.shape == shape and label.max() < len(palette)
        assert (colour == palette[label]).all()


def test_missing_files_are_clear_errors(tmp_path, capsys):
    from hooktrain.cli import main

    for argv, expected in (
        (["export", str(tmp_path / "nope"), str(tmp_path / "o.safetensors")], "not found"),
        (["predict", str(tmp_path / "no.safetensors"), "x.png", "--out", str(tmp_path)],
         "not found"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1
