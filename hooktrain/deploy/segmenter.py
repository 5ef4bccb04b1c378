"""Segment images from Python with an exported model: :class:`Segmenter`.

    from hooktrain import Segmenter

    segmenter = Segmenter.load("model.safetensors")  # or "model.onnx"
    label = segmenter("photo.jpg")                   # HxW class indices at the original size
    labels = segmenter([image_array, pil_image])     # a list is batched
    label, probs = segmenter("photo.jpg", probabilities=True)  # probs: float32 [C, H, W]

A ``.safetensors`` export runs the PyTorch model with the recipe's ``model.inference`` (whole or
slide, flip and multi-scale TTA, or the overrides given to :meth:`Segmenter.load`); a ``.onnx``
export runs its graph in onnxruntime, with slide windows in Python and no TTA. Both use the
recipe's val pipeline (resize, normalisation) and :func:`predicted_labels`, so ``hooktrain
predict`` (which goes through this class) writes the same labels for both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hooktrain.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
logger = logging.getLogger("hooktrain")


class Segmenter:
    """An exported model with its recipe's val pipeline: images in, label maps out.

    Build it with :meth:`load`. Calling it takes one image or a list of images; an image is a
    file path, a PIL image, or an ``HxWxC`` (``HxW`` for one channel) ``uint8``/``uint16``
    array with ``data.in_channels`` channels, colour in RGB order. Each result is the ``HxW``
    label map at the image's original size (``uint8``; ``int64`` past 256 labels), and with
    ``probabilities=True`` the pair ``(labels, probabilities)``, the latter float32 ``[C, H, W]``
    (softmax; for a binary model the one foreground sigmoid channel).
    """

    def __init__(
        self,
        recipe: Any,
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        backend: str,
        device: torch.device,
        batch_size: int,
        align_corners: bool,
        precision: str = "fp32",
    ) -> None:
        from hooktrain.data.transforms import ValTransform

        data = recipe.data
        if data.val is None:
            raise UserError(
                "predict: the model's recipe has no data.val section, whose pipeline predict uses; "
                "export a checkpoint of a recipe with data.val"
            )
        self.recipe = recipe
        self.backend = backend
        self.device = device
        self.batch_size = batch_size
        self.align_corners = align_corners
        self.precision = precision
        self._logits_fn = logits_fn
        self._transform = ValTransform(data.val.pipeline, mean=data.mean, std=data.std, in_channels=data.in_channels)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_file: str | os.PathLike,
        *,
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 1,
        tta: bool | None = None,
        flip: bool | None = None,
        scales: Sequence[float] | None = None,
    ) -> Segmenter:
        """Load a ``.safetensors`` or ``.onnx`` file written by ``hooktrain export``.

        ``device``: ``"cpu"``, ``"cuda"`` (``"cuda:N"``), or None for CUDA when available.
        ``precision``: ``"fp32"``, or ``"fp16"`` / ``"bf16"`` autocast (PyTorch model only).
        ``batch_size``: how many images of a list run together. ``tta``: None keeps the recipe's
        ``model.inference``; True adds MMSegmentation's TTA (flip, and the recipe's scales or
        0.5..1.75); False turns flip and scales off. ``flip`` / ``scales`` override either. TTA
        is refused for ``.onnx`` models, whose graph is whole-image logits.
        """
        path = Path(model_file)
        if precision not in PRECISIONS:
            raise UserError(f"Segmenter: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"Segmenter: batch_size {batch_size!r} must be an integer >= 1")
        if path.suffix == ".onnx":
            return cls._load_onnx(path, device, precision, batch_size, tta, flip, scales)
        if path.suffix != ".safetensors":
            raise UserError(f"predict: model {path} must be a .safetensors or .onnx file written by `hooktrain export`")
        from hooktrain.deploy.export import load_exported

        torch_device = _torch_device(device)
        model, recipe = load_exported(path)
        recipe.model.inference = model.inference = _inference(model.inference, tta, flip, scales)
        model.to(torch_device)
        logits_fn = model.logits
        if precision != "fp32":
            logits_fn = _autocast(model.logits, torch_device, PRECISIONS[precision])
        return cls(recipe, logits_fn, backend="torch", device=torch_device, batch_size=batch_size,
                   align_corners=model.align_corners, precision=precision)  # fmt: skip

    @classmethod
    def from_pretrained(cls, repo_id: str, revision: str | None = None, **load_kwargs: Any) -> Segmenter:
        """Load a model shared with ``hooktrain push`` from the Hugging Face Hub: its
        ``model.safetensors`` is downloaded (or found in huggingface_hub's cache) and loaded by
        :meth:`load`, which takes ``load_kwargs``. ``repo_id`` is ``OWNER/NAME`` or
        ``hf://OWNER/NAME[@REVISION]``; ``revision`` is a branch, tag or commit (default
        ``main``). Only the safetensors file is read: no code from the Hub runs."""
        from hooktrain.models.hub import HUB_PREFIX, hub_model_file, parse_hub_id

        repo, pinned = parse_hub_id(repo_id if repo_id.startswith(HUB_PREFIX) else HUB_PREFIX + repo_id,
                                    "Segmenter.from_pretrained")  # fmt: skip
        return cls.load(hub_model_file(repo, revision or pinned, "Segmenter.from_pretrained"), **load_kwargs)

    @classmethod
    def _load_onnx(cls, path, device, precision, batch_size, tta, flip, scales) -> Segmenter:
        from hooktrain.deploy.export import exported_recipe
        from hooktrain.deploy.onnx_export import OnnxLogits

        if tta or flip or scales:
            raise UserError(
                f"Segmenter: TTA (tta, flip, scales) runs the PyTorch model; {path} is an ONNX graph of "
                "whole-image logits: load the .safetensors export for TTA"
            )
        if precision != "fp32":
            raise UserError(
                f"Segmenter: {path} is a float32 ONNX graph; precision {precision!r} needs the .safetensors export"
            )
        if not path.is_file():
            raise UserError(f"predict: model file {path} not found; create one with `hooktrain export`")
        graph = OnnxLogits(path, None if device is None else str(torch.device(device).type))
        recipe = exported_recipe(graph.metadata["hooktrain.recipe"])
        inference = recipe.model.inference
        if inference.flip or inference.scales is not None:
            logger.warning(f"{path}: the recipe's flip / scales TTA is not applied to an ONNX graph; "
                           "use the .safetensors export for it")  # fmt: skip
        recipe.model.inference = _inference(inference, False, None, None)
        return cls(recipe, graph, backend="onnx", device=torch.device("cpu"), batch_size=batch_size,
                   align_corners=recipe.model.decode_head.align_corners)  # fmt: skip

    # -- what the model predicts ---------------------------------------------------------------

    @property
    def inference(self):
        """The ``InferenceConfig`` predictions follow (mode, flip, scales, threshold)."""
        return self.recipe.model.inference

    @property
    def class_names(self) -> list[str]:
        """One name per label."""
        return self.recipe.data.names

    @property
    def palette(self) -> np.ndarray:
        """``[labels, 3]`` uint8 RGB colours, one per label."""
        return np.asarray(self.recipe.data.colours, dtype=np.uint8)

    def colourize(self, label: np.ndarray) -> np.ndarray:
        """An ``HxW`` label map as an ``HxWx3`` uint8 RGB picture in the recipe's palette."""
        return self.palette[label]

    def tiled(
        self,
        source: Any,
        *,
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        blend: str | None = None,
        probabilities: str | None = None,
        on_tiles: Callable[[int], None] | None = None,
    ) -> Any:
        """A :class:`hooktrain.deploy.tiled.TiledPredictor` over ``source`` (a ``RowSource``:
        ``ArraySource(image)`` or ``RasterSource(path, channels)``): the image runs in
        overlapping tiles at its own resolution (the val pipeline's resize is not applied),
        blended by ``model.inference.blend``, without TTA. ``crop_size``, ``stride`` and ``blend``
        override the recipe's ``model.inference`` values; ``probabilities`` (None, ``"uint8"``
        or ``"float32"``) adds them to the rows; iterate its ``rows()``."""
        from hooktrain.deploy.tiled import TiledPredictor

        update = {"crop_size": crop_size, "stride": stride, "blend": blend}
        cfg = _inference(self.inference, False, None, None)
        cfg = _validated(cfg, {key: value for key, value in update.items() if value is not None})
        return TiledPredictor(source, self._transform.normalised, self._logits_fn, cfg, device=self.device,
                              batch_size=self.batch_size, probabilities=probabilities,
                              on_tiles=on_tiles)  # fmt: skip

    def __call__(self, images: Any, *, probabilities: bool = False) -> Any:
        """Segment one image (a path, PIL image or array) or a list of them; see the class."""
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        results = []
        for start in range(0, len(batch), self.batch_size):
            chunk = [self._decode(image, start + i) for i, image in enumerate(batch[start : start + self.batch_size])]
            results += self._predict(chunk, probabilities)
        return results[0] if single else results

    def _decode(self, image: Any, index: int) -> tuple[np.ndarray, str]:
        from hooktrain.data.labels import decode_image

        channels = self.recipe.data.in_channels
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise UserError(f"predict: input {path} not found; give image files or directories")
            return decode_image(path.read_bytes(), example_id=str(path), channels=channels), str(path)
        name = f"image {index}"
        return decode_image(image, example_id=name, channels=channels), name

    @torch.no_grad()
    def _predict(self, chunk: list[tuple[np.ndarray, str]], probabilities: bool) -> list[Any]:
        from hooktrain.data.transforms import pad_stack
        from hooktrain.models.inference import (
            averages_probabilities,
            predict_logits,
            predict_scales,
            predicted_labels,
        )
        from hooktrain.models.inference import probabilities as to_probabilities

        cfg = self.inference
        ori_shapes = [image.shape[:2] for image, _ in chunk]
        if cfg.scales is None:
            tensors = [self._transform(image, example_id=name)[0] for image, name in chunk]
            batch = pad_stack(tensors).to(self.device)
            img_shapes = [tuple(t.shape[-2:]) for t in tensors]
            scores = predict_logits(self._logits_fn, batch, img_shapes, ori_shapes, cfg, self.align_corners)
        else:  # the multi-scale test: the original image resized by each factor, one at a time
            scores = []
            for image, name in chunk:
                views = (self._transform.rescaled(image, r, example_id=name)[None].to(self.device) for r in cfg.scales)
                scores.append(predict_scales(self._logits_fn, views, image.shape[:2], cfg, self.align_corners))
        dtype = np.uint8 if self.recipe.data.num_labels <= 256 else np.int64
        results = []
        for score in scores:
            label = predicted_labels(score, cfg).cpu().numpy().astype(dtype)
            if probabilities:
                probs = score if averages_probabilities(cfg) else to_probabilities(score.float())
                results.append((label, probs.float().cpu().numpy()))
            else:
                results.append(label)
        return results


