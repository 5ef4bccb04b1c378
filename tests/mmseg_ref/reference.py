"""MMSegmentation 1.2.2's side of the comparisons: run INSIDE its environment (``MmsegEnv.run``).

    reference.py build CONFIG --out DIR [--seed N] [--sizes 97x131,128x160] [--num-classes K]
    reference.py bench CONFIG [--mode train|whole|slide] [--size HxW] [--batch B] [--iters N]
                       [--warmup W] [--crop C] [--device cpu|cuda] [--bf16]

CONFIG is a config shipped in the mmseg wheel (``mmseg/.mim/configs/*/CONFIG.py``, for example
``segformer_mit-b0_8xb2-160k_ade20k-512x512``) or a path to a config file. The model is built by
MMSegmentation itself, with SyncBN replaced by BN and no pretrained weights (nothing is
downloaded).

``build`` randomises every parameter and BN statistic (seeded; scaled so that activations stay
O(1) through ResNet-50) and writes, into DIR:

- ``checkpoint.pth``: ``{"meta": {...}, "state_dict": ...}``, the model zoo's format (aux head included);
- ``backbone.pth``: ``{"state_dict": backbone's}``, the format of the pretrain files (mit_b0.pth, resnet50_v1c);
- ``logits.pt``: ``{"HxW": {"input": (1, 3, H, W) N(0, 1), "logits": encode_decode's (1, K, H, W) float32}}``;
- ``backbone_features.pt``: the backbone's outputs (a list of tensors) for the first size's input;
- ``info.json``: parameter counts, the heads' settings, test/train/optimizer/scheduler/data settings
  and the whole resolved config, for recipe authors.

``bench`` times the training step (``model.loss`` forward, backward, AdamW) on random inputs and
labels, or inference (``model.inference``, whole or slide), and prints one line of JSON last:
``{"config", "mode", "seconds_per_iter", "images_per_s", ...}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import mmengine
import mmseg
import torch
from mmengine import Config, ConfigDict
from mmengine.structures import PixelData
from mmseg.registry import DATASETS, MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules

CONFIGS = Path(mmseg.__file__).parent / ".mim" / "configs"


# --------------------------------------------------------------------------- building


def config_path(name: str) -> Path:
    """CONFIG's file: a path, or a config name looked up in the wheel's configs."""
    if name.endswith(".py") and Path(name).is_file():
        return Path(name)
    found = sorted(CONFIGS.glob(f"*/{name}.py"))
    if not found:
        raise SystemExit(f"no config {name!r} under {CONFIGS}/*/")
    return found[0]


def plain_batch_norm(node):
    """SyncBN (and MMSyncBN) -> BN, everywhere in a config (one process, maybe CPU)."""
    if isinstance(node, dict):
        if node.get("type") in ("SyncBN", "MMSyncBN"):
            node["type"] = "BN"
        for value in node.values():
            plain_batch_norm(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            plain_batch_norm(value)
    return node


def heads(model_cfg: dict) -> list[dict]:
    aux = model_cfg.get("auxiliary_head")
    aux = [] if aux is None else aux if isinstance(aux, list) else [aux]
    return [model_cfg["decode_head"], *aux]


def model_config(cfg: Config, num_classes: int | None = None) -> dict:
    """The resolved ``cfg.model`` as a plain dict, ready for MODELS.build on one CPU process."""
    model_cfg = plain_batch_norm(copy.deepcopy(cfg.to_dict()["model"]))
    model_cfg["pretrained"] = None
    model_cfg["backbone"]["init_cfg"] = None
    if "pretrained" in model_cfg["backbone"]:
        model_cfg["backbone"]["pretrained"] = None
    if num_classes is not None:
        for head in heads(model_cfg):
            head["num_classes"] = num_classes
    return model_cfg


def build_model(name: str, num_classes: int | None = None):
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config_path(name))
    model_cfg = model_config(cfg, num_classes)
    return MODELS.build(model_cfg), cfg, model_cfg


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Every parameter and BN statistic random, from the global torch seed, in a fixed order:
    weights (ndim > 1) ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm weights ~ U(0.5, 1.5), BN
    running_mean ~ N(0, 0.1) and running_var ~ U(0.5, 1.5); position embeddings ~ N(0, 0.25).
    Activations stay O(1) through ResNet-50 (eval-mode BN does not renormalise) and no BN is the
    identity."""
    for name, param in model.named_parameters():
        if name.endswith("pos_embed"):  # O(1), so that resizing it differently shows in the logits
            param.normal_(0, 0.5)
        elif param.ndim > 1:
            param.normal_(0, param[0].numel() ** -0.5)
        elif name.endswith("bias"):
            param.normal_(0, 0.1)
        else:
            param.uniform_(0.5, 1.5)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise SystemExit(f"--sizes/--size wants HxW[,HxW...], got {text!r}")
    return sizes


