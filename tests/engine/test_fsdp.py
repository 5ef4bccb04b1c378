"""``train.strategy: fsdp | fsdp2`` on 2 CPU processes (gloo): training as DDP does, checkpoints
that hold whole, plain weights and a by-name optimizer state, bitwise resume, resume with
another number of processes, DDP checkpoints resumed under FSDP, activation checkpointing,
bf16, the EMA plugin, and sharded checkpoints (``train.sharded_checkpoint``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_runs import ITERS, assert_bitwise_equal, options, run, train_command, weights
from conftest import QUICKSTART

pytestmark = pytest.mark.slow  # every test here trains in 2-process subprocesses
STRATEGIES = ("fsdp", "fsdp2")
PORTS = {"ddp": 29901, "fsdp": 29902, "fsdp2": 29903}
# examples/hooktrain-ema in every run of the fixture and its resumes: the averages are compared
# across strategies and resumes (evaluations keep scoring the raw weights).
EMA = "{type: ema, momentum: 0.2, evaluate_ema: false}"


def train(work_dir: Path, data_root: Path, strategy: str, *extra: str, processes: int = 2, port: int = 0,
          sharded: bool = False):
    args = options(data_root, f"train.strategy={strategy}", f"train.sharded_checkpoint={sharded}", hooks=EMA)
    result = run(train_command(work_dir, *extra, "--cfg-options", *args, processes=processes, port=port))
    assert result.returncode == 0, result.output[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root) -> dict[str, Path]:
    """Uninterrupted 6-iteration runs with each strategy (checkpoints at 4 and 6, best/), with the
    EMA plugin."""
    from conftest import ROOT, ensure_installed

    ensure_installed("hooktrain-ema", ROOT / "examples" / "hooktrain-ema")
    root = tmp_path_factory.mktemp("strategies")
    for strategy, port in PORTS.items():
        output = train(root / strategy, data_root, strategy, port=port).output
        (root / f"{strategy}.log").write_text(output)
    return {strategy: root / strategy for strategy in PORTS}


def resumed_from(source: Path, work_dir: Path, data_root: Path, strategy: str, *, processes: int = 2, port: int = 0,
                 sharded: bool = False):
    """Resume a copy of ``source``'s ``iter_4`` with ``strategy`` to the end."""
    (work_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "iter_4", work_dir / "checkpoints" / "iter_4")
    return train(work_dir, data_root, strategy, "--resume", processes=processes, port=port, sharded=sharded)


def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.bin", weights_only=True)


def ema_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "hooks.pt", weights_only=True)["ema"]


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(
        ((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-12)).item()
        for k in b if b[k].is_floating_point()
    )  # fmt: skip


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fsdp_trains_as_ddp_does(runs, strategy):
    final = f"checkpoints/iter_{ITERS}"
    ddp, sharded = weights(runs["ddp"] / final), weights(runs[strategy] / final)
    assert sharded.keys() == ddp.keys()
    assert relative_error(sharded, ddp) < 1e-4
    ddp_metrics = json.loads((runs["ddp"] / final / "train_state.json").read_text())["metrics"]
    metrics = json.loads((runs[strategy] / final / "train_state.json").read_text())["metrics"]
    assert metrics == pytest.approx(ddp_metrics, abs=1e-3)
    version = "2" if strategy == "fsdp2" else "1"
    # The quickstart's ResNet-18 blocks and its FPN head are the units.
    assert f"FSDP{version} wraps BasicBlock, FPNHead" in (runs[strategy].parent / f"{strategy}.log").read_text()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoints_hold_whole_plain_weights_and_optimizer_state_by_name(runs, strategy):
    from hooktrain.checkpoint.weights import load_weights
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    work_dir = runs[strategy]
    model = build_recipe_segmentor(load_recipe(work_dir / "recipe.yaml"), pretrained=False)
    for checkpoint in (work_dir / "checkpoints" / f"iter_{ITERS}", work_dir / "checkpoints" / "best"):
        assert load_weights(model, checkpoint, strict=True).exact
    final = work_dir / "checkpoints" / f"iter_{ITERS}"
    assert json.loads((final / "train_state.json").read_text())["optimizer_state"] == "by_name"
    state = optimizer_state(final)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(state["state"]) == trained
    assert {name for group in state["param_groups"] for name in group["params"]} == trained
    for name, param in model.named_parameters():
        moments = state["state"][name]
        assert moments["exp_avg"].shape == param.shape
        assert not torch.equal(moments["exp_avg"], moments["exp_avg_sq"]), name


