"""Shared test set-up: offline everything, paths, and helpers to run the CLI.

Tests that take over ~20 s each (whole documented command sequences, signalled training
runs, ``torch.compile``, the MMSegmentation reference runs) carry the ``slow`` marker
(registered in pyproject.toml). While working, run the quick inner loop::

    python -m pytest -m "not slow"

and the whole suite (README's test command, what CI runs) before handing a change in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # The test workers share the cores: each worker, and every process it starts, gets its
    # share of them. Torch's OpenMP threads spinning on a core another worker uses run several
    # times slower than one thread each (before torch is imported here).
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

from mmseg_ref.fixtures import mmseg_env, mmseg_zoo_references  # noqa: E402,F401  (session fixtures)

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
RECIPES = ROOT / "recipes"
QUICKSTART = RECIPES / "quickstart.yaml"
# Lets the training subprocesses import the probe hooks in tests/ by "module:Class".
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run_cli(*args: str, cwd: Path | str = ROOT, env: dict | None = None, timeout: int = 600):
    """Run ``python -m hooktrain ARGS`` in a subprocess; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "hooktrain", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli(capsys, *argv) -> SimpleNamespace:
    """``hooktrain ARGV`` in this process, as a CompletedProcess-like result for assert_refused."""
    from hooktrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=exit_info.value.code, stdout=out.out, stderr=out.err)


def assert_refused(result, *fragments: str) -> str:
    """``result`` (a CompletedProcess) exited 2 with exactly one error line on stderr, no
    traceback, naming every ``fragment``; returns that line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("hooktrain: error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree_digest(root: Path | str) -> dict[str, str]:
    """Every path under ``root`` with its mode and a hash of its bytes, to show that a refused
    command left a directory byte-for-byte as it was."""
    import hashlib

    root = Path(root)
    if not root.exists():
        return {}
    digest = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_file():
            digest[key] = f"{path.stat().st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
        else:
            digest[key] = f"{path.stat().st_mode:o} dir"
    return digest


def tiny(data_root: Path, iters: int = 6, *extra: str) -> list[str]:
    """--cfg-options for a seconds-long run of the quickstart on tiny shapes images."""
    options = [
        f"train.max_iters={iters}",
        "schedule.warmup_iters=2",
        "data.train.batch_size=2",
        "data.train.num_workers=0",
        "data.train.shuffle_buffer=8",
        "data.train.pipeline.crop_size=[32,32]",
        "data.train.pipeline.scale=[64,32]",
        "data.val.pipeline.scale=[64,32]",
        "hooks.0.interval=2",
        *extra,
    ]
    for split in ("train", "val"):
        options += [
            f"data.{split}.source.root={data_root}",
            f"data.{split}.source.num_train=24",
            f"data.{split}.source.num_val=4",
            f"data.{split}.source.image_size=32",
            f"data.{split}.source.train_shards=4",
        ]
    return options


# A seconds-long run of an ADE20K recipe's own model on the replica the local Hub stand-in serves.
TINY_ADE20K = [
    "train.max_iters=2", "schedule.warmup_iters=1", "model.encoder.pretrained=false", "data.train.batch_size=2",
    "data.train.shuffle_buffer=4", "data.train.num_workers=0", "data.train.pipeline.scale=[64,32]",
    "data.train.pipeline.crop_size=[32,32]", "data.val.pipeline.scale=[64,32]", "data.val.num_workers=0",
    "hooks.0.interval=1", "hooks.1.interval=2", "hooks.2.interval=2", "train.mixed_precision=no",
]  # fmt: skip


def train_on_ade20k_replica(recipe: Path | str, tmp_path: Path, *extra: str) -> Path:
    """Train ``recipe`` for two iterations (:data:`TINY_ADE20K` and ``extra`` options) on the
    ADE20K replica served by a local Hub stand-in, through the real client; asserts the run ends
    with its iteration-2 checkpoint and returns the work dir."""
    from hub_replicas import serve_ade20k
    from hub_server import HubServer

    server = HubServer()
    serve_ade20k(server, tmp_path / "hub")
    work_dir = tmp_path / "run"
    env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}  # fmt: skip
    with server:
        result = run_cli(str(recipe), "--work-dir", str(work_dir), "--cfg-options", *TINY_ADE20K, *extra, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work_dir / "checkpoints" / "iter_2" / "model.safetensors").is_file()
    return work_dir


def export_untrained(recipe_file: Path | str, root: Path, *options: str, in_process: bool = False) -> Path:
    """``root/model.safetensors``: a recipe's model with its initial weights, exported by
    ``hooktrain export`` (or, ``in_process``, its function) from a checkpoint folder as
    training writes one."""
    from safetensors.torch import save_file

    from hooktrain.models import build_segmentor
    from hooktrain.recipe.schema import dump_recipe, load_recipe

    recipe = load_recipe(recipe_file, list(options))
    data = recipe.data
    model = build_segmentor(recipe.model, num_classes=data.num_classes, ignore_index=data.ignore_index,
                            in_channels=data.in_channels)  # fmt: skip
    checkpoint = root / "run" / "checkpoints" / "iter_1"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / "model.safetensors"))
    (checkpoint / "recipe.yaml").write_text(dump_recipe(recipe))
    if in_process:
        from hooktrain.deploy.export import export_checkpoint

        return Path(export_checkpoint(checkpoint, root / "model.safetensors"))
    result = run_cli("export", str(checkpoint), str(root / "model.safetensors"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "model.safetensors"


def randomise(model):
    """``model`` in eval mode with weights and BN statistics that give logits of order 1 (a fresh
    head's are ~1e-3, which would make softmax almost linear and tests blind to, say, the order
    of averaging)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0, param[0].numel() ** -0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def launch_command(*args: str, port: int, processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``processes`` CPU processes (gloo) running ARGS, for example
    ``"-m", "hooktrain", recipe, ...``; each test passes its own ``port``."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), *args,
    ]  # fmt: skip


