"""The mask-classification family (EoMT, Mask2Former): queries each predict a class and a mask;
training matches them to the ground-truth segments (:mod:`hooktrain.models.mask_criterion`),
and the per-pixel scores every tool reads are Mask2Former's semantic inference.

A network of this family subclasses :class:`MaskClassifier` and implements ``predictions``
(:class:`hooktrain.models.eomt.EoMT`); building it from a recipe is one entry in
:data:`hooktrain.models.segmentor.FAMILY_BUILDERS`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hooktrain.models.mask_criterion import MaskClassificationLoss, semantic_to_segments
from hooktrain.models.segmentor_base import SegmentorBase
from hooktrain.recipe.mask_heads import MaskLossConfig
from hooktrain.recipe.model import InferenceConfig


def semantic_scores(mask_logits: torch.Tensor, class_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask2Former's ``semantic_inference``: mask logits ``[B,Q,h,w]`` resized (bilinear,
    ``align_corners=False``) to ``size``, then ``sum_q softmax(class_q)[:-1] * sigmoid(mask_q)``:
    scores ``[B,C,H,W]``, the no-object class left out."""
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], masks.sigmoid())


class MaskClassifier(SegmentorBase):
    """A segmentor whose network predicts ``(mask_logits [B,Q,h,w], class_logits [B,Q,C+1])``
    per layer (:meth:`predictions`, the final layer last).

    Training: the semantic mask becomes one segment per class present (ignored pixels in none),
    and ``criterion`` scores every layer's predictions, logged as ``decode.loss_cls``,
    ``decode.d0.loss_mask``, ... Inference: :func:`semantic_scores` of the final layer, at the
    input size; TTA treats them as MMSegmentation's ``SegTTAModel`` treats Mask2Former's.
    """

    def __init__(
        self,
        criterion: MaskClassificationLoss,
        *,
        ignore_index: int = 255,
        inference: InferenceConfig | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__(inference=inference, channels_last=channels_last, align_corners=False)
        self.criterion = criterion
        self.ignore_index = ignore_index

    def predictions(self, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each supervised layer's ``(mask_logits, class_logits)``, the final layer last."""
        raise NotImplementedError

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        mask_logits, class_logits = self.predictions(self._prepare(image))[-1]
        return semantic_scores(mask_logits, class_logits, image.shape[-2:])

    def _loss_terms(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        predictions = self.predictions(self._prepare(image))
        terms = self.criterion(predictions, semantic_to_segments(mask, self.ignore_index))
        return {f"decode.{name}": value for name, value in terms.items()}


def build_criterion(cfg: MaskLossConfig, num_classes: int) -> MaskClassificationLoss:
    """The criterion a recipe's ``decode_head.loss`` describes."""
    return MaskClassificationLoss(num_classes, **cfg.model_dump())
