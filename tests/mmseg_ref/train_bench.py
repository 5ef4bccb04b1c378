"""Run inside the MMSegmentation environment (``MmsegEnv.run``): MMSegmentation 1.2.2 training
a zoo config end to end with its own runner, for ``bench/mmseg_train.py``.

    train_bench.py DATA_ROOT --out RESULT.json --work-dir DIR [--config NAME] [--device cpu|cuda]
                   [--batch B] [--workers W] [--iters N] [--start S] [--crop C] [--bf16] [--seed K]
                   [--threads T]

DATA_ROOT is in ``ADE20KDataset``'s layout (``images/training/*.jpg``,
``annotations/training/*.png``, labels 0..150 with 0 = other). CONFIG (default
``segformer_mit-b0_8xb2-160k_ade20k-512x512``) is the config shipped in the mmseg wheel
(``mmseg/.mim/configs/*/CONFIG.py``), loaded with ``Config.fromfile`` and run as mmseg's
``tools/train.py`` runs it (``Runner.from_cfg(cfg).train()``): its dataset class, train pipeline,
``SegDataPreProcessor``, model, AdamW with its paramwise settings, schedulers and default hooks.
Changed, and only what a benchmark must:

- ``train_dataloader``: ``data_root`` -> DATA_ROOT, ``batch_size`` (the global batch, one
  device), ``num_workers``, ``persistent_workers`` (only with workers);
- ``train_cfg.max_iters``; no validation or test loop (their dataloaders, cfgs and evaluators
  None); no checkpoint hook; the logger's interval = ``--start``;
- ``SyncBN`` -> ``BN`` (one process); ``pretrained`` and the backbone's ``init_cfg`` None (no
  download: the backbone keeps its own random initialisation);
- ``launcher='none'``, ``work_dir``, ``randomness=dict(seed=K)``;
- ``--crop C`` (a smoke run): the pipeline's own ``RandomCrop.crop_size`` = (C, C),
  ``RandomResize.scale`` = (4C, C) (2048x512 at C = 512) and the data preprocessor's ``size``;
- ``--bf16`` on CUDA: ``AmpOptimWrapper`` with ``dtype='bfloat16'`` (what ``tools/train.py
  --amp`` sets, in bf16); fp32 ``OptimWrapper`` otherwise (on the CPU ``--bf16`` is ignored,
  ``precision`` says what ran).

Timing as hooktrain's ``bench/synced_timer.py``: a hook synchronises CUDA (when the model is
on it) after iteration ``S`` and after the last one; images/s = B * (N - S) / seconds. Peak
memory: ``torch.cuda.max_memory_allocated()`` read by the same hook every iteration before
mmengine's logger resets it (its ``get_max_cuda_memory`` does), the largest reading in MiB;
None on the CPU. ``--device cpu`` hides CUDA from this process; ``--threads 1`` keeps a CPU
smoke run on a busy 2-core machine from slowing down 50x (torch's threads spin against other jobs).

The result is written to ``--out`` and printed as the last line (JSON): ``images_per_s``,
``step_ms``, ``iters_timed`` ([S, N]), ``timed_iterations``, ``seconds``, ``peak_memory_mib``,
``device``, ``precision``, ``optim_wrapper``, ``batch``, ``workers``, ``crop_size``, ``scale``,
``dataset_size``, ``model`` (segmentor, backbone, decode head, classes, parameters),
``loss`` (first and last iteration's), ``setup_s``, ``train_s`` and ``versions``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

import mmcv
import mmengine
import mmseg
import torch
from mmengine import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from reference import config_path, plain_batch_norm  # the launcher puts this directory on sys.path

try:  # mmengine's collect_env (the Runner logs it) imports distutils, which Python 3.12 has only from setuptools
    import distutils  # noqa: F401
except ImportError:
    try:
        import setuptools  # noqa: F401  (importing it installs its own distutils)
    except ImportError:  # neither: the one name collect_env uses
        _errors = types.ModuleType("distutils.errors")
        _errors.DistutilsPlatformError = type("DistutilsPlatformError", (Exception,), {})
        sys.modules["distutils"] = types.SimpleNamespace(errors=_errors)
        sys.modules["distutils.errors"] = _errors

DEFAULT_CONFIG = "segformer_mit-b0_8xb2-160k_ade20k-512x512"
STARTED = time.perf_counter()


@HOOKS.register_module()
class SyncedIterTimer(Hook):
    """Wall time of iterations ``start + 1`` .. ``max_iters`` with CUDA synchronised at both ends,
    the peak CUDA memory (read every iteration, before LoggerHook's reset), the first and last
    loss. Registered with priority ABOVE_NORMAL: after RuntimeInfoHook (VERY_HIGH, which reads the
    losses), before IterTimerHook (NORMAL) and LoggerHook (BELOW_NORMAL, which resets the peak)."""

    def __init__(self, start: int, cuda: bool) -> None:
        self.start, self.cuda = start, cuda
        self.marks: list[tuple[int, float]] = []
        self.peak_bytes = 0
        self.losses: list[float] = []
        self.train_started: float | None = None
        self.train_ended: float | None = None

    def before_train(self, runner) -> None:
        self.train_started = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        done = runner.iter + 1  # mmengine counts runner.iter up after this hook
        if self.cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())
        if done in (self.start, runner.max_iters):
            if self.cuda:
                torch.cuda.synchronize()
            self.marks.append((done, time.perf_counter()))
        if (done == 1 or done == runner.max_iters) and outputs and "loss" in outputs:
            self.losses.append(outputs["loss"].detach().item())  # (RuntimeInfoHook read it already: no extra sync)

    def after_train(self, runner) -> None:
        self.train_ended = time.perf_counter()


def configure(cfg: Config, args: argparse.Namespace, cuda: bool) -> None:
    """The benchmark's changes to mmseg's own config (the module docstring lists them)."""
    cfg.launcher = "none"
    cfg.work_dir = str(args.work_dir)
    cfg.randomness = dict(seed=args.seed)
    cfg.resume, cfg.load_from = False, None
    plain_batch_norm(cfg.model)
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    if "pretrained" in cfg.model.backbone:
        cfg.model.backbone.pretrained = None

    loader = cfg.train_dataloader
    loader.batch_size = args.batch
    loader.num_workers = args.workers
    loader.persistent_workers = args.workers > 0
    dataset = loader.dataset
    dataset.data_root = str(args.data_root)
    if args.crop:
        for step in dataset.pipeline:
            if step["type"] == "RandomResize":
                step["scale"] = (4 * args.crop, args.crop)
            elif step["type"] == "RandomCrop":
                step["crop_size"] = (args.crop, args.crop)
        cfg.model.data_preprocessor.size = (args.crop, args.crop)

    cfg.train_cfg.max_iters = args.iters
    cfg.train_cfg.val_interval = args.iters + 1
    for key in ("val_dataloader", "val_cfg", "val_evaluator", "test_dataloader", "test_cfg", "test_evaluator"):
        cfg[key] = None
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = args.start
    cfg.custom_hooks = [dict(type="SyncedIterTimer", start=args.start, cuda=cuda, priority="ABOVE_NORMAL")]

    if args.bf16 and cuda:  # tools/train.py --amp, in bf16
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
        cfg.optim_wrapper.dtype = "bfloat16"


def pipeline_setting(cfg: Config, step_type: str, key: str):
    for step in cfg.train_dataloader.dataset.pipeline:
        if step["type"] == step_type:
            value = step.get(key)
            return list(value) if isinstance(value, (list, tuple)) else value
    return None


def model_summary(model: torch.nn.Module) -> dict:
    model = model.module if is_model_wrapper(model) else model
    head = model.decode_head
    norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)})
    return {
        "segmentor": type(model).__name__,
        "backbone": type(model.backbone).__name__,
        "decode_head": type(head).__name__,
        "num_classes": head.num_classes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_norms": norms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", type=Path, help="ADE20K layout: images/training, annotations/training")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--work-dir", type=Path, required=True, help="the runner's work_dir (logs, config dump)")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--batch", type=int, default=16, help="global batch (one device)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--start", type=int, default=20, help="timing starts after this iteration")
    parser.add_argument("--crop", type=int, default=None, help="crop size (default: the config's)")
    parser.add_argument("--bf16", action="store_true", help="AmpOptimWrapper(dtype='bfloat16') on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if not 1 <= args.start < args.iters:
        raise SystemExit(f"--start must be in [1, --iters), got {args.start} with --iters {args.iters}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # mmengine puts the model on CUDA whenever it sees one
    cuda = args.device == "cuda"
    if torch.cuda.is_available() != cuda:
        raise SystemExit(f"--device {args.device} but torch.cuda.is_available() is {torch.cuda.is_available()}")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = Config.fromfile(config_path(args.config))
    configure(cfg, args, cuda)
    runner = Runner.from_cfg(cfg)
    runner.train()

    timer = next(hook for hook in runner.hooks if isinstance(hook, SyncedIterTimer))
    if len(timer.marks) != 2:
        raise SystemExit(f"the timer saw iterations {[mark[0] for mark in timer.marks]}, not [start, last]")
    (first, t0), (last, t1) = timer.marks
    seconds = t1 - t0
    losses = timer.losses
    result = {
        "config": Path(config_path(args.config)).stem,
        "images_per_s": round(args.batch * (last - first) / seconds, 2),
        "step_ms": round(1000 * seconds / (last - first), 2),
        "iters_timed": [first, last],
        "timed_iterations": last - first,
        "seconds": round(seconds, 3),
        "peak_memory_mib": round(timer.peak_bytes / 2**20, 1) if cuda else None,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "precision": "bf16" if args.bf16 and cuda else "fp32",
        "optim_wrapper": type(runner.optim_wrapper).__name__,
        "batch": args.batch,
        "workers": args.workers,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "crop_size": pipeline_setting(cfg, "RandomCrop", "crop_size"),
        "scale": pipeline_setting(cfg, "RandomResize", "scale"),
        "dataset_size": len(runner.train_dataloader.dataset),
        "model": model_summary(runner.model),
        "loss": {"first": losses[0], "last": losses[-1]} if losses else None,
        "loss_finite": bool(losses) and all(math.isfinite(value) for value in losses),
        "setup_s": round(timer.train_started - STARTED, 2),
        "train_s": round(timer.train_ended - timer.train_started, 2),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "mmsegmentation": mmseg.__version__,
            "mmengine": mmengine.__version__,
            "mmcv": mmcv.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
