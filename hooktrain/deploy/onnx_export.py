"""Export a segmentor to ONNX, verified by onnxruntime before the file is written.

The graph is the model's whole-image inference (``Segmentor.logits``: encoder, decode head,
bilinear resize to the input size; no auxiliary head):

- input ``image``: float32 ``[B, C, H, W]``, already normalised as the recipe's data pipeline
  does (``(pixel - data.mean) / data.std`` per channel, after the val pipeline's resize);
  normalising is the caller's job, the mean and std are in the metadata;
- output ``logits``: float32 ``[B, num_classes, H, W]`` at the input size;
- B, H and W are dynamic (opset 17).

Slide inference, flip and multi-scale TTA stay in Python (``hooktrain predict`` and
:class:`hooktrain.deploy.segmenter.Segmenter` run slide windows around the graph; TTA needs the
``.safetensors`` model). The model's ``metadata_props`` carry what a caller needs to use the graph
(:func:`onnx_metadata`): the format, the resolved recipe (YAML), ``in_channels``,
``num_classes``, ``mean``, ``std``, ``threshold``, ``class_names``, ``palette`` (JSON).

The graph follows the input size in every encoder, timm's ViTs included: their antialiased
bicubic resize of the position embeddings to the patch grid, which opset 17 has no operator for,
is traced as two resize matrices (:func:`antialiased_bicubic_weights`).

Before anything is written the graph runs in onnxruntime on random inputs of batch 2 at sizes
other than the export size, against PyTorch; a relative difference (``max|ort - torch| /
max|torch|``) above :data:`TOLERANCE` is a ``UserError`` and no file is written. The file is
written to a temporary name in the output directory and moved into place.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hooktrain.checkpoint.files import write_atomically
from hooktrain.errors import UserError

if TYPE_CHECKING:
    import onnxruntime

FORMAT = "hooktrain-onnx/1"
OPSET = 17
INPUT, OUTPUT = "image", "logits"
# Odd feature-map sizes at strides 4..32, so every resize between levels is traced as a Resize
# (at sizes where two levels agree PyTorch skips it; the graph's same-size Resize is exact).
EXPORT_SIZE = (65, 97)
VERIFY_SIZES = ((50, 78), (83, 61))  # batch 2, non-square, not multiples of 32
TOLERANCE = 1e-4
INSTALL_HINT = "pip install 'hooktrain[onnx]' (onnx and onnxruntime)"


class OnnxAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(size)`` for any input size as two averaging matrices.

    Bin ``i`` of ``n`` over a length ``L`` covers ``[floor(i*L/n), ceil((i+1)*L/n))``, as
    PyTorch's kernel; the output is ``A_h @ x @ A_w^T`` where row ``i`` of ``A`` is
    ``1/len(bin_i)`` on the bin. The sizes come from tensor ops (not Python ints), so the ONNX
    graph stays dynamic, which the exporter's own ``adaptive_avg_pool2d`` is not when the size
    does not divide the input.
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.output_size = (int(size[0]), int(size[1]))

    @staticmethod
    def _weights(line: torch.Tensor, bins: int, dtype: torch.dtype) -> torch.Tensor:
        """``[bins, L]`` averaging matrix for a line ``[L]`` of the input."""
        ones = torch.ones_like(line, dtype=torch.long)
        length = ones.sum()
        position = ones.cumsum(0) - 1
        index = torch.arange(bins, dtype=torch.long, device=line.device)
        start = torch.div(index * length, bins, rounding_mode="floor")
        end = torch.div((index + 1) * length + bins - 1, bins, rounding_mode="floor")
        inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
        weights = inside.to(dtype)
        return weights / weights.sum(1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._weights(x[0, 0, :, 0], self.output_size[0], x.dtype)
        cols = self._weights(x[0, 0, 0, :], self.output_size[1], x.dtype)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def antialiased_bicubic_weights(out_size: torch.Tensor | int, in_size: int) -> torch.Tensor:
    """``[out_size, in_size]`` matrix ``A`` with ``A @ line`` = PyTorch's antialiased bicubic resize
    of ``line`` (``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``, one axis).

    As PyTorch's kernel: scale ``s = in/out``; output ``i`` reads inputs ``j`` in
    ``[floor(c - r + 0.5), floor(c + r + 0.5))`` around its centre ``c = s (i + 0.5)``, radius
    ``r = 2 max(s, 1)``, weighted by the cubic filter (``a = -0.5``) at ``(j + 0.5 - c) / max(s, 1)``
    and normalised. ``out_size`` may be a traced size, so the ONNX graph stays dynamic; ONNX's
    ``Resize`` has no antialiasing before opset 18, so the exporter has no symbolic for the op.
    """
    index = torch.arange(out_size, dtype=torch.float32)
    scale = in_size / torch.ones_like(index).sum()  # out_size as a tensor either way
    stretch = torch.clamp(scale, min=1.0)
    centre = scale * (index + 0.5)
    first = torch.clamp(torch.floor(centre - 2 * stretch + 0.5), min=0.0)
    end = torch.clamp(torch.floor(centre + 2 * stretch + 0.5), max=float(in_size))
    source = torch.arange(in_size, dtype=torch.float32)[None, :]
    x = ((source + 0.5 - centre[:, None]) / stretch).abs()
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    weights = torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))
    weights = weights * ((source >= first[:, None]) & (source < end[:, None])).to(weights.dtype)
    return weights / weights.sum(1, keepdim=True)


def _exportable_resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size,
    old_size=None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
    verbose: bool = False,
    align_corners=None,
) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed`` with its default antialiased bicubic resize as two
    matrices (:func:`antialiased_bicubic_weights`), which export to ONNX at any grid size; other
    resizes go to timm's own."""
    from timm.layers import pos_embed

    if interpolation != "bicubic" or not antialias or align_corners or old_size is None:
        return pos_embed.resample_abs_pos_embed(
            posemb, new_size, old_size, num_prefix_tokens, interpolation, antialias, verbose, align_corners
        )
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    channels = grid.shape[-1]
    grid = grid.float().reshape(old_size[0], old_size[1], channels).permute(2, 0, 1)
    rows = antialiased_bicubic_weights(new_size[0], old_size[0]).to(grid.device)
    cols = antialiased_bicubic_weights(new_size[1], old_size[1]).to(grid.device)
    grid = torch.matmul(torch.matmul(rows, grid), cols.transpose(0, 1))  # [C, H, W]
    grid = grid.permute(1, 2, 0).reshape(1, -1, channels).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