def metas(h: int, w: int, batch: int = 1) -> list[dict]:
    return [{"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w)} for _ in range(batch)]


def stats(t: torch.Tensor) -> dict:
    t = t.float()
    return {"shape": list(t.shape), "mean": t.mean().item(), "std": t.std().item(), "min": t.min().item(),
            "max": t.max().item(), "spatial_std": t.std(dim=(2, 3)).mean().item() if t.ndim == 4 else None}  # fmt: skip


def dataset_meta(cfg: Config, num_classes: int) -> dict:
    """The training dataset's classes and palette (as zoo checkpoints carry them), if they fit."""
    try:
        dataset = cfg.train_dataloader.dataset
        dataset = dataset.get("dataset", dataset)  # RepeatDataset & co.
        meta = DATASETS.get(dataset.type).METAINFO
        classes, palette = list(meta["classes"]), [list(map(int, p)) for p in meta["palette"]]
    except Exception:  # noqa: BLE001 (a config without a registered dataset: no classes)
        return {}
    return {"classes": classes, "palette": palette} if len(classes) == num_classes else {}


def select(cfg: dict, *keys: str):
    for key in keys:
        if not isinstance(cfg, dict) or key not in cfg:
            return None
        cfg = cfg[key]
    return cfg


def summary(cfg: Config, model_cfg: dict) -> dict:
    """What a recipe author needs, from the resolved config (with SyncBN -> BN applied)."""
    full = plain_batch_norm(cfg.to_dict())

    def head_summary(head: dict) -> dict:
        losses = head.get("loss_decode")
        losses = losses if isinstance(losses, list) else [losses]
        return {
            "type": head["type"],
            "in_index": head.get("in_index"),
            "in_channels": head.get("in_channels"),
            "channels": head.get("channels"),
            "num_classes": head.get("num_classes"),
            "align_corners": head.get("align_corners", False),
            "dropout_ratio": head.get("dropout_ratio", 0.1),
            "losses": [
                {
                    "type": loss.get("type"),
                    "loss_weight": loss.get("loss_weight", 1.0),
                    "avg_non_ignore": loss.get("avg_non_ignore", False),
                    "use_sigmoid": loss.get("use_sigmoid"),
                    "class_weight": loss.get("class_weight"),
                }
                for loss in losses
                if loss
            ],
            "ignore_index": head.get("ignore_index", 255),
            "cfg": head,
        }

    aux = model_cfg.get("auxiliary_head")
    train_loader = full.get("train_dataloader") or {}
    train_dataset = train_loader.get("dataset") or {}
    return {
        "segmentor": model_cfg["type"],
        "backbone": model_cfg["backbone"],
        "neck": model_cfg.get("neck"),
        "decode_head": head_summary(model_cfg["decode_head"]),
        "auxiliary_head": None if aux is None else [head_summary(h) for h in (aux if isinstance(aux, list) else [aux])],
        "align_corners": model_cfg["decode_head"].get("align_corners", False),
        "test_cfg": model_cfg.get("test_cfg"),
        "model_train_cfg": model_cfg.get("train_cfg"),
        "data_preprocessor": model_cfg.get("data_preprocessor"),
        "crop_size": full.get("crop_size"),
        "optim_wrapper": full.get("optim_wrapper"),
        "optimizer": select(full, "optim_wrapper", "optimizer"),
        "param_scheduler": full.get("param_scheduler"),
        "train_cfg": full.get("train_cfg"),  # the loop: type, max_iters, val_interval
        "max_iters": select(full, "train_cfg", "max_iters"),
        "val_interval": select(full, "train_cfg", "val_interval"),
        "train_batch_size": train_loader.get("batch_size"),
        "train_dataset": {k: v for k, v in train_dataset.items() if k != "pipeline"},
        "train_pipeline": train_dataset.get("pipeline", full.get("train_pipeline")),
        "test_pipeline": select(full, "test_dataloader", "dataset", "pipeline") or full.get("test_pipeline"),
        "val_evaluator": full.get("val_evaluator"),
        "default_hooks": full.get("default_hooks"),
        "config": full,
    }


def build(args) -> None:
    started = time.perf_counter()
    timings = {}

    def lap(phase: str) -> None:
        timings[phase] = round(time.perf_counter() - started - sum(timings.values()), 2)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = parse_sizes(args.sizes)
    torch.manual_seed(args.seed)
    model, cfg, model_cfg = build_model(args.config, args.num_classes)
    randomise(model)
    model.eval()
    num_classes = model.decode_head.num_classes
    lap("build_model")

    state_dict = model.state_dict()
    meta = {
        "mmseg_version": mmseg.__version__,
        "mmengine_version": mmengine.__version__,
        "config": cfg.pretty_text,
        "seed": args.seed,
        "iter": 0,
        "hooktrain_reference": {"config_name": args.config, "randomised": True, "num_classes": num_classes},
    }
    classes = dataset_meta(cfg, num_classes)
    if classes:
        meta.update(dataset_meta=classes, CLASSES=tuple(classes["classes"]), PALETTE=classes["palette"])
    torch.save({"meta": meta, "state_dict": state_dict}, out / "checkpoint.pth")
    torch.save({"state_dict": model.backbone.state_dict()}, out / "backbone.pth")
    lap("save_checkpoints")

    cases, case_stats = {}, {}
    for index, (h, w) in enumerate(sizes):
        gen = torch.Generator().manual_seed(args.seed * 1000 + index)
        image = torch.randn(1, 3, h, w, generator=gen)
        with torch.no_grad():
            logits = model.encode_decode(image, metas(h, w)).float().contiguous()
        if logits.shape != (1, num_classes, h, w):
            raise SystemExit(f"{h}x{w}: encode_decode gave {tuple(logits.shape)}")
        case_stats[f"{h}x{w}"] = stats(logits)
        if not torch.isfinite(logits).all():
            raise SystemExit(f"{h}x{w}: logits are not finite")
        if case_stats[f"{h}x{w}"]["std"] <= 1e-3 or case_stats[f"{h}x{w}"]["spatial_std"] <= 1e-3:
            raise SystemExit(f"{h}x{w}: degenerate logits {case_stats[f'{h}x{w}']}")
        cases[f"{h}x{w}"] = {"input": image, "logits": logits}
    torch.save(cases, out / "logits.pt")
    lap("encode_decode")

    first = next(iter(cases.values()))["input"]
    with torch.no_grad():
        features = [f.float().contiguous() for f in model.backbone(first)]
    torch.save(features, out / "backbone_features.pt")
    lap("backbone_features")

    def count(module) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    path = config_path(args.config)
    info = {
        "config_name": args.config,
        "config_file": str(path.relative_to(CONFIGS) if CONFIGS in path.parents else path),
        "mmseg_version": mmseg.__version__,
        "mmengine_version": mmengine.__version__,
        "torch_version": torch.__version__,
        "seed": args.seed,
        "num_classes": num_classes,
        "num_params": count(model),
        "num_params_by_part": {
            "backbone": count(model.backbone),
            "neck": count(getattr(model, "neck", None)),
            "decode_head": count(model.decode_head),
            "auxiliary_head": count(getattr(model, "auxiliary_head", None)),
        },
        "num_state_dict_tensors": len(state_dict),
        "sizes": list(cases),
        "logits": case_stats,
        "backbone_features": [stats(f) for f in features],
        **summary(cfg, model_cfg),
        "build_seconds": round(time.perf_counter() - started, 2),
        "timings": timings,  # seconds; build_model includes mmseg's imports (register_all_modules)
    }
    (out / "info.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    print(json.dumps({"config": args.config, "out": str(out), "num_params": info["num_params"],
                      "build_seconds": info["build_seconds"], "timings": timings, "logits": case_stats}))  # fmt: skip


