"""What the train stream and the val loader share: who reads which rows, reading raw rows
from one shard, decoding an example, and DataLoader worker plumbing."""

from __future__ import annotations

import atexit
import functools
import logging
import math
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from hooktrain.data.labels import WrongImage, example_name
from hooktrain.data.retry import Retries, quiet_client_retries
from hooktrain.data.sources import read_bytes
from hooktrain.data.transforms import LabelMapper, decode_image, decode_mask, limit_opencv_threads
from hooktrain.errors import RunError, UserError, first_line
from hooktrain.recipe.data import DataConfig

logger = logging.getLogger(__name__)

# Whole shards go to readers when they divide evenly or are plentiful enough that one extra
# shard per reader is a small imbalance; otherwise readers stride over rows (balanced).
_WHOLE_SHARDS_FACTOR = 16
_ARROW_BATCH = 64


@dataclass(frozen=True)
class ReaderPlan:
    """The rows one reader (a rank's DataLoader worker) owns: rows ``r`` of each of
    ``shards`` with ``r % stride == offset``."""

    shards: tuple[int, ...]
    stride: int = 1
    offset: int = 0


def _split(plan: ReaderPlan, parts: int, index: int) -> ReaderPlan:
    n = len(plan.shards)
    if n % parts == 0 or n >= _WHOLE_SHARDS_FACTOR * parts:
        return ReaderPlan(plan.shards[index::parts], plan.stride, plan.offset)
    return ReaderPlan(plan.shards, plan.stride * parts, plan.offset + plan.stride * index)


def plan_reader(
    num_shards: int, *, rank: int, world_size: int, worker: int, num_workers: int
) -> ReaderPlan:
    """Split ``num_shards`` shards first across ranks, then across a rank's workers.

    At each level, whole shards are handed out round-robin when their number divides evenly
    (or is at least 16 per part), as ``datasets.distributed.split_dataset_by_node`` does;
    otherwise every part reads all shards and keeps every n-th row. Plans of distinct
    (rank, worker) pairs never share a row, and together they cover every row.
    """
    plan = _split(ReaderPlan(tuple(range(num_shards))), world_size, rank)
    return _split(plan, max(num_workers, 1), worker)


@dataclass
class RawRow:
    """One undecoded example and where it came from."""

    shard: int
    row: int  # row index inside the shard
    image: Any  # {"bytes", "path"} of Image(decode=False)
    annotation: Any

    @property
    def example_id(self) -> str:
        path = self.image.get("path") if isinstance(self.image, dict) else None
        where = f"shard {self.shard} row {self.row}"
        return f"{path} ({where})" if path else where


def _kept_rows(table, first: int, stride: int, offset: int) -> list[int]:
    """Positions in ``table`` (whose first row has index ``first``) of the rows with
    ``index % stride == offset``."""
    return list(range((offset - first) % stride, len(table), stride))


def _shard_tables(base, num_shards: int, shard: int, first_row: int):
    """The Arrow tables of ``shard`` of ``base`` from row ``first_row`` on (``datasets``
    skips the rows before it without converting them)."""
    ds = base.shard(num_shards=num_shards, index=shard, contiguous=True)
    if first_row:
        ds = ds.skip(first_row)
    return ds.with_format("arrow").iter(batch_size=_ARROW_BATCH)


def shard_rows(
    base,
    num_shards: int,
    shard: int,
    plan: ReaderPlan,
    start: int = 0,
    leave_out: Callable[[int, int], bool] | None = None,
    retries: Retries | None = None,
):
    """Yield ``(kept_index, RawRow)`` for the plan's rows of ``shard`` from the ``start``-th
    kept row on. Rows before it are skipped by ``datasets`` on Arrow tables, so nothing
    before ``start`` is converted to Python, let alone decoded. Rows for which
    ``leave_out(shard, row)`` is true keep their kept index but are not converted either.
    With ``retries``, a read that fails on the network is re-opened at the next row."""

    def rows_from(kept: int):
        raw = plan.offset + plan.stride * kept
        for table in _shard_tables(base, num_shards, shard, raw):
            idx = _kept_rows(table, raw, plan.stride, plan.offset)
            wanted = [(kept + n, i) for n, i in enumerate(idx)
                      if leave_out is None or not leave_out(shard, raw + i)]  # fmt: skip
            kept += len(idx)
            if wanted:
                sub = table.take([i for _, i in wanted])
                images = sub.column("image").to_pylist()
                annotations = sub.column("annotation").to_pylist()
                for (k, i), image, annotation in zip(wanted, images, annotations, strict=True):
                    yield k + 1, (k, RawRow(shard, raw + i, image, annotation))
            raw += len(table)

    rows = rows_from(start) if retries is None else retries.read(rows_from, start)
    for _, row in rows:
        yield row


