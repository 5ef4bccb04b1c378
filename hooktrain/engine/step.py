"""One optimizer step, the same for the runner, ``hooktrain benchmark`` and the benches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import Accelerator

from hooktrain.models.input_stage import InputStage


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss to backpropagate: the sum of the terms whose name contains ``"loss"``
    (MMSegmentation's ``parse_losses`` rule); other terms, such as accuracies, are only logged."""
    return sum(value for key, value in terms.items() if "loss" in key)


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, Any]],
    *,
    clip_grad_norm: float | None = None,
    accept: Callable[[dict[str, torch.Tensor], torch.Tensor], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step over ``accelerator.gradient_accumulation_steps`` micro-batches.

    Each batch goes through the model's input stage (``Segmentor.input_stage``: onto the
    device, with ``gpu_augment``'s distortion and normalisation), then forward with its mask
    and backward inside ``accelerator.accumulate``. The gradient norm is clipped to
    ``clip_grad_norm`` (``None``: only measured); the optimizer steps unless
    ``accept(terms, grad_norm)`` returns False; the gradients are zeroed either way.

    Returns the detached loss terms averaged over the micro-batches (``"loss"`` is their
    total) and the gradient norm. ``model`` and ``optimizer`` are prepared by ``accelerator``.
    """
    input_stage = getattr(accelerator.unwrap_model(model), "input_stage", None) or InputStage()
    micro_batches = accelerator.gradient_accumulation_steps
    totals: dict[str, torch.Tensor] = {}
    for batch in batches:
        image, mask = input_stage(batch, accelerator.device)
        with accelerator.accumulate(model):
            # Accelerate autocasts a prepared model's forward itself, except under FSDP2.
            with accelerator.autocast():
                terms = model(image, mask)
            loss = total_loss(terms)
            accelerator.backward(loss)
        for key, value in {"loss": loss, **terms}.items():
            totals[key] = totals.get(key, 0) + value.detach() / micro_batches
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 gives a DTensor
        grad_norm = grad_norm.full_tensor()
    if accept is None or accept(totals, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm
