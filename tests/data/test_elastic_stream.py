"""Elastic resume of the train stream: with another number of processes or DataLoader
workers, the interrupted pass goes on with no example repeated and none left out, and the
next pass is whole. Ranks are simulated in one process (a stream is built per rank); workers
are real processes."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, tiny

from hooktrain.data import build_train_stream, prepare_data, reading
from hooktrain.data.elastic import mark
from hooktrain.data.reading import plan_reader
from hooktrain.data.stream import TrainExamples
from hooktrain.errors import UserError
from hooktrain.recipe.schema import load_recipe

ROWS = 24  # tiny(): 4 shards of 6 rows
ALL_ROWS = {(shard, row) for shard in range(4) for row in range(6)}
REAL_EXAMPLE = TrainExamples._example


@pytest.fixture(autouse=True)
def ids_instead_of_images(monkeypatch):
    """Each example becomes its (shard, row) id; forked DataLoader workers inherit this."""

    def example(self, raw, epoch, worker, pos):
        return torch.tensor([raw.shard, raw.row]), torch.zeros(1), worker, pos["corrupt"]

    monkeypatch.setattr(TrainExamples, "_example", example)


def stream(data_root: Path, rank: int, world_size: int, workers: int, *extra: str, seed: int = 0):
    options = [*tiny(data_root), f"data.train.num_workers={workers}", *extra]
    recipe = load_recipe(QUICKSTART, options, "/tmp/x")
    prepare_data(recipe.data)
    return build_train_stream(recipe.data, seed=seed, rank=rank, world_size=world_size)


def draw(streams, batches: int) -> list[tuple[int, int]]:
    """``batches`` batches from each stream, as example ids."""
    ids = []
    for s in streams:
        for _ in range(batches):
            ids += [tuple(pair) for pair in next(s)["image"].tolist()]
    return ids


def owned_rows(rank: int, world_size: int, worker: int, workers: int) -> set[tuple[int, int]]:
    plan = plan_reader(4, rank=rank, world_size=world_size, worker=worker, num_workers=workers)
    return {(shard, row) for shard in plan.shards for row in range(6)
            if row % plan.stride == plan.offset}  # fmt: skip


def assert_pass_goes_on(after, consumed, rank: int, world_size: int, workers: int) -> None:
    """Each reader of the new stream hands out its rows not in ``consumed``, once each, then
    all its rows once (its next pass)."""
    for worker in range(max(workers, 1)):
        rows = owned_rows(rank, world_size, worker, workers)
        sequence = [i for i in after if i in rows]
        rest = rows - set(consumed)
        assert Counter(sequence[: len(rest)]) == Counter(rest), worker  # the pass, finished
        following = sequence[len(rest) : len(rest) + len(rows)]
        assert Counter(following) == Counter(rows), worker  # the next pass, whole


@pytest.mark.parametrize(
    ("old", "new", "drawn"),
    [((2, 2), (1, 1), 2), ((1, 2), (2, 1), 3), ((1, 0), (1, 3), 5), ((2, 1), (1, 2), 1)],
    ids=["2x2-to-1x1", "1x2-to-2x1", "1x0-to-1x3", "2x1-to-1x2"],
)  # fmt: skip
def test_the_interrupted_pass_goes_on_without_repeats_or_gaps(data_root, old, new, drawn):
    """Each new reader first hands out its rows the old readers had not, once each, then
    all its rows once (its next pass)."""
    (old_world, old_workers), (new_world, new_workers) = old, new
    olds = [stream(data_root, r, old_world, old_workers) for r in range(old_world)]
    before = draw(olds, drawn)
    assert len(set(before)) == len(before)
    states = [s.state_dict() for s in olds]
    for s in olds:
        s.close()

    for rank in range(new_world):
        new_stream = stream(data_root, rank, new_world, new_workers)
        assert new_stream.resume(states).startswith("elastic")
        after = draw([new_stream], 2 * ROWS)
        new_stream.close()
        assert_pass_goes_on(after, before, rank, new_world, new_workers)


def test_a_second_resume_inside_an_elastic_pass_is_exact_and_keeps_the_skipped_rows(data_root):
    olds = [stream(data_root, r, 2, 1) for r in range(2)]
    before = draw(olds, 2)
    new = stream(data_root, 0, 1, 2)
    new.resume([s.state_dict() for s in olds])
    middle = draw([new], 2)
    state = new.state_dict()
    rest = draw([new], 2)
    new.close()

    again = stream(data_root, 0, 1, 2)
    assert again.resume([state]) == "exact"
    assert draw([again], 2) == rest
    assert sorted(before + middle + rest) == sorted({*before, *middle, *rest})
    again.close()


def test_same_settings_resume_exactly_with_real_batches(data_root, monkeypatch):
    """``resume`` with the old run's processes and settings is the bitwise exact path."""
    monkeypatch.setattr(TrainExamples, "_example", REAL_EXAMPLE)
    reference = [stream(data_root, r, 2, 2) for r in range(2)]
    expected = [[next(s) for _ in range(9)] for s in reference]
    olds = [stream(data_root, r, 2, 2) for r in range(2)]
    for s in olds:
        [next(s) for _ in range(5)]
    states = [s.state_dict() for s in olds]
    for s in reference + olds:
        s.close()
    for rank in range(2):
        new = stream(data_root, rank, 2, 2)
        assert new.resume(states) == "exact"
        for want in expected[rank][5:]:
            got = next(new)
            assert torch.equal(got["image"], want["image"])
            assert torch.equal(got["mask"], want["mask"])
        new.close()