class CorruptExample(Exception):
    """An example whose bytes cannot be decoded (skipped and counted, not fatal)."""


class ExampleDecoder:
    """Bytes to ``(image HxWxC uint8/uint16, mask HxW label-mapped)``, C = ``data.in_channels``.

    Undecodable images or annotations raise :class:`CorruptExample`; images and annotations
    that decode but are wrong (another channel count or pixel type, colour masks, labels out
    of range) raise ``UserError``.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.mapper = LabelMapper(
            cfg.num_classes,
            ignore_index=cfg.ignore_index,
            reduce_zero_label=cfg.reduce_zero_label,
            label_map=cfg.label_map,
            out_of_range=cfg.out_of_range,
            mask_scale=cfg.mask_scale,
        )
        self.in_channels = cfg.in_channels

    def __call__(self, row: RawRow) -> tuple[np.ndarray, np.ndarray]:
        example_id = row.example_id
        try:
            image = decode_image(row.image, example_id, self.in_channels)
        except WrongImage:
            raise  # decodes, but does not fit the recipe: the user must fix one or the other
        except Exception as exc:  # noqa: BLE001 - any failure to decode means corrupt
            raise _corrupt(example_id, exc) from exc
        try:
            mask = decode_mask(row.annotation, example_id)
        except UserError as exc:
            if _decodable(row.annotation):
                raise  # a real annotation that is wrong: the user must fix the dataset
            raise _corrupt(example_id, exc) from exc
        return image, self.mapper(mask, example_id)


def _corrupt(example_id: str, exc: Exception) -> CorruptExample:
    """A ``CorruptExample`` whose message names the example once: the decoders' own errors
    already start with its name."""
    text, name = first_line(exc), example_name(example_id)
    return CorruptExample(text if text.startswith(name) else f"{name}: {text}")


def _decodable(value: Any) -> bool:
    try:
        data = np.frombuffer(read_bytes(value), np.uint8)
    except (OSError, ValueError):
        return False
    return data.size > 0 and cv2.imdecode(data, cv2.IMREAD_UNCHANGED) is not None


def corrupt_cap_error(count: int, cfg: DataConfig, last: str | None = None) -> UserError:
    """The error that stops a run after more than ``max_corrupt`` undecodable examples;
    ``last`` is the message of the latest one."""
    if cfg.max_corrupt == 0 and last:
        return UserError(
            f"{last}; data.max_corrupt=0 skips no undecodable example: fix or remove the file, "
            "or set data.max_corrupt to the number of undecodable examples to skip"
        )
    detail = f" (last: {last})" if last else " (the warnings above name them)"
    return UserError(
        f"{count} examples could not be decoded, more than data.max_corrupt="
        f"{cfg.max_corrupt}{detail}; fix or remove the corrupt files, or raise data.max_corrupt"
    )


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per worker, so workers do not
    oversubscribe the cores (OpenCV's single thread they inherit: :func:`loader_options`),
    and deaf to SIGTERM/SIGINT.

    Schedulers and terminals signal the whole process group. A worker that died of it would
    crash the main process mid-iteration; instead the main process finishes the iteration,
    saves, and shuts its workers down.
    """
    torch.set_num_threads(1)
    quiet_client_retries()  # inherited when forked, not when spawned
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_position() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the calling DataLoader worker, or (0, 1)."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@functools.cache
def _kill_workers_at_exit() -> None:
    """multiprocessing ends daemonic children at exit with SIGTERM, which the workers ignore
    (``worker_init``); an aborted run would wait for them for ever. They hold nothing to
    save, so they are killed first (``atexit`` runs the latest registration first)."""

    def kill_daemonic_children() -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill_daemonic_children)