def test_ema_plugin_averages_the_shards_as_ddp_averages_the_weights(runs):
    """examples/hooktrain-ema averages each process's shards and saves the average whole: the
    same average as under DDP."""
    final = f"checkpoints/iter_{ITERS}"
    ddp = ema_state(runs["ddp"] / final)
    for strategy in STRATEGIES:
        average = ema_state(runs[strategy] / final)
        assert average["n_averaged"] == ITERS
        assert average["weights"].keys() == weights(runs[strategy] / final).keys()
        assert relative_error(average["weights"], ddp["weights"]) < 1e-4, strategy
    # Not the raw weights: the average trails them.
    assert relative_error(ddp["weights"], weights(runs["ddp"] / final)) > 1e-3


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_best_scores_what_hooktrain_test_scores(runs, tmp_path, strategy):
    """The evaluation during training scores the weights best/ saves: every rank gets rank 0's
    BatchNorm statistics (each rank's last forward updated its own), so `hooktrain test` on
    best/ gives best.json's value exactly."""
    from conftest import ENV, run_cli

    best = runs[strategy] / "checkpoints" / "best"
    result = run_cli("test", str(runs[strategy] / "recipe.yaml"), "--checkpoint", str(best),
                     "--work-dir", str(tmp_path), env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((best / "best.json").read_text())
    assert json.loads((tmp_path / "test_metrics.json").read_text())["mIoU"] == recorded["value"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_is_bitwise(runs, data_root, tmp_path, strategy):
    resumed_from(runs[strategy], tmp_path / "run", data_root, strategy, port=PORTS[strategy] + 10)
    final = f"checkpoints/iter_{ITERS}"
    assert_bitwise_equal(weights(tmp_path / "run" / final), weights(runs[strategy] / final))
    a, b = optimizer_state(tmp_path / "run" / final), optimizer_state(runs[strategy] / final)
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][name][key], b["state"][name][key]), (name, key)
    # The EMA plugin's average, saved whole and given back to each rank as its shards, goes on exactly.
    assert_bitwise_equal(ema_state(tmp_path / "run" / final)["weights"], ema_state(runs[strategy] / final)["weights"])


def test_fsdp_checkpoint_resumes_in_one_process(runs, data_root, tmp_path):
    """Elastic 2 -> 1: the whole optimizer state loads into the unsharded model and the data
    pass goes on."""
    result = resumed_from(runs["fsdp2"], tmp_path / "run", data_root, "fsdp2", processes=1)
    assert "data stream: elastic" in result.output
    final = tmp_path / "run" / "checkpoints" / f"iter_{ITERS}"
    steps = {float(moments["step"]) for moments in optimizer_state(final)["state"].values()}
    assert steps == {float(ITERS)}
    # One process saves Accelerate's optimizer state (parameters by number): compare totals.
    before = optimizer_state(runs["fsdp2"] / "checkpoints" / "iter_4")["state"].values()
    after = optimizer_state(final)["state"].values()
    # The resumed moments went on from the saved ones, not from zero: with AdamW's beta2 0.999,
    # two more steps keep at least 0.998 of the saved second moments.
    assert sum(m["exp_avg_sq"].sum() for m in after) >= 0.99 * sum(m["exp_avg_sq"].sum() for m in before)


def test_a_ddp_checkpoint_resumes_under_fsdp_exactly(runs, data_root, tmp_path):
    resumed_from(runs["ddp"], tmp_path / "run", data_root, "fsdp", port=PORTS["fsdp"] + 20)
    final = f"checkpoints/iter_{ITERS}"
    assert_bitwise_equal(weights(tmp_path / "run" / final), weights(runs["ddp"] / final))
    assert_bitwise_equal(ema_state(tmp_path / "run" / final)["weights"], ema_state(runs["ddp"] / final)["weights"])


