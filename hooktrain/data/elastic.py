"""Elastic resume: continuing a data pass with another number of processes or workers.

Every reader (a rank's DataLoader worker) records which rows of each shard it handed out in
its current pass, as one bit per row (``seen``: 20,000 ADE20K rows are 2.5 KB in all). A run
resumed with other readers cannot continue the old readers' positions, since their row
assignments changed. Instead, the new readers continue the pass of the old reader that was
furthest behind: each walks its own rows of that pass in the usual shuffled order, leaving
out (``PassSkip``) every row an old reader had handed out in it, and every row of an old
reader that had already finished it. So no example of the pass is repeated or left out; the
following passes are normal. Rows that readers one pass ahead had handed out in their *next*
pass are seen again in that next pass (readers drift apart by at most a few rows per pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hooktrain.data.reading import ReaderPlan, plan_reader

Bitmaps = dict[int, bytes]  # shard -> bit r set when row r of the shard is meant


def mark(bitmaps: dict[int, bytearray], shard: int, row: int) -> None:
    """Set the bit of ``row`` of ``shard``."""
    bitmap = bitmaps.setdefault(shard, bytearray())
    if len(bitmap) <= row >> 3:
        bitmap.extend(bytes((row >> 3) + 1 - len(bitmap)))
    bitmap[row >> 3] |= 1 << (row & 7)


def _is_set(bitmaps: Bitmaps, shard: int, row: int) -> bool:
    bitmap = bitmaps.get(shard)
    return bitmap is not None and row >> 3 < len(bitmap) and bool(bitmap[row >> 3] >> (row & 7) & 1)


@dataclass
class PassSkip:
    """Rows a reader leaves out of its current pass, because they were consumed in it before
    an elastic resume: single rows (``bits``) and whole plans of readers that had finished."""

    bits: Bitmaps = field(default_factory=dict)
    plans: list[ReaderPlan] = field(default_factory=list)

    def covers(self, shard: int, row: int) -> bool:
        return _is_set(self.bits, shard, row) or any(
            shard in plan.shards and row % plan.stride == plan.offset for plan in self.plans
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "bits": dict(self.bits),
            "plans": [[list(p.shards), p.stride, p.offset] for p in self.plans],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> PassSkip | None:
        if state is None:
            return None
        plans = [
            ReaderPlan(tuple(shards), stride, offset) for shards, stride, offset in state["plans"]
        ]
        return cls(dict(state["bits"]), plans)


@dataclass
class OldReader:
    """One reader of the run that wrote the checkpoint, and where it was."""

    plan: ReaderPlan
    position: dict[str, Any]


def old_readers(stream_state: dict[str, Any]) -> list[OldReader]:
    """The readers of one rank's ``TrainStream.state_dict()``, with their positions (a
    reader that never produced a batch is at the start of pass 0)."""
    fp, loader = stream_state["fingerprint"], stream_state["loader"]
    workers = max(fp["num_workers"], 1)
    if fp["num_workers"] == 0:
        positions = {0: loader.get("dataset_state")}
    else:
        snapshots = loader.get("_snapshot", {}).get("_worker_snapshots", {})
        positions = {
            int(k.removeprefix("worker_")): v.get("dataset_state") for k, v in snapshots.items()
        }
    return [
        OldReader(
            plan_reader(
                fp["num_shards"],
                rank=fp["rank"],
                world_size=fp["world_size"],
                worker=worker,
                num_workers=fp["num_workers"],
            ),
            positions.get(worker) or {"epoch": 0},
        )  # fmt: skip
        for worker in range(workers)
    ]


def continue_pass(readers: list[OldReader]) -> tuple[int, PassSkip]:
    """The pass new readers continue (the earliest any old reader was in) and the rows they
    leave out of it."""
    epoch = min(reader.position.get("epoch", 0) for reader in readers)
    bits: dict[int, bytearray] = {}
    plans: list[ReaderPlan] = []
    for reader in readers:
        if reader.position.get("epoch", 0) > epoch:
            plans.append(reader.plan)
            continue
        previous = PassSkip.from_state(reader.position.get("skip"))
        if previous is not None:
            plans.extend(previous.plans)
        for source in (reader.position.get("seen") or {}, previous.bits if previous else {}):
            for shard, bitmap in source.items():
                merged = bits.setdefault(shard, bytearray())
                merged.extend(bytes(max(0, len(bitmap) - len(merged))))
                for i, byte in enumerate(bitmap):
                    merged[i] |= byte
    return epoch, PassSkip({k: bytes(v) for k, v in bits.items()}, plans)
