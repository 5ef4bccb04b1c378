"""Elastic resume of the train stream: with another number of processes or DataLoader
workers, the interrupted pass goes on with no example repeated and none left out, and the
next pass is whole. Ranks are simulated in one process (a stream is built per rank); workers
are real processes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from hooktrain.data import build_train_stream, prepare_data
from hooktrain.data.reading import plan_reader
from hooktrain.data.stream import TrainExamples
from hooktrain.errors import UserError
from hooktrain.recipe import load_recipe
from conftest import QUICKSTART
from test_train import tiny

ROWS = 24  # tiny(): 4 shards of 6 rows


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elastic_shapes") / "shapes"


@pytest.fixture(autouse=True)
def ids_instead_of_images(monkeypatch):
    """Each example becomes its (shard, row) id; forked DataLoader workers inherit this."""

    def example(self, raw, epoch, worker, pos):
        return torch.tensor([raw.shard, raw.row]), torch.zeros(1), worker, pos["corrupt"]

    monkeypatch.setattr(TrainExamples, "_example", example)


def stream(data_root: Path, rank: int, world_size: int, workers: int, seed: int = 0):
    recipe = load_recipe(
        QUICKSTART, [*tiny(data_root), f"data.train.num_workers={workers}"], "/tmp/x"
    )
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
        readers = [owned_rows(rank, new_world, w, new_workers) for w in range(max(new_workers, 1))]
        after = draw([new_stream], 2 * ROWS)
        new_stream.close()
        for rows in readers:
            sequence = [i for i in after if i in rows]
            rest = rows - set(before)
            assert Counter(sequence[: len(rest)]) == Counter(rest)  # the pass, finished
            following = sequence[len(rest) : len(rest) + len(rows)]
            assert Counter(following) == Counter(rows)  # the next pass, whole


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


def test_a_different_seed_is_refused(data_root):
    old = stream(data_root, 0, 2, 0)
    draw([old], 1)
    with pytest.raises(UserError, match="seed=0 .now 1."):
        stream(data_root, 0, 1, 0, seed=1).resume([old.state_dict(), old.state_dict()])


# -- end to end: real processes, real checkpoints ------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "stop_at", "max_iters", "port"),
    [((1, 2), (2, 2), 4, 18, 29861), ((2, 2), (1, 1), 2, 22, 29863)],
    ids=["1x2-to-2x2", "2x2-to-1x1"],
)
def test_resume_with_other_processes_and_workers_continues_the_pass(
    tmp_path, data_root, before, after, stop_at, max_iters, port
):
    from test_checkpoint import run, train_command

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
        for worker in range(after[1] or 1):
            rows = owned_rows(rank, after[0], worker, after[1])
            sequence = [i for i in seen if i in rows]
            rest = rows - set(consumed)
            assert Counter(sequence[: len(rest)]) == Counter(rest)  # the pass, finished
            assert Counter(sequence[len(rest) : len(rest) + len(rows)]) == Counter(rows)