def test_readers_in_different_passes_continue_the_earliest(data_root):
    """Rank 0 finished pass 0 and began pass 1; rank 1 is in pass 0. Pass 0 goes on without
    rank 0's rows; the rows rank 0 had drawn in pass 1 are drawn again in pass 1."""
    olds = [stream(data_root, r, 2, 1) for r in range(2)]
    first, second = draw(olds[:1], 7), draw(olds[1:], 3)  # a pass is 6 batches per rank
    new = stream(data_root, 0, 1, 0)
    assert new.resume([s.state_dict() for s in olds]).startswith("elastic")
    assert new.dataset.state_dict()["epoch"] == 0
    after = draw([new], 3 + ROWS // 2)
    assert Counter(after[:6]) == Counter(ALL_ROWS - set(first[:12]) - set(second))
    assert Counter(after[6 : 6 + ROWS]) == Counter(ALL_ROWS)


@pytest.mark.parametrize(
    "setting", ["data.train.batch_size=3", "data.train.shuffle_buffer=5"], ids=["batch", "buffer"]
)
def test_other_batch_size_or_shuffle_buffer_continue_the_pass(data_root, setting):
    old = stream(data_root, 0, 1, 2)
    before = draw([old], 3)
    state = old.state_dict()
    old.close()
    new = stream(data_root, 0, 1, 2, setting)
    assert new.resume([state]).startswith("elastic")
    after = draw([new], ROWS)
    new.close()
    assert_pass_goes_on(after, before, 0, 1, 2)


def test_an_elastic_pass_resumed_elastically_again(data_root):
    """2x1 -> 1x2 (never stepped before its checkpoint) -> 1x2 stepped -> 2x2: every row of
    the pass once."""
    olds = [stream(data_root, r, 2, 1) for r in range(2)]
    before = draw(olds, 2)
    unstepped = stream(data_root, 0, 1, 2)
    unstepped.resume([s.state_dict() for s in olds])
    middle = stream(data_root, 0, 1, 3)
    assert middle.resume([unstepped.state_dict()]).startswith("elastic")
    unstepped.close()
    before += draw([middle], 3)
    assert len(set(before)) == len(before)
    state = middle.state_dict()
    middle.close()
    for rank in range(2):
        new = stream(data_root, rank, 2, 2)
        assert new.resume([state]).startswith("elastic")
        after = draw([new], 2 * ROWS)
        new.close()
        assert_pass_goes_on(after, before, rank, 2, 2)


def test_consumed_rows_are_left_out_unconverted(data_root, monkeypatch):
    """Late in the pass, the first batch after an elastic resume converts only rows it may
    hand out: the consumed ones are read as Arrow rows and left there."""
    olds = [stream(data_root, r, 2, 0) for r in range(2)]
    before = draw(olds, 5)  # 20 of 24 rows
    converted = []
    real_row = reading.RawRow
    monkeypatch.setattr(reading, "RawRow", lambda *a: converted.append(a[:2]) or real_row(*a))
    new = stream(data_root, 0, 1, 0)
    assert new.resume([s.state_dict() for s in olds]).startswith("elastic")
    assert draw([new], 1)
    assert converted and not set(converted) & set(before)


def test_the_consumed_rows_of_ade20k_take_a_few_kb():
    seen: dict[int, bytearray] = {}
    for row in range(20_210):  # ADE20K train, in 64 shards
        mark(seen, row % 64, row // 64)
    assert len(pickle.dumps({s: bytes(b) for s, b in seen.items()})) < 4_000


def _state(data_root, **change):
    old = stream(data_root, 0, 2, 0)
    draw([old], 1)
    state = old.state_dict()
    state.update(change.pop("top", {}))
    state["fingerprint"].update(change)
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [({"seed": 1}, "seed=1 .now 0."), ({"num_shards": 8}, "num_shards=8 .now 4."),
     ({"top": {"format": 0}}, "has format 0, this version reads")],
    ids=["seed", "dataset", "format"],
)  # fmt: skip
def test_another_seed_dataset_or_format_is_refused(data_root, change, message):
    state = _state(data_root, **change)
    with pytest.raises(UserError, match=message):
        stream(data_root, 0, 1, 0).resume([state, state])


# -- end to end: real processes, real checkpoints ------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "stop_at", "max_iters", "port"),
    [((1, 2), (2, 2), 4, 18, 29861), ((2, 2), (1, 1), 2, 22, 29863)],
    ids=["1x2-to-2x2", "2x2-to-1x1"],
)
def test_resume_with_other_processes_and_workers_continues_the_pass(
    tmp_path, data_root, before, after, stop_at, max_iters, port
):
    from checkpoint_runs import run, train_command

    work_dir, prefix = tmp_path / "run", tmp_path / "ids"
    hooks = (
        "hooks=[{type: logger, interval: 1}, {type: checkpoint, interval: 100}, "
        f"{{type: 'probe_hooks:ExampleIdsHook', prefix: '{prefix}'}}"
    )
    stop = f", {{type: 'probe_hooks:SignalSelfHook', at_iter: {stop_at}}}]"

    def train(processes: int, workers: int, port: int, *extra: str):
        options = [*tiny(data_root, max_iters), f"data.train.num_workers={workers}"]
        command = train_command(work_dir, *extra, "--cfg-options", *options, processes=processes,
                                port=port)  # fmt: skip
        return run(command)

    first = train(before[0], before[1], port, "--cfg-options", hooks + stop)
    assert first.returncode in (143, 1), first.output[-4000:]  # 1: accelerate launch's own code
    assert (work_dir / "checkpoints" / f"iter_{stop_at}").is_dir(), first.output[-4000:]
    consumed = [
        tuple(i)
        for r in range(before[0])
        for i in json.loads(Path(f"{prefix}.rank{r}.json").read_text())
    ]
    assert len(consumed) == stop_at * 2 * before[0] and len(set(consumed)) == len(consumed)
    for r in range(before[0]):
        Path(f"{prefix}.rank{r}.json").unlink()

    second = train(after[0], after[1], port + 1, "--resume", "--cfg-options", hooks + "]")
    assert second.returncode == 0, second.output[-4000:]
    assert (
        f"at iteration {stop_at} (data stream: elastic, {before[0]} -> {after[0]} processes"
        in second.stdout
    )
    for rank in range(after[0]):
        seen = [tuple(i) for i in json.loads(Path(f"{prefix}.rank{rank}.json").read_text())]
        assert_pass_goes_on(seen, consumed, rank, after[0], after[1])
