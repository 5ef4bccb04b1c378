"""The validation loader: every example exactly once across all ranks, no padding duplicates.

Reader ``g = rank * num_workers + worker`` of ``R = world_size * num_workers`` keeps the
examples whose global index (position in shard order) is ``g`` modulo ``R``. That holds for
any number of shards, ranks and workers, including fewer examples than readers (a rank may
then get no batch at all), and balances ranks to within one example. Every reader reads the
split's raw bytes but converts and decodes only its own rows; validation sets are small, and
a Hub split can be cached locally with ``streaming: false``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from hooktrain.data.reading import (
    CorruptExample,
    ExampleDecoder,
    corrupt_cap_error,
    loader_options,
    one_line_error,
    strided_rows,
    warn_corrupt,
    worker_position,
)
from hooktrain.data.retry import Retries
from hooktrain.data.sources import load_source
from hooktrain.data.transforms import ValTransform, pad_stack
from hooktrain.errors import RunError, UserError
from hooktrain.recipe.data import DataConfig, HubSource


class ScaledViews:
    """The multi-scale test's inputs of one image, made one at a time when iterated.

    Holds the original uint8 image (small, picklable across DataLoader workers); each step
    of an iteration yields it resized by the next factor and normalised, float32 [3, h, w]
    (:meth:`ValTransform.rescaled`), so the variants never all exist at once.
    """

    def __init__(self, image: np.ndarray, factors: Sequence[float], transform: ValTransform, example_id: Any = None):
        self.image, self.factors = image, list(factors)
        self.transform, self.example_id = transform, example_id

    def __len__(self) -> int:
        return len(self.factors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for factor in self.factors:
            yield self.transform.rescaled(self.image, factor, example_id=self.example_id)


class ValExamples(torch.utils.data.IterableDataset):
    """One rank's share of the validation split; each worker yields its own rows. With
    ``scales``, each example also carries ``views``: :class:`ScaledViews` of its image."""

    def __init__(
        self, base, cfg: DataConfig, *, rank: int, world_size: int, scales: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.base, self.cfg = base, cfg
        self.rank, self.world_size = rank, world_size
        self.scales = None if scales is None else list(scales)
        self.decode = ExampleDecoder(cfg)
        self.transform = ValTransform(cfg.val.pipeline, mean=cfg.mean, std=cfg.std, in_channels=cfg.in_channels)
        self.retries = Retries.for_source(cfg.val.source, cfg.retry_budget_s, "data.val.source")

    def __iter__(self):
        worker, num_workers = worker_position()
        reader = self.rank * num_workers + worker
        corrupt = 0
        for index, raw in strided_rows(self.base, self.world_size * num_workers, reader, self.retries):
            try:
                image, mask = self.decode(raw)
            except CorruptExample as exc:
                corrupt += 1
                warn_corrupt(str(exc), corrupt, self.cfg)  # raises past data.max_corrupt
                continue
            image_t, mask_t = self.transform(image, mask, example_id=raw.example_id)
            example = {"image": image_t, "mask": mask_t, "index": index, "example_id": raw.example_id,
                       "ori_shape": tuple(mask.shape[:2]), "worker": worker, "corrupt": corrupt}  # fmt: skip
            if self.scales is not None:
                example["views"] = ScaledViews(image, self.scales, self.transform, raw.example_id)
            yield example


def make_val_collate(ignore_index: int):
    """Collate function padding images with 0 and masks with ``ignore_index`` (bottom/right)."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {
            "image": pad_stack([e["image"] for e in examples], 0.0),
            "mask": pad_stack([e["mask"] for e in examples], ignore_index),
            "img_shapes": [tuple(e["image"].shape[-2:]) for e in examples],
            "ori_shapes": [e["ori_shape"] for e in examples],
            "index": torch.tensor([e["index"] for e in examples], dtype=torch.int64),
            "_worker": examples[-1]["worker"],
            "_corrupt": examples[-1]["corrupt"],
        }
        if "example_id" in examples[0]:
            batch["example_ids"] = [e["example_id"] for e in examples]
        if "views" in examples[0]:
            batch["views"] = [e["views"] for e in examples]
        return batch

    return collate


class ValLoader:
    """Iterable of validation batches of one rank (iterate it once per evaluation).

    Batch: ``{"image": float32 [B,3,h,w] padded with 0, "mask": int64 [B,H,W] original size
    padded with ignore_index, "img_shapes": [(h_i, w_i)], "ori_shapes": [(H_i, W_i)],
    "index": int64 [B] global example index, "example_ids": [str] (``"shard 0 row 3"``, with
    the file name first when the source has one)}``, plus ``"views": [ScaledViews]`` when
    built with ``scales`` (the multi-scale test).
    """

    def __init__(self, dataset: ValExamples, cfg: DataConfig) -> None:
        self.dataset, self.cfg = dataset, cfg
        val = cfg.val
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=val.batch_size,
            collate_fn=make_val_collate(cfg.ignore_index),
            **loader_options(val.num_workers, 2),
        )

    def __iter__(self):
        corrupt = [0] * max(self.cfg.val.num_workers, 1)
        try:
            for batch in self.loader:
                corrupt[batch.pop("_worker")] = batch.pop("_corrupt")
                if sum(corrupt) > self.cfg.max_corrupt:
                    raise corrupt_cap_error(sum(corrupt), self.cfg)
                yield batch
        except (UserError, RunError) as exc:
            raise one_line_error(exc) from None


def build_val_loader(
    cfg: DataConfig, *, rank: int = 0, world_size: int = 1, scales: Sequence[float] | None = None
) -> ValLoader:
    """The validation loader of process ``rank`` of ``world_size`` (see :class:`ValLoader`);
    with ``scales`` (``model.inference.scales``) its batches also carry each image's views."""
    if cfg.val is None:
        raise UserError("the recipe has no data.val section; add one to evaluate")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return ValLoader(ValExamples(val_base(cfg), cfg, rank=rank, world_size=world_size, scales=scales), cfg)


_hub_bases: dict[str, Any] = {}


def val_base(cfg: DataConfig):
    """The validation source as :func:`~hooktrain.data.sources.load_source` opens it. A Hub
    source is opened once per process: opening asks the Hub for its files, which an outage
    would fail at every evaluation; reading it is retried (``hooktrain.data.retry``)."""
    source = cfg.val.source
    if not isinstance(source, HubSource):
        return load_source(source, where="data.val.source")
    key = source.model_dump_json()
    if key not in _hub_bases:
        retries = Retries.for_source(source, cfg.retry_budget_s, "data.val.source")
        _hub_bases[key] = load_source(source, where="data.val.source", retries=retries)
    return _hub_bases[key]
