"""MMSegmentation 1.2.2 training SegFormer-B0 end to end with its own runner: images/s and peak
memory, the reference figure beside ``bench/gpu_train.py``'s hooktrain runs.

The same synthetic ADE20K-like examples as gpu_train's (``data_pipeline.make_example`` drawn from
``np.random.default_rng(0)``, as its ``write_dataset`` draws the training examples) are written in
``ADE20KDataset``'s layout (``images/training/*.jpg``, ``annotations/training/*.png``) and
trained on by ``tests/mmseg_ref/train_bench.py`` inside MMSegmentation's throwaway environment
(``tests/mmseg_ref/env.py``): mmseg's own ``segformer_mit-b0_8xb2-160k_ade20k-512x512`` config,
dataset class, train pipeline, data preprocessor, model, AdamW and ``Runner.from_cfg(cfg).train()``,
with only the data root, batch, workers, iterations, no validation/checkpoints, SyncBN -> BN,
no pretrained weights and (on CUDA, ``bf16``) ``AmpOptimWrapper(dtype='bfloat16')`` changed.
Timed as hooktrain's ``bench/synced_timer.py`` times: CUDA synchronised after iteration
``start`` and after the last; images/s = batch * (iters - start) / seconds.

    from mmseg_train import measure_mmseg_train      # bench/ on sys.path
    measure_mmseg_train(device="cuda", batch=16, workers=8, iters=120, start=20, examples=256,
                        bf16=True, root=tmp)         # -> {"images_per_s": ..., ...}

    python bench/mmseg_train.py [--quick] [--device cpu|cuda] [--batch 16] [--workers 8]
                                [--iters 120] [--start 20] [--examples 256] [--crop C] [--fp32] [--save]

``--quick`` is a CPU smoke run (64 px crops, batch 2, no workers, 4 iterations, one thread).
The environment installs from ``$HOOKTRAIN_MMSEG_WHEELS`` or, when it holds wheels,
``.whl/mmseg`` (``bench/device_wheels.sh`` fills it for a machine with no index), else from PyPI
(and is reused once installed). Where it cannot be installed or its run fails, the result is
``{"unavailable": "<why>"}`` instead of an exception. ``--save`` writes
``bench/results/mmseg_train[-cuda].json`` (``$HOOKTRAIN_BENCH_RESULTS`` overrides the directory).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT / "bench"), str(ROOT / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
from data_pipeline import make_example  # noqa: E402
from mmseg_ref.env import WHEELS_ENV, MmsegEnv  # noqa: E402
from results import write_result  # noqa: E402

TRAIN_BENCH = ROOT / "tests" / "mmseg_ref" / "train_bench.py"
CONFIG = "segformer_mit-b0_8xb2-160k_ade20k-512x512"
COUNT_FILE = ".examples"  # in the data folder: how many examples it holds (reused when equal)
DEVICE_WHEELS = ROOT / ".whl" / "mmseg"  # where bench/device_wheels.sh puts the mmseg env's wheels


def wheel_dir() -> Path | None:
    """``$HOOKTRAIN_MMSEG_WHEELS``, else ``.whl/mmseg`` when it holds wheels (they travelled to a
    machine with no index: install from them rather than wait on an unreachable PyPI), else None."""
    if os.environ.get(WHEELS_ENV):
        return Path(os.environ[WHEELS_ENV])
    return DEVICE_WHEELS if any(DEVICE_WHEELS.glob("*.whl")) else None


def one_line(text: str) -> str:
    """The last non-empty line of ``text`` (an exception's or pip's verdict), at most 300 characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:300]


def write_ade20k(directory: Path, examples: int, seed: int = 0) -> Path:
    """``examples`` synthetic examples (``make_example`` from ``np.random.default_rng(seed)``, the
    first ``examples`` that gpu_train's ``write_dataset`` trains on) in ADE20KDataset's layout
    under ``directory``; a folder already holding that many is reused."""
    directory = Path(directory)
    count = directory / COUNT_FILE
    if count.exists() and count.read_text().strip() == f"{examples} {seed}":
        return directory
    images, annotations = directory / "images" / "training", directory / "annotations" / "training"
    for folder in (images, annotations):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    rng = np.random.default_rng(seed)
    for index in range(examples):
        image, mask = make_example(rng)
        (images / f"synthetic_{index:06d}.jpg").write_bytes(image)
        (annotations / f"synthetic_{index:06d}.png").write_bytes(mask)
    count.write_text(f"{examples} {seed}")
    return directory


