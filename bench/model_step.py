"""Training-step time of hooktrain's SegFormer-B0-like segmentor (the NVlabs ``segformer_mlp``
head) against the same model in plain PyTorch.

Both models (timm ``pvt_v2_b0`` encoder + all-MLP head, 150 classes) run forward, backward and an
AdamW step on the same random batch, interleaved in one process; the median step times are
compared. A ratio (hooktrain / plain) near 1.0 means the segmentor adds no overhead.

    python bench/model_step.py                 # CPU, 512x512, batch 2, fp32 and bf16 autocast
    python bench/model_step.py --quick         # fewer steps at 256x256
    python bench/model_step.py --device cuda   # also images/s and peak memory

On a CPU without native bf16 (no AVX512-BF16/AMX), bf16 autocast is emulated and many times
slower than fp32; ``--precision bf16 --size 128`` keeps that measurement short.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.models import ModelConfig, build_segmentor

NUM_CLASSES = 150
ENCODER = "pvt_v2_b0"


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
    return sum(v for k, v in model(image, mask).items() if "loss" in k)


def plain_loss(model: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(image, mask)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace, device: torch.device, bf16: bool) -> dict:
    """Interleaved steps of both models; returns median step times (and GPU stats)."""
    torch.manual_seed(0)
    image = torch.randn(args.batch, 3, args.size, args.size, device=device)
    mask = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size), device=device)
    mask[:, : args.size // 8] = 255
    contenders = {}
    for name, model, loss_fn in (
        ("hooktrain", hooktrain_model(), hooktrain_loss),
        ("plain", PlainSegformer(), plain_loss),
    ):
        model = model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
        contenders[name] = (model, optimizer, loss_fn)
    times = {name: [] for name in contenders}
    peak = {name: 0 for name in contenders}
    for step in range(args.warmup + args.steps):
        for name, (model, optimizer, loss_fn) in contenders.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model, image, mask)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
    result = {name: statistics.median(t) for name, t in times.items()}
    if device.type == "cuda":
        result["peak_mib"] = {name: round(p / 2**20, 1) for name, p in peak.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="3 steps at 256x256 (a smoke run)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512, 256 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--precision", choices=["fp32", "bf16", "both"], default="both", help="bf16 = torch.autocast(bfloat16)"
    )
    args = parser.parse_args()
    args.size = args.size or (256 if args.quick else 512)
    args.steps = args.steps or (3 if args.quick else 10)
    device = torch.device(args.device)
    params = {
        "hooktrain": sum(p.numel() for p in hooktrain_model().parameters()),
        "plain": sum(p.numel() for p in PlainSegformer().parameters()),
    }
    print(f"model_step: {ENCODER} + all-MLP head, {NUM_CLASSES} classes, {args.size}x{args.size}, batch {args.batch}")
    print(f"  device {device}, threads {torch.get_num_threads()}, {args.steps} timed steps after {args.warmup} warmup")
    print(f"  parameters: hooktrain {params['hooktrain']:,}, plain {params['plain']:,}")
    summary = {"bench": "model_step", "device": device.type}
    for precision in ("fp32", "bf16") if args.precision == "both" else (args.precision,):
        result = run(args, device, bf16=precision == "bf16")
        ratio = result["hooktrain"] / result["plain"]
        line = (
            f"  {precision}: hooktrain {result['hooktrain']:.3f} s/step, plain {result['plain']:.3f} s/step, "
            f"ratio {ratio:.3f}"
        )
        summary[f"{precision}_ratio"] = round(ratio, 4)
        summary[f"{precision}_step_s"] = round(result["hooktrain"], 4)
        summary[f"{precision}_plain_step_s"] = round(result["plain"], 4)
        if device.type == "cuda":
            ips = args.batch / result["hooktrain"]
            peak = result["peak_mib"]
            line += f", {ips:.1f} images/s, peak {peak['hooktrain']} MiB (plain {peak['plain']} MiB)"
            summary[f"{precision}_images_per_s"] = round(ips, 2)
            summary[f"{precision}_plain_images_per_s"] = round(args.batch / result["plain"], 2)
            summary[f"{precision}_max_memory_allocated_mib"] = result["peak_mib"]["hooktrain"]
            summary[f"{precision}_plain_max_memory_allocated_mib"] = result["peak_mib"]["plain"]
        print(line, flush=True)
    summary.update(size=args.size, batch=args.batch, steps=args.steps, threads=torch.get_num_threads())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
