"""The run's Accelerator and the model it trains: devices, mixed precision, BatchNorm across
processes and ``train.strategy`` (DDP or FSDP, :mod:`hooktrain.engine.sharding`)."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from hooktrain.checkpoint.sharded import is_sharded
from hooktrain.checkpoint.state import save_plain_weights
from hooktrain.engine.optim import build_optimizer
from hooktrain.engine.sharding import (
    InferenceReplica,
    broadcast_batch_norm_stats,
    enable_fsdp,
    fsdp_plugin,
    prepare_for_fsdp,
    without_fsdp_flags,
)
from hooktrain.errors import UserError
from hooktrain.recipe.schema import Recipe, TrainConfig

logger = logging.getLogger("hooktrain")


def make_accelerator(cfg: TrainConfig, *, shard: bool = True, **kwargs: Any) -> Accelerator:
    """The run's Accelerator, its collectives timing out after ``train.collective_timeout``,
    saving the plain module's weights (``checkpoint.state.save_plain_weights``), sharding the
    model as ``train.strategy`` (or Accelerate's own FSDP flags) says unless ``shard`` is False
    (inference: every rank needs the whole model). fp16 without a CUDA GPU is refused
    (Accelerate would silently train in fp32)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cfg.mixed_precision == "fp16" and (use_cpu or not torch.cuda.is_available()):
        raise UserError(
            "train.mixed_precision: fp16 needs a CUDA GPU and none is in use; "
            "use bf16 (autocasts on CPU too) or 'no'"
        )
    plugin = fsdp_plugin(cfg.strategy) if shard else None
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))
    with nullcontext() if shard else without_fsdp_flags():
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[timeout],
            fsdp_plugin=plugin,
            **kwargs,
        )
    if plugin is not None:
        enable_fsdp(accelerator, plugin, ours=cfg.strategy != "ddp")
    save_plain_weights(accelerator)  # no DDP `module.` prefix in the checkpoints' model.safetensors
    return accelerator


def prepare_model(
    accelerator: Accelerator, model: torch.nn.Module, recipe: Recipe
) -> tuple[torch.nn.Module, torch.optim.Optimizer, InferenceReplica | None]:
    """``model`` with the recipe's BatchNorm choice and its optimizer, both prepared by
    ``accelerator`` (DDP or FSDP). Under FSDP also the plain replica evaluations use."""
    model = _choose_batch_norm(model, recipe.train.sync_bn, accelerator)
    replica = None
    if is_sharded(accelerator):
        prepare_for_fsdp(accelerator, model)
        replica = InferenceReplica(model)
    elif recipe.train.strategy != "ddp":
        whole = ", and checkpoints are whole (train.sharded_checkpoint)" if recipe.train.sharded_checkpoint else ""
        logger.info("train.strategy: %s has nothing to shard in one process: the model trains whole%s",
                    recipe.train.strategy, whole)  # fmt: skip
    optimizer = build_optimizer(model, recipe.optimizer, device=accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    if replica is not None:
        broadcast_batch_norm_stats(model)
    return model, optimizer, replica


def _choose_batch_norm(model: torch.nn.Module, setting: bool | str, accelerator: Accelerator):
    """``train.sync_bn``: SyncBatchNorm across several CUDA processes (``auto``) or forced."""
    processes, device = accelerator.num_processes, accelerator.device.type
    sync = processes > 1 and device == "cuda" if setting == "auto" else setting
    if sync and processes > 1 and device != "cuda":
        raise UserError(
            f"train.sync_bn: true needs CUDA processes, and these {processes} run on "
            f"{device} (SyncBatchNorm runs on GPUs only); use train.sync_bn: auto or false"
        )
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        logger.info("batch norm: %s (train.sync_bn: %s, %d %s process%s)",
                    "SyncBatchNorm across processes" if sync else "BatchNorm per process",
                    setting, processes, device, "es" if processes > 1 else "")  # fmt: skip
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model