def run_launch(*args: str, port: int, processes: int = 2, timeout: int = 600):
    """Run :func:`launch_command` from the repository root with the probe hooks importable and
    ``ACCELERATE_USE_CPU=1``; returns the CompletedProcess."""
    return subprocess.run(
        launch_command(*args, port=port, processes=processes),
        cwd=ROOT,
        env={**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ensure_installed(distribution_name: str, path: Path) -> None:
    """pip-install a local plugin package into this environment unless it is there already."""
    import importlib
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(distribution_name)
    except PackageNotFoundError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(path)],
            check=True,
        )
        importlib.invalidate_caches()
    from hooktrain.hooks import discover_hooks

    discover_hooks.cache_clear()


def read_probe(prefix: Path, rank: int = 0) -> dict:
    """The record a ``probe_hooks:ProbeHook`` with this ``prefix`` wrote for ``rank``."""
    import json

    return json.loads(Path(f"{prefix}.rank{rank}.json").read_text())


def generate_once(tmp_path_factory, name: str, **params) -> Path:
    """The shapes dataset with ``params`` in a directory ``name`` shared by the whole test run:
    generated by the first test process to need it, under a file lock, also under pytest-xdist
    (whose workers share the parent of their base temporary directories)."""
    from filelock import FileLock

    from hooktrain.data.shapes import generate_shapes

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    with FileLock(str(shared / f"{name}.lock")):
        return generate_shapes(shared / name, **params)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The tiny shapes dataset that :func:`tiny` describes (24 train and 4 val images of 32x32
    in 4 + 2 shards), generated once per test run. Shared by every module that uses it: tests
    read it and never write into it (a test that must change a dataset makes its own)."""
    from hooktrain.recipe.schema import load_recipe

    root = tmp_path_factory.getbasetemp() / "tiny_shapes"  # only to resolve tiny()'s options
    source = load_recipe(QUICKSTART, tiny(root)).data.train.source
    return generate_once(tmp_path_factory, "tiny_shapes", **source.model_dump(exclude={"type", "root", "split"}))


# The xdist group of the tests that share :func:`eval_command_runs`, so that they run on one
# worker (a session fixture is built once per worker) and each of its runs is made once.
EVAL_COMMAND_GROUP = "eval_command_runs"


class EvalCommandRuns:
    """``hooktrain test`` of one random quickstart model (seed 3, :func:`randomise`; its weights
    file holds no recipe) on the tiny shapes validation split (batches of 3), on 1 or 2 processes,
    with or without ``--tta``: each run is made the first time a test asks for it, then shared."""

    PORTS = {False: 29622, True: 29641}  # accelerate launch's port, without and with --tta

    def __init__(self, root: Path, data_root: Path) -> None:
        import torch
        from safetensors.torch import save_file

        from hooktrain.models import build_segmentor
        from hooktrain.recipe.schema import load_recipe

        self.root = root
        recipe = load_recipe(QUICKSTART)
        torch.manual_seed(3)
        model = build_segmentor(recipe.model, num_classes=recipe.data.num_classes, in_channels=recipe.data.in_channels)
        self.weights = root / "weights.safetensors"
        save_file(randomise(model).state_dict(), self.weights)
        self.options = [*tiny(data_root), "hooks=[{type: eval, num_samples: 0}]", "data.val.batch_size=3"]
        self._work_dirs: dict[tuple[int, bool], Path] = {}

    def work_dir(self, processes: int, tta: bool) -> Path:
        """The run's work dir (``test_metrics.json``, ``confusion/``); the run must exit 0."""
        key = (processes, tta)
        if key not in self._work_dirs:
            work_dir = self.root / f"{processes}_processes{'_tta' if tta else ''}"
            args = ["test", str(QUICKSTART), "--checkpoint", str(self.weights), *(["--tta"] if tta else []),
                    "--work-dir", str(work_dir), "--cfg-options", *self.options]  # fmt: skip
            if processes == 1:
                result = run_cli(*args)
            else:
                result = run_launch("-m", "hooktrain", *args, port=self.PORTS[tta], processes=processes)
            assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
            self._work_dirs[key] = work_dir
        return self._work_dirs[key]

    def metrics(self, processes: int, tta: bool) -> dict:
        """The run's ``test_metrics.json``."""
        import json

        return json.loads((self.work_dir(processes, tta) / "test_metrics.json").read_text())


