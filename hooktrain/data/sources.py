"""Sources: every kind ends as a ``datasets.IterableDataset`` with two raw columns.

``load_source`` returns a dataset whose only columns are ``image`` and ``annotation``, both
typed ``Image(decode=False)``: each value is ``{"bytes": ..., "path": ...}`` and the loaders
decode it themselves with OpenCV. Parquet-backed sources are resharded per row group when
``datasets`` can, so shards (the units of splitting, shuffling and resuming) stay small.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from hooktrain.data.folder import load_folder
from hooktrain.data.hub import check_repo, is_local, load_hub
from hooktrain.data.retry import Retries
from hooktrain.data.shapes import generate_shapes, shapes_files
from hooktrain.errors import UserError, did_you_mean
from hooktrain.recipe.data import (
    DataConfig,
    FolderSource,
    HubSource,
    ParquetSource,
    ShapesSource,
)


def prepare_data(cfg: DataConfig) -> None:
    """One-time work before streaming: generate the shapes dataset, download non-streamed
    Hub splits into the cache. Idempotent; call it on the main process first, then on the
    others (``with accelerator.main_process_first(): prepare_data(cfg)``)."""
    sources = [("data.train.source", cfg.train.source)]
    if cfg.val is not None:
        sources.append(("data.val.source", cfg.val.source))
    for where, source in sources:
        if isinstance(source, ShapesSource):
            _generate(source)
        elif isinstance(source, HubSource) and not source.streaming:
            load_source(source, where=where)


def _generate(source: ShapesSource) -> Path:
    return generate_shapes(
        source.root,
        num_train=source.num_train,
        num_val=source.num_val,
        image_size=source.image_size,
        train_shards=source.train_shards,
        val_shards=source.val_shards,
        seed=source.seed,
        bands=source.bands,
        bit_depth=source.bit_depth,
    )


def open_source(source: Any, *, where: str = "data.train.source"):
    """Open ``source`` as it is: ``(dataset, image column, annotation column)``, with every
    column of the source and its own features. ``where`` is the recipe key of the source,
    used in messages. :func:`load_source` narrows this to what training reads."""
    if isinstance(source, HubSource):
        return _load_hub(source, where), source.image_column, source.annotation_column
    if isinstance(source, ParquetSource):
        ds = _load_parquet(_resolve_globs(source.data_files, f"{where}.data_files"), where)
        return ds, source.image_column, source.annotation_column
    if isinstance(source, ShapesSource):
        files = shapes_files(source.root, source.split)
        if not files:
            raise UserError(
                f"{where}: no shapes dataset in {Path(source.root).absolute()}; "
                "call hooktrain.data.prepare_data(cfg) first (training does it for you)"
            )
        return _load_parquet(files, where), "image", "annotation"
    if isinstance(source, FolderSource):
        return load_folder(source, where), "image", "annotation"
    raise TypeError(f"unknown source {source!r}")  # pragma: no cover - the union admits no other


def load_source(source: Any, *, where: str = "data.train.source", retries: Retries | None = None):
    """Open ``source`` as a ``datasets.IterableDataset`` with raw ``image`` and
    ``annotation`` columns. ``where`` is the recipe key of the source, used in messages.

    With ``retries``, a Hub source whose repository answered once is opened again when the
    Hub fails midway (opening reads the files' metadata); the first question to the Hub is
    not retried, so a wrong id or ``HF_ENDPOINT`` fails at once."""
    if retries is not None and isinstance(source, HubSource) and not is_local(source):
        check_repo(source, where)
        return retries.call(lambda: _open_columns(source, where))
    return _open_columns(source, where)


def _open_columns(source: Any, where: str):
    from datasets import Image

    ds, image_column, annotation_column = open_source(source, where=where)
    if isinstance(source, FolderSource):
        return ds
    columns = _column_names(ds)
    for key, column in (("image_column", image_column), ("annotation_column", annotation_column)):
        if column not in columns:
            raise UserError(
                f"{where}: column '{column}' not found{did_you_mean(column, columns)}; the "
                f"source has columns {columns}; set {where}.{key} to the right one"
            )
    ds = ds.select_columns([image_column, annotation_column])
    if (image_column, annotation_column) != ("image", "annotation"):
        ds = ds.rename_columns({image_column: "_img", annotation_column: "_ann"})
        ds = ds.rename_columns({"_img": "image", "_ann": "annotation"})
    ds = ds.cast_column("image", Image(decode=False))
    ds = ds.cast_column("annotation", Image(decode=False))
    try:
        ds = ds.reshard()
    except NotImplementedError:
        pass
    return ds


def _column_names(ds) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds)).keys())  # features unknown until the first example


def _resolve_globs(patterns: str | list[str], where: str) -> list[str]:
    """Expand globs relative to the working directory into a sorted list of files."""
    files: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not found:
            raise UserError(
                f"{where}: '{pattern}' matched no files (relative paths resolve against the "
                f"working directory {os.getcwd()}); fix the path or glob"
            )
        files.extend(str(Path(f).absolute()) for f in found)
    return files


def _load_parquet(files: list[str], where: str):
    from datasets import load_dataset

    try:
        return load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{where}: cannot read parquet files {files[:3]}...: {exc}") from exc


def _load_hub(source: HubSource, where: str):
    ds = load_hub(source, where)
    if not source.streaming:
        ds = ds.to_iterable_dataset(num_shards=min(len(ds), 64) or 1)
    return ds


def read_bytes(value: dict[str, Any] | bytes) -> bytes:
    """The encoded bytes of a raw ``Image(decode=False)`` value (reading the file when the
    dataset holds only a path)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path")
    if not path:
        raise ValueError("image value holds neither bytes nor a path")
    with open(path, "rb") as f:
        return f.read()
