"""What every segmentor family shares (:class:`SegmentorBase`): the interface the runner,
evaluation, TTA, predict, ``Segmenter`` and ONNX export use, and its ``torch.compile`` path."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hooktrain.models.inference import predict_logits
from hooktrain.models.input_stage import InputStage
from hooktrain.recipe.model import InferenceConfig


class SegmentorBase(nn.Module):
    """What every segmentor family shares: the runner's and the tools' interface.

    ``forward(image, mask)`` returns the weighted loss terms (training); ``forward(image)`` returns
    class scores at the input size; ``predict`` runs the configured whole/slide/flip inference.
    Mode (train/eval) and gradient context are the caller's; ``predict`` runs without
    gradients. ``input_stage`` turns a train batch into the ``(image, mask)`` that ``forward``
    takes, on the device (MMSegmentation's ``data_preprocessor``). ``schedule(iteration)`` is
    called by the runner before the first step and after every step (``iteration`` steps done),
    for a family with a schedule of its own (EoMT's mask annealing).

    A family implements ``_logits(image)`` (scores ``[B,C,H,W]`` at the input size: eval, TTA,
    predict, ``Segmenter`` and ONNX export read only these) and ``_loss_terms(image, mask)``.

    With ``compile_mode`` set (``model.compile``), the training forward (the network, the
    losses) and :meth:`logits` each run as one ``torch.compile``d function (:func:`compiled`).
    """

    compile_mode: str | None = None

    def __init__(
        self,
        *,
        inference: InferenceConfig | None = None,
        channels_last: bool = False,
        align_corners: bool = False,
        input_stage: InputStage | None = None,
    ) -> None:
        super().__init__()
        self.inference = inference or InferenceConfig()
        self.channels_last = channels_last
        self.align_corners = align_corners
        self.input_stage = input_stage or InputStage()  # a train batch to (image, mask) on the device

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _loss_terms(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def schedule(self, iteration: int) -> None:
        """Set whatever the family schedules by iteration (``iteration`` steps are done); none here."""

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Class scores ``[B,C,H,W]`` at the input size (logits, for the encoder-decoder family)."""
        if self.compile_mode is None or torch.compiler.is_compiling():
            return self._logits(image)
        return compiled(type(self)._logits, INFERENCE_COMPILE_MODES[self.compile_mode])(self, image)

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        """With ``mask`` [B,H,W] (255 = ignore): ``{"decode.loss_ce": ..., "aux.loss_ce": ...}``,
        each term already multiplied by its weight. Without: scores [B,C,H,W] at the input size."""
        if mask is None:
            return self.logits(image)
        if self.compile_mode is None or torch.compiler.is_compiling():
            return self._loss_terms(image, mask)
        if self.compile_mode in CUDA_GRAPH_MODES:
            # Each call is a new step: the previous step's graph outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(type(self)._loss_terms, self.compile_mode)(self, image, mask)

    @torch.no_grad()
    def predict(
        self, image: torch.Tensor, img_shapes: Sequence[Sequence[int]], ori_shapes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Float32 scores ``[C, H_i, W_i]`` per image at its original size ``ori_shapes[i]``: logits,
        or with ``flip`` the mean class probabilities (MMSegmentation's TTA); argmax is the
        prediction either way. Multi-scale (``inference.scales``) needs the original images and
        goes through :func:`hooktrain.models.inference.predict_scales`.

        ``image`` is a padded batch [B,3,h,w] whose i-th image fills the top-left ``img_shapes[i]``;
        see :func:`hooktrain.models.inference.predict_logits` for the whole/slide/flip details.
        """
        return predict_logits(self.logits, image, img_shapes, ori_shapes, self.inference, self.align_corners)


# torch.compile modes (``model.compile_mode``). CUDA graphs need the static shapes of training
# (fixed crop and batch); inference sees every image size, so it compiles without them.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
INFERENCE_COMPILE_MODES = {
    "default": "default",
    "reduce-overhead": "default",
    "max-autotune": "max-autotune-no-cudagraphs",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}


@functools.cache
def compiled(method: Callable, mode: str) -> Callable:
    """``torch.compile(method, mode=mode)``, once per process, for an unbound segmentor
    method. The module is an argument rather than a bound ``self``, so a copy of a model (an
    EMA average, say) runs its own parameters, and the parameter names, hence checkpoints, are
    the eager model's."""
    return torch.compile(method, mode=mode)
