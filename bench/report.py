"""docs/benchmarks.md's tables, generated from the committed ``bench/results/*.json``.

    python bench/report.py           # rewrite the generated blocks of docs/benchmarks.md
    python bench/report.py --check   # exit 1 when they differ from what the results files say

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``: ``summary``
(one row per bench) and one block per bench (its detail table). Prose around the blocks may
interpret the figures; every number in a table comes from a results file. A bench without a
results file says so instead of showing numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)

Result = dict[str, Any]


def load(name: str) -> Result | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def machine(result: Result) -> str:
    info = result.get("machine")
    return info["description"] if isinstance(info, dict) else str(info)


def provenance(result: Result) -> str:
    return f"{machine(result)}; {result.get('date', 'undated')}, revision {result.get('revision', 'unknown')}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


# -- one renderer per bench: (summary cell, detail block) ------------------------------------


def startup(r: Result) -> tuple[str, str]:
    errors = r["errors"][:-1]
    summary = (f"recipe/CLI errors {min(e['seconds'] for e in errors):.2f}-{r['worst_recipe_error_s']:.2f} s "
               f"({max(e['vs_heavy_imports'] for e in errors):.2f}x the {r['heavy_imports_s']:.2f} s of importing "
               f"torch, timm, datasets); first quickstart iteration {r['first_iteration_s']:.2f} s")  # fmt: skip
    rows = [[e["case"], fmt(e["seconds"], 2), fmt(e["vs_heavy_imports"], 2)] for e in r["errors"]]
    rows.append(["first iteration of a 1-iteration quickstart", fmt(r["first_iteration_s"], 2),
                 fmt(r["first_iteration_vs_heavy_imports"], 2)])  # fmt: skip
    rows.append(["baseline: `python -c pass`", fmt(r["python_s"], 2), ""])
    rows.append(["baseline: `import torch, timm, datasets`", fmt(r["heavy_imports_s"], 2), "1.00"])
    return summary, table(["case", "seconds", "x heavy imports"], rows)


def checkpoint(r: Result) -> tuple[str, str]:
    summary = (f"save {r['save_s']:.2f} s; resume same-size {r['resume_same_early_s']:.3f} / "
               f"{r['resume_same_late_s']:.3f} s early/late ({r['same_late_over_early']:.2f}), elastic "
               f"{r['resume_elastic_early_s']:.3f} / {r['resume_elastic_late_s']:.3f} s "
               f"({r['elastic_late_over_early']:.2f})")  # fmt: skip
    rows = [
        ["same number of processes (exact)", f"{r['resume_same_early_s']:.3f} s", f"{r['resume_same_late_s']:.3f} s",
         fmt(r["same_late_over_early"], 2)],
        ["elastic: 2-process checkpoint, 1 process", f"{r['resume_elastic_early_s']:.3f} s",
         f"{r['resume_elastic_late_s']:.3f} s", fmt(r["elastic_late_over_early"], 2)],
        ["elastic / same-size", "", "", fmt(r["elastic_over_same_late"], 2) + " (late)"],
        ["save", f"{r['save_s']:.3f} s", "", ""],
    ]  # fmt: skip
    header = ["", f"resume at iteration {r['early_iter']}", f"resume at iteration {r['late_iter']}", "late / early"]
    return summary, table(header, rows)


PARITY_NAMES = {
    "segformer_mit-b0": "SegFormer-B0", "upernet_r50": "UPerNet R-50", "deeplabv3plus_r50-d8": "DeepLabV3+ R-50-D8",
    "pspnet_r50-d8": "PSPNet R-50-D8", "fcn_r50-d8": "FCN R-50-D8", "fpn_r50": "Semantic FPN R-50",
}  # fmt: skip


def parity_name(config: str) -> str:
    return next((name for prefix, name in PARITY_NAMES.items() if config.startswith(prefix)), config)


def mmseg_parity(r: Result) -> tuple[str, str]:
    train = [row for row in r["rows"] if row["mode"] == "train"]
    infer = [row for row in r["rows"] if row["mode"] != "train"]
    ratios = [row["ratio"] for row in train]
    summary = (f"{r['device']} {r['precision']} {r['size']}x{r['size']} b{r['batch']}: train ratio "
               f"{min(ratios):.2f}-{max(ratios):.2f}; inference ratio {min(x['ratio'] for x in infer):.2f}-"
               f"{max(x['ratio'] for x in infer):.2f}")  # fmt: skip
    train_table = table(
        ["model", "hooktrain s/step", "mmseg s/step", "ratio"],
        [[parity_name(x["config"]), fmt(x["hooktrain_s"]), fmt(x["mmseg_s"]), fmt(x["ratio"], 2)] for x in train],
    )
    infer_table = table(
        ["model", "inference", "hooktrain img/s", "mmseg img/s", "ratio"],
        [[parity_name(x["config"]), x["mode"], fmt(x["hooktrain_img_s"], 2), fmt(x["mmseg_img_s"], 2),
          fmt(x["ratio"], 2)] for x in infer],
    )  # fmt: skip
    return summary, f"{train_table}\n\n{infer_table}"


def quickstart(r: Result) -> tuple[str, str]:
    summary = f"{r['seconds']:.0f} s, mIoU {r['miou']:.3f} at iteration {r['iters']}"
    rows = [["wall time (data generation included)", f"{r['seconds']:.1f} s", "180 s", fmt(r["time_ratio"], 2)],
            ["final val/mIoU", fmt(r["miou"], 4), "0.70", fmt(r["miou_ratio"], 2)]]  # fmt: skip
    return summary, table(["", "measured", "target", "ratio"], rows) + f"\n\nCommand: `{r['command']}`."


def gpu_train(r: Result) -> tuple[str, str]:
    best = max(r["runs"], key=lambda run: run["images_per_s"])
    summary = f"best {best['images_per_s']} img/s (batch {best['batch']}, {best['workers']} workers)"
    rows = [[x["batch"], x["workers"], x["images_per_s"], x["step_ms"], f"{100 * x['data_wait_share']:.1f}%",
             x["peak_memory_mib"]] for x in r["runs"]]  # fmt: skip
    return summary, table(["batch", "workers", "images/s", "ms/iteration", "data wait", "peak MiB"], rows)


# bench: (what is compared, target, renderer)
BENCHES: dict[str, tuple[str, str, Callable[[Result], tuple[str, str]]]] = {
    "startup": ("time from the command to a one-line error, and to the first iteration, against importing "
                "torch + timm + datasets in the same run", "errors ~1 s", startup),
    "checkpoint": ("save time; resume early and late in a data pass, same-size and elastic", "late/early ~1",
                   checkpoint),
    "mmseg_parity": ("each `recipes/mmseg` model against MMSegmentation 1.2.2's own module from the same config: "
                     "train step and whole/slide inference", "ratio <= 1.0", mmseg_parity),
    "quickstart": ("the quickstart from a fresh directory: wall time and final mIoU", "<= 180 s, >= 0.70",
                   quickstart),
    "gpu_train": ("`recipes/ade20k.yaml` end to end on one GPU, per batch size and DataLoader workers",
                  "data wait < 5%", gpu_train),
}  # fmt: skip


def blocks() -> dict[str, str]:
    """Every generated block's text, by name."""
    out, rows = {}, []
    for name, (what, target, render) in BENCHES.items():
        result = load(name)
        if result is None:
            rows.append([f"`{name}.py`", what, "no results file yet: run `python bench/run_all.py`", target, ""])
            out[name] = f"No `bench/results/{name}.json` yet: run `python bench/run_all.py --only {name}`."
            continue
        summary, detail = render(result)
        quick = " (quick mode)" if result.get("quick") else ""
        rows.append([f"`{name}.py`", what, summary + quick, target, f"{machine(result)}, {result.get('date', '')}"])
        out[name] = f"{detail}\n\n`bench/results/{name}.json`{quick}: {provenance(result)}."
    out["summary"] = table(["bench", "what is compared", "result", "target", "machine, date"], rows)
    return out


def render(text: str) -> str:
    generated = blocks()

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in generated:
            raise SystemExit(f"docs/benchmarks.md has a generated block '{name}' that no bench renders")
        return f"{match.group(1)}{generated[name]}\n{match.group(4)}"

    return BLOCK.sub(replace, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/benchmarks.md is out of date")
    args = parser.parse_args()
    text = DOC.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("docs/benchmarks.md differs from bench/results: run `python bench/report.py`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
