"""The training stream: endless, sharded across ranks and workers, shuffled, exactly resumable.

Design (why it resumes exactly)
    The source's shards (parquet row groups when ``datasets`` can split files that finely)
    are divided between ranks and then between each rank's DataLoader workers by
    :func:`~hooktrain.data.reading.plan_reader`: every (rank, worker) reader owns a fixed,
    disjoint set of rows. A reader walks its rows in passes ("epochs", counted per reader).
    Pass ``e`` visits the reader's shards in an order drawn from ``rng(seed, e, rank,
    worker)``, cuts the concatenated rows into consecutive windows of ``shuffle_buffer`` rows
    and yields each window in a permutation drawn from ``rng(seed, e, window start, rank,
    worker)``. Augmentation draws from ``rng(seed, e, shard, row)`` of each example (with
    ``data.train.gpu_augment`` too: the workers then draw the PhotoMetricDistortion parameters
    and hand them over with the uint8 crop, see :mod:`hooktrain.data.device_augment`).

    Everything is a function of the position, so the position is the whole state:
    ``(epoch, window start = (shard cursor, row), offset in the window, corrupt count)``.
    Restoring re-opens the window's first shard at its row (``datasets`` skips the rows
    before it on Arrow tables, without converting or decoding them), re-reads the raw bytes
    of that one window, re-draws its permutation and continues at the offset. Only the
    examples still to come are decoded, so resume costs one window of raw reads wherever
    the position is.

    With ``num_workers > 0``, torchdata's ``StatefulDataLoader`` asks each worker's dataset
    for its state after every batch and hands batches out round-robin by worker; workers
    never run dry (passes are endless), so the batch order is fixed and its state dict
    (per worker positions plus the next worker) restores it exactly.

    With another number of processes or workers the positions no longer apply; each reader
    also records the rows it handed out in its pass, and the new readers continue that pass
    without them (``hooktrain.data.elastic``).
"""

from __future__ import annotations

import warnings
from itertools import islice
from typing import Any

import numpy as np
import torch

from hooktrain.data.elastic import PassSkip, continue_pass, mark, old_readers
from hooktrain.data.reading import (
    CorruptExample,
    ExampleDecoder,
    RawRow,
    ReaderPlan,
    corrupt_cap_error,
    loader_options,
    one_line_error,
    plan_reader,
    shard_rows,
    warn_corrupt,
    worker_position,
)
from hooktrain.data.retry import Retries
from hooktrain.data.sources import load_source
from hooktrain.data.transforms import TrainTransform
from hooktrain.errors import RunError, SourceOutage, UserError
from hooktrain.recipe.data import DataConfig

_STATE_FORMAT = 1
# Distinct first words of the RNG keys, so no two uses of the seed share a stream.
_ORDER, _WINDOW, _EXAMPLE = 1, 2, 3


def _fresh_position() -> dict[str, int]:
    return {"epoch": 0, "cursor": 0, "row": 0, "pos": 0, "corrupt": 0}


