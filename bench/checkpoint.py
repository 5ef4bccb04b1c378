"""Checkpoint save and resume time of the quickstart model, early and late in a run.

Resume must not grow with the iteration number: the data stream restores its position
instead of replaying batches. This bench builds the quickstart segmentor (ResNet-18 + FPN)
through ``IterRunner.from_recipe`` on a small generated shapes dataset (32x32 images, so the
stream can be run far ahead cheaply), trains 10 real iterations and saves ``iter_10``. It
then draws batches from the real stream until it has produced 10,000 batches in total and
steps the LR schedule and ``TrainState.iter`` to 10,000 (the weights and optimizer moments
stay those of iteration 10: their size, not their values, sets the I/O), and saves
``iter_10000``. Resume time = ``runner.load_state`` plus drawing the first batch after it
(where the stream pays for its restore), median of several repeats.

    python bench/checkpoint.py [--late 10000] [--repeats 3]
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

from hooktrain.checkpoints import save_checkpoint
from hooktrain.recipe import load_recipe
from hooktrain.runner import IterRunner

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def tiny_data(root: Path) -> list[str]:
    options = [
        "data.train.batch_size=2", "data.train.num_workers=0", "data.train.shuffle_buffer=8",
        "data.train.pipeline.crop_size=[32,32]", "data.train.pipeline.scale=[64,32]",
        "data.val.pipeline.scale=[64,32]",
    ]  # fmt: skip
    for split in ("train", "val"):
        options += [f"data.{split}.source.root={root}", f"data.{split}.source.num_train=64",
                    f"data.{split}.source.num_val=4", f"data.{split}.source.image_size=32",
                    f"data.{split}.source.train_shards=4"]  # fmt: skip
    return options


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def resume_time(runner: IterRunner, checkpoint: Path) -> float:
    def resume() -> None:
        runner.load_state(checkpoint)
        next(runner._train_iter)

    return timed(resume)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--early", type=int, default=10)
    parser.add_argument("--late", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    options = [*tiny_data(tmp / "shapes"), f"train.max_iters={args.late * 2}", "hooks=[]"]
    recipe = load_recipe(QUICKSTART, options, str(tmp / "run"))
    runner = IterRunner.from_recipe(recipe)
    logging.getLogger("hooktrain").setLevel(logging.WARNING)
    params = sum(p.numel() for p in runner.model.parameters())
    print(f"quickstart model: {params / 1e6:.1f} M parameters; work dir {tmp} (removed at the end)")

    for _ in range(args.early):
        runner.train_step()
        runner.state.iter += 1
    save_times = []
    for _ in range(args.repeats):
        save_times.append(timed(lambda: save_checkpoint(runner)))
    early = runner.work_dir / "checkpoints" / f"iter_{args.early}"
    print(f"save at iteration {args.early} (real training): median {statistics.median(save_times):.2f}s "
          f"of {args.repeats} ({', '.join(f'{t:.2f}' for t in save_times)})")  # fmt: skip

    start = time.perf_counter()
    for _ in range(args.late - args.early):  # the real stream, really run ahead
        next(runner._train_iter)
        runner.scheduler.step()
    runner.state.iter = args.late
    print(f"ran the data stream and LR schedule ahead to iteration {args.late} in "
          f"{time.perf_counter() - start:.1f}s (weights/optimizer: those of iteration {args.early})")  # fmt: skip
    save_checkpoint(runner)
    late = runner.work_dir / "checkpoints" / f"iter_{args.late}"
    position = runner.train_stream.state_dict()["loader"]
    print(f"stream state at {args.late}: {json.dumps(position, default=str)[:160]}...")

    early_times, late_times = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        early_times.append(resume_time(runner, early))
        late_times.append(resume_time(runner, late))
    resume_early, resume_late = statistics.median(early_times), statistics.median(late_times)
    print(f"resume from iteration {args.early}: median {resume_early:.2f}s "
          f"({', '.join(f'{t:.2f}' for t in early_times)})")  # fmt: skip
    print(f"resume from iteration {args.late}: median {resume_late:.2f}s "
          f"({', '.join(f'{t:.2f}' for t in late_times)})")  # fmt: skip
    print(f"late/early resume ratio: {resume_late / resume_early:.2f} (flat means ~1)")
    runner.accelerator.end_training()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "bench": "checkpoint",
        "save_s": round(statistics.median(save_times), 3),
        "resume_early_s": round(resume_early, 3),
        "resume_late_s": round(resume_late, 3),
        "ratio": round(resume_late / resume_early, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
