"""``hooktrain benchmark``: parameters, FLOPs, images/s and peak memory of a recipe's model.

Unlike MMSegmentation's ``get_flops.py`` / ``benchmark.py`` (experimental, they fail on some
models), everything here goes through the model's own code paths, so it works on any model the
recipe schema builds:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one fp32 forward (logits, no loss,
  no auxiliary head) at the training crop, batch 1. It counts a multiply-add as 2 FLOPs, and
  operators without a formula (interpolation, normalisation, activations) as 0.
- Inference: ``Segmentor.predict`` (the recipe's ``model.inference``, ``scales`` left out), once
  with ``mode: whole`` and once with ``mode: slide``, at the val loader's batch size, on images
  the size the val pipeline gives an image shaped like the training crop.
- Train step: the runner's own step (``hooktrain.engine.step.train_step``: forward with a
  mask, ``accelerator.backward``, gradient-norm clipping, optimizer step) at the training crop,
  over ``train.grad_accum_steps`` micro-batches of the per-process batch size (the batch
  column counts the images of the whole step).

Each measurement runs ``warmup`` untimed then ``iters`` timed iterations (``time.perf_counter``,
the device synchronised around them). Inputs are random tensors: the data pipeline is not
measured and the dataset is never read. Weights are random unless ``--checkpoint`` is given
(the encoder's pretrained weights and ``load_from`` are not loaded: they do not change speed).

stdout gets a table, then one JSON line with every figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hooktrain.errors import UserError, first_line

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from hooktrain.models.segmentor_base import SegmentorBase
    from hooktrain.recipe.model import InferenceConfig
    from hooktrain.recipe.schema import Recipe

BENCHMARK_FIX = "benchmark with the recipe the checkpoint was trained with (its recipe.yaml)"
FLOPS_NOTE = "FlopCounterMode: a multiply-add counts as 2 FLOPs; ops without a formula count 0"
INFERENCE_NOTE = (
    "images shaped like the training crop, resized as data.val.pipeline.scale resizes (keep ratio); "
    "predicted at that size (no resize back to an original size); the val batch size"
)
INPUTS_NOTE = "random tensors (the data pipeline is not measured; the dataset is not read)"
MIB = 2**20


@dataclass
class Measurement:
    """One timed measurement, as a row of the table and an entry of the JSON line."""

    name: str  # "inference whole", "inference slide", "train step"
    precision: str  # "fp32", "bf16", "fp16"
    batch: int
    size: tuple[int, int]  # input (height, width)
    detail: str = ""
    images_per_s: float | None = None
    seconds: float | None = None  # the timed iterations together
    peak_memory_mib: float | None = None
    skipped: str | None = None  # why it was not measured


# -- entry point ---------------------------------------------------------------------------


def benchmark(
    recipe_path: str | os.PathLike,
    cfg_options: list[str] | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    iters: int = 10,
    warmup: int = 2,
) -> dict[str, Any]:
    """Measure the recipe's model on the device Accelerate picks; print a table, then the
    report as one JSON line (the last line of stdout). Returns the report."""
    if iters < 1:
        raise UserError(f"--iters {iters}: give at least 1 timed iteration")
    if warmup < 0:
        raise UserError(f"--warmup {warmup}: give 0 or more untimed iterations")
    from hooktrain.checkpoint.weights import read_shapes, weights_file
    from hooktrain.recipe.schema import load_recipe

    recipe = load_recipe(recipe_path, cfg_options)
    if checkpoint is not None:
        read_shapes(weights_file(checkpoint))  # a missing or bad file is refused before the slow imports
    report = run_benchmark(recipe, checkpoint=checkpoint, iters=iters, warmup=warmup)
    report = {"recipe": str(recipe_path), **report}
    print(format_report(report))
    print(json.dumps(report))
    return report


def run_benchmark(
    recipe: Recipe, *, checkpoint: str | os.PathLike | None = None, iters: int = 10, warmup: int = 2
) -> dict[str, Any]:
    """Every figure of the benchmark, as the JSON-ready report."""
    from hooktrain.engine.preflight import preflight

    recipe = speed_recipe(recipe)
    preflight(recipe, checkpoint=checkpoint, fix=BENCHMARK_FIX)  # the checkpoint's shapes, before building
    import torch
    from accelerate.utils import set_seed

    from hooktrain.engine.logs import setup_logging

    accelerator, unavailable = build_accelerator(recipe)
    if accelerator.num_processes > 1:
        raise UserError(
            f"benchmark measures one device but runs in {accelerator.num_processes} processes; "
            "run it with python -m hooktrain (or accelerate launch --num_processes 1)"
        )
    setup_logging(accelerator.is_main_process)
    set_seed(recipe.train.seed)
    device = accelerator.device
    model, weights = build_model(recipe, checkpoint)
    model.to(device)
    crop = tuple(recipe.data.train.pipeline.crop_size)
    total, trainable = count_parameters(model)
    flops = count_flops(model, crop, device, recipe.data.in_channels)
    if recipe.model.compile:
        model.compile_mode = recipe.model.compile_mode
    memory = PeakMemory(device)
    timer = Timer(device, memory, iters=iters, warmup=warmup)
    mixed = recipe.train.mixed_precision
    precisions = ["fp32"] + ([mixed] if mixed != "no" else [])
    size = val_image_size(crop, tuple(recipe.data.val.pipeline.scale))
    measurements = inference_measurements(recipe, model, accelerator, timer, precisions, unavailable, size)
    measurements += train_measurements(recipe, model, accelerator, timer, unavailable)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "precision": mixed,
        "weights": weights,
        "inputs": INPUTS_NOTE,
        "seed": recipe.train.seed,
        "params": {"total": total, "trainable": trainable},
        "gflops": flops / 1e9,
        "flops_note": FLOPS_NOTE,
        "crop": list(crop),
        "inference_input": {"size": list(size), "batch": recipe.data.val.batch_size, "note": INFERENCE_NOTE},
        "memory": memory.method,
        "iters": iters,
        "warmup": warmup,
        "measurements": [asdict(m) for m in measurements],
    }


# -- set-up ------------------------------------------------------------------------------


def speed_recipe(recipe: Recipe) -> Recipe:
    """A copy of ``recipe`` that builds the same architecture without reading weights files:
    no encoder pretrained weights, no ``load_from`` (speed does not depend on the values)."""
    recipe = recipe.model_copy(deep=True)
    recipe.model.encoder.pretrained = False
    recipe.model.encoder.pretrained_path = None
    recipe.load_from = None
    return recipe


def build_accelerator(recipe: Recipe) -> tuple[Accelerator, str | None]:
    """The run's Accelerator (``hooktrain.engine.runner.make_accelerator``). When the device cannot
    run ``train.mixed_precision`` (fp16 without a CUDA GPU), an fp32 one and the reason."""
    from hooktrain.engine.runner import make_accelerator

    try:
        return make_accelerator(recipe.train), None
    except UserError as exc:
        if recipe.train.mixed_precision == "no":
            raise
        fp32 = recipe.train.model_copy(update={"mixed_precision": "no"})
        return make_accelerator(fp32), str(exc).removeprefix("train.mixed_precision: ").split(";")[0]


def build_model(recipe: Recipe, checkpoint: str | os.PathLike | None) -> tuple[SegmentorBase, str]:
    """The recipe's segmentor, not compiled yet (``Segmentor.compile_mode``), with the
    checkpoint's weights (strict) or random ones, and a description of the weights."""
    from hooktrain.checkpoint.weights import load_weights, recorded_iteration, weights_file
    from hooktrain.models import build_recipe_segmentor

    model = build_recipe_segmentor(recipe, pretrained=False)
    model.compile_mode = None  # the run compiles it after counting FLOPs (FlopCounterMode runs it eagerly)
    if checkpoint is None:
        return model, "random init (encoder pretrained weights and load_from not loaded: speed does not depend on them)"
    load_weights(model, checkpoint, strict=True)
    iteration = recorded_iteration(checkpoint)
    return model, f"{weights_file(checkpoint)}" + (f" (iteration {iteration})" if iteration is not None else "")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """All parameters, and those that require gradients."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count_flops(model: SegmentorBase, size: tuple[int, int], device: torch.device, channels: int = 3) -> int:
    """FLOPs of one fp32 inference forward (logits) of a ``[1, channels, *size]`` image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.randn(1, channels, *size, device=device)
    counter = FlopCounterMode(display=False)
    model.eval()
    with torch.no_grad(), counter:
        model(image)
    return counter.get_total_flops()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name} ({torch.get_num_threads()} threads)"