def test_activation_checkpointing_composes_with_fsdp(runs, data_root, tmp_path):
    """The encoder's blocks recomputed inside their FSDP units train the same parameters (the
    recomputed BatchNorm forwards update the running statistics again, so buffers differ)."""
    args = options(data_root, "train.strategy=fsdp", "model.encoder.grad_checkpointing=true")
    result = run(train_command(tmp_path / "run", "--cfg-options", *args, processes=2, port=PORTS["fsdp"] + 30))
    assert result.returncode == 0, result.output[-4000:]
    final = f"checkpoints/iter_{ITERS}"
    recomputed, kept = weights(tmp_path / "run" / final), weights(runs["fsdp"] / final)
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    model = build_recipe_segmentor(load_recipe(tmp_path / "run" / "recipe.yaml"), pretrained=False)
    parameters = {name for name, _ in model.named_parameters()}
    assert relative_error({k: recomputed[k] for k in parameters}, {k: kept[k] for k in parameters}) < 1e-6


def test_bf16_autocasts_under_fsdp2(runs, data_root, tmp_path):
    """Accelerate autocasts a prepared model's forward itself except under FSDP2; the train step
    does it for every strategy, so bf16 changes the losses (slightly) there too."""
    args = options(data_root, "train.strategy=fsdp2", "train.mixed_precision=bf16")
    result = run(train_command(tmp_path / "run", "--cfg-options", *args, processes=2, port=PORTS["fsdp2"] + 30))
    assert result.returncode == 0, result.output[-4000:]

    def losses(history: Path) -> list[float]:
        rows = [json.loads(line) for line in history.read_text().splitlines()]
        return [row["train/loss"] for row in rows if "train/loss" in row]

    bf16, fp32 = losses(tmp_path / "run" / "metrics.jsonl"), losses(runs["fsdp2"] / "metrics.jsonl")
    assert len(bf16) == len(fp32) == ITERS
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=0.02)


def test_early_stop_under_fsdp_ends_every_rank_with_a_whole_checkpoint(data_root, tmp_path):
    """min_delta 1.0 is never reached: after 2 evaluations without improvement (iterations 4 and
    6) both ranks end after iteration 6, exit 0, with the final checkpoint whole."""
    from hooktrain.checkpoint.resume import checkpoint_problems

    hooks = ("{type: logger, interval: 2}, {type: checkpoint, interval: 100}, "
             "{type: eval, interval: 2, num_samples: 0}, {type: early_stop, patience: 2, min_delta: 1.0}")  # fmt: skip
    args = options(data_root, "train.strategy=fsdp", "train.max_iters=20", base=hooks)
    result = run(train_command(tmp_path / "run", "--cfg-options", *args, processes=2, port=PORTS["fsdp"] + 60))
    assert result.returncode == 0, result.output[-4000:]
    assert "stopping after iteration 6" in result.output and "iter 7/" not in result.output
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_6"]
    assert checkpoint_problems(tmp_path / "run" / "checkpoints" / "iter_6") == []


def test_the_recipe_names_the_strategy_and_refuses_others():
    from conftest import assert_refused, run_cli

    result = run_cli("config", str(QUICKSTART), "--cfg-options", "train.strategy=zero3")
    assert_refused(result, "train.strategy")
    result = run_cli("config", str(QUICKSTART), "--cfg-options", "train.strategy=fsdp2", "model.compile=true")
    assert_refused(result, "model.compile", "train.strategy: fsdp2", "set model.compile: false")
    result = run_cli("config", str(QUICKSTART), "--cfg-options", "train.sharded_checkpoint=true")
    assert_refused(result, "train.sharded_checkpoint: true needs train.strategy: fsdp or fsdp2")


# -- sharded checkpoints: train.sharded_checkpoint ----------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, data_root) -> Path:
    """The fsdp2 run of ``runs`` with each rank saving its shard (iter_4, iter_6, best/)."""
    work_dir = tmp_path_factory.mktemp("sharded") / "run"
    train(work_dir, data_root, "fsdp2", port=PORTS["fsdp2"] + 40, sharded=True)
    return work_dir


