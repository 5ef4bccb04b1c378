"""Run inside the MMSegmentation environment (``MmsegEnv.run``): reference outputs and timings.

    reference.py build CONFIG --out DIR --seed N --sizes 97x131,128x160
    reference.py bench CONFIG --mode train|whole|slide --size HxW --batch B --iters N --warmup W [--crop C] [--bf16]

``build`` makes CONFIG's model (a config shipped in the mmseg wheel; SyncBN becomes BN, nothing
is downloaded) with random weights and BN statistics and writes, into DIR: ``checkpoint.pth``
in the model zoo's format (``meta`` + ``state_dict``), ``backbone.pth`` (the backbone alone, the
format of MMSegmentation's pretrain files), ``logits.pt`` ({"HxW": {"input", "logits"}} from
``encode_decode``), ``backbone_features.pt`` (for the first size) and ``info.json``.
``bench`` times the training step or inference and prints one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mmseg
import torch
from mmengine import Config, ConfigDict
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules

CONFIGS = Path(mmseg.__file__).parent / ".mim" / "configs"


def load_config(name: str) -> Config:
    found = sorted(CONFIGS.glob(f"*/{name}.py"))
    if not found:
        raise SystemExit(f"no config {name} in {CONFIGS}")
    return Config.fromfile(found[0])


def plain_batch_norm(node) -> None:
    """SyncBN -> BN everywhere in a config (one process, CPU)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "norm_cfg" and isinstance(value, dict) and value.get("type") == "SyncBN":
                value["type"] = "BN"
            else:
                plain_batch_norm(value)
    elif isinstance(node, list):
        for value in node:
            plain_batch_norm(value)


def build_model(name: str):
    register_all_modules()
    cfg = load_config(name)
    model_cfg = cfg.model
    plain_batch_norm(model_cfg)
    model_cfg["pretrained"] = None
    model_cfg["backbone"].pop("init_cfg", None)
    return MODELS.build(model_cfg), cfg


def randomise(model: torch.nn.Module) -> None:
    """Random weights that keep activations O(1) through deep ResNets, and non-trivial BN."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                param.normal_(0, param[0].numel() ** -0.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
            else:
                param.uniform_(0.5, 1.5)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def build(args) -> None:
    torch.manual_seed(args.seed)
    model, cfg = build_model(args.config)
    randomise(model)
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"config": args.config, "mmseg_version": mmseg.__version__}, "state_dict": model.state_dict()},
               out / "checkpoint.pth")  # fmt: skip
    torch.save({"state_dict": model.backbone.state_dict()}, out / "backbone.pth")
    cases = {}
    for h, w in sizes(args.sizes):
        image = torch.randn(1, 3, h, w)
        meta = {"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w)}
        with torch.no_grad():
            cases[f"{h}x{w}"] = {"input": image, "logits": model.encode_decode(image, [meta])}
    torch.save(cases, out / "logits.pt")
    first = next(iter(cases.values()))["input"]
    with torch.no_grad():
        torch.save(list(model.backbone(first)), out / "backbone_features.pt")
    info = {
        "config": args.config,
        "num_params": sum(p.numel() for p in model.parameters()),
        "model": cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model),
    }
    (out / "info.json").write_text(json.dumps(info, indent=1, default=str))


def bench(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = build_model(args.config)
    model.to(device)
    h, w = sizes(args.size)[0]
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, h, w, generator=gen).to(device)
    if args.mode == "train":
        model.train()
        samples = []
        for _ in range(args.batch):
            sample = SegDataSample(metainfo={"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w)})
            label = torch.randint(0, 150, (1, h, w), generator=gen).to(device)
            sample.gt_sem_seg = PixelData(data=label)
            samples.append(sample)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                losses = model.loss(image, samples)
            sum(v for k, v in losses.items() if "loss" in k).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()
        model.test_cfg = ConfigDict({"mode": args.mode, "crop_size": (args.crop, args.crop),
                          "stride": (args.crop * 2 // 3, args.crop * 2 // 3)})  # fmt: skip
        metas = [{"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w)}] * args.batch

        def step() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                model.inference(image, metas)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({"config": args.config, "mode": args.mode, "seconds_per_iter": seconds,
                      "images_per_s": args.batch / seconds}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build")
    build_parser.add_argument("config")
    build_parser.add_argument("--out", required=True)
    build_parser.add_argument("--seed", type=int, default=0)
    build_parser.add_argument("--sizes", default="97x131,128x160")
    bench_parser = sub.add_parser("bench")
    bench_parser.add_argument("config")
    bench_parser.add_argument("--mode", choices=["train", "whole", "slide"], default="train")
    bench_parser.add_argument("--size", default="512x512")
    bench_parser.add_argument("--batch", type=int, default=2)
    bench_parser.add_argument("--iters", type=int, default=5)
    bench_parser.add_argument("--warmup", type=int, default=2)
    bench_parser.add_argument("--crop", type=int, default=512)
    bench_parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    {"build": build, "bench": bench}[args.command](args)


if __name__ == "__main__":
    main()
