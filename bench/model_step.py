"""Training-step time of hooktrain's SegFormer-B0-like segmentor (the NVlabs ``segformer_mlp``
head) against the same model in plain PyTorch.

Both models (timm ``pvt_v2_b0`` encoder + all-MLP head, 150 classes) run forward, backward and an
AdamW step on the same random batch. Time: both models are built, each gets the same
``--warmup`` steps, then ``--steps`` rounds of one step each, the side that goes first
alternating every round (hooktrain, plain; then plain, hooktrain; ...); the median step times
are compared. On CUDA each step is timed between two ``torch.cuda.synchronize()`` calls. A ratio
(hooktrain / plain) near 1.0 means the segmentor adds no overhead.

Peak memory (CUDA only): afterwards each side alone is built, warmed up and stepped with the
other side freed (``del``, ``gc.collect()``, ``torch.cuda.empty_cache()``), between
``torch.cuda.reset_peak_memory_stats()`` and ``torch.cuda.max_memory_allocated()``. On the CPU
no peak is reported: the allocator keeps freed memory, so a process-wide RSS peak cannot tell
the two sides apart.

    python bench/model_step.py                 # CPU, 512x512, batch 2, fp32 and bf16 autocast
    python bench/model_step.py --quick         # a smoke run: 2 steps at 64x64, fp32
    python bench/model_step.py --device cuda   # also images/s and peak memory

On a CPU without native bf16 (no AVX512-BF16/AMX), bf16 autocast is emulated and many times
slower than fp32; ``--precision bf16 --size 128`` keeps that measurement short.

Results go to bench/results/model_step.json (``bench/results.py``); the last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
import torch.nn.functional as F
from results import write_result
from torch import nn

from hooktrain.engine.step import total_loss
from hooktrain.models import ModelConfig, build_segmentor

NUM_CLASSES = 150
ENCODER = "pvt_v2_b0"
SIDES = ("hooktrain", "plain")


class PlainMLPHead(nn.Module):
    """SegFormer's all-MLP decoder as the original code writes it: nn.Linear on flattened tokens."""

    def __init__(self, in_channels: list[int], channels: int = 256, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(c, channels) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(len(in_channels) * channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        projected = []
        for linear, x in zip(self.linears, features):
            b, _, h, w = x.shape
            x = linear(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
            projected.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return self.classifier(self.dropout(self.fuse(torch.cat(projected, dim=1))))


class PlainSegformer(nn.Module):
    """The baseline: timm encoder, hand-written head, F.cross_entropy on upsampled logits."""

    def __init__(self):
        super().__init__()
        self.encoder = timm.create_model(ENCODER, features_only=True, drop_path_rate=0.1)
        self.head = PlainMLPHead(self.encoder.feature_info.channels())

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(image))
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), mask, ignore_index=255)


def hooktrain_model() -> nn.Module:
    cfg = ModelConfig.model_validate(
        {
            "encoder": {"name": ENCODER, "drop_path_rate": 0.1},
            "decode_head": {"type": "segformer_mlp", "channels": 256, "dropout": 0.1},
        }
    )
    return build_segmentor(cfg, num_classes=NUM_CLASSES)


