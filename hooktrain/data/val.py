"""The validation loader: every example exactly once across all ranks, no padding duplicates.

Reader ``g = rank * num_workers + worker`` of ``R = world_size * num_workers`` keeps the
examples whose global index (position in shard order) is ``g`` modulo ``R``. That holds for
any number of shards, ranks and workers, including fewer examples than readers (a rank may
then get no batch at all), and balances ranks to within one example. Every reader reads the
split's raw bytes but converts and decodes only its own rows; validation sets are small, and
a Hub split can be cached locally with ``streaming: false``.
"""

from __future__ import annotations

from typing import Any

import torch

from hooktrain.data.config import DataConfig
from hooktrain.data.reading import (
    CorruptExample,
    ExampleDecoder,
    corrupt_cap_error,
    loader_options,
    reraise_user_error,
    strided_rows,
    warn_corrupt,
    worker_position,
)
from hooktrain.data.sources import load_source
from hooktrain.data.transforms import ValTransform
from hooktrain.errors import UserError


class ValExamples(torch.utils.data.IterableDataset):
    """One rank's share of the validation split; each worker yields its own rows."""

    def __init__(self, base, cfg: DataConfig, *, rank: int, world_size: int) -> None:
        super().__init__()
        self.base, self.cfg = base, cfg
        self.rank, self.world_size = rank, world_size
        self.decode = ExampleDecoder(cfg)
        self.transform = ValTransform(cfg.val.pipeline, mean=cfg.mean, std=cfg.std)

    def __iter__(self):
        worker, num_workers = worker_position()
        reader = self.rank * num_workers + worker
        corrupt = 0
        for index, raw in strided_rows(self.base, self.world_size * num_workers, reader):
            try:
                image, mask = self.decode(raw)
            except CorruptExample as exc:
                corrupt += 1
                warn_corrupt(str(exc), corrupt, self.cfg)
                if corrupt > self.cfg.max_corrupt:
                    raise corrupt_cap_error(corrupt, self.cfg, str(exc)) from None
                continue
            image_t, mask_t = self.transform(image, mask, example_id=raw.example_id)
            yield {"image": image_t, "mask": mask_t, "index": index,
                   "ori_shape": tuple(mask.shape[:2]), "worker": worker, "corrupt": corrupt}  # fmt: skip


def _pad_stack(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], h, w), value)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out


def make_val_collate(ignore_index: int):
    """Collate function padding images with 0 and masks with ``ignore_index`` (bottom/right)."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "image": _pad_stack([e["image"] for e in examples], 0.0),
            "mask": _pad_stack([e["mask"] for e in examples], ignore_index),
            "img_shapes": [tuple(e["image"].shape[-2:]) for e in examples],
            "ori_shapes": [e["ori_shape"] for e in examples],
            "index": torch.tensor([e["index"] for e in examples], dtype=torch.int64),
            "_worker": examples[-1]["worker"],
            "_corrupt": examples[-1]["corrupt"],
        }

    return collate


class ValLoader:
    """Iterable of validation batches of one rank (iterate it once per evaluation).

    Batch: ``{"image": float32 [B,3,h,w] padded with 0, "mask": int64 [B,H,W] original size
    padded with ignore_index, "img_shapes": [(h_i, w_i)], "ori_shapes": [(H_i, W_i)],
    "index": int64 [B] global example index}``.
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
        except UserError as exc:
            raise reraise_user_error(exc) from None


def build_val_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1) -> ValLoader:
    """The validation loader of process ``rank`` of ``world_size`` (see :class:`ValLoader`)."""
    if cfg.val is None:
        raise UserError("the recipe has no data.val section; add one to evaluate")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    base = load_source(cfg.val.source, where="data.val.source")
    return ValLoader(ValExamples(base, cfg, rank=rank, world_size=world_size), cfg)
