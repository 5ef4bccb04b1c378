"""Every bench still runs: ``bench/run_all.py --quick`` (each bench's smoke mode) in CI. Nothing
about speed is asserted; the figures are the benches' own business (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_every_cpu_bench_runs_in_its_quick_mode(mmseg_env, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick"],
        cwd=ROOT, env={**os.environ, "HOOKTRAIN_BENCH_RESULTS": str(tmp_path)},
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    names = [run["bench"] for run in summary["runs"]]
    assert set(names) == {"startup", "checkpoint", "metrics", "data_pipeline", "runner_overhead", "model_step",
                          "mmseg_parity", "quickstart"}  # fmt: skip
    for name in names:  # each wrote its results file, with where and when it ran
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["bench"] == name and record["quick"] is True
        assert record["machine"]["cpu"]["cores"] >= 1 and record["date"] and record["revision"]
    parity = json.loads((tmp_path / "mmseg_parity.json").read_text())
    assert [row["mode"] for row in parity["rows"]] == ["train", "whole"] and all(r["ratio"] > 0 for r in parity["rows"])
    pipeline = json.loads((tmp_path / "data_pipeline.json").read_text())
    assert pipeline["mmseg_same_outputs"] is True  # hooktrain and MMSegmentation 1.2.2 made the same crops
