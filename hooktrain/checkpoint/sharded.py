"""Whole state dicts of a model and optimizer that FSDP shards, so a checkpoint stays one format.

Under FSDP (``train.strategy: fsdp | fsdp2``, see :mod:`hooktrain.engine.sharding`), a
checkpoint's ``model.safetensors`` is the whole, plain state dict and ``optimizer.bin`` the
whole optimizer state keyed by parameter name, both gathered with torch's
``torch.distributed.checkpoint.state_dict`` functions, which work on FSDP1, FSDP2, DDP and
plain modules alike. Loading gives each rank its shard, for any number of processes (a
resume with another world size re-shards the state), and also loads such a checkpoint into
an unsharded model. ``train.sharded_checkpoint`` saves the shards instead
(:mod:`hooktrain.checkpoint.dcp`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch import nn

#: ``train_state.json``'s ``optimizer_state`` for an ``optimizer.bin`` keyed by parameter name.
BY_NAME = "by_name"
# Names FSDP1 and activation checkpointing add to the module path of a parameter.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether ``accelerator`` shards the model (FSDP1 or FSDP2)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


@contextmanager
def without_model_and_optimizer(accelerator: Accelerator) -> Iterator[None]:
    """Accelerate's ``save_state``/``load_state`` for everything but the model and optimizer
    (scheduler, scaler, RNG states), which hooktrain writes whole itself. Accelerate has no
    option for it, so its lists of prepared models and optimizers are emptied meanwhile."""
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


def full_state_dict(model: nn.Module, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole, plain state dict of a prepared ``model`` (every rank calls it: under FSDP it is
    a collective). On rank 0 only (CPU tensors), or on every rank with ``everywhere``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    return get_model_state_dict(model, options=options)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole, plain state dict into a prepared ``model`` (every rank calls it with the same
    ``state``; each keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter name, on rank 0 at least (every rank calls
    it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Offloading tensors that already are on the CPU makes torch's FSDP1 gather write exp_avg_sq
    # over exp_avg (torch 2.14), so CPU runs gather in place, on every rank.
    on_gpu = any(p.is_cuda for p in model.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu)
    return get_optimizer_state_dict(model, _plain(optimizer), options=options)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load :func:`full_optimizer_state`'s dict into this rank's shard of the optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, _plain(optimizer), optim_state_dict=state, options=options)


def _plain(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it


def optimizer_state_by_name(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, Any]:
    """``torch.optim.Optimizer.state_dict()``'s ``state`` (parameters numbered in the order of
    the optimizer's groups, as a DDP checkpoint's ``optimizer.bin`` holds it) keyed by the
    parameters' names in ``model`` instead, as :func:`load_full_optimizer_state` takes it."""
    names = {id(p): _canonical(name) for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in _plain(optimizer).param_groups for p in group["params"]]
    return {
        "state": {ordered[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [ordered[i] for i in group["params"]]} for group in state["param_groups"]],
    }


def _canonical(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name
