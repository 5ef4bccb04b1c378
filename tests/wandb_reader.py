"""Read an offline wandb run back from its ``run-<id>.wandb`` record file (for tests).

The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by LevelDB-log
records in 32 KiB blocks: each record chunk has a 7-byte header (crc32c, length, type) and
a record longer than what is left of its block is split into FIRST / MIDDLE / LAST chunks.
Every reassembled payload is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    """Every record of a ``.wandb`` file, in the order written."""
    data = Path(path).read_bytes()
    magic, version = data[:4], data[6]
    if magic != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a wandb record file (header {data[:7]!r})")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict[str, Any]:
    """``key`` (or ``nested_key`` path) + ``value_json`` items as a dict of parsed values;
    a nested key ``["val/samples", "count"]`` becomes ``out["val/samples"]["count"]``."""
    out: dict[str, Any] = {}
    for item in items:
        *parents, last = [item.key] if item.key else list(item.nested_key)
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    """What a test wants to know about one offline run."""

    run_id: str
    project: str
    entity: str
    name: str
    group: str
    tags: list[str]
    resumed: bool
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per committed row
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[pb.MetricRecord] = field(default_factory=list)

    def series(self, key: str) -> dict[int, Any]:
        """``{_step: value}`` for every history row that holds ``key``."""
        return {row["_step"]: row[key] for row in self.history if key in row}


def read_run(path: str | Path) -> OfflineRun:
    """Parse an offline run from its ``.wandb`` file or its ``offline-run-*`` directory."""
    path = Path(path)
    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    run = None
    config: dict[str, Any] = {}
    history, summary, metrics = [], {}, []
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = (r.run_id, r.project, r.entity, r.display_name, r.run_group, list(r.tags), r.resumed)
            config.update(_items(r.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "metric":
            metrics.append(record.metric)
    if run is None:
        raise ValueError(f"{path} holds no run record")
    config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()}
    return OfflineRun(*run, config=config, history=history, summary=summary, metrics=metrics)


def offline_runs(wandb_dir: str | Path) -> list[Path]:
    """The ``offline-run-*`` directories under a ``wandb`` directory, oldest first."""
    return sorted(Path(wandb_dir).glob("offline-run-*"))
