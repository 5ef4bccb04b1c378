"""Run every benchmark that fits the device, each in its own process.

    python bench/run_all.py                  # CPU: every CPU bench, results into bench/results/
    python bench/run_all.py --device cuda    # the GPU benches (and the device-independent ones)
    python bench/run_all.py --quick          # smoke run: each bench's quick mode, results into
                                             # $HOOKTRAIN_BENCH_RESULTS or a temporary directory,
                                             # never over the committed ones
    python bench/run_all.py --only startup,checkpoint

Each bench writes ``<results>/<bench>.json`` through ``bench/results.py`` (machine, versions,
date, git revision) and prints one line of JSON last. ``--quick`` asserts nothing about speed:
it shows the benches still run. The exit code is 1 when any bench failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    """A bench script, the devices it measures, and its arguments per mode."""

    name: str
    devices: tuple[str, ...] = ("cpu",)
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ("--quick",)
    cpu: tuple[str, ...] = field(default=())  # extra arguments of a full run on the CPU
    cuda: tuple[str, ...] = field(default=())  # extra arguments on a CUDA device
    script: str | None = None  # bench/<script>.py when it is not bench/<name>.py


BENCHES = (
    Bench("startup", devices=("cpu", "cuda")),
    Bench("checkpoint"),
    Bench("metrics"),
    Bench("data_pipeline"),
    Bench("augment_exactness"),
    Bench("runner_overhead"),
    # fp32 at 256x256 on the CPU: 512x512 steps take ~20 s each there, and bf16 is emulated
    # without AVX512-BF16.
    Bench("model_step", devices=("cpu", "cuda"), cpu=("--size", "256", "--steps", "4", "--warmup", "1",
                                                       "--precision", "fp32"), cuda=("--device", "cuda")),
    Bench("mmseg_parity", devices=("cpu", "cuda"), cuda=("--device", "cuda", "--bf16", "--size", "512")),
    Bench("quickstart"),
    Bench("quickstart_binary", script="quickstart", args=("--recipe", "quickstart_binary")),
    Bench("onnx_inference"),
    Bench("grad_checkpointing", devices=("cpu", "cuda"), cuda=("--device", "cuda")),
    Bench("unet_vs_fpn"),
    Bench("mask_matching", devices=("cpu", "cuda"), cuda=("--device", "cuda")),
    Bench("eomt_vs_transformers", devices=("cpu", "cuda"), cuda=("--device", "cuda")),
    Bench("mask2former_vs_transformers", devices=("cpu", "cuda"), cuda=("--device", "cuda")),
    Bench("fsdp_memory"),
    Bench("tiled_predict"),
    Bench("gpu_train", devices=("cuda",)),
)


def command(bench: Bench, device: str, quick: bool) -> list[str]:
    device_args = bench.cuda if device == "cuda" else () if quick else bench.cpu
    args = [*bench.args, *(bench.quick if quick else ()), *device_args]
    return [sys.executable, str(BENCH / f"{bench.script or bench.name}.py"), *args]


def run(bench: Bench, device: str, quick: bool, env: dict[str, str]) -> dict:
    """Run one bench; its last JSON line (or the error) with the wall time."""
    started = time.perf_counter()
    result = subprocess.run(command(bench, device, quick), cwd=BENCH.parent, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 1)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        return {"bench": bench.name, "ok": False, "seconds": seconds, "error": result.stderr[-2000:]}
    try:
        summary = json.loads(lines[-1])
    except ValueError:
        return {"bench": bench.name, "ok": False, "seconds": seconds, "error": f"last line is not JSON: {lines[-1]}"}
    return {"bench": bench.name, "ok": True, "seconds": seconds, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each bench's smoke mode; results to a temp dir")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", help="comma-separated bench names")
    args = parser.parse_args()
    chosen = [b for b in BENCHES if args.device in b.devices]
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {b.name for b in BENCHES}
        if unknown:
            parser.error(f"unknown bench(es): {', '.join(sorted(unknown))}")
        chosen = [b for b in chosen if b.name in names]
    env = dict(os.environ)
    if args.quick and not env.get("HOOKTRAIN_BENCH_RESULTS"):
        env["HOOKTRAIN_BENCH_RESULTS"] = tempfile.mkdtemp(prefix="hooktrain-bench-quick-")
    reports = []
    for bench in chosen:
        report = run(bench, args.device, args.quick, env)
        status = "ok" if report["ok"] else "FAILED"
        print(f"{bench.name:<16} {status:<6} {report['seconds']:7.1f} s", flush=True)
        if not report["ok"]:
            print(report["error"], file=sys.stderr)
        reports.append(report)
    print(json.dumps({"bench": "run_all", "quick": args.quick, "device": args.device,
                      "results": env.get("HOOKTRAIN_BENCH_RESULTS", str(BENCH / "results")),
                      "runs": [{k: r[k] for k in ("bench", "ok", "seconds")} for r in reports]}))  # fmt: skip
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