def measure_mmseg_train(
    *,
    device: str,
    batch: int,
    workers: int,
    iters: int,
    start: int,
    examples: int,
    crop: int | None = None,
    bf16: bool,
    root: Path,
    threads: int | None = None,
    timeout: int = 900,
) -> dict:
    """Train MMSegmentation's SegFormer-B0 for ``iters`` iterations on ``examples`` synthetic
    examples written under ``root`` (kept there; the caller owns ``root``) and time iterations
    ``start + 1`` .. ``iters``.

    Returns ``train_bench.py``'s report (``images_per_s``, ``step_ms``, ``iters_timed``,
    ``timed_iterations``, ``peak_memory_mib`` (None on the CPU), ``device``, ``gpu``,
    ``precision`` ("bf16" only on CUDA), ``optim_wrapper``, ``batch``, ``workers``, ``crop_size``,
    ``scale``, ``dataset_size``, ``model``, ``loss``, ``setup_s``, ``train_s``, ``versions``)
    plus ``wall_s`` (the subprocess: start-up, imports, dataset and model building included),
    ``mmseg_env`` (install seconds, reused) and ``config``; or ``{"unavailable": "<one line>"}``
    (plus ``log_tail`` when the run itself failed) where the environment cannot be installed
    or the run fails."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not 1 <= start < iters:
        raise ValueError(f"start must be in [1, iters), got start={start}, iters={iters}")
    root = Path(root)
    try:
        env = MmsegEnv.install(wheels=wheel_dir())
    except Exception as error:  # noqa: BLE001 (pip failed: offline, no wheels, ...; report, don't raise)
        return {"unavailable": f"the MMSegmentation 1.2.2 environment could not be installed: {one_line(error)}"}
    data_root = write_ade20k(root / "mmseg-ade20k", examples)
    out = root / f"mmseg-train-b{batch}w{workers}.json"
    out.unlink(missing_ok=True)
    args = [str(data_root), "--out", str(out), "--work-dir", str(root / f"mmseg-work-b{batch}w{workers}"),
            "--config", CONFIG, "--device", device, "--batch", str(batch), "--workers", str(workers),
            "--iters", str(iters), "--start", str(start), "--seed", "0"]  # fmt: skip
    if crop:
        args += ["--crop", str(crop)]
    if bf16:
        args.append("--bf16")
    if threads:
        args += ["--threads", str(threads)]
    began = time.perf_counter()
    try:
        env.run(TRAIN_BENCH, *args, timeout=timeout)
        report = json.loads(out.read_text())
    except (AssertionError, OSError, ValueError) as error:
        return {
            "unavailable": f"MMSegmentation's training run failed: {one_line(error)}",
            "log_tail": str(error)[-3000:],
        }
    wall = time.perf_counter() - began
    return {
        **report,
        "wall_s": round(wall, 1),
        "examples": examples,
        "mmseg_env": {"install_s": env.install_seconds, "reused": env.reused},
    }


def describe(result: dict) -> str:
    if "unavailable" in result:
        return f"MMSegmentation 1.2.2 training not measured: {result['unavailable']}"
    memory = "n/a" if result["peak_memory_mib"] is None else f"{result['peak_memory_mib']} MiB"
    model = result["model"]
    return (
        f"MMSegmentation 1.2.2 {result['config']} ({model['backbone']} + {model['decode_head']}, "
        f"{model['parameters'] / 1e6:.2f}M parameters), batch {result['batch']}, {result['workers']} workers, "
        f"{result['precision']} on {result['gpu'] or result['device']}, crop {result['crop_size']}: "
        f"{result['images_per_s']} images/s ({result['step_ms']} ms/it over iterations "
        f"{result['iters_timed'][0] + 1}..{result['iters_timed'][1]}), peak {memory}, {result['wall_s']} s wall"
    )


def main() -> None:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 64 px, batch 2, 4 iterations")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--start", type=int, default=20, help="timing starts after this iteration")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--crop", type=int, default=None, help="crop size (default: the config's 512)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 AmpOptimWrapper on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the mmseg process")
    parser.add_argument("--save", action="store_true", help="write bench/results/mmseg_train[-cuda].json")
    args = parser.parse_args()
    if args.quick:
        args.device, args.batch, args.workers, args.iters, args.start = "cpu", 2, 0, 4, 2
        args.examples, args.crop, args.threads = 4, 64, args.threads or 1
    with tempfile.TemporaryDirectory(prefix="mmseg-train-") as tmp:
        result = measure_mmseg_train(device=args.device, batch=args.batch, workers=args.workers, iters=args.iters,
                                     start=args.start, examples=args.examples, crop=args.crop,
                                     bf16=not args.fp32, root=Path(tmp), threads=args.threads)  # fmt: skip
    print(describe(result), flush=True)
    summary = {"quick": args.quick, "device": args.device, **result}
    if args.save:
        print(f"results: {write_result('mmseg_train', summary)}")
    print(json.dumps({"bench": "mmseg_train", **summary}))


if __name__ == "__main__":
    main()
