"""Writing image/annotation examples as parquet shards that ``datasets`` reads as ``Image()``."""

from __future__ import annotations

import os

from hooktrain.checkpoint.files import atomic_path


def write_image_shard(
    path: str | os.PathLike, columns: dict[str, list[dict]], *, row_group_size: int
) -> None:
    """Write one shard of ``Image()`` columns, each a list of ``{"bytes", "path"}`` dicts.

    The file carries ``datasets``' schema metadata, so ``load_dataset("parquet")`` and the Hub
    see the columns as ``Image()`` features, exactly as ``Dataset.to_parquet`` would write them.
    pyarrow writes it directly: ``Dataset.from_dict`` would first pickle and hash the whole
    table for a cache fingerprint nothing here uses. The file appears under its name only once
    complete, so a crash never leaves a half-written shard.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image

    features = Features({name: Image() for name in columns})
    table = pa.Table.from_pydict(features.encode_batch(columns), schema=features.arrow_schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)
