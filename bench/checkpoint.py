"""Checkpoint save time, and resume time early and late in a data pass, same-size and elastic.

Resume must not grow with the position in the pass: the data stream restores its position
instead of replaying batches, and an elastic resume (another number of processes) skips the
rows the pass consumed instead of decoding them. This bench builds the quickstart segmentor
(ResNet-18 + FPN) through ``IterRunner.from_recipe`` on a generated shapes dataset of
``--rows`` 32x32 training images (one pass = rows / 2 iterations at batch 2), trains
``--early`` real iterations and saves, then runs the real stream and LR schedule ahead to
``--late`` (default: 90% of the pass; weights and optimizer stay those of ``--early``: their
size, not their values, sets the I/O) and saves again.

For each of the two checkpoints it also writes an elastic twin: the data states of a 2-process
run at the same position in the pass (two real streams of world size 2, run ahead), so that
resuming it in this 1-process run takes the elastic path. Resume time = ``resume_from`` plus
drawing the first batch after it (where the stream pays for its restore), median of several
interleaved repeats. Ratios: late/early for each kind (flat means ~1), and elastic/same-size.

    python bench/checkpoint.py [--rows 2048] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import write_result

from hooktrain.checkpoint.state import TRAIN_STATE, data_state_file, save_checkpoint
from hooktrain.data import build_train_stream
from hooktrain.engine.runner import IterRunner
from hooktrain.recipe.schema import load_recipe

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
BATCH = 2


def tiny_data(root: Path, rows: int) -> list[str]:
    options = [
        f"data.train.batch_size={BATCH}", "data.train.num_workers=0",
        "data.train.shuffle_buffer=8", "data.train.pipeline.crop_size=[32,32]",
        "data.train.pipeline.scale=[64,32]", "data.val.pipeline.scale=[64,32]",
    ]  # fmt: skip
    for split in ("train", "val"):
        options += [f"data.{split}.source.root={root}", f"data.{split}.source.num_train={rows}",
                    f"data.{split}.source.num_val=4", f"data.{split}.source.image_size=32",
                    f"data.{split}.source.train_shards=8"]  # fmt: skip
    return options


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def resume_time(runner: IterRunner, checkpoint: Path) -> float:
    def resume() -> None:
        runner.resume_from(checkpoint)
        next(runner._train_iter)

    return timed(resume)


def elastic_twin(runner: IterRunner, checkpoint: Path, iteration: int) -> Path:
    """``checkpoint`` with the data states of 2 processes that drew ``iteration`` batches of
    the same global size (``BATCH`` each, so the same position in the pass)."""
    twin = checkpoint.with_name(checkpoint.name + "-from-2-processes")
    shutil.copytree(checkpoint, twin)
    recipe = runner.recipe
    for rank in range(2):
        stream = build_train_stream(recipe.data, seed=recipe.train.seed, rank=rank, world_size=2)
        for _ in range(iteration // 2):
            next(stream)
        torch.save(stream.state_dict(), twin / data_state_file(rank))
        stream.close()
    state = json.loads((twin / TRAIN_STATE).read_text())
    (twin / TRAIN_STATE).write_text(json.dumps({**state, "world_size": 2}))
    return twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="training images (pass = rows/2)")
    parser.add_argument("--early", type=int, default=10)
    parser.add_argument("--late", type=int, help="default: 90%% of the pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 rows, resume at 2 and 14, 1 repeat (CI smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.early, args.repeats = 32, 2, 1
    late_iter = args.late or int(0.9 * args.rows / BATCH)

    tmp = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    options = [
        *tiny_data(tmp / "shapes", args.rows),
        f"train.max_iters={late_iter * 2}",
        "hooks=[]",
    ]
    recipe = load_recipe(QUICKSTART, options, str(tmp / "run"))
    runner = IterRunner.from_recipe(recipe)
    logging.getLogger("hooktrain").setLevel(logging.WARNING)
    params = sum(p.numel() for p in runner.model.parameters())
    print(f"quickstart model: {params / 1e6:.1f} M parameters; {args.rows} training rows "
          f"(a pass is {args.rows // BATCH} iterations); work dir {tmp} (removed at the end)")  # fmt: skip

    for _ in range(args.early):
        runner.train_step()
        runner.state.iter += 1
    save_times = [timed(lambda: save_checkpoint(runner)) for _ in range(args.repeats)]
    early = runner.work_dir / "checkpoints" / f"iter_{args.early}"
    for _ in range(late_iter - args.early):  # the real stream, really run ahead
        next(runner._train_iter)
        runner.scheduler.step()
    runner.state.iter = late_iter
    save_checkpoint(runner)
    late = runner.work_dir / "checkpoints" / f"iter_{late_iter}"
    checkpoints = {
        "same_early": early,
        "same_late": late,
        "elastic_early": elastic_twin(runner, early, args.early),
        "elastic_late": elastic_twin(runner, late, late_iter),
    }
    times: dict[str, list[float]] = {name: [] for name in checkpoints}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every kind alike
        for name, path in checkpoints.items():
            times[name].append(resume_time(runner, path))
    runner.watch.close()
    runner.accelerator.end_training()
    shutil.rmtree(tmp, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"save: median {statistics.median(save_times):.2f}s of {args.repeats}")
    for name, values in times.items():
        print(
            f"resume {name:<14} median {median[name]:.2f}s ({', '.join(f'{t:.2f}' for t in values)})"
        )
    ratios = {
        "same_late_over_early": median["same_late"] / median["same_early"],
        "elastic_late_over_early": median["elastic_late"] / median["elastic_early"],
        "elastic_over_same_late": median["elastic_late"] / median["same_late"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    summary = {
        "quick": args.quick,
        "rows": args.rows, "early_iter": args.early, "late_iter": late_iter, "repeats": args.repeats,
        "save_s": round(statistics.median(save_times), 3),
        **{f"resume_{name}_s": round(value, 3) for name, value in median.items()},
        **{name: round(value, 3) for name, value in ratios.items()},
    }  # fmt: skip
    print(f"results: {write_result('checkpoint', summary)}")
    print(json.dumps({"bench": "checkpoint", **summary}))


if __name__ == "__main__":
    main()