def hooktrain_loss(model: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return total_loss(model(image, mask))


def plain_loss(model: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(image, mask)


BUILDERS = {"hooktrain": (hooktrain_model, hooktrain_loss), "plain": (PlainSegformer, plain_loss)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image = torch.randn(args.batch, 3, args.size, args.size, device=device)
    mask = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size), device=device)
    mask[:, : args.size // 8] = 255
    return image, mask


def build(name: str, device: torch.device):
    """One side: its model (seeded the same for both), AdamW optimizer and loss function."""
    make_model, loss_fn = BUILDERS[name]
    torch.manual_seed(0)
    model = make_model().to(device).train()
    return model, torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01), loss_fn


def step(side, image: torch.Tensor, mask: torch.Tensor, bf16: bool) -> float:
    """One forward, backward and AdamW step; seconds, with the device synchronised at both ends."""
    model, optimizer, loss_fn = side
    sync(image.device)
    start = time.perf_counter()
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(model, image, mask)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(image.device)
    return time.perf_counter() - start


def step_times(args: argparse.Namespace, device: torch.device, bf16: bool) -> dict[str, float]:
    """Median step time of each side: equal warm-up, then rounds alternating who goes first."""
    image, mask = make_batch(args, device)
    sides = {name: build(name, device) for name in SIDES}
    for _ in range(args.warmup):
        for name in SIDES:
            step(sides[name], image, mask, bf16)
    times = {name: [] for name in SIDES}
    for index in range(args.steps):
        for name in SIDES if index % 2 == 0 else SIDES[::-1]:
            times[name].append(step(sides[name], image, mask, bf16))
    return {name: statistics.median(t) for name, t in times.items()}


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def peak_memory_mib(name: str, args: argparse.Namespace, device: torch.device, bf16: bool) -> float:
    """``torch.cuda.max_memory_allocated`` over building one side and its warm-up and timed
    steps, with nothing else of this bench resident but the batch."""
    image, mask = make_batch(args, device)
    free_cuda()
    torch.cuda.reset_peak_memory_stats()
    side = build(name, device)
    for _ in range(args.warmup + args.steps):
        step(side, image, mask, bf16)
    sync(device)
    peak = torch.cuda.max_memory_allocated()
    del side
    free_cuda()
    return round(peak / 2**20, 1)


def measure(args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    """Step times (both sides resident, interleaved), then on CUDA each side's peak alone."""
    bf16 = precision == "bf16"
    result = {"step_s": step_times(args, device, bf16)}
    if device.type == "cuda":
        free_cuda()
        result["peak_mib"] = {name: peak_memory_mib(name, args, device, bf16) for name in SIDES}
    return result


def report(precision: str, result: dict, batch: int) -> dict:
    """Print one line for ``precision``; its summary entries."""
    times = result["step_s"]
    ratio = times["hooktrain"] / times["plain"]
    line = (f"  {precision}: hooktrain {times['hooktrain']:.4f} s/step, plain {times['plain']:.4f} s/step, "
            f"ratio {ratio:.3f}")  # fmt: skip
    entry = {"ratio": round(ratio, 4), "step_s": {name: round(t, 4) for name, t in times.items()},
             "images_per_s": {name: round(batch / t, 2) for name, t in times.items()}}  # fmt: skip
    if "peak_mib" in result:
        peak = result["peak_mib"]
        line += (f", {entry['images_per_s']['hooktrain']:.1f} images/s, peak {peak['hooktrain']} MiB "
                 f"(plain {peak['plain']} MiB, each measured alone)")  # fmt: skip
        entry["max_memory_allocated_mib"] = peak
    print(line, flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fp32, 2 steps at 64x64, 1 warm-up")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512, 64 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per model (default 2, 1 with --quick)")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16", "both"], default=None,
        help="bf16 = torch.autocast(bfloat16) (default both, fp32 with --quick)",
    )  # fmt: skip
    args = parser.parse_args()
    args.size = args.size or (64 if args.quick else 512)
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.precision = args.precision or ("fp32" if args.quick else "both")
    device = torch.device(args.device)
    params = {name: sum(p.numel() for p in BUILDERS[name][0]().parameters()) for name in SIDES}
    print(f"model_step: {ENCODER} + all-MLP head, {NUM_CLASSES} classes, {args.size}x{args.size}, batch {args.batch}")
    print(f"  device {device}, threads {torch.get_num_threads()}, median of {args.steps} interleaved steps "
          f"(first side alternating) after {args.warmup} warm-up each")  # fmt: skip
    print(f"  parameters: hooktrain {params['hooktrain']:,}, plain {params['plain']:,}")
    if device.type != "cuda":
        print("  peak memory: measured on CUDA only")
    summary = {"quick": args.quick, "device": device.type, "size": args.size, "batch": args.batch,
               "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
               "parameters": params}  # fmt: skip
    for precision in ("fp32", "bf16") if args.precision == "both" else (args.precision,):
        summary[precision] = report(precision, measure(args, device, precision), args.batch)
    print(f"results: {write_result('model_step', summary)}")
    print(json.dumps({"bench": "model_step", **summary}))


if __name__ == "__main__":
    main()
