"""The model card (``README.md``) ``hooktrain push`` uploads with a model.

The card is YAML front matter the Hub reads (``library_name``, ``tags``, ``pipeline_tag``, and a
``model-index`` with the scores when the run was evaluated), then Markdown: the model and its
data, the metrics of the evaluation shown (the best one when the run kept ``best/``, else the
last), the per-class table of that evaluation, the training curves picture and how to load the
model back. Everything comes from what a run writes: its ``recipe.yaml``, the eval hook's
records in ``metrics.jsonl`` (``val/mIoU``, ..., ``val/per_class``) and ``best/best.json``.
Metric values are shown in percent, as MMSegmentation reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

# The scalar metrics of an evaluation, in the order the card shows them (those logged).
METRICS = ("mIoU", "mDice", "mFscore", "aAcc", "mAcc", "mPrecision", "mRecall")
PER_CLASS = ("IoU", "Dice", "Fscore", "Acc", "Precision", "Recall")
CURVES = "training_curves.png"


@dataclass
class Evaluation:
    """One evaluation of the run: its iteration, scalar metrics (fractions) and per-class rows."""

    iteration: int | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    per_class: dict[str, list[float | None]] = field(default_factory=dict)
    label: str = "last evaluation"  # or "best mIoU"

    def as_json(self, names: list[str]) -> dict[str, Any]:
        return {"iter": self.iteration, "evaluation": self.label, "metrics": self.metrics,
                "per_class": self.per_class, "class_names": names}  # fmt: skip


def pick_evaluation(
    history: list[dict[str, Any]], iteration: int | None = None, best: dict[str, Any] | None = None
) -> Evaluation | None:
    """The evaluation the card shows: the one at the pushed checkpoint's ``iteration`` when the
    run's ``history`` has it (labelled with the best score's key when ``best``, the checkpoint's
    ``best.json``, is given), else the last one; with no history, the best value alone."""
    evaluations = [r for r in history if any(isinstance(k, str) and k.startswith("val/m") for k in r)]
    chosen, label = None, "last evaluation"
    at_checkpoint = [r for r in evaluations if iteration is not None and r.get("iter") == iteration]
    if at_checkpoint:
        chosen = at_checkpoint[-1]
        label = f"best {best.get('key', 'score')}" if best is not None else "the pushed checkpoint's evaluation"
    elif evaluations:
        chosen = evaluations[-1]
    if chosen is None:
        if best is None or best.get("key") is None:
            return None
        return Evaluation(best.get("iter"), {best["key"]: best.get("value")}, {}, f"best {best['key']}")
    metrics = {k.removeprefix("val/"): v for k, v in chosen.items()
               if k.startswith("val/") and k != "val/per_class" and _is_number_or_null(v)}  # fmt: skip
    per_class = chosen.get("val/per_class") or {}
    per_class = {k: list(v) for k, v in per_class.items() if isinstance(v, list)}
    return Evaluation(chosen.get("iter"), metrics, per_class, label)


def build_card(
    repo_id: str,
    recipe: dict[str, Any],
    evaluation: Evaluation | None,
    *,
    revision: str | None = None,
    iteration: int | None = None,
    files: list[str] | None = None,
    curves: bool = False,
) -> str:
    """The ``README.md`` text for ``repo_id`` (``recipe`` is the resolved recipe as data)."""
    data = recipe.get("data") or {}
    model = recipe.get("model") or {}
    names = class_names(data)
    dataset_id, dataset_name = dataset_of(data)
    front: dict[str, Any] = {
        "library_name": "hooktrain",
        "tags": ["image-segmentation", "hooktrain"],
        "pipeline_tag": "image-segmentation",
    }
    scored = {k: v for k, v in (evaluation.metrics if evaluation else {}).items() if k in METRICS and _finite(v)}
    if scored:
        front["model-index"] = [{
            "name": repo_id.split("/")[-1],
            "results": [{
                "task": {"type": "image-segmentation", "name": "Semantic Segmentation"},
                "dataset": {"name": dataset_name, "type": dataset_id, "split": "validation"},
                "metrics": [{"type": k, "name": k, "value": round(100 * float(v), 2)}
                            for k in METRICS if k in scored for v in [scored[k]]],
            }],
        }]  # fmt: skip
    hub_id = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    encoder = (model.get("encoder") or {}).get("name", "?")
    head = (model.get("decode_head") or {}).get("type", "?")
    trained = f", trained for {iteration} iterations" if iteration is not None else ""
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A semantic segmentation model trained with hooktrain: a `{head}` decode head on a "
        f"`{encoder}` encoder, {len(names)} classes, on {dataset_name}{trained}.",
        "",
    ]
    lines += _metrics_section(evaluation, names)
    if curves:
        lines += ["## Training curves", "", f"![Training curves]({CURVES})", ""]
    revision_arg = f', revision="{revision}"' if revision else ""
    lines += [
        "## How to use it",
        "",
        "In Python:",
        "",
        "```python",
        "from hooktrain import Segmenter",
        "",
        f'segmenter = Segmenter.from_pretrained("{repo_id}"{revision_arg})',
        'label = segmenter("photo.jpg")  # HxW class indices at the image\'s size',
        "```",
        "",
        "From the command line (colour and label PNGs for every image):",
        "",
        "```bash",
        f"hooktrain predict {hub_id} images/ --out predictions/",
        "```",
        "",
        "To fine-tune from these weights, or to start an encoder from this model's, in a recipe:",
        "",
        "```yaml",
        f"load_from: {hub_id}",
        "# or only the encoder:",
        "model:",
        "  encoder:",
        f"    pretrained_path: {hub_id}",
        "```",
        "",
        "The weights are a safetensors file with the resolved recipe in its metadata: loading runs no code from "
        "the repository.",
        "",
    ]
    if files:
        lines += ["## Files", "", *[f"- `{name}`{FILE_NOTES.get(name, '')}" for name in files], ""]
    return "\n".join(lines)


FILE_NOTES = {
    "model.safetensors": ": the weights and the resolved recipe (`hooktrain export`)",
    "recipe.yaml": ": the resolved recipe the model was trained with",
    "metrics.jsonl": ": the run's logged history (`hooktrain plot` reads it)",
    "metrics.json": ": the evaluation shown above, with the per-class values",
    "best.json": ": the best checkpoint's score and iteration",
    CURVES: ": the training curves (`hooktrain plot`)",
}


def _metrics_section(evaluation: Evaluation | None, names: list[str]) -> list[str]:
    if evaluation is None:
        return ["## Evaluation", "", "The run logged no validation metrics.", ""]
    where = f" at iteration {evaluation.iteration}" if evaluation.iteration is not None else ""
    lines = ["## Evaluation", "", f"Validation ({evaluation.label}{where}), in percent:", ""]
    shown = [k for k in METRICS if k in evaluation.metrics]
    shown += [k for k in evaluation.metrics if k not in METRICS and "loss" not in k and "/" not in k]
    lines += ["| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {_percent(evaluation.metrics[k])} |" for k in shown]
    lines.append("")
    columns = [k for k in PER_CLASS if k in evaluation.per_class]
    if columns:
        count = max(len(evaluation.per_class[k]) for k in columns)
        labels = names if len(names) == count else [f"class_{i}" for i in range(count)]
        lines += ["### Per class", "", "| class | " + " | ".join(columns) + " |",
                  "| --- | " + " | ".join("---:" for _ in columns) + " |"]  # fmt: skip
        for index, label in enumerate(labels):
            row = [_percent(_at(evaluation.per_class[k], index)) for k in columns]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines += ["", "n/a: the class is absent from both the predictions and the ground truth.", ""]
    return lines


def class_names(data: dict[str, Any]) -> list[str]:
    """The names the metrics count, as ``DataConfig.names`` gives them."""
    num_classes = int(data.get("num_classes") or 0)
    names = data.get("class_names")
    if num_classes == 1:
        names = names or ["foreground"]
        return ["background", *names] if len(names) == 1 else list(names)
    return list(names) if names else [f"class_{i}" for i in range(num_classes)]


def dataset_of(data: dict[str, Any]) -> tuple[str, str]:
    """``(type, name)`` of the validation data for the model index: a Hub dataset's id, else the
    source kind (``shapes``, ``folder``, ``parquet``)."""
    split = data.get("val") or data.get("train") or {}
    source = split.get("source") or {}
    if source.get("type") == "hub" and source.get("path"):
        return str(source["path"]), str(source["path"])
    kind = str(source.get("type") or "custom")
    return kind, f"{kind} dataset" if kind != "shapes" else "the procedural shapes dataset"


def _at(values: list, index: int):
    return values[index] if index < len(values) else None


def _is_number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _percent(value: Any) -> str:
    return f"{100 * float(value):.2f}" if _finite(value) else "n/a"