def test_sharded_checkpoints_hold_each_ranks_shard_and_consolidate_into_the_whole_weights(
    runs, sharded_run, tmp_path, capsys
):
    from conftest import assert_refused, cli

    from hooktrain.checkpoint.weights import load_weights
    from hooktrain.errors import UserError
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    final = sharded_run / "checkpoints" / f"iter_{ITERS}"
    record = json.loads((final / "train_state.json").read_text())
    assert record["model_state"] == "sharded" and "optimizer_state" not in record
    assert not (final / "model.safetensors").exists() and not (final / "optimizer.bin").exists()
    shards = sorted(p.name for p in (final / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    # Each rank wrote about half of the weights and moments, never the whole.
    sizes = [(final / "sharded" / name).stat().st_size for name in shards]
    assert max(sizes) < 0.7 * sum(sizes)
    model = build_recipe_segmentor(load_recipe(sharded_run / "recipe.yaml"), pretrained=False)
    with pytest.raises(UserError, match="hooktrain convert dcp"):
        load_weights(model, final, strict=True)
    refused = cli(capsys, "export", final, tmp_path / "model.safetensors")
    assert_refused(refused, "sharded checkpoint", "hooktrain convert dcp")
    assert load_weights(model, sharded_run / "checkpoints" / "best", strict=True).exact  # best/ stays whole
    copy = tmp_path / "iter_6"
    shutil.copytree(final, copy)
    result = cli(capsys, "convert", "dcp", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"wrote the whole weights of {copy} to {copy / 'model.safetensors'}\n"
    assert load_weights(model, copy, strict=True).exact
    # Saving in shards changed nothing in training: the whole weights of the run that gathered them.
    assert_bitwise_equal(weights(copy), weights(runs["fsdp2"] / "checkpoints" / f"iter_{ITERS}"))


def test_a_damaged_sharded_checkpoint_is_never_resumed_from(sharded_run, tmp_path):
    from hooktrain.checkpoint.dcp import consolidate
    from hooktrain.checkpoint.resume import checkpoint_problems, choose_resume
    from hooktrain.errors import UserError

    shutil.copytree(sharded_run / "checkpoints", tmp_path / "checkpoints")
    final = tmp_path / "checkpoints" / f"iter_{ITERS}"
    assert checkpoint_problems(final) == []
    shard = final / "sharded" / "__1_0.distcp"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    truncated = f"sharded/__1_0.distcp is truncated ({len(whole) // 2:,} of {len(whole):,} bytes)"
    assert checkpoint_problems(final) == [truncated]
    assert choose_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "iter_4"
    with pytest.raises(UserError, match="not a whole hooktrain checkpoint: sharded/__1_0.distcp is truncated"):
        choose_resume(tmp_path, str(final))
    shard.write_bytes(whole)
    (final / "sharded" / ".metadata").unlink()  # a save killed before rank 0 wrote the metadata
    assert checkpoint_problems(final) == ["sharded/.metadata is missing"]
    with pytest.raises(UserError, match="is not a whole checkpoint: sharded/.metadata is missing"):
        consolidate(final)


def test_sharded_resume_is_bitwise(sharded_run, data_root, tmp_path):
    from hooktrain.checkpoint.dcp import read_sharded

    resumed_from(sharded_run, tmp_path / "run", data_root, "fsdp2", port=PORTS["fsdp2"] + 50, sharded=True)
    final = f"checkpoints/iter_{ITERS}"
    for prefix in ("model.", "optimizer.state."):  # the weights; AdamW's moments and steps
        assert_bitwise_equal(read_sharded(tmp_path / "run" / final, prefix), read_sharded(sharded_run / final, prefix))


def test_sharded_checkpoint_resumes_in_one_process(sharded_run, data_root, tmp_path):
    """Elastic 2 -> 1: DCP reads both shards into the plain model and its optimizer, the data pass
    goes on, and the one process saves whole checkpoints."""
    from hooktrain.checkpoint.dcp import read_sharded

    result = resumed_from(sharded_run, tmp_path / "run", data_root, "fsdp2", processes=1, sharded=True)
    assert "data stream: elastic" in result.output
    assert "checkpoints are whole (train.sharded_checkpoint)" in result.output
    final = tmp_path / "run" / "checkpoints" / f"iter_{ITERS}"
    after = optimizer_state(final)["state"].values()
    assert {float(moments["step"]) for moments in after} == {float(ITERS)}
    before = read_sharded(sharded_run / "checkpoints" / "iter_4", "optimizer.state.")
    saved = sum(value.sum() for key, value in before.items() if key.endswith(".exp_avg_sq"))
    # The moments went on from the saved ones (AdamW's beta2 0.999 keeps 0.998 over two steps).
    assert sum(m["exp_avg_sq"].sum() for m in after) >= 0.99 * saved
