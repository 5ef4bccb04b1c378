"""The optimizer step the runner takes: gradient accumulation and clipping change the update
exactly as they should (in-process runners over a model without batch statistics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICKSTART

from hooktrain.engine.runner import IterRunner, make_accelerator
from hooktrain.recipe.schema import load_recipe

NUM_CLASSES = 3
LR = 0.5


class PixelClassifier(torch.nn.Module):
    """Two convolutions and a cross-entropy: no batch statistics, so a batch of 8 and two
    micro-batches of 4 must give the same gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, NUM_CLASSES, 1)
        )

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss_ce": F.cross_entropy(self.body(image), mask)}


def examples(count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, 12, 12, generator=gen), torch.randint(0, NUM_CLASSES, (count, 12, 12), generator=gen)


def one_step(micro_batch: int, accumulate: int, clip: float | None = None) -> tuple[dict, dict, float]:
    """Weights before and after one runner iteration over the 8 examples, and its grad norm."""
    options = [f"train.grad_accum_steps={accumulate}", "train.max_iters=1"]
    if clip is not None:
        options.append(f"train.clip_grad_norm={clip}")
    recipe = load_recipe(QUICKSTART, options)
    accelerator = make_accelerator(recipe.train)
    model = PixelClassifier()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    images, masks = examples()
    stream = iter(
        [{"image": images[i : i + micro_batch], "mask": masks[i : i + micro_batch]} for i in range(0, 8, micro_batch)]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runner = IterRunner(recipe=recipe, accelerator=accelerator, model=model, optimizer=optimizer,
                        scheduler=scheduler, train_stream=stream, hooks=[], work_dir="unused")  # fmt: skip
    try:
        outputs = runner.train_step()
    finally:
        runner.watch.close()
    after = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return before, after, float(outputs["grad_norm"])


def test_two_micro_batches_of_4_update_the_weights_as_one_batch_of_8():
    start, whole, whole_norm = one_step(micro_batch=8, accumulate=1)
    _, accumulated, accumulated_norm = one_step(micro_batch=4, accumulate=2)
    _, first_half_only, _ = one_step(micro_batch=4, accumulate=1)
    assert accumulated_norm == pytest.approx(whole_norm, rel=1e-5)
    for key in start:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-5, atol=1e-6)
    # The test can fail: one micro-batch of 4 alone moves the weights elsewhere.
    assert any(not torch.allclose(first_half_only[k], whole[k], rtol=1e-3, atol=1e-5) for k in start)


def test_clipping_bounds_the_accumulated_update():
    start, clipped, norm = one_step(micro_batch=4, accumulate=2, clip=0.05)
    step = torch.cat([(clipped[k] - start[k]).flatten() for k in start])
    assert norm > 0.05  # the gradient was above the bound: clipping had work to do
    assert step.norm().item() / LR == pytest.approx(0.05, rel=1e-4)  # SGD: update = lr x clipped grad