@contextlib.contextmanager
def _exportable_pos_embeds() -> Iterator[None]:
    """While tracing: timm's ViTs (``vision_transformer``, ``deit``, ``eva``) resize their position
    embeddings to the input's grid with :func:`_exportable_resample_abs_pos_embed` instead of
    ``F.interpolate(antialias=True)``, which opset 17 cannot express (DINOv2, DeiT, AugReg, EVA-02)."""
    from timm.models import deit, eva, vision_transformer

    modules = (vision_transformer, deit, eva)
    originals = [module.resample_abs_pos_embed for module in modules]
    for module in modules:
        module.resample_abs_pos_embed = _exportable_resample_abs_pos_embed
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.resample_abs_pos_embed = original


class _Logits(nn.Module):
    """The graph's module: whole-image logits at the input size."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.segmentor.logits(image)


def onnx_friendly(model: nn.Module) -> nn.Module:
    """A float32, eval-mode, contiguous-format copy of ``model`` without compiled modules, whose
    adaptive average pools of output size other than 1 are :class:`OnnxAdaptiveAvgPool2d`
    (size 1 exports as ``GlobalAveragePool``)."""
    import copy

    copied = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    if hasattr(copied, "channels_last"):
        copied.channels_last = False
    if hasattr(copied, "compile_mode"):
        copied.compile_mode = None
    for module in copied.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size not in (1, (1, 1)):
                setattr(module, name, OnnxAdaptiveAvgPool2d(child.output_size))
    return copied


def onnx_metadata(recipe: Any, recipe_text: str, iteration: int | None) -> dict[str, str]:
    """The ``metadata_props`` of an exported graph (values are strings; lists are JSON)."""
    data = recipe.data
    return {
        "format": FORMAT,
        "hooktrain.recipe": recipe_text,
        "iter": str(iteration),
        "input": f"{INPUT}: float32 [B, C, H, W], (pixel - mean) / std per channel",
        "output": f"{OUTPUT}: float32 [B, num_classes, H, W] at the input size",
        "in_channels": str(data.in_channels),
        "num_classes": str(data.num_classes),
        "mean": json.dumps(list(data.mean)),
        "std": json.dumps(list(data.std)),
        "threshold": str(recipe.model.inference.threshold),
        "class_names": json.dumps(data.names),
        "palette": json.dumps(data.colours),
    }


def _need_onnx(what: str):
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError(f"{what} needs onnx and onnxruntime: {INSTALL_HINT}") from None
    return onnx, onnxruntime


def export_onnx(
    model: nn.Module,
    in_channels: int,
    metadata: dict[str, str],
    out: str | os.PathLike,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Export ``model``'s whole-image logits to ``out`` (``.onnx``), verify it with onnxruntime
    (:func:`verify`), then write it atomically. Nothing is written when a step fails. ``report``
    gets one line saying what the graph holds and how it verified."""
    import warnings

    onnx, _ = _need_onnx("export to .onnx")
    out = Path(out)
    graph = _Logits(onnx_friendly(model))
    example = torch.randn(1, in_channels, *EXPORT_SIZE, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    dims = {0: "batch", 2: "height", 3: "width"}
    try:
        with torch.no_grad(), warnings.catch_warnings(), _exportable_pos_embeds():
            # The TorchScript exporter's deprecation notice, and tracer warnings about Python-side
            # shape checks (the verification below runs the graph at other sizes).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: dims, OUTPUT: dims},
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter: no onnxscript needed, dynamic sizes traced
            )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"export: torch.onnx could not export this model ({first}); export .safetensors instead"
        ) from None
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    serialized = proto.SerializeToString()
    differences = verify(serialized, model, in_channels)
    write_atomically(out, serialized)
    if report is not None:
        sizes = ", ".join(f"2x{in_channels}x{h}x{w}" for h, w in VERIFY_SIZES)
        report(
            f"{out}: ONNX opset {OPSET}, whole-image logits of the decode head, dynamic batch/height/width, "
            f"input normalised by the caller; verified by onnxruntime at {sizes} (max relative difference "
            f"{max(differences):.1e}); slide inference and flip/multi-scale TTA stay in Python"
        )
    return out