@pytest.fixture(scope="session")
def eval_command_runs(tmp_path_factory, data_root) -> EvalCommandRuns:
    """The ``hooktrain test`` runs that tests/evaluation/test_eval.py and test_tta.py compare
    (their tests that use it carry the xdist group :data:`EVAL_COMMAND_GROUP`)."""
    return EvalCommandRuns(tmp_path_factory.mktemp("eval_command_runs"), data_root)


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    """For the doc-command tests: a directory laid out like a checkout (recipes/, examples/) with its own Accelerate
    config home, so a user's ~/.cache/huggingface/accelerate does not leak in."""
    for name in ("recipes", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path


@pytest.fixture
def shapes_sandbox(sandbox, tmp_path_factory) -> Path:
    """A sandbox whose data/shapes is the quickstart's dataset, generated once per test run."""
    from hooktrain.recipe.schema import load_recipe

    source = load_recipe(QUICKSTART).data.train.source
    params = source.model_dump(exclude={"type", "root", "split"})
    (sandbox / "data").mkdir()
    (sandbox / "data" / "shapes").symlink_to(generate_once(tmp_path_factory, "quickstart_shapes", **params))
    return sandbox


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    """Under ``-n 2 --dist loadgroup`` (README's test command) a module's tests stay on one
    worker, where its module-scoped fixtures (a trained run, say) are built once, unless the
    module is marked ``spread``: its tests are independent, and run on whichever worker is free.
    A test with an ``xdist_group`` of its own (:data:`EVAL_COMMAND_GROUP`) keeps it."""
    for item in items:
        if item.get_closest_marker("spread") is None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