def loader_options(num_workers: int, prefetch_factor: int, pin_memory: bool = True) -> dict[str, Any]:
    """DataLoader keyword arguments shared by the train stream and the val loader. Pinning
    happens on CUDA machines only. With workers, OpenCV is made single-threaded here, before
    they fork, so they inherit it (see :func:`~hooktrain.data.transforms.limit_opencv_threads`)."""
    pin_memory = pin_memory and torch.cuda.is_available()
    if num_workers == 0:
        return {"num_workers": 0, "pin_memory": pin_memory}
    limit_opencv_threads()
    _kill_workers_at_exit()
    return {
        "num_workers": num_workers,
        "worker_init_fn": worker_init,
        "persistent_workers": True,
        "prefetch_factor": prefetch_factor,
        "pin_memory": pin_memory,
    }


def one_line_error(exc: UserError | RunError) -> UserError | RunError:
    """A ``UserError`` or ``RunError`` re-raised by DataLoader from a worker carries the
    worker's traceback in its message; return one of its type with the original line."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    prefix = f"{type(exc).__name__}: "
    return type(exc)(last[last.index(prefix) + len(prefix) :] if prefix in last else last)


def warn_corrupt(message: str, count: int, cfg: DataConfig) -> None:
    """Log the ``count``-th skipped example, or raise :func:`corrupt_cap_error` when it is one
    more than ``data.max_corrupt`` allows: the error line then says it all, with no warning of
    an example that was not skipped before it."""
    if count > cfg.max_corrupt:
        raise corrupt_cap_error(count, cfg, message) from None
    logger.warning(
        "skipping an undecodable example (%d of at most %d): %s", count, cfg.max_corrupt, message
    )


def strided_rows(base, stride: int, offset: int, retries: Retries | None = None) -> Iterator[tuple[int, RawRow]]:
    """Rows of ``base`` whose global index (position in shard order) is ``offset`` modulo
    ``stride``, with that index. Other rows are read but never converted to Python. With
    ``retries``, a read that fails on the network is re-opened at the next table."""
    index = 0  # global index of the current shard's first row
    for shard in range(base.num_shards):

        def tables_from(row: int, shard: int = shard, first: int = index):
            for table in _shard_tables(base, base.num_shards, shard, row):
                idx = _kept_rows(table, first + row, stride, offset)
                found = []
                if idx:
                    sub = table.take(idx)
                    images = sub.column("image").to_pylist()
                    annotations = sub.column("annotation").to_pylist()
                    found = [(first + row + i, RawRow(shard, row + i, image, annotation))
                             for i, image, annotation in zip(idx, images, annotations, strict=True)]  # fmt: skip
                row += len(table)
                yield row, found

        rows = 0
        for rows, found in tables_from(0) if retries is None else retries.read(tables_from):
            yield from found
        index += rows


def first_rows(base, num_shards: int | None = None, retries: Retries | None = None) -> Iterator[RawRow]:
    """The first row of each shard of ``base``, or of its first ``num_shards`` shards."""
    shards = base.num_shards if num_shards is None else min(num_shards, base.num_shards)
    for shard in range(shards):
        rows = shard_rows(base, base.num_shards, shard, ReaderPlan((shard,)), retries=retries)
        try:
            first = next(rows, None)
        finally:
            rows.close()  # stop the source's reader now
        if first is not None:
            yield first[1]


def check_first_examples(
    cfg: DataConfig,
    base,
    transform: Callable,
    *,
    num_shards: int | None = None,
    world_size: int = 1,
    retries: Retries | None = None,
) -> int:
    """Decode, label-map and ``transform`` the first example of each shard of ``base`` as the
    loaders do, so that what would stop them later (an unreadable or colour mask, labels out of
    range, an image and mask of different sizes) stops the caller now, with the same one-line
    ``UserError``. Undecodable examples are skipped as the loaders skip them; the cap error is
    raised only when the ``world_size`` processes sharing them cannot all stay within
    ``data.max_corrupt``. ``retries`` re-reads what fails on the network. Returns the number of
    examples checked."""
    decode = ExampleDecoder(cfg)
    checked, corrupt = 0, []
    for raw in first_rows(base, num_shards, retries):
        checked += 1
        try:
            image, mask = decode(raw)
        except CorruptExample as exc:
            corrupt.append(str(exc))
            continue
        transform(image, mask, example_id=raw.example_id)
    # The processes share these examples: however they are split, one meets at least this many.
    if math.ceil(len(corrupt) / world_size) > cfg.max_corrupt:
        raise corrupt_cap_error(len(corrupt), cfg, corrupt[-1])
    return checked