# -- timing and memory -------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, MPS, XPU...); nothing on CPU."""
    import torch

    if device.type != "cpu":
        sync = getattr(getattr(torch, device.type, None), "synchronize", None)
        if sync is not None:
            sync()


def _proc_status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` line in KiB (``VmRSS``, ``VmHWM``), or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


class PeakMemory:
    """Peak memory of one measurement, in MiB: on CUDA ``torch.cuda.max_memory_allocated``
    (reset before each; the weights count), on CPU how much the process's peak RSS grew."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable_rss = device.type == "cpu" and _reset_peak_rss()
        self._base = 0

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "cuda: torch.cuda.max_memory_allocated, reset before each measurement (weights included)"
        if self.device.type != "cpu":
            return f"not measured on {self.device.type}"
        if self.resettable_rss:
            return "cpu: growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS"
        return "cpu: growth of ru_maxrss (a lower bound: growth below the process's earlier peak is not seen)"

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu" and self.resettable_rss:
            _reset_peak_rss()
            self._base = _proc_status_kib("VmRSS") or 0
        elif self.device.type == "cpu":
            self._base = _max_rss_kib()

    def peak_mib(self) -> float | None:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        if self.device.type == "cpu" and self.resettable_rss:
            return max(0, (_proc_status_kib("VmHWM") or 0) - self._base) / 1024
        if self.device.type == "cpu":
            return max(0, _max_rss_kib() - self._base) / 1024
        return None


def _max_rss_kib() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


@dataclass
class Timer:
    """Runs a step ``warmup`` times untimed, then ``iters`` times timed, with peak memory."""

    device: torch.device
    memory: PeakMemory
    iters: int
    warmup: int

    def measure(self, row: Measurement, step: Callable[[], object], context=None) -> Measurement:
        """Fill ``row`` with images/s and peak memory of ``step`` (run inside ``context``).
        Running out of memory, or an operator the mixed precision cannot run, skips the row
        with the reason; any other failure is raised."""
        import torch

        self.memory.start()
        try:
            with context or contextlib.nullcontext():
                for _ in range(self.warmup):
                    step()
                synchronize(self.device)
                start = time.perf_counter()
                for _ in range(self.iters):
                    step()
                synchronize(self.device)
                row.seconds = time.perf_counter() - start
        except torch.OutOfMemoryError:
            row.skipped = f"out of memory at batch {row.batch}"
        except (RuntimeError, NotImplementedError) as exc:
            if row.precision == "fp32":
                raise
            row.skipped = f"{row.precision} failed on {self.device.type}: {first_line(exc)}"
        if row.skipped is None:
            row.images_per_s = row.batch * self.iters / row.seconds
            row.peak_memory_mib = self.memory.peak_mib()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return row


# -- the measurements --------------------------------------------------------------------


def val_image_size(crop: tuple[int, int], val_scale: tuple[int, int]) -> tuple[int, int]:
    """The size the val pipeline's keep-ratio resize (``data.val.pipeline.scale``, long and
    short edge) gives an image shaped like the training crop (mmcv's ``rescale_size``):
    512x512 for ADE20K, 1024x2048 for Cityscapes."""
    height, width = crop
    factor = min(max(val_scale) / max(height, width), min(val_scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def slide_config(cfg: InferenceConfig, crop: tuple[int, int]) -> InferenceConfig:
    """The recipe's inference with ``mode: slide``: its own windows when the recipe slides,
    else the training crop with a stride of 2/3 of it (mmseg's 512 / 341)."""
    if cfg.mode == "slide":
        return cfg.model_copy(update={"scales": None})
    stride = tuple(max(1, side * 2 // 3) for side in crop)
    return cfg.model_copy(update={"mode": "slide", "crop_size": tuple(crop), "stride": stride, "scales": None})


def precision_context(precision: str, accelerator: Accelerator):
    """fp32: no autocast; the mixed precision: the accelerator's autocast (as evaluation)."""
    return contextlib.nullcontext() if precision == "fp32" else accelerator.autocast()


def inference_measurements(
    recipe: Recipe,
    model: SegmentorBase,
    accelerator: Accelerator,
    timer: Timer,
    precisions: list[str],
    unavailable: str | None,
    size: tuple[int, int],
) -> list[Measurement]:
    """``Segmentor.predict`` images/s on ``size`` images, whole and slide, in each precision."""
    import torch

    from hooktrain.models.inference import slide_windows

    crop = tuple(recipe.data.train.pipeline.crop_size)
    batch = recipe.data.val.batch_size
    images = torch.randn(batch, recipe.data.in_channels, *size, device=accelerator.device)
    shapes = [size] * batch  # ori_shapes = img_shapes: no resize back to an original size
    whole = recipe.model.inference.model_copy(update={"mode": "whole", "scales": None})
    slide = slide_config(recipe.model.inference, crop)
    windows = len(slide_windows(*size, slide.crop_size, slide.stride))
    variants = ", flip" if whole.flip else ""
    if recipe.model.inference.scales is not None:
        variants += ", one scale (inference.scales not measured)"
    modes = [
        ("inference whole", whole, f"whole image{variants}"),
        ("inference slide", slide, f"window {_hw(slide.crop_size)}, stride {_hw(slide.stride)}: "
                                   f"{windows} per image{variants}"),
    ]  # fmt: skip
    rows = []
    model.eval()
    for name, cfg, detail in modes:
        model.inference = cfg
        for precision in precisions:
            row = Measurement(name, precision, batch, size, detail)
            if precision != "fp32" and unavailable:
                row.skipped = unavailable
            else:
                timer.measure(row, lambda: model.predict(images, shapes, shapes),
                              precision_context(precision, accelerator))  # fmt: skip
            rows.append(row)
    model.inference = recipe.model.inference
    return rows


def train_measurements(
    recipe: Recipe, model: SegmentorBase, accelerator: Accelerator, timer: Timer, unavailable: str | None
) -> list[Measurement]:
    """Train-step images/s in the recipe's precision (with fp32 in its place, and the reason,
    when the device cannot run it): the runner's step (``hooktrain.engine.step.train_step``)
    over ``train.grad_accum_steps`` micro-batches of the train batch size."""
    import torch

    from hooktrain.engine.accelerator import prepare_model
    from hooktrain.engine.step import train_step

    data = recipe.data
    crop = tuple(data.train.pipeline.crop_size)
    micro = accelerator.gradient_accumulation_steps
    batch = data.train.batch_size * micro
    mixed = recipe.train.mixed_precision
    precision = "fp32" if mixed == "no" or unavailable else mixed
    detail = "forward with mask, backward, clip, optimizer step"
    if micro > 1:
        detail += f" ({micro} micro-batches of {data.train.batch_size})"
    rows = []
    if unavailable:
        rows.append(Measurement("train step", mixed, batch, crop, detail, skipped=unavailable))
    prepared, optimizer, _ = prepare_model(accelerator, model, recipe)  # as the runner does (DDP or FSDP)
    prepared.train()
    device = accelerator.device
    micro_batch = {
        "image": torch.randn(data.train.batch_size, data.in_channels, *crop, device=device),
        "mask": torch.randint(0, data.num_labels, (data.train.batch_size, *crop), device=device),
    }

    def step() -> None:
        train_step(accelerator, prepared, optimizer, [micro_batch] * micro, clip_grad_norm=recipe.train.clip_grad_norm)

    rows.append(timer.measure(Measurement("train step", precision, batch, crop, detail), step))
    accelerator.free_memory(prepared, optimizer)
    return rows


# -- output ------------------------------------------------------------------------------


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable table (the JSON line follows it)."""
    params = report["params"]
    lines = [
        f"hooktrain benchmark: {report['recipe']}",
        f"  device       {report['device']}: {report['device_name']}; torch {report['torch']}",
        f"  precision    train.mixed_precision: {report['precision']}",
        f"  weights      {report['weights']}",
        f"  inputs       {report['inputs']}, seed {report['seed']}",
        f"  parameters   {_count(params['total'])} total, {_count(params['trainable'])} trainable",
        f"  FLOPs        {report['gflops']:.3f} GFLOPs per forward at the crop {_hw(report['crop'])}, batch 1 "
        f"({report['flops_note']})",
        f"  inference    {_hw(report['inference_input']['size'])}: {report['inference_input']['note']}",
        f"  memory       {report['memory']}",
        f"  timing       {report['warmup']} warmup + {report['iters']} timed iterations per measurement",
        "",
    ]
    header = ("measurement", "precision", "batch", "input", "images/s", "peak MiB", "")
    rows = [header]
    for m in report["measurements"]:
        speed = "skipped" if m["skipped"] else f"{m['images_per_s']:.2f}"
        memory = "-" if m["peak_memory_mib"] is None else f"{m['peak_memory_mib']:.1f}"
        note = m["skipped"] or m["detail"]
        rows.append((m["name"], m["precision"], str(m["batch"]), _hw(m["size"]), speed, memory, note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    right = {2, 4, 5}
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append(("  " + "  ".join(cells) + "  " + row[-1]).rstrip())
    return "\n".join(lines)