# --------------------------------------------------------------------------- timing


def bench(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build_model(args.config, args.num_classes)[0]
    model.to(device)
    num_classes = model.decode_head.num_classes
    (h, w), batch = parse_sizes(args.size)[0], args.batch
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, h, w, generator=gen).to(device)
    if args.mode == "train":
        model.train()
        samples = []
        for _ in range(batch):
            sample = SegDataSample(metainfo=metas(h, w)[0])
            sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, h, w), generator=gen).to(device))
            samples.append(sample)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                losses = model.loss(image, samples)
            loss = sum(v for k, v in losses.items() if "loss" in k)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:
        model.eval()
        crop = parse_sizes(args.crop)[0] if "x" in args.crop else (int(args.crop), int(args.crop))
        model.test_cfg = ConfigDict(mode=args.mode, crop_size=crop, stride=(crop[0] * 2 // 3, crop[1] * 2 // 3))

        def step() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                model.inference(image, metas(h, w, batch))  # fresh metas: slide inference edits them

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({
        "config": args.config, "mode": args.mode, "seconds_per_iter": seconds, "images_per_s": batch / seconds,
        "size": [h, w], "batch": batch, "iters": args.iters, "warmup": args.warmup, "times": times,
        "device": str(device), "bf16": args.bf16, "threads": torch.get_num_threads(),
        "test_cfg": None if args.mode == "train" else dict(model.test_cfg),
    }, default=str))  # fmt: skip


def build_all(args) -> None:
    """``build`` for several configs in one process (start-up is paid once), into OUT/<config>,
    each with its position in the list as seed."""
    for seed, name in enumerate(args.configs.split(",")):
        build(argparse.Namespace(config=name, out=str(Path(args.out) / name), seed=seed, sizes=args.sizes,
                                 num_classes=None))  # fmt: skip


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="random-weight model, zoo checkpoint, logits and info.json")
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default="97x131,128x160", help="HxW[,HxW...]")
    p.add_argument("--num-classes", type=int, default=None, help="default: the config's")
    p = sub.add_parser("build-all", help="build for each of several configs, in one process")
    p.add_argument("configs", help="comma-separated config names")
    p.add_argument("--out", required=True, help="one subdirectory per config")
    p.add_argument("--sizes", default="97x131,128x160", help="HxW[,HxW...]")
    p = sub.add_parser("bench", help="time a training step or inference; prints one JSON line")
    p.add_argument("config")
    p.add_argument("--mode", choices=["train", "whole", "slide"], default="train")
    p.add_argument("--size", default="512x512", help="HxW of the input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--crop", default="512", help="slide/whole test_cfg crop (C or HxW); stride = 2/3 of it")
    p.add_argument("--num-classes", type=int, default=None, help="default: the config's")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    args = parser.parse_args(argv)
    {"build": build, "build-all": build_all, "bench": bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
