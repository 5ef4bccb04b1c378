"""Sources, the shapes dataset, the sharded resumable train stream and the val loader.

Examples in the synthetic datasets carry their id in the mask: example ``i`` has a uniform
mask of value ``i``, which survives every augmentation at pixel (0, 0).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from data_configs import NUM_CLASSES, make_cfg

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hooktrain.data import (  # noqa: E402
    DataConfig,
    build_train_stream,
    build_val_loader,
    generate_shapes,
    load_source,
    prepare_data,
    reading,
    shapes,
)
from hooktrain.data.parquet import write_image_shard  # noqa: E402
from hooktrain.data.reading import ReaderPlan, plan_reader, shard_rows  # noqa: E402
from hooktrain.errors import UserError  # noqa: E402
from hooktrain.recipe.data import default_palette  # noqa: E402
from hooktrain.tools.convert import convert_folder  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
AUGMENT = {"scale": [16, 8], "ratio_range": [0.5, 2.0], "crop_size": [8, 8], "flip_prob": 0.5,
           "photometric": True, "cat_max_ratio": 0.75}  # fmt: skip


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def write_parquet(out: Path, n: int, shards: int, *, split: str = "train", rows_per_group=None,
                  corrupt=(), mask_fn=None, columns=("image", "annotation"), sizes=None):  # fmt: skip
    """``n`` examples in ``shards`` parquet files, Hub layout ``out/data/<split>-*.parquet``."""
    from datasets import Dataset, Features, Image

    (out / "data").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        images, masks = [], []
        for i in range(bounds[s], bounds[s + 1]):
            h, w = sizes(i) if sizes else (8, 8)
            rgb = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = mask_fn(i, h, w) if mask_fn else np.full((h, w), i, np.uint8)
            images.append({"bytes": b"not an image" if i in corrupt else _png(rgb), "path": None})
            masks.append({"bytes": _png(mask), "path": None})
        features = Features({columns[0]: Image(), columns[1]: Image()})
        table = {columns[0]: images, columns[1]: masks}
        Dataset.from_dict(table, features=features).to_parquet(
            out / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet",
            batch_size=rows_per_group or max(bounds[s + 1] - bounds[s], 1),
        )
    return out


def ids(batch) -> list[int]:
    return batch["mask"][:, 0, 0].tolist()


def take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def data24(tmp_path_factory) -> Path:
    """24 train examples in 4 files of 2 row groups (8 shards after resharding), 7 val."""
    root = tmp_path_factory.mktemp("data24")
    write_parquet(root, 24, 4, rows_per_group=3)
    write_parquet(root, 7, 2, split="validation")
    return root


# -- splitting ------------------------------------------------------------------------------


def test_reader_plans_are_disjoint_and_cover_every_row():
    rows_per_shard = 7
    for shards, world, workers in itertools.product(range(1, 9), (1, 2, 3), (0, 1, 2, 3)):
        seen: list[tuple[int, int]] = []
        for rank, worker in itertools.product(range(world), range(max(workers, 1))):
            plan = plan_reader(shards, rank=rank, world_size=world, worker=worker,
                               num_workers=workers)  # fmt: skip
            seen += [(s, r) for s in plan.shards for r in range(rows_per_shard)
                     if r % plan.stride == plan.offset]  # fmt: skip
        assert sorted(seen) == [(s, r) for s in range(shards) for r in range(rows_per_shard)]


def test_whole_shards_per_rank_when_divisible():
    plans = [plan_reader(8, rank=r, world_size=2, worker=w, num_workers=2)
             for r in range(2) for w in range(2)]  # fmt: skip
    assert [p.shards for p in plans] == [(0, 4), (2, 6), (1, 5), (3, 7)]
    assert all(p.stride == 1 for p in plans)
    assert plan_reader(3, rank=1, world_size=2, worker=0, num_workers=1) == ReaderPlan(
        (0, 1, 2), 2, 1
    )


def test_shard_rows_skips_to_a_kept_row(data24):
    base = load_source(make_cfg(data24).train.source)
    assert base.num_shards == 8  # 4 files x 2 row groups
    plan = ReaderPlan((5,), stride=2, offset=1)
    rows = [(k, r.row, r.annotation) for k, r in shard_rows(base, 8, 5, plan, start=0)]
    assert [k for k, *_ in rows] == [0] and rows[0][1] == 1
    later = list(shard_rows(base, 8, 5, plan, start=1))
    assert later == []


def test_train_shards_disjoint_across_two_ranks_with_two_workers(data24):
    cfg = make_cfg(data24, batch=3, workers=2)
    per_rank = []
    for rank in range(2):
        stream = build_train_stream(cfg, seed=1, rank=rank, world_size=2)
        # each reader owns 2 shards = 6 examples = 2 batches; 4 batches cover both workers
        per_rank.append([i for b in take(stream, 4) for i in ids(b)])
        stream.close()
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(24))


def test_two_real_processes_read_disjoint_halves(data24):
    cfg = make_cfg(data24, batch=4, workers=0)
    # Spawned, not forked: a child forked from this many-threaded test process (pyarrow's and
    # tqdm's threads) can inherit a lock another thread held, and hang.
    with mp.get_context("spawn").Pool(2) as pool:
        halves = pool.starmap(_rank_ids, [(cfg, 0), (cfg, 1)])
    assert set(halves[0]).isdisjoint(halves[1])
    assert sorted(halves[0] + halves[1]) == list(range(24))


def _rank_ids(cfg: DataConfig, rank: int) -> list[int]:
    stream = build_train_stream(cfg, seed=3, rank=rank, world_size=2)
    return [i for b in take(stream, 3) for i in ids(b)]


def test_each_pass_is_a_new_permutation_of_all_examples(data24):
    stream = build_train_stream(make_cfg(data24, batch=4, buffer=8), seed=0)
    passes = [[i for b in take(stream, 6) for i in ids(b)] for _ in range(3)]
    assert all(sorted(p) == list(range(24)) for p in passes)
    assert passes[0] != passes[1] != passes[2]
    again = build_train_stream(make_cfg(data24, batch=4, buffer=8), seed=0)
    assert [i for b in take(again, 6) for i in ids(b)] == passes[0]
    other_seed = build_train_stream(make_cfg(data24, batch=4, buffer=8), seed=1)
    assert [i for b in take(other_seed, 6) for i in ids(b)] != passes[0]


# -- exact resume ---------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 2)])
def test_restored_stream_continues_exactly(data24, world, workers):
    """Checkpoints mid-window, mid-pass and across pass boundaries, with augmentation."""
    cfg = make_cfg(data24, batch=3, workers=workers, buffer=5, pipeline=AUGMENT)
    for rank in range(world):
        reference = build_train_stream(cfg, seed=7, rank=rank, world_size=world)
        expected = take(reference, 14)
        for k in (1, 5, 9):  # 24/world/readers examples per pass: boundaries are crossed
            stream = build_train_stream(cfg, seed=7, rank=rank, world_size=world)
            assert same_batches(take(stream, k), expected[:k])
            state = stream.state_dict()
            stream.close()
            restored = build_train_stream(cfg, seed=7, rank=rank, world_size=world)
            restored.load_state_dict(state)
            assert same_batches(take(restored, 14 - k), expected[k:]), (rank, k)
            restored.close()
        reference.close()


def test_resume_decodes_only_what_it_yields(data24, monkeypatch):
    cfg = make_cfg(data24, batch=2, buffer=5)
    stream = build_train_stream(cfg, seed=0)
    take(stream, 40)  # into the fourth pass
    state = stream.state_dict()

    decoded, converted = [], []
    real_call, real_row = reading.ExampleDecoder.__call__, reading.RawRow
    monkeypatch.setattr(reading.ExampleDecoder, "__call__",
                        lambda self, row: decoded.append(row) or real_call(self, row))  # fmt: skip
    monkeypatch.setattr(reading, "RawRow",
                        lambda *a: converted.append(a) or real_row(*a))  # fmt: skip
    restored = build_train_stream(cfg, seed=0)
    restored.load_state_dict(state)
    next(restored)
    assert len(decoded) == 2  # just the batch
    assert len(converted) <= cfg.train.shuffle_buffer  # one window of raw rows


def test_state_from_other_settings_is_refused(data24):
    state = build_train_stream(make_cfg(data24), seed=0).state_dict()
    other = build_train_stream(make_cfg(data24, batch=4), seed=0)
    with pytest.raises(UserError, match="batch_size=2 \\(now 4\\)"):
        other.load_state_dict(state)


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8])
def test_val_sees_every_example_exactly_once(tmp_path, n):
    for shards in range(1, min(n, 3) + 1):
        root = write_parquet(tmp_path / f"s{shards}", n, shards, split="validation")
        for world, workers, batch in itertools.product((1, 2), (0, 1, 2), (1, 2)):
            if workers and batch == 1 and n != 3:
                continue  # workers x batch 1 costs worker start-ups, n=3 covers it
            cfg = make_cfg(root, val_batch=batch, val_workers=workers)
            seen = []
            for rank in range(world):
                for b in build_val_loader(cfg, rank=rank, world_size=world):
                    assert b["mask"][:, 0, 0].tolist() == b["index"].tolist()
                    seen += b["index"].tolist()
            assert sorted(seen) == list(range(n)), (shards, world, workers, batch)


def test_val_batches_pad_images_and_masks_of_different_sizes(tmp_path):
    sizes = {0: (6, 10), 1: (12, 4), 2: (8, 8)}
    root = write_parquet(tmp_path, 3, 1, split="validation", sizes=lambda i: sizes[i])
    cfg = make_cfg(root, val_batch=3).model_copy()
    cfg.val.pipeline.scale = (16, 16)
    (batch,) = list(build_val_loader(cfg))
    assert batch["ori_shapes"] == [(6, 10), (12, 4), (8, 8)]
    assert batch["img_shapes"] == [(10, 16), (16, 5), (16, 16)]  # long edge scaled to 16
    assert batch["image"].shape == (3, 3, 16, 16) and batch["mask"].shape == (3, 12, 10)
    assert batch["image"][0, :, 10:, :].abs().sum() == 0  # padded with 0
    assert (batch["mask"][0, 6:, :] == 255).all() and (batch["mask"][1, :, 4:] == 255).all()
    assert (batch["mask"][1, :12, :4] == 1).all()
    assert batch["index"].dtype == torch.int64


# -- bad input ------------------------------------------------------------------------------


def test_missing_column_lists_columns_and_the_key(tmp_path):
    root = write_parquet(tmp_path, 4, 1, columns=("img", "label"))
    with pytest.raises(UserError) as err:
        build_train_stream(make_cfg(root), seed=0)
    message = str(err.value)
    assert "column 'image' not found" in message and "['img', 'label']" in message
    assert "data.train.source.image_column" in message and "\n" not in message
    cfg = make_cfg(root)
    cfg.train.source.image_column, cfg.train.source.annotation_column = "img", "label"
    assert ids(next(build_train_stream(cfg, seed=0)))


def test_rgb_annotation_is_a_one_line_error_even_from_a_worker(tmp_path):
    rgb = lambda i, h, w: np.dstack([np.full((h, w), c, np.uint8) for c in (1, 2, 3)])  # noqa: E731
    root = write_parquet(tmp_path, 4, 1, mask_fn=rgb)
    for workers in (0, 1):
        with pytest.raises(UserError) as err:
            next(build_train_stream(make_cfg(root, workers=workers), seed=0))
        assert "3 channels" in str(err.value) and "single-channel" in str(err.value)
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_out_of_range_labels_error_or_become_ignore(tmp_path):
    root = write_parquet(tmp_path, 4, 1, mask_fn=lambda i, h, w: np.full((h, w), 7, np.uint8))
    cfg = make_cfg(root, num_classes=5)
    with pytest.raises(UserError, match=r"values \[7\] fall outside \[0, 5\).*out_of_range"):
        next(build_train_stream(cfg, seed=0))
    cfg = make_cfg(root, num_classes=5, out_of_range="ignore")
    assert (next(build_train_stream(cfg, seed=0))["mask"] == 255).all()


def test_corrupt_images_are_skipped_counted_and_capped(tmp_path):
    root = write_parquet(tmp_path, 12, 2, corrupt={3, 8})
    write_parquet(root, 5, 1, split="validation", corrupt={2})
    stream = build_train_stream(make_cfg(root, batch=5, buffer=12, max_corrupt=2), seed=0)
    got = [i for b in take(stream, 2) for i in ids(b)]
    assert sorted(got) == [0, 1, 2, 4, 5, 6, 7, 9, 10, 11]
    take(stream, 4)  # later passes skip them again without counting them again
    assert stream.num_corrupt == 2
    capped = build_train_stream(make_cfg(root, batch=5, buffer=12, max_corrupt=1), seed=0)
    with pytest.raises(UserError, match="2 examples could not be decoded.*max_corrupt=1"):
        take(capped, 2)
    val = [i for b in build_val_loader(make_cfg(root, max_corrupt=1)) for i in b["index"].tolist()]
    assert val == [0, 1, 3, 4]
    with pytest.raises(UserError, match="max_corrupt=0"):
        list(build_val_loader(make_cfg(root, max_corrupt=0)))


def test_config_checks_class_names_and_palette(data24):
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes is 250"):
        make_cfg(data24, class_names=["a", "b"])
    with pytest.raises(ValueError, match="palette has 1 colours"):
        make_cfg(data24, palette=[[0, 0, 0]])
    cfg = make_cfg(data24)
    assert cfg.colours == default_palette(NUM_CLASSES) and len(cfg.names) == NUM_CLASSES
    with pytest.raises(ValueError, match="images_dir"):
        DataConfig.model_validate({"num_classes": 2, "train": {"source": {"type": "folder"}}})


# -- sources --------------------------------------------------------------------------------


def _ade_folder(root: Path, counts=(("training", 5), ("validation", 3))) -> Path:
    for split, n in counts:
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image = np.random.default_rng(i).integers(0, 256, (8 + i, 8, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"ADE_{split}_{i:08d}.jpg"), image)
            mask = np.full((8 + i, 8), i + 1, np.uint8)
            cv2.imwrite(str(root / "annotations" / split / f"ADE_{split}_{i:08d}.png"), mask)
    return root


def _folder_cfg(train: dict, val: dict) -> DataConfig:
    return DataConfig.model_validate({
        "num_classes": 10, "reduce_zero_label": True,
        "train": {"source": train, "batch_size": 5, "num_workers": 0,
                  "pipeline": {"scale": [16, 8], "crop_size": [8, 8]}},
        "val": {"source": val, "batch_size": 2, "pipeline": {"scale": [16, 8]}},
    })  # fmt: skip


def test_folder_source_reads_the_ade_challenge_layout(tmp_path):
    root = _ade_folder(tmp_path / "ADEChallengeData2016")
    cfg = _folder_cfg({"type": "folder", "root": str(root), "split": "training"},
                      {"type": "folder", "root": str(root), "split": "validation"})  # fmt: skip
    batch = next(build_train_stream(cfg, seed=0))
    assert sorted(ids(batch)) == [0, 1, 2, 3, 4]  # reduce_zero_label: i + 1 -> i
    val = list(build_val_loader(cfg))
    assert [s for b in val for s in b["ori_shapes"]] == [(8, 8), (9, 8), (10, 8)]
    (root / "annotations" / "training" / "ADE_training_00000002.png").unlink()
    with pytest.raises(UserError, match="'ADE_training_00000002' has no annotation"):
        build_train_stream(cfg, seed=0)


def test_convert_round_trip_streams_as_parquet_and_as_hub_repo(tmp_path):
    root = _ade_folder(tmp_path / "ADEChallengeData2016")
    written = convert_folder(root, tmp_path / "out", shards=2)
    assert sorted(written) == ["train", "validation"] and len(written["train"]) == 2
    folder = _folder_cfg({"type": "folder", "root": str(root), "split": "training"},
                         {"type": "folder", "root": str(root), "split": "validation"})  # fmt: skip
    hub = _folder_cfg({"type": "hub", "path": str(tmp_path / "out"), "split": "train"},
                      {"type": "hub", "path": str(tmp_path / "out"), "split": "validation"})
    for a, b in zip(build_val_loader(folder), build_val_loader(hub), strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert sorted(ids(next(build_train_stream(hub, seed=0)))) == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="already holds train shards"):
        convert_folder(root, tmp_path / "out", shards=2)


def test_shard_writer_matches_what_datasets_writes(tmp_path):
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Image, load_dataset

    columns = {name: [{"bytes": _png(np.full((4, 4), i, np.uint8)), "path": f"{i}.png"}
                      for i in range(5)] for name in ("image", "annotation")}  # fmt: skip
    write_image_shard(tmp_path / "ours.parquet", columns, row_group_size=2)
    features = Features({"image": Image(), "annotation": Image()})
    theirs_path = tmp_path / "theirs.parquet"
    Dataset.from_dict(columns, features=features).to_parquet(theirs_path, batch_size=2)
    ours, theirs = pq.ParquetFile(tmp_path / "ours.parquet"), pq.ParquetFile(theirs_path)
    assert ours.schema_arrow == theirs.schema_arrow  # the `huggingface` features metadata included
    assert ours.metadata.num_row_groups == theirs.metadata.num_row_groups == 3
    assert ours.read().equals(theirs.read())
    stream = load_dataset(
        "parquet", data_files=str(tmp_path / "ours.parquet"), split="train", streaming=True
    )
    assert stream.features == features and len(list(stream)) == 5
    assert not list(tmp_path.glob(".tmp-*"))  # the shard was renamed into place


def test_hub_source_runs_offline_on_a_local_repo_directory(data24):
    cfg = make_cfg(data24).model_copy()
    cfg.train.source = {"type": "hub", "path": str(data24), "split": "train"}
    cfg.val.source = {"type": "hub", "path": str(data24), "split": "validation"}
    stream = build_train_stream(cfg, seed=0)
    assert sorted(i for b in take(stream, 12) for i in ids(b)) == list(range(24))
    assert sum(len(b["index"]) for b in build_val_loader(cfg)) == 7
    cfg.train.source = {"type": "hub", "path": str(data24), "split": "test"}
    with pytest.raises(UserError, match=r"has no split 'test'; its splits are \['train', 'validation'\]"):
        build_train_stream(cfg, seed=0)


def test_relative_paths_resolve_against_the_working_directory(data24, monkeypatch):
    monkeypatch.chdir(data24)
    cfg = make_cfg(Path("."))
    assert ids(next(build_train_stream(cfg, seed=0)))
    cfg.train.source.data_files = "nowhere/*.parquet"
    with pytest.raises(UserError, match=f"matched no files .*{data24}"):
        build_train_stream(cfg, seed=0)


# -- shapes ---------------------------------------------------------------------------------


def _table(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_shapes_generation_is_deterministic_and_idempotent(tmp_path):
    kwargs = dict(num_train=40, num_val=8, image_size=32, train_shards=4, val_shards=2)
    a = generate_shapes(tmp_path / "a", **kwargs)
    b = generate_shapes(tmp_path / "b", **kwargs)
    files = sorted(p.name for p in (a / "data").iterdir())
    assert len(files) == 6 and files == sorted(p.name for p in (b / "data").iterdir())
    assert all(_table(a / "data" / f) == _table(b / "data" / f) for f in files)
    mtime = (a / "shapes.json").stat().st_mtime_ns
    generate_shapes(tmp_path / "a", **kwargs)  # already there: nothing rewritten
    assert (a / "shapes.json").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="other parameters \\(seed=0 \\(recipe: 1\\)\\)"):
        generate_shapes(tmp_path / "a", **{**kwargs, "seed": 1})
    masks = [cv2.imdecode(np.frombuffer(r["annotation"]["bytes"], np.uint8), -1)
             for r in _table(a / "data" / files[0])]  # fmt: skip
    assert set(np.unique(np.stack(masks))) <= set(range(len(shapes.SHAPES_CLASSES)))


def test_shapes_generation_is_atomic(tmp_path, monkeypatch):
    calls = []

    def crash(out, split, *args):
        calls.append(split)
        (out / "data" / "partial.parquet").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(shapes, "_write_split", crash)
    with pytest.raises(RuntimeError):
        generate_shapes(tmp_path / "shapes", num_train=8, num_val=2, image_size=32)
    assert calls and list(tmp_path.iterdir()) == []  # no dataset, no temporary left


def test_shapes_generation_from_two_processes_at_once(tmp_path):
    with mp.get_context("fork").Pool(2) as pool:
        roots = pool.map(_generate_small, [tmp_path / "shapes"] * 2)
    assert roots[0] == roots[1]
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]
    assert len(list((tmp_path / "shapes" / "data").glob("*.parquet"))) == 4


def _generate_small(root: Path) -> Path:
    return generate_shapes(root, num_train=16, num_val=4, image_size=32, train_shards=2)


def test_shapes_recipe_streams_after_prepare_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load((RECIPES / "_base_/datasets/shapes.yaml").read_text())["data"]
    for split in ("train", "val"):
        data[split]["source"].update(num_train=16, num_val=4, train_shards=2)
    data["train"]["num_workers"] = 0
    cfg = DataConfig.model_validate(data)
    with pytest.raises(UserError, match="call hooktrain.data.prepare_data"):
        build_train_stream(cfg, seed=0)
    prepare_data(cfg)
    assert (tmp_path / "data" / "shapes" / "shapes.json").is_file()
    batch = next(build_train_stream(cfg, seed=0))
    assert batch["image"].shape == (8, 3, 96, 96) and batch["mask"].shape == (8, 96, 96)
    assert sum(len(b["index"]) for b in build_val_loader(cfg)) == 4


def test_ade20k_recipe_is_valid():
    data = yaml.safe_load((RECIPES / "_base_/datasets/ade20k.yaml").read_text())["data"]
    cfg = DataConfig.model_validate(data)
    assert cfg.num_classes == 150 == len(cfg.names) == len(cfg.colours)
    assert cfg.names[:3] == ["wall", "building", "sky"] and cfg.names[-1] == "flag"
    assert cfg.colours[0] == [120, 120, 120] and cfg.colours[-1] == [92, 0, 255]
    assert cfg.reduce_zero_label and cfg.train.source.revision == "refs/convert/parquet"
    assert cfg.train.pipeline.crop_size == (512, 512) and cfg.val.batch_size == 1


WORKERS_AFTER_OPENCV_POOL = """
import sys
import cv2
import numpy as np
from pathlib import Path
sys.path.insert(0, {tests!r})
from data_configs import make_cfg
from hooktrain.data import build_train_stream

cv2.setNumThreads(2)  # OpenCV's default on 2 cores: the pool's threads run in this process
cv2.cvtColor(np.zeros((2048, 2048, 3), np.uint8), cv2.COLOR_RGB2HSV)
stream = build_train_stream(make_cfg(Path({root!r}), workers=2), seed=0)
next(stream)
stream.close()
print("workers started, OpenCV threads", cv2.getNumThreads())
"""


def test_workers_start_after_the_main_process_used_opencvs_thread_pool(data24):
    """A forked worker that reconfigures a thread pool its parent had running hangs for ever
    (OpenCV 5.1's pthreads backend): the stream makes OpenCV single-threaded before its
    workers fork. A fresh process, so the pool's state is this test's own."""
    import subprocess
    import sys

    script = WORKERS_AFTER_OPENCV_POOL.format(tests=str(Path(__file__).parents[1]), root=str(data24))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "workers started, OpenCV threads 1" in result.stdout