def verify(serialized: bytes, model: nn.Module, in_channels: int) -> list[float]:
    """Run the graph in onnxruntime (CPU) and ``model.logits`` in PyTorch on random batches of 2
    at :data:`VERIFY_SIZES`; raise a ``UserError`` naming the size when the relative difference
    exceeds :data:`TOLERANCE`. Returns the differences."""
    session = _session(serialized, "cpu")
    differences = []
    generator = torch.Generator().manual_seed(1)
    model = model.eval()
    for height, width in VERIFY_SIZES:
        image = torch.randn(2, in_channels, height, width, generator=generator)
        with torch.no_grad():
            want = model.logits(image).float()
        got = torch.from_numpy(session.run([OUTPUT], {INPUT: image.numpy()})[0])
        if got.shape != want.shape:
            raise UserError(
                f"export: onnxruntime gives logits of shape {tuple(got.shape)} for input 2x{height}x{width}, "
                f"PyTorch {tuple(want.shape)}; the model does not export with dynamic sizes, export .safetensors"
            )
        difference = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        differences.append(difference)
        if not difference <= TOLERANCE:
            raise UserError(
                f"export: onnxruntime's logits differ from PyTorch's by {difference:.3g} (relative, max "
                f"{TOLERANCE:g}) at input 2x{in_channels}x{height}x{width}; nothing written, "
                "export .safetensors instead"
            )
    return differences


def _session(model: bytes | str, device: str | None) -> onnxruntime.InferenceSession:
    _, ort = _need_onnx("an .onnx model")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about unused initialisers
    return ort.InferenceSession(model, options, providers=providers(device))


def providers(device: str | None) -> list[str]:
    """onnxruntime's execution providers: CUDA when available (and ``device`` is not ``cpu``),
    then CPU; ``device="cuda"`` without the CUDA provider is a ``UserError``."""
    _, ort = _need_onnx("an .onnx model")
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise UserError(
            "device cuda: this onnxruntime has no CUDAExecutionProvider; "
            "pip install onnxruntime-gpu, or use device='cpu'"
        )
    if cuda and device != "cpu":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxLogits:
    """An exported graph as a logits function (``[B,C,H,W]`` tensor -> logits tensor on the CPU)
    with its metadata."""

    def __init__(self, path: str | os.PathLike, device: str | None = None) -> None:
        onnx, _ = _need_onnx("an .onnx model")
        path = Path(path)
        try:
            meta = onnx.load(str(path), load_external_data=False).metadata_props
        except Exception as exc:
            raise UserError(f"predict: {path} is not an ONNX model ({type(exc).__name__})") from None
        self.metadata = {entry.key: entry.value for entry in meta}
        if self.metadata.get("format") != FORMAT or "hooktrain.recipe" not in self.metadata:
            raise UserError(
                f"predict: {path} carries no hooktrain recipe; export it with `hooktrain export CHECKPOINT OUT.onnx`"
            )
        self.session = _session(str(path), device)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: array})[0])
