"""docs/benchmarks.md's tables (and README's quickstart figures), generated from the committed
``bench/results/*.json``.

    python bench/report.py           # rewrite the generated blocks of docs/benchmarks.md and README.md
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
DOCS = (ROOT / "docs" / "benchmarks.md", ROOT / "README.md")
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)

Result = dict[str, Any]


GPU_ONLY = {"gpu_train"}  # rendered from <bench>-cuda.json


def load(name: str) -> Result | None:
    path = RESULTS / (f"{name}-cuda.json" if name in GPU_ONLY else f"{name}.json")
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


def joined(values: list) -> str:
    return ", ".join(str(v) for v in values)


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
    "convnext-tiny_upernet": "UPerNet ConvNeXt-T", "vit_vit-b16_mln_upernet": "UPerNet ViT-B/16 + MLN",
    "swin-tiny-patch4-window7": "UPerNet Swin-T",
    "upernet-convnext-tiny": "UPerNet ConvNeXt-T (`recipes/transformers/upernet-convnext-tiny.yaml`)",
    "upernet-swin-tiny": "UPerNet Swin-T (`recipes/transformers/upernet-swin-tiny.yaml`)",
}  # fmt: skip
# rows' ``reference`` (rows without one predate the transformers comparison: MMSegmentation)
PARITY_REFERENCES = {"mmseg": "MMSegmentation", "transformers": "transformers"}


def parity_name(config: str) -> str:
    return next((name for prefix, name in PARITY_NAMES.items() if config.startswith(prefix)), config)


def mmseg_parity(r: Result) -> tuple[str, str]:
    summaries, blocks = [], []
    for ref, label in PARITY_REFERENCES.items():
        rows = [row for row in r["rows"] if row.get("reference", "mmseg") == ref]
        if not rows:
            if ref == "transformers" and r.get("references", ["mmseg"]) != ["transformers"]:
                summaries.append("transformers not measured")
                blocks.append("transformers' `UperNetForSemanticSegmentation`: not measured in this results file.")
            continue
        train = [row for row in rows if row["mode"] == "train"]
        infer = [row for row in rows if row["mode"] != "train"]
        span = lambda group: f"{min(x['ratio'] for x in group):.2f}-{max(x['ratio'] for x in group):.2f}"  # noqa: E731
        summaries.append(f"vs {label} train ratio {span(train) if train else 'n/a'}, inference ratio "
                         f"{span(infer) if infer else 'n/a'}")  # fmt: skip
        name = lambda x, wide=1: parity_name(x["config"]) + (  # noqa: E731
            f" at {x['size']}x{wide * x['size']}" if x.get("size", r["size"]) != r["size"] else "")  # fmt: skip
        if train:
            blocks.append(table(
                ["model", "hooktrain s/step", f"{ref} s/step", "ratio"],
                [[name(x), fmt(x["hooktrain_s"]), fmt(x[f"{ref}_s"]), fmt(x["ratio"], 2)] for x in train],
            ))  # fmt: skip
        if infer:
            blocks.append(table(
                ["model", "inference", "hooktrain img/s", f"{ref} img/s", "ratio"],
                [[name(x, 2), x["mode"], fmt(x["hooktrain_img_s"], 2), fmt(x[f"{ref}_img_s"], 2), fmt(x["ratio"], 2)]
                 for x in infer],
            ))  # fmt: skip
        if ref == "transformers":
            blocks.append(
                f"transformers {r.get('transformers_version', '')}: `UperNetForSemanticSegmentation` with the Hub "
                "checkpoint's architecture, random weights, the recipe's stochastic depth, in the same process. Train "
                "step: hooktrain's loss terms (CE + 0.4 x the auxiliary head's CE) vs transformers' own "
                "`model(pixel_values, labels=mask).loss` (the same two terms; hooktrain's heads also apply their "
                "dropout 0.1, transformers' have none), then backward and AdamW on both; "
                "inference: whole-image logits at the input size on one image of size x 2*size, transformers' "
                "auxiliary head left out (its forward would compute it too)."
            )  # fmt: skip
    summary = f"{r['device']} {r['precision']} {r['size']}x{r['size']} b{r['batch']}: " + "; ".join(summaries)
    setting = (f"Each side measured in {r.get('rounds', 1)} round(s), the first side alternating; each round "
               f"{r['iters']} timed step(s) after {r.get('warmup', 1)} warm-up.")  # fmt: skip
    for reference, origin in r.get("kept_rows_from", {}).items():  # rows a --reference rerun left in place
        setting += (f" The {reference} rows come from an earlier run: {origin['date']}, revision "
                    f"{origin['revision']}.")  # fmt: skip
    return summary, "\n\n".join([*blocks, setting])


def quickstart(r: Result) -> tuple[str, str]:
    summary = f"{r['seconds']:.0f} s, mIoU {r['miou']:.3f} at iteration {r['iters']}"
    rows = [["wall time (data generation included)", f"{r['seconds']:.1f} s", "180 s", fmt(r["time_ratio"], 2)],
            ["final val/mIoU", fmt(r["miou"], 4), "0.70", fmt(r["miou_ratio"], 2)]]  # fmt: skip
    return summary, table(["", "measured", "target", "ratio"], rows) + f"\n\nCommand: `{r['command']}`."


def quickstart_eomt(r: Result) -> tuple[str, str]:
    summary = f"{r['seconds']:.0f} s, mIoU {r['miou']:.3f} at iteration {r['iters']}"
    rows = [["wall time (data generation included)", f"{r['seconds']:.1f} s", f"{r['target_seconds']:.0f} s",
             fmt(r["time_ratio"], 2)],
            ["final val/mIoU", fmt(r["miou"], 4), str(r["target_score"]), fmt(r["score_ratio"], 2)],
            ["per-class IoU", joined([fmt(v, 3) for v in r["per_class_iou"]]), "", ""]]  # fmt: skip
    return summary, table(["", "measured", "target", "ratio"], rows) + f"\n\nCommand: `{r['command']}`."


def quickstart_binary(r: Result) -> tuple[str, str]:
    iou = r["foreground_iou"]
    summary = f"{r['seconds']:.0f} s, foreground IoU {iou:.3f} at iteration {r['iters']}"
    rows = [["wall time (data generation included)", f"{r['seconds']:.1f} s", f"{r['target_seconds']:.0f} s",
             fmt(r["time_ratio"], 2)],
            ["final foreground IoU", fmt(iou, 4), str(r["target_score"]), fmt(r["score_ratio"], 2)],
            ["final val/mIoU (background and foreground)", fmt(r["miou"], 4), "", ""]]  # fmt: skip
    return summary, table(["", "measured", "target", "ratio"], rows) + f"\n\nCommand: `{r['command']}`."


def gpu_train(r: Result) -> tuple[str, str]:
    best, mmseg = r["variants"][r["best"]], r.get("mmseg") or {}
    versus = (
        f"{r['ratio_vs_mmseg']:.2f}x MMSegmentation 1.2.2 ({mmseg['images_per_s']} img/s)"
        if r.get("ratio_vs_mmseg")
        else f"MMSegmentation not measured ({mmseg.get('unavailable', 'left out')})"
    )
    gap = "" if best["data_bound_gap"] is None else f"; data-bound gap {100 * best['data_bound_gap']:.1f}%"
    summary = f"best {best['images_per_s']} img/s (`{r['best']}`); {versus}{gap}"  # fmt: skip
    percent = lambda x: "" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    rows = [[f"`{name}`", x["images_per_s"], x["step_ms"], percent(x["data_wait_share"]),
             f"{percent(x['data_bound_gap'])} (vs `{x['model_only']}`)", x["peak_memory_mib"]]
            for name, x in r["variants"].items()]  # fmt: skip
    if mmseg.get("images_per_s"):
        rows.append(["MMSegmentation 1.2.2, own runner and pipeline", mmseg["images_per_s"], mmseg["step_ms"], "", "",
                     mmseg.get("peak_memory_mib")])  # fmt: skip
    end_to_end = table(["end to end", "images/s", "ms/iteration", "data wait", "data-bound gap", "peak MiB"], rows)
    rows = [[f"`{name}`", x["images_per_s"], x["step_ms"], "yes" if x["fused_adamw"] else "no", x["peak_memory_mib"]]
            for name, x in r["model_only"].items()]  # fmt: skip
    model_only = table(["model only (synthetic batch on the device)", "images/s", "ms/step", "fused AdamW",
                        "peak MiB"], rows)  # fmt: skip
    setting = (f"Global batch {r['batch']} on one device, {r['workers']} DataLoader workers, {r['precision']}, "
               f"{r['iters']} iterations timed from iteration {r['timed_from']}.")  # fmt: skip
    return summary, f"{end_to_end}\n\n{model_only}\n\n{setting}"


def runner_overhead(r: Result) -> tuple[str, str]:
    model = r["model"]
    summary = f"**{r['ratio']:.3f}** ({r['runner_ms_per_step']:.1f} vs {r['plain_ms_per_step']:.1f} ms/step)"
    rows = [["IterRunner with the logger hook", f"{r['runner_ms_per_step']:.1f}"],
            ["hand-written Accelerate loop", f"{r['plain_ms_per_step']:.1f}"], ["ratio", fmt(r["ratio"])]]  # fmt: skip
    setting = (f"{model['encoder']} (stages {model['out_indices']}) + {model['decode_head']}, "
               f"{model['parameters']:,} parameters, batch {r['batch']}x3x{r['size']}x{r['size']}, precision "
               f"{r['precision']}, {r['rounds']} rounds x {r['steps_per_round']} steps, "
               f"{r['threads']} threads")  # fmt: skip
    return summary, table(["", "ms/step"], rows) + f"\n\n{setting}."


def data_pipeline(r: Result) -> tuple[str, str]:
    if r.get("mmseg_unavailable"):
        versus = f"MMSegmentation not measured ({r['mmseg_unavailable']}): no ratio"
    else:
        versus = f"{r['ratio_vs_mmseg']:.2f}x MMSegmentation 1.2.2's pipeline ({r['mmseg_images_per_s']} img/s)"
    summary = (f"{r['images_per_s']} img/s per core; {versus}; {r['ratio_vs_tv2']:.2f}x torchvision v2; "
               f"HTTP/local stream {r['stream_ratio_hub_vs_local']:.2f}; quickstart data wait "
               f"{100 * r['quickstart_data_wait_share']:.1f}%")  # fmt: skip
    rounds, first = r["images_per_s_per_round"], r["stream_first_batch_s"]
    versus = f"{r['ratio_vs_mmseg']:.2f}x" if r.get("ratio_vs_mmseg") else "not measured"
    rows = [
        ["hooktrain", r["images_per_s"], joined(rounds["hooktrain"]), ""],
        ["MMSegmentation 1.2.2 (own env.)", r["mmseg_images_per_s"], joined(rounds.get("mmseg", [])), versus],
        ["torchvision v2", r["baseline_tv2_images_per_s"], joined(rounds["tv2"]), f"{r['ratio_vs_tv2']:.2f}x"],
        ["decode only (JPEG + PNG)", r["decode_only_images_per_s"], joined(rounds["decode_only"]), ""],
    ]
    pipeline = table(["pipeline (one thread)", "images/s (median)", "per round", "hooktrain is"], rows)
    handover = r["worker_handover_batches_per_s"]
    rows = [
        ["local Hub server over HTTP", r["stream_hub_http_images_per_s_per_worker"], f"{first['hub_http']} s"],
        ["local parquet", r["stream_local_parquet_images_per_s_per_worker"], f"{first['local_parquet']} s"],
        ["HTTP / local", fmt(r["stream_ratio_hub_vs_local"], 2), ""],
        ["worker hand-over alone, float32 image + int64 mask (batches/s)", handover["float32_int64"], ""],
        ["worker hand-over alone, uint8 (batches/s)", handover["uint8"], ""],
    ]
    stream = table(["train stream, 1 worker", "images/s", "first batch"], rows)
    same = "equal bit for bit" if r.get("mmseg_same_outputs") else "NOT equal"
    notes = (f"{r['examples']} examples, {r['rounds']} interleaved rounds, {r['warmup_images']} warm-up images per "
             f"side and round; hooktrain's and MMSegmentation's outputs on the warm-up images: {same}.")  # fmt: skip
    return summary, f"{pipeline}\n\n{stream}\n\n{notes}"


def model_step(r: Result) -> tuple[str, str]:
    precisions = [p for p in ("fp32", "bf16") if p in r]
    summary = f"{r['device']} {r['size']}x{r['size']} b{r['batch']}: " + "; ".join(
        f"{p} ratio {r[p]['ratio']:.2f}" for p in precisions
    )
    rows = []
    for p in precisions:
        memory = r[p].get("max_memory_allocated_mib") or {}
        rows.append([p, fmt(r[p]["step_s"]["hooktrain"], 4), fmt(r[p]["step_s"]["plain"], 4), fmt(r[p]["ratio"], 3),
                     r[p]["images_per_s"]["hooktrain"], memory.get("hooktrain", "CUDA only"),
                     memory.get("plain", "CUDA only")])  # fmt: skip
    header = ["precision", "hooktrain s/step", "plain s/step", "ratio", "hooktrain images/s", "peak MiB hooktrain",
              "peak MiB plain"]  # fmt: skip
    setting = (f"{r['size']}x{r['size']}, batch {r['batch']}, {r['steps']} timed steps after {r['warmup']} warm-up, "
               f"{r['threads']} threads, {r['parameters']['hooktrain']:,} parameters on both sides")  # fmt: skip
    return summary, table(header, rows) + f"\n\n{setting}."


def metrics(r: Result) -> tuple[str, str]:
    ms = r["ms_per_image"]
    summary = (f"{r['vs_histc_ratio']:.1f}x faster than histc, {r['vs_evaluate_ratio']:.1f}x than evaluate; "
               f"{r['collective_bytes_per_evaluation']:,} B reduced per evaluation vs "
               f"{r['evaluate_mask_bytes_per_image']:,} B of masks per image; RSS +{r['rss_growth_mb']} MB over "
               f"{r['rss_images']:,} images")  # fmt: skip
    names = {
        "hooktrain": "hooktrain `intersect_and_union`",
        "histc": "MMSegmentation `histc`",
        "evaluate_int64": "`evaluate` mean_iou (int64 masks)",
        "evaluate_uint8": "`evaluate` mean_iou (uint8 masks)",
    }
    rows = [[names.get(k, k), fmt(v, 2), fmt(v / ms["hooktrain"], 2)] for k, v in ms.items()]
    speed = table(["implementation", "ms/image (median)", "x hooktrain"], rows)
    bound = "" if r.get("rss_reset_ok") else "; an upper bound: the peak reset did not take"
    volume = table(
        ["what the eval hook hands over (measured)", "bytes"],
        [["collectives, per evaluation (the confusion matrix)", f"{r['collective_bytes_per_evaluation']:,}"],
         ["collectives, per evaluation with `confusion: false` (packed areas)",
          f"{r['collective_bytes_per_evaluation_areas_only']:,}"],
         ["masks to an `evaluate` module, per image (both)", f"{r['evaluate_mask_bytes_per_image']:,}"],
         ["peak RSS growth accumulating areas", f"{r['rss_growth_mb']} MB over {r['rss_images']:,} images "
          f"({r['rss_growth_after_first_image_mb']} MB after the first){bound}"]],
    )  # fmt: skip
    return summary, f"{speed}\n\n{volume}\n\n{r['images']} images of 512x512, {r['rounds']} interleaved rounds."


def onnx_inference(r: Result) -> tuple[str, str]:
    names = {"quickstart": "quickstart", "segformer_b0": "SegFormer-B0"}
    summary = ", ".join(f"**{x['ratio']:.2f}x** {names.get(x['model'], x['model'])}" for x in r["rows"])
    rows = [[names.get(x["model"], x["model"]), f"`{x['recipe']}`", f"{x['size']}x{x['size']}",
             f"{x['parameters']:,}", x["pytorch_images_per_s"], x["onnxruntime_images_per_s"], fmt(x["ratio"], 2)]
            for x in r["rows"]]  # fmt: skip
    setting = (f"Batch {r['batch']}, median of {r['rounds']} interleaved rounds, PyTorch with {r['torch_threads']} "
               f"threads, onnxruntime {r['onnxruntime']} with its default CPU session")  # fmt: skip
    header = ["model", "recipe", "size", "parameters", "PyTorch images/s", "ONNX Runtime images/s", "ratio"]
    return summary, table(header, rows) + f"\n\n{setting}."


def augment_exactness(r: Result) -> tuple[str, str]:
    paths = {p["path"]: p for p in r["paths"]}
    worst = max(row["max_steps"] for p in r["paths"] for row in p["whole_draws"])
    hsv = max(row["max_steps"] for p in r["paths"] for row in p["hsv_to_rgb"].values())
    summary = (f"HSV->RGB within {hsv} step of OpenCV's optimised and baseline kernels; whole draws within "
               f"{worst} steps (bound: 11, 17 after contrast)")  # fmt: skip
    conversions = [[name, f"{p['rgb_to_hsv_values_off']:,}",
                    *(f"{p['hsv_to_rgb'][k]['values_off']:,} / {p['hsv_to_rgb'][k]['max_steps']}"
                      for k in ("rows_256", "rows_250"))] for name, p in paths.items()]  # fmt: skip
    draws = [[name, row["width"], row["draws"], row["max_steps"], row["max_steps_saturation_then_hue"],
              f"{row['share_off']:.2%}", f"{row['share_over_one_step']:.4%}"]
             for name, p in paths.items() for row in p["whole_draws"]]  # fmt: skip
    text = (table(["OpenCV path", "RGB->HSV values off (of 2^24)", "HSV->RGB, rows of 256: off / max steps",
                   "rows of 250: off / max steps"], conversions)
            + "\n\n" + table(["OpenCV path", "width", "draws", "max steps", "max steps, saturation then hue",
                               "values off", "values > 1 step off"], draws)
            + f"\n\nOpenCV {r['opencv']} ({r['opencv_cpu_features']}), one thread.")  # fmt: skip
    return summary, text


def grad_checkpointing(r: Result) -> tuple[str, str]:
    summary = (f"peak {r['peak_gib_off']:.2f} -> {r['peak_gib_on']:.2f} GiB ({r['peak_saved_gib']:.2f} GiB saved), "
               f"step time x{r['step_time_ratio']:.2f}")  # fmt: skip
    rows = [["off", fmt(r["step_s_off"], 2), fmt(r["peak_gib_off"], 2), "1.00"],
            ["on", fmt(r["step_s_on"], 2), fmt(r["peak_gib_on"], 2), fmt(r["step_time_ratio"], 2)]]  # fmt: skip
    setting = (f"{r['model']}, {r['size']}x{r['size']}, batch {r['batch']}, {r['precision']}, median of "
               f"{r['steps']} steps per process, {r['rounds']} alternating processes per side; peak memory: "
               f"{r['peak_memory']}")  # fmt: skip
    header = ["grad_checkpointing", "step seconds", "peak GiB", "x step time"]
    return summary, table(header, rows) + f"\n\n{setting}."


def fsdp_memory(r: Result) -> tuple[str, str]:
    runs = r["runs"]
    by = {(x["strategy"], x["grad_checkpointing"]): x for x in runs}

    def versus(strategy: str, key: str) -> str:
        x = by.get((strategy, False))
        return f"x{x['vs_ddp'][key]:.2f}" if x and "vs_ddp" in x else "n/a"

    summary = (f"{r['processes']} CPU processes, checkpointing off, FSDP / FSDP2 over DDP: state per rank "
               f"{versus('fsdp', 'state_mib')} / {versus('fsdp2', 'state_mib')}, peak RSS over baseline "
               f"{versus('fsdp', 'peak_over_baseline_gib')} / {versus('fsdp2', 'peak_over_baseline_gib')}, step time "
               f"{versus('fsdp', 'step_s')} / {versus('fsdp2', 'step_s')}")  # fmt: skip
    rows = []
    for x in runs:
        ckpt = "on" if x["grad_checkpointing"] else "off"
        if not x["ok"]:
            rows.append([f"`{x['strategy']}`", ckpt] + ["failed"] * 8)
            continue
        ratio = {key: fmt(x["vs_ddp"][key], 2) if "vs_ddp" in x else "n/a"
                 for key in ("state_mib", "peak_over_baseline_gib", "step_s")}  # fmt: skip
        rows.append([f"`{x['strategy']}`", ckpt, fmt(x["state_mib"], 1), ratio["state_mib"],
                     fmt(x["rss_before_model_gib"], 2), fmt(x["peak_rss_gib"], 2), fmt(x["peak_over_baseline_gib"], 2),
                     ratio["peak_over_baseline_gib"], fmt(x["step_s"], 2), ratio["step_s"]])  # fmt: skip
    header = ["train.strategy", "grad_checkpointing", "state MiB/rank", "x DDP", "RSS before model GiB",
              "peak RSS GiB", "peak over baseline GiB", "x DDP", "step seconds", "x DDP"]  # fmt: skip
    setting = (f"{r['model']} ({r['parameters']:,} parameters), {r['size']}x{r['size']}, "
               f"batch {r['batch_per_process']} per process, {r['processes']} processes (gloo) of "
               f"{r['threads_per_process']} thread(s), "
               f"{r['precision']}, median of {r['steps']} steps after {r['warmup']} warm-up; each figure the larger "
               f"rank's; x DDP: over DDP with the same checkpointing setting, same run; state: exact local bytes of "
               "parameters, gradients and AdamW state (DDP's gradient buckets not counted); peak: the process's peak "
               "RSS (ru_maxrss) over the run, model building included; baseline: its RSS before the model was built; "
               f"{r['wall_s']:.0f} s in all")  # fmt: skip
    return summary, table(header, rows) + f"\n\n{setting}."


def unet_vs_fpn(r: Result) -> tuple[str, str]:
    pairs = r["pairs"]
    summary = ", ".join(f"{name}: U-Net {p['unet']['score']:.3f} vs FPN {p['fpn']['score']:.3f} {p['score']}"
                        for name, p in pairs.items())  # fmt: skip
    rows = [[name, f"`{p[side]['recipe']}`", p[side]["iters"], fmt(p["iteration_s"][side], 3),
             fmt(p[side]["train_seconds"], 1), p["score"], fmt(p[side]["score"], 4)]
            for name, p in pairs.items() for side in ("fpn", "unet")]  # fmt: skip
    header = ["data", "recipe", "iterations", "s/iteration", "training seconds", "score", "value"]
    return summary, table(header, rows)



def mask_matching(r: Result) -> tuple[str, str]:
    def versus(x: Result) -> str:
        return f", step {x['step_vs_transformers']:.2f}x transformers'" if "step_vs_transformers" in x else ""

    summary = "; ".join(f"{x['queries']} queries: matching {1e3 * x['matching_s_per_image']:.1f} ms/image, "
                        f"{100 * x['matching_share_of_step']:.0f}% of the criterion step{versus(x)}"
                        for x in r["runs"])  # fmt: skip
    rows = [[x["queries"], fmt(1e3 * x["matching_s_per_image"], 1), fmt(1e3 * x["assignment_s_per_image"], 3),
             fmt(x["matching_peak_mib"], 1), fmt(1e3 * x["point_sampling_s"], 1), fmt(x["point_sampling_peak_mib"], 1),
             fmt(x["criterion_step_s"], 3), fmt(x["criterion_step_peak_mib"], 1), f"{x['matching_share_of_step']:.1%}",
             fmt(x["transformers_step_s"], 3) if "transformers_step_s" in x else "not measured",
             fmt(x["step_vs_transformers"], 2) if "step_vs_transformers" in x else ""]
            for x in r["runs"]]  # fmt: skip
    header = ["queries", "matching ms/image", "linear_sum_assignment ms/image", "matching peak MiB",
              "point sampling ms", "point sampling peak MiB", "criterion step s", "step peak MiB",
              "matching share of step", "transformers step s", "step ratio"]  # fmt: skip
    setting = (f"{r['batch']} targets of {r['target_size']}x{r['target_size']} ({joined(r['segments_per_image'])} "
               f"segments of {r['classes']} classes), mask logits at {r['mask_logits_size']}x{r['mask_logits_size']}, "
               f"{r['layers']} supervised layers, {r['points']} points, fastest of {r['repeats']} runs, "
               f"{r['threads']} thread(s); peak memory: {r['peak_memory']}")  # fmt: skip
    return summary, table(header, rows) + f"\n\n{setting}."


def _versus_rows(r: Result, train_step: str) -> tuple[str, str]:
    """The summary cell and table of a bench timed with ``bench/versus.py`` against transformers."""
    train, infer = r["train"], r["inference"]
    summary = (f"{r['device']} {r['precision']} {r['size']}x{r['size']} b{r['batch']}: train step ratio "
               f"{train['ratio']:.2f} fastest, {train['paired_ratio']:.2f} per round; inference ratio "
               f"{infer['ratio']:.2f} fastest, {infer['paired_ratio']:.2f} per round")  # fmt: skip
    rows = [[name, fmt(x["hooktrain_s"]), fmt(x["transformers_s"]), fmt(x["ratio"], 2), fmt(x["hooktrain_median_s"]),
             fmt(x["transformers_median_s"]), fmt(x["median_ratio"], 2), fmt(x["paired_ratio"], 2)]
            for name, x in ((train_step, train), ("inference (semantic scores)", infer))]
    header = ["", "hooktrain s (fastest)", "transformers s (fastest)", "ratio", "hooktrain median s",
              "transformers median s", "ratio of medians", "median of the rounds' ratios"]  # fmt: skip
    return summary, table(header, rows)


def eomt_vs_transformers(r: Result) -> tuple[str, str]:
    summary, rows = _versus_rows(r, "train step (forward + loss + backward)")
    config = r["config"]
    setting = (f"EoMT, ViT of width {config['hidden_size']}, depth {config['num_hidden_layers']}, "
               f"{config['num_attention_heads']} heads, patch {config['patch_size']}, "
               f"{config['num_register_tokens']} registers, {config['num_queries']} queries, {config['num_blocks']} "
               f"masked blocks, {config['num_labels']} classes ({r['parameters']:,} parameters); batch {r['batch']} "
               f"at {r['size']}x{r['size']}, {joined(r['segments_per_image'])} segments per image, {r['points']} "
               f"points; transformers {r['transformers_version']} ({r['attention']} attention), {r['threads']} "
               f"threads. Seconds are the fastest of {r['rounds']} alternating rounds (medians beside them); each "
               f"round runs one step of each model back to back. Same "
               f"weights: semantic scores within {r['scores_max_relative_difference']:.1e} (relative); losses "
               f"{r['loss']['hooktrain']} (hooktrain) and {r['loss']['transformers']} (transformers: its layers "
               "draw their random points in another order)")  # fmt: skip
    return summary, rows + f"\n\n{setting}."


def mask2former_vs_transformers(r: Result) -> tuple[str, str]:
    summary, rows = _versus_rows(r, "train step (forward + loss + backward + AdamW)")
    swin, config = r["backbone"], r["config"]
    setting = (f"Mask2Former on transformers' Swin (embed dim {swin['embed_dim']}, depths {joined(swin['depths'])}, "
               f"heads {joined(swin['num_heads'])}, window {swin['window_size']}, drop path "
               f"{swin['drop_path_rate']}), {config['encoder_layers']} deformable encoder layers, "
               f"{r['predictions']} predictions (transformers' decoder_layers {config['decoder_layers']}), "
               f"{config['num_queries']} queries, {config['num_labels']} classes, width {config['hidden_dim']} "
               f"({r['parameters']:,} parameters); batch {r['batch']} at {r['size']}x{r['size']}, "
               f"{joined(r['segments_per_image'])} segments per image, {r['points']} points, {r['optimizer']}; "
               f"transformers {r['transformers_version']}, {r['threads']} threads. Seconds are the fastest of "
               f"{r['rounds']} alternating rounds (medians beside them); each round runs one step of each model back "
               f"to back. Same weights: semantic scores within {r['scores_max_relative_difference']:.1e} and class "
               f"logits within {r['class_logits_max_relative_difference']:.1e} (relative), the same argmax at "
               f"{r['same_argmax']:.2%} of pixels; last losses {r['loss']['hooktrain']} (hooktrain) and "
               f"{r['loss']['transformers']} (transformers: the same seed, drawn in another order); "
               f"{r['wall_s']:.0f} s in all")  # fmt: skip
    return summary, rows + f"\n\n{setting}."


def tiled_predict(r: Result) -> tuple[str, str]:
    ok = {(x["mode"], x["height"], x["width"]): x for x in r["runs"] if x["ok"]}
    side = max((h for (mode, h, _) in ok if mode == "tiled"), default=0)
    biggest = ok.get(("tiled", side, side))
    parts = []
    if biggest:
        parts.append(f"{side:,}x{side:,}: {biggest['tiles_per_s']:.2f} tiles/s, "
                     f"peak RSS {biggest['peak_rss_gib']:.2f} GiB")  # fmt: skip
    if "image_memory_tall_over_short" in r:
        parts.append(f"image memory x{r['image_memory_tall_over_short']:.2f} for 4x the rows")
    if "png_whole_over_strips_memory" in r:
        parts.append(f"a PNG decoded whole x{r['png_whole_over_strips_memory']:.0f} the memory of strips")
    if "slide_over_tiled_image_memory" in r:
        parts.append(f"slide x{r['slide_over_tiled_image_memory']:.1f} the image memory, x"
                     f"{1 / r['tiled_over_slide_tiles_per_s']:.2f} the speed")  # fmt: skip
    rows = []
    for x in r["runs"]:
        if not x["ok"]:
            rows.append([x["mode"], x["image"]] + ["failed"] * 6)
            continue
        rows.append([x["mode"], f"{x['height']:,} x {x['width']:,}", f"{x['tiles']:,}", fmt(x["seconds"], 1),
                     fmt(x["tiles_per_s"], 2), fmt(x["model_rss_gib"], 2), fmt(x["peak_rss_gib"], 2),
                     fmt(x["peak_over_model_gib"], 2)])  # fmt: skip
    header = ["mode", "image (rows x columns)", "tiles", "seconds", "tiles/s", "RSS with model GiB", "peak RSS GiB",
              "peak over model GiB"]  # fmt: skip
    notes = [f"{r['model']}, 4-band uint8 DEFLATE GeoTIFFs, tiles {r['crop']} stride {r['stride']}, "
             f"batch {r['batch']}, blend {r['blend']}; each run its own process; peak: VmHWM; over model: the "
             "peak minus the RSS after loading the model"]  # fmt: skip
    if "slide_largest_side_in_ram" in r:
        notes.append(f"slide's memory grows {r['slide_gib_per_megapixel']:.3f} GiB per megapixel: the largest square "
                     f"image it holds in this machine's {r['ram_gib']:.0f} GiB is about "
                     f"{r['slide_largest_side_in_ram']:,} pixels a side")  # fmt: skip
    if "wall_s" in r:
        notes.append(f"{r['wall_s']:.0f} s in all")
    return "; ".join(parts), table(header, rows) + "\n\n" + "; ".join(notes) + "."


# bench: (what is compared, target, renderer)
BENCHES: dict[str, tuple[str, str, Callable[[Result], tuple[str, str]]]] = {
    "startup": ("time from the command to a one-line error, and to the first iteration, against importing "
                "torch + timm + datasets in the same run", "errors ~1 s", startup),
    "checkpoint": ("save time; resume early and late in a data pass, same-size and elastic", "late/early ~1",
                   checkpoint),
    "mmseg_parity": ("each `recipes/mmseg` model against MMSegmentation 1.2.2's own module from the same config, "
                     "and the `recipes/transformers` UperNets (ConvNeXt-T, Swin-T) against transformers' "
                     "`UperNetForSemanticSegmentation`: train step and whole/slide inference", "ratio <= 1.0",
                     mmseg_parity),
    "runner_overhead": ("IterRunner with its per-iteration hooks vs a hand-written Accelerate loop, same model, "
                        "data and optimizer, median step time", "<= 1.03", runner_overhead),
    "data_pipeline": ("the ADE20K train pipeline per core vs MMSegmentation 1.2.2's own (same run, its environment) "
                      "and torchvision v2; the train stream over HTTP vs local parquet", "> 1.0x MMSegmentation",
                      data_pipeline),
    "model_step": ("SegFormer-B0-like segmentor vs the same encoder + MLP head in plain PyTorch, fwd+bwd+step",
                   "~1.0", model_step),
    "metrics": ("per-image areas vs MMSegmentation's histc and evaluate's mean_iou; bytes handed to collectives",
                "faster; no masks gathered", metrics),
    "quickstart": ("the quickstart from a fresh directory: wall time and final mIoU", "<= 180 s, >= 0.70",
                   quickstart),
    "quickstart_binary": ("the binary quickstart (`recipes/quickstart_binary.yaml`) from a fresh directory: wall "
                          "time and the foreground's IoU", "<= 90 s, >= 0.85", quickstart_binary),
    "quickstart_eomt": ("the mask-classification quickstart (`recipes/quickstart_eomt.yaml`, EoMT on a small "
                        "hybrid ViT) from a fresh directory: wall time and final mIoU", "<= 300 s, >= 0.70",
                        quickstart_eomt),
    "onnx_inference": ("whole-image inference of the `hooktrain export` ONNX graph in ONNX Runtime vs the model "
                       "in PyTorch on the CPU, quickstart (96 px) and SegFormer-B0 (512 px)", "ratio >= 1",
                       onnx_inference),
    "augment_exactness": ("`data.train.gpu_augment`'s device PhotoMetricDistortion vs the OpenCV path, against "
                          "OpenCV's optimised and baseline kernels", "<= 1 step per HSV step", augment_exactness),
    "grad_checkpointing": ("ViT-B/16 + MLN + UPerNet at 512x512, one training step with the ViT's blocks "
                           "recomputed in the backward pass vs without", "less memory, measured cost",
                           grad_checkpointing),
    "fsdp_memory": ("`train.strategy` ddp / fsdp / fsdp2, each with and without `grad_checkpointing`, on the "
                    "ViT-B/16 + MLN + UPerNet with AdamW, 2 CPU processes: state bytes and peak memory per rank, "
                    "step time, against DDP in the same run", "state x0.5 on 2 ranks, measured cost",
                    fsdp_memory),
    "unet_vs_fpn": ("U-Net vs the quickstarts' FPN (binary, 4-band) for the same training time, same run",
                    "measured", unet_vs_fpn),
    "mask_matching": ("Mask2Former's Hungarian matching inside its criterion (`hooktrain.models.mask_criterion`): "
                      "its time, share of a criterion step and peak memory at 100 and 200 queries, the step against "
                      "transformers' `Mask2FormerLoss`", "step ratio <= 1.0", mask_matching),
    "eomt_vs_transformers": ("hooktrain's EoMT against transformers' `EomtForUniversalSegmentation`, same weights "
                             "and inputs (ViT-S-like, 512x512): training step with the masks on, inference after "
                             "annealing", "ratio <= 1.0", eomt_vs_transformers),
    "mask2former_vs_transformers": ("hooktrain's Mask2Former against transformers' "
                                    "`Mask2FormerForUniversalSegmentation`, same weights and inputs (Swin-T, "
                                    "ADE20K's sizes, 512x512): training step with AdamW, inference",
                                    "ratio <= 1.0", mask2former_vs_transformers),
    "tiled_predict": ("`hooktrain predict` on generated 4-band GeoTIFFs up to 20,000 x 20,000, tile by tile, "
                      "against slide inference holding the whole image (same model, same tiles)",
                      "memory flat in the height", tiled_predict),
    "gpu_train": ("SegFormer-B0 (`recipes/ade20k.yaml`) on one GPU: end to end per speed switch, model-only, "
                  "and MMSegmentation 1.2.2 on the same card", ">= 500 img/s, data-bound gap < 5%", gpu_train),
}  # fmt: skip


def _script(name: str) -> str:
    """How the summary table names a bench: its script (and arguments, for a variant)."""
    return f"`quickstart.py --recipe {name}`" if name.startswith("quickstart_") else f"`{name}.py`"


def blocks() -> dict[str, str]:
    """Every generated block's text, by name."""
    out, rows = {}, []
    for name, (what, target, render) in BENCHES.items():
        result = load(name)
        if result is None:
            device = " --device cuda" if name in GPU_ONLY else ""
            rows.append([_script(name), what, f"not measured yet: `python bench/run_all.py{device}`", target, ""])
            out[name] = f"Not measured yet: run `python bench/run_all.py{device} --only {name}`."
            continue
        summary, detail = render(result)
        quick = " (quick mode)" if result.get("quick") else ""
        rows.append([_script(name), what, summary + quick, target, f"{machine(result)}, {result.get('date', '')}"])
        out[name] = f"{detail}\n\n`bench/results/{name}.json`{quick}: {provenance(result)}."
    out["summary"] = table(["bench", "what is compared", "result", "target", "machine, date"], rows)
    out["quickstart_readme"] = quickstart_readme(load("quickstart"))
    return out


def quickstart_readme(r: Result | None) -> str:
    """README's sentence on the quickstart's last measurement."""
    if r is None:
        return "No `bench/results/quickstart.json` yet."
    verdict = "within" if r["seconds"] <= 180 else "over"
    return (
        f"**{r['seconds']:.0f} s** in all (data generation included; {verdict} the 3 minutes) and validation "
        f"mIoU **{r['miou']:.3f}** at iteration {r['iters']}, on {provenance(r)} "
        "(`bench/results/quickstart.json`)."
    )


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
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated block is out of date")
    args = parser.parse_args()
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = render(text)
        if new != text:
            stale.append(doc.name)
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"{', '.join(stale)} differ from bench/results: run `python bench/report.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