class TrainExamples(torch.utils.data.IterableDataset):
    """The examples of one rank, as seen by each of its DataLoader workers (a reader).

    Iterating yields ``(image [3,h,w], mask [h,w], worker, corrupt_count, (example_id,
    pass))`` forever: ``example_id`` is :attr:`RawRow.example_id` (``"shard 3 row 5"``, with
    the file name first when the source has one) and ``pass`` the reader's pass number.
    ``state_dict``/``load_state_dict`` hold the reader's position (see the module doc).
    With ``data.train.gpu_augment`` the image is the uint8 crop and a last element
    ``(photometric draws [9], (h, w))`` follows (:meth:`TrainTransform.uint8_crop`).
    """

    def __init__(
        self,
        base,
        cfg: DataConfig,
        *,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        retries: Retries | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.num_shards = base.num_shards
        self.cfg = cfg
        self.seed = int(seed) % 2**63
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.window = cfg.train.shuffle_buffer
        self.gpu_augment = cfg.train.gpu_augment
        self.decode = ExampleDecoder(cfg)
        self.transform = TrainTransform(
            cfg.train.pipeline,
            mean=cfg.mean,
            std=cfg.std,
            ignore_index=cfg.ignore_index,
            in_channels=cfg.in_channels,
        )
        self.retries = retries or Retries.for_source(cfg.train.source, cfg.retry_budget_s, "data.train.source")
        self._position = _fresh_position()
        self._seen: dict[int, bytearray] = {}  # rows handed out in this pass (elastic resume)
        self._skip: PassSkip | None = None  # rows consumed in this pass before an elastic resume

    def state_dict(self) -> dict[str, Any]:
        """The position of this reader: everything needed to continue exactly, plus the rows
        it handed out in this pass (for an elastic resume)."""
        return {
            **self._position,
            "seen": {shard: bytes(bits) for shard, bits in self._seen.items()},
            "skip": self._skip.state_dict() if self._skip is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position returned by ``state_dict``."""
        state = dict(state)
        seen = state.pop("seen", None) or {}
        self._seen = {shard: bytearray(bits) for shard, bits in seen.items()}
        self._skip = PassSkip.from_state(state.pop("skip", None))
        self._position = {**_fresh_position(), **state}

    def continue_pass(self, epoch: int, skip: PassSkip) -> None:
        """Start this reader in pass ``epoch``, leaving out the rows ``skip`` covers."""
        self._position = {**_fresh_position(), "epoch": epoch}
        self._seen, self._skip = {}, skip

    def _plan(self) -> tuple[int, ReaderPlan]:
        worker, _ = worker_position()
        return worker, plan_reader(
            self.num_shards,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=self.num_workers,
        )

    def _rows_from(self, plan: ReaderPlan, order: list[int], cursor: int, row: int):
        """``(cursor, kept row index, RawRow)`` from position ``(cursor, row)`` to the end of
        the pass, without the rows an elastic resume left out (read, never converted)."""
        leave_out = self._skip.covers if self._skip is not None else None
        for c in range(cursor, len(order)):
            for kept, raw in shard_rows(self.base, self.num_shards, order[c], plan,
                                        row if c == cursor else 0, leave_out, self.retries):  # fmt: skip
                yield c, kept, raw

    def __iter__(self):
        worker, plan = self._plan()
        pos = self._position
        while True:
            epoch, at_pass_start = pos["epoch"], pos["cursor"] == pos["row"] == 0
            order = list(plan.shards)
            np.random.default_rng([self.seed, _ORDER, epoch, self.rank, worker]).shuffle(order)
            rows = self._rows_from(plan, order, pos["cursor"], pos["row"])
            seen = 0
            while window := list(islice(rows, self.window)):
                seen += len(window)
                key = [self.seed, _WINDOW, epoch, pos["cursor"], pos["row"], self.rank, worker]
                perm = np.random.default_rng(key).permutation(len(window))
                last_cursor, last_kept, _ = window[-1]
                for p in range(pos["pos"], len(window)):
                    # The position moves before the example is used: a snapshot taken after
                    # this yield must point past it.
                    if p + 1 < len(window):
                        pos["pos"] = p + 1
                    else:
                        pos.update(cursor=last_cursor, row=last_kept + 1, pos=0)
                    raw = window[perm[p]][2]
                    mark(self._seen, raw.shard, raw.row)
                    example = self._example(raw, epoch, worker, pos)
                    if example is not None:
                        yield (*example[:4], (raw.example_id, epoch), *example[4:])
            if at_pass_start and seen == 0 and self._skip is None:
                raise UserError(
                    f"data.train.source: rank {self.rank} worker {worker} got no training "
                    f"examples ({self.num_shards} shards for {self.world_size} ranks x "
                    f"{max(self.num_workers, 1)} workers); lower data.train.num_workers or "
                    "use a larger dataset"
                )
            pos.update(epoch=epoch + 1, cursor=0, row=0, pos=0)
            self._seen, self._skip = {}, None

    def _example(self, raw: RawRow, epoch: int, worker: int, pos: dict[str, int]):
        try:
            image, mask = self.decode(raw)
        except CorruptExample as exc:
            if epoch > 0:
                return None  # counted (and reported) in the first pass already
            pos["corrupt"] += 1
            count = pos["corrupt"]
            warn_corrupt(str(exc), count, self.cfg)  # raises past data.max_corrupt
            return None
        rng = np.random.default_rng([self.seed, _EXAMPLE, epoch, raw.shard, raw.row])
        if self.gpu_augment:
            image_t, mask_t, draws, size = self.transform.uint8_crop(image, mask, rng, example_id=raw.example_id)
            return image_t, mask_t, worker, pos["corrupt"], (draws, size)
        image_t, mask_t = self.transform(image, mask, rng, example_id=raw.example_id)
        return image_t, mask_t, worker, pos["corrupt"]


def collate_train(examples: list[tuple]) -> dict[str, Any]:
    """Stack examples into a batch; ``_worker``/``_corrupt`` are removed by ``TrainStream``.

    Examples that carry their ``(example_id, pass)`` (those of :class:`TrainExamples`) also
    give ``"example_ids": [str]`` and ``"passes": [int]``, for tools such as ``hooktrain
    browse``; training uses only ``image`` and ``mask``. ``gpu_augment`` examples also give
    ``"photometric"``: float32 ``[B, 9]`` and ``"image_sizes"``: int64 ``[B, 2]`` (their image
    is uint8; the model's input stage, :class:`hooktrain.models.input_stage.InputStage`, finishes it on the device).
    """
    columns = list(zip(*examples, strict=True))
    images, masks, workers, corrupt = columns[:4]
    batch = {
        "image": torch.stack(images),
        "mask": torch.stack(masks),
        "_worker": workers[-1],
        "_corrupt": corrupt[-1],
    }
    if len(columns) > 4:
        batch["example_ids"] = [example_id for example_id, _ in columns[4]]
        batch["passes"] = [epoch for _, epoch in columns[4]]
    if len(columns) > 5:
        draws, sizes = zip(*columns[5], strict=True)
        batch["photometric"] = torch.stack(draws)
        batch["image_sizes"] = torch.tensor(sizes, dtype=torch.int64)
    return batch


class TrainStream:
    """Endless iterator of training batches ``{"image": float32 [B,3,H,W], "mask": int64
    [B,H,W], "example_ids": [str], "passes": [int]}`` on the CPU, with
    ``state_dict``/``load_state_dict`` for exact resume. ``example_ids`` and ``passes`` name
    where each example came from (see :class:`TrainExamples`); training ignores them. With
    ``data.train.gpu_augment`` the image is uint8 and ``"photometric"`` and ``"image_sizes"``
    come with it (see :func:`collate_train`).

    The state belongs to this rank: ``load_state_dict`` restores it exactly with the same
    ``world_size``, ``num_workers``, ``batch_size``, ``shuffle_buffer``, seed and data;
    ``resume`` takes every rank's state and also continues with other processes or workers.
    """

    def __init__(self, dataset: TrainExamples, cfg: DataConfig) -> None:
        self.dataset = dataset
        self.cfg = cfg
        self._workers = max(cfg.train.num_workers, 1)
        self._corrupt = [0] * self._workers
        self._loader = self._make_loader()
        self._iter = None
        self._ahead: list[dict[str, Any]] = []  # batches fetch_ahead took, not yet handed out
        self._before_ahead: dict[str, Any] | None = None  # the state before them
        self.fingerprint = {
            "rank": dataset.rank,
            "world_size": dataset.world_size,
            "num_workers": cfg.train.num_workers,
            "batch_size": cfg.train.batch_size,
            "shuffle_buffer": cfg.train.shuffle_buffer,
            "seed": dataset.seed,
            "num_shards": dataset.num_shards,
        }

    def _make_loader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        train = self.cfg.train
        with warnings.catch_warnings():  # torchdata 0.11 warns about its own set_vital call
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            return StatefulDataLoader(
                self.dataset,
                batch_size=train.batch_size,
                collate_fn=collate_train,
                **loader_options(train.num_workers, train.prefetch_factor, train.pin_memory),
            )

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._ahead:
            batch = self._ahead.pop(0)
            if not self._ahead:
                self._before_ahead = None
            return batch
        return self._next_batch()

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self._loader)
        try:
            batch = next(self._iter)
        except (UserError, RunError) as exc:
            raise one_line_error(exc) from None
        self._corrupt[batch.pop("_worker")] = batch.pop("_corrupt")
        if sum(self._corrupt) > self.cfg.max_corrupt:
            raise corrupt_cap_error(sum(self._corrupt), self.cfg)
        return batch

    def fetch_ahead(self, count: int) -> SourceOutage | None:
        """Take the next ``count`` batches now; ``next`` hands them out first. Until it has,
        :meth:`state_dict` still gives the position before them, so a checkpoint taken
        meanwhile holds the batches trained on and nothing more. Returns the
        :class:`~hooktrain.errors.SourceOutage` that stopped the fetch, if one did: the
        position before the fetch then stays the stream's saved position."""
        if self._ahead:
            raise RuntimeError("fetch_ahead: the batches fetched before are not used up")
        self._before_ahead = self._own_state()
        try:
            for _ in range(count):
                self._ahead.append(self._next_batch())
        except SourceOutage as exc:
            return exc
        return None

    @property
    def num_corrupt(self) -> int:
        """Undecodable examples skipped so far by this rank."""
        return sum(self._corrupt)

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (plain Python data, picklable): after the last batch ``next``
        handed out (see :meth:`fetch_ahead`)."""
        return self._before_ahead if self._before_ahead is not None else self._own_state()

    def _own_state(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "fingerprint": dict(self.fingerprint),
            "loader": self._loader.state_dict(),
            "corrupt": list(self._corrupt),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the stream that wrote ``state`` was."""
        self._check_format(state)
        saved = state["fingerprint"]
        diff = [f"{k}={saved.get(k)} (now {v})" for k, v in self.fingerprint.items()
                if saved.get(k) != v]  # fmt: skip
        if diff:
            raise UserError(
                "cannot resume the data stream exactly: the checkpoint was written with "
                f"{', '.join(diff)}; resume with the same processes, data.train settings, "
                "seed and dataset"
            )
        self.close()
        self._loader = self._make_loader()
        self._loader.load_state_dict(state["loader"])
        self._corrupt = list(state["corrupt"])

    def resume(self, states: list[dict[str, Any]]) -> str:
        """Continue from the states of every rank of the run that wrote a checkpoint (index =
        its rank). Returns ``"exact"`` when this rank's own state fits (same processes,
        workers and ``data.train`` settings: bitwise the same batches), else continues the
        interrupted pass elastically (``hooktrain.data.elastic``) and says how."""
        own = states[self.dataset.rank] if len(states) == self.dataset.world_size else None
        if own is not None and own.get("fingerprint") == self.fingerprint:
            self.load_state_dict(own)
            return "exact"
        for state in states:
            self._check_format(state)
            saved = state["fingerprint"]
            diff = [f"{k}={saved[k]} (now {self.fingerprint[k]})" for k in ("seed", "num_shards")
                    if saved[k] != self.fingerprint[k]]  # fmt: skip
            if diff:
                raise UserError(
                    f"cannot continue the data pass: the checkpoint was written with "
                    f"{', '.join(diff)}; resume with the same seed and dataset"
                )
        readers = [reader for state in states for reader in old_readers(state)]
        epoch, skip = continue_pass(readers)
        self.close()
        self.dataset.continue_pass(epoch, skip)
        self._loader = self._make_loader()
        old = states[0]["fingerprint"]
        return (f"elastic, {old['world_size']} -> {self.dataset.world_size} processes x "
                f"{max(old['num_workers'], 1)} -> {self._workers} readers each; the pass goes on "
                f"without the {len(readers)} old readers' consumed rows")  # fmt: skip

    @staticmethod
    def _check_format(state: dict[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise UserError(
                f"the checkpoint's data stream state has format {state.get('format')}, this "
                f"version reads {_STATE_FORMAT}; resume with the hooktrain version that wrote it"
            )

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` starts them again)."""
        self._ahead, self._before_ahead = [], None
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def build_train_stream(
    cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1
) -> TrainStream:
    """The training stream of process ``rank`` of ``world_size`` (see :class:`TrainStream`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    retries = Retries.for_source(cfg.train.source, cfg.retry_budget_s, "data.train.source")
    base = load_source(cfg.train.source, where="data.train.source", retries=retries)
    dataset = TrainExamples(
        base,
        cfg,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.train.num_workers,
        retries=retries,
    )
    return TrainStream(dataset, cfg)
