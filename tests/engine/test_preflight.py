"""Bad input never costs work: every check runs before the work dir is touched, each problem
is one line with exit code 2, and recipe errors come before torch is even imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, assert_refused, cli, run_cli, tiny, tree_digest
from safetensors.torch import save_file

from hooktrain.recipe.schema import apply_cfg_options


class Trained:
    """A finished 2-iteration quickstart run in ``work_dir``, made once per module."""

    def __init__(self, root: Path, data_root: Path) -> None:
        self.root = root
        self.options = tiny(data_root, 2, "hooks[1].interval=2")
        self.work_dir = root / "run"
        self.result = self.cli("train", str(QUICKSTART), "--work-dir", str(self.work_dir))
        assert self.result.returncode == 0, self.result.stderr[-3000:]

    def cli(self, *args: str, options: tuple[str, ...] = ()):
        return run_cli(*args, "--cfg-options", *self.options, *options, cwd=self.root)

    def refused(self, args: tuple[str, ...], options: tuple[str, ...], *fragments: str) -> str:
        """Run a command expected to be refused; the work dir must be byte-for-byte unchanged."""
        before = tree_digest(self.work_dir)
        line = assert_refused(self.cli(*args, options=options), *fragments)
        assert tree_digest(self.work_dir) == before
        return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> Trained:
    return Trained(tmp_path_factory.mktemp("preflight"), data_root)


# -- recipe errors: one line, full key paths, no torch ------------------------------------


def run_without_heavy_imports(*args: str) -> subprocess.CompletedProcess:
    """``hooktrain ARGS`` in a process where importing torch, timm or datasets fails: a
    recipe error must be found and printed without them."""
    code = (
        "import sys; sys.modules.update(torch=None, timm=None, datasets=None, accelerate=None); "
        "from hooktrain.cli import main; main(sys.argv[1:])"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["train.max_iter=5"], ["unknown recipe key 'train.max_iter' (did you mean 'max_iters'?)"]),
        (["data={}"], ["recipe key 'data.num_classes' is required but missing"]),
        (["hooks[0]={}"], ["recipe key 'hooks[0].type' is required but missing"]),
        (["model.decode_head={type: fpn, in_index: [0]}", "model.decode_head.nope=1"], ["'model.decode_head.nope'"]),
        (
            ["hooks[0].log_with=[wandb]", "hooks[0].wandb={projet: x}"],
            [
                "unknown option 'hooks[0].wandb.projet'",
                "(did you mean 'project'?)",
                "valid options hooks[0].wandb: entity, group, name, project",
            ],
        ),  # fmt: skip
        (["data.train.pipeline.crop_size=[200,200]"], ["crop_size (200, 200) is larger than any image", "scale"]),
        (["hooks[0]].interval=3"], ["is not a key path like", "hooks[0].interval"]),
    ],
)
def test_recipe_errors_are_one_line_and_need_no_torch(options, fragments):
    result = run_without_heavy_imports("config", str(QUICKSTART), "--cfg-options", *options)
    assert_refused(result, *fragments)


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["config", "--help"]])
def test_help_and_the_plugin_list_need_no_torch(args):
    result = run_without_heavy_imports(*args)
    assert result.returncode == 0, result.stderr
    if args == ["plugins"]:  # every installed hook, described from its source without importing it
        assert {"logger", "eval", "checkpoint"} <= {line.split()[0] for line in result.stdout.splitlines()}


def test_cfg_options_take_the_bracket_spelling_errors_print():
    cfg = {"hooks": [{"type": "logger", "interval": 50}, {"type": "eval"}]}
    assert apply_cfg_options(cfg, ["hooks[1].interval=7", "hooks.0.interval=5"])["hooks"] == [
        {"type": "logger", "interval": 5},
        {"type": "eval", "interval": 7},
    ]


# -- hooktrain config runs the checks a run makes before it starts ------------------------


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["model.encoder.name=resnet181"], ["unknown timm model 'resnet181'", "did you mean"]),
        (["model.decode_head.in_index=[0,1,7]"], ["model.decode_head.in_index: level 7 does not exist"]),
        (["model.encoder.pretrained_path=missing.safetensors"], ["pretrained_path: missing.safetensors is not a file"]),
        (["load_from=recipe.yaml"], ["recipe.yaml is not a safetensors file"]),
        (["load_from=foreign.safetensors"], ["load_from: none of the tensors", "foreign.safetensors"]),
    ],
)
def test_config_refuses_recipes_that_could_not_start(tmp_path, monkeypatch, capsys, options, fragments):
    (tmp_path / "recipe.yaml").write_text("not: weights\n")
    save_file({"backbone.stem.weight": torch.zeros(2, 3)}, str(tmp_path / "foreign.safetensors"))
    monkeypatch.chdir(tmp_path)
    assert_refused(cli(capsys, "config", QUICKSTART, "--cfg-options", *options), *fragments)


# -- checkpoints and work dirs ------------------------------------------------------------


def test_start_up_logs_the_time_to_the_first_iteration(trained):
    assert "starting iteration 1, " in trained.result.stdout
    assert "s after the command started" in trained.result.stdout


def test_model_weights_have_the_mode_of_the_other_checkpoint_files(trained):
    checkpoint = trained.work_dir / "checkpoints" / "iter_2"
    modes = {path.name: path.stat().st_mode for path in checkpoint.iterdir()}
    assert modes["model.safetensors"] == modes["optimizer.bin"] == modes["recipe.yaml"]


def test_test_refuses_a_checkpoint_of_another_model(trained):
    line = trained.refused(
        ("test", str(QUICKSTART), "--work-dir", str(trained.work_dir),
         "--checkpoint", str(trained.work_dir / "checkpoints" / "iter_2")),
        ("model.decode_head.channels=32",),
        "does not fit the recipe's model", "shape mismatch", "file [5, 64, 1, 1], model [5, 32, 1, 1]",
    )  # fmt: skip
    assert "test with the recipe the checkpoint was trained with" in line


def test_test_refuses_a_checkpoint_that_is_not_safetensors(trained):
    trained.refused(
        ("test", str(QUICKSTART), "--work-dir", str(trained.work_dir),
         "--checkpoint", str(trained.work_dir / "recipe.yaml")),
        (), "recipe.yaml is not a safetensors file",
    )  # fmt: skip


def test_test_logs_the_iteration_it_evaluated(trained):
    result = trained.cli(
        "test", str(QUICKSTART), "--work-dir", str(trained.root / "test_run"),
        "--checkpoint", str(trained.work_dir / "checkpoints" / "iter_2"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "iter 2  val/aAcc" in result.stdout and "iter 0" not in result.stdout


def test_a_work_dir_that_is_a_file_is_refused(trained):
    trained.refused(
        ("train", str(QUICKSTART), "--work-dir", str(trained.work_dir / "recipe.yaml")), (),
        "is a file, not a directory", "--work-dir",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (("model.encoder.name=not_a_timm_model",), ["unknown timm model 'not_a_timm_model'"]),
        (("model.decode_head.channels=32",), ["does not fit the recipe's model", "resume with the recipe"]),
        (("train.seed=3", "train.max_iters=4"), ["seed=0 (now 3)"]),
        (("train.max_iters=4", "hooks[0].interval=0"), ["hooks[0].interval"]),
    ],
)
def test_a_refused_resume_leaves_the_work_dir_as_it_was(trained, options, fragments):
    trained.refused(("train", str(QUICKSTART), "--work-dir", str(trained.work_dir), "--resume"), options, *fragments)


def test_a_refused_force_moves_nothing(trained):
    trained.refused(
        ("train", str(QUICKSTART), "--work-dir", str(trained.work_dir), "--force"),
        ("model.decode_head.in_index=[0,1,7]",), "level 7 does not exist",
    )  # fmt: skip


def test_force_moves_the_whole_previous_run_aside(trained, tmp_path):
    work_dir = tmp_path / "run"
    shutil.copytree(trained.work_dir, work_dir)
    before = tree_digest(work_dir)
    result = trained.cli("train", str(QUICKSTART), "--work-dir", str(work_dir), "--force",
                         options=("train.max_iters=1",))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (aside,) = work_dir.glob("previous-*")
    assert tree_digest(aside) == before  # checkpoints, metrics.jsonl, recipe.yaml: all kept
    history = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert history and all(record["iter"] == 1 for record in history)  # a fresh history


# -- load_from: fine-tuning into another class count ----------------------------------------


def test_load_from_skips_what_does_not_fit_and_says_so(trained):
    result = trained.cli(
        "train", str(QUICKSTART), "--work-dir", str(trained.root / "six"),
        options=(f"load_from={trained.work_dir / 'checkpoints' / 'iter_2'}", "data.num_classes=6",
                 "data.class_names=null", "data.palette=null", "train.max_iters=1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = [line for line in result.stdout.splitlines() if " model tensors from " in line]
    assert "kept the model's own decode_head.conv_seg.* (other shape in the file)" in line


def test_load_weights_loads_every_tensor_that_fits(tmp_path):
    from hooktrain.checkpoint.weights import load_weights
    from hooktrain.models import ModelConfig, build_segmentor

    cfg = ModelConfig.model_validate({"encoder": {"name": "resnet18", "out_indices": [1, 2, 3]},
                                      "decode_head": {"type": "fcn", "channels": 8}})  # fmt: skip
    five, six = build_segmentor(cfg, num_classes=5), build_segmentor(cfg, num_classes=6)
    seg_before = six.decode_head.conv_seg.weight.detach().clone()
    file = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in five.state_dict().items()}, str(file))
    fit = load_weights(six, file, strict=False)
    assert [key for key, _, _ in fit.mismatched] == ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    assert torch.equal(six.decode_head.conv_seg.weight, seg_before)
    for key, value in five.state_dict().items():
        if not key.startswith("decode_head.conv_seg"):
            assert torch.equal(six.state_dict()[key], value), key
