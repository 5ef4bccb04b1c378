"""``train.strategy``: DDP, or FSDP1/FSDP2 through Accelerate, on GPUs and on CPU processes.

FSDP shards the parameters, gradients and optimizer state across the processes. hooktrain
wraps every encoder block (a ViT's transformer blocks, a ConvNeXt's, a Swin's, a ResNet's
bottlenecks) and each head as its own unit, so only one unit's parameters are whole at a time.

What stays the same whatever the strategy:

- a checkpoint's ``model.safetensors`` is the whole, plain state dict (gathered with torch's
  ``get_model_state_dict``), and ``optimizer.bin`` the whole optimizer state keyed by
  parameter name (``get_optimizer_state_dict``), so a resume re-shards it for any number of
  processes, and ``test``, ``export``, ``predict`` and ``load_from`` read the weights unchanged
  (unless ``train.sharded_checkpoint`` has each rank save its shard: :mod:`hooktrain.checkpoint.dcp`);
- evaluation runs on a plain replica holding the gathered weights, so ranks with different
  numbers of images never wait on each other inside a forward;
- BatchNorm statistics are rank 0's, sent to every rank before each forward as DDP does.

Accelerate turns FSDP on only for GPU processes (on CPU it picks ``MULTI_CPU`` before it
looks at the FSDP plugin). torch's FSDP1 and FSDP2 run on CPU with gloo, so hooktrain sets
the distributed type itself there; that is how the tests exercise FSDP on CPU processes.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

from hooktrain.checkpoint.sharded import full_state_dict

logger = logging.getLogger("hooktrain")

FSDP_VERSIONS = {"fsdp": 1, "fsdp2": 2}


def fsdp_plugin(strategy: str) -> FullyShardedDataParallelPlugin | None:
    """Accelerate's FSDP plugin for ``train.strategy``; for ``ddp``, the one Accelerate's own
    flags ask for (``accelerate launch --use_fsdp``, an FSDP config file), else ``None``.

    hooktrain's plugin gathers whole state dicts (see :func:`full_state_dict`); FSDP1 keeps
    the original parameters so the optimizer's parameter groups (``lr_mult``, layer decay)
    survive; no loading on rank 0 only and no broadcast of the initial weights (every rank
    builds the same model from the same seed).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    if strategy not in FSDP_VERSIONS:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            return FullyShardedDataParallelPlugin()  # read from Accelerate's FSDP_* variables
        return None
    return FullyShardedDataParallelPlugin(
        fsdp_version=FSDP_VERSIONS[strategy],
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[],  # set from the model by `prepare_for_fsdp`
        state_dict_type="FULL_STATE_DICT",
        use_orig_params=True if strategy == "fsdp" else None,
        cpu_ram_efficient_loading=False,
        sync_module_states=False,
    )


@contextmanager
def without_fsdp_flags() -> Iterator[None]:
    """Accelerate's FSDP flags ignored while an Accelerator is made (inference needs the whole
    model on every rank)."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def enable_fsdp(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin, *, ours: bool) -> None:
    """Finish the FSDP set-up once ``accelerator`` exists. With hooktrain's own plugin (``ours``),
    the weights, all-gathers and gradient reductions stay fp32 and ``train.mixed_precision``
    comes from Accelerate's autocast alone, exactly as under DDP (FSDP's own bf16 weight casting
    would also give BatchNorm bf16 weights next to fp32 statistics, which CPU kernels refuse).
    On multi-process CPU (gloo) switch Accelerate to FSDP, as it does for GPU processes."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if ours:
        plugin.mixed_precision_policy = None
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    for state in (PartialState, AcceleratorState):
        state._shared_state["distributed_type"] = DistributedType.FSDP
        state._shared_state["device"] = torch.device("cpu")  # FSDP1 refuses "cpu:0" for CPU modules
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def wrapped_classes(model: nn.Module) -> list[str]:
    """The class names FSDP wraps as units: the encoder's blocks (modules with children of their
    own held in an ``nn.Sequential`` or ``nn.ModuleList``) and the classes of the segmentor's
    other top-level parts (decode and auxiliary heads, necks, pixel decoders)."""
    containers = (nn.Sequential, nn.ModuleList)
    encoder = getattr(model, "encoder", None)
    names: set[str] = set()
    if encoder is not None:
        for container in encoder.modules():
            if isinstance(container, containers):
                names.update(type(m).__name__ for m in container.children()
                             if next(m.children(), None) is not None and not isinstance(m, containers))  # fmt: skip
    for name, child in model.named_children():
        if child is not encoder and any(p.requires_grad for p in child.parameters()):
            if not isinstance(child, containers):
                names.add(type(child).__name__)
    return sorted(names)


def prepare_for_fsdp(accelerator: Accelerator, model: nn.Module) -> None:
    """Before ``accelerator.prepare``: choose the units to wrap (:func:`wrapped_classes`) and keep
    the parameters contiguous (FSDP2 shards by rows and refuses ``channels_last`` weights)."""
    plugin = accelerator.state.fsdp_plugin
    if not plugin.transformer_cls_names_to_wrap:  # Accelerate's own flags may name classes
        plugin.transformer_cls_names_to_wrap = wrapped_classes(model)
    with torch.no_grad():
        for param in model.parameters():
            if not param.is_contiguous():
                param.data = param.data.contiguous()
    logger.info("FSDP%d wraps %s", plugin.fsdp_version, ", ".join(plugin.transformer_cls_names_to_wrap))


def share_batch_norm_stats(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics, the ones a checkpoint saves (every rank
    calls it). Each rank's own forward passes update its own copy."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)


def broadcast_batch_norm_stats(model: nn.Module) -> None:
    """:func:`share_batch_norm_stats` before each training forward of ``model``, as DDP's
    ``broadcast_buffers`` does (FSDP leaves each rank its own)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return

    def send(module: nn.Module, args: Any) -> None:
        if module.training:
            share_batch_norm_stats(module)

    model.register_forward_pre_hook(send)


class InferenceReplica:
    """A plain copy of the model for inference under FSDP: kept on the meta device (no memory)
    between evaluations, filled with the gathered weights for one (:meth:`fill`)."""

    def __init__(self, model: nn.Module) -> None:
        """``model``: the plain model, before ``accelerator.prepare`` shards it."""
        persistent = set(model.state_dict())
        # Buffers outside the state dict (Swin's relative position index, RoPE tables) are not
        # in the gathered weights: keep them.
        self._kept = {name: b.detach().clone() for name, b in model.named_buffers() if name not in persistent}
        self._module = copy.deepcopy(model).to("meta")

    def fill(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The replica with the prepared ``model``'s whole weights (a collective: every rank calls
        it), on ``device``."""
        state = full_state_dict(model, everywhere=True)
        replica = self._module.to_empty(device=device)
        replica.load_state_dict(state, strict=True)
        with torch.no_grad():
            for name, value in self._kept.items():
                replica.get_buffer(name).copy_(value)
        return replica

    def release(self) -> None:
        """Free the weights until the next :meth:`fill`."""
        self._module.to("meta")