def _torch_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"Segmenter: device {device!r} is not a device; give 'cpu' or 'cuda'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Segmenter: device {device!r} but CUDA is not available here; give device='cpu'")
    return chosen


def _inference(cfg: Any, tta: bool | None, flip: bool | None, scales: Sequence[float] | None) -> Any:
    """``cfg`` with the :meth:`Segmenter.load` overrides, validated."""
    if tta is True:
        cfg = cfg.with_tta()
    elif tta is False:
        cfg = cfg.model_copy(update={"flip": False, "scales": None})
    update = {**({} if flip is None else {"flip": flip}), **({} if scales is None else {"scales": list(scales)})}
    return _validated(cfg, update)


def _validated(cfg: Any, update: dict[str, Any]) -> Any:
    """``cfg`` (an ``InferenceConfig``) with ``update`` applied and validated, or a one-line ``UserError``."""
    from hooktrain.recipe.model import InferenceConfig

    try:
        return InferenceConfig.model_validate({**cfg.model_dump(), **update})
    except Exception as exc:  # pydantic's ValidationError: one line
        message = str(exc).splitlines()
        raise UserError(f"Segmenter: {message[-1].strip() if message else exc}") from None


def _autocast(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype):
    def run(image: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext():
            return fn(image)

    return run
