"""Recipes: YAML with ``_base_`` composition and ``--cfg-options``, validated into ``Recipe``.

Composition follows MMSegmentation: ``_base_`` is a path or a list of paths relative to the
file that names them, loaded recursively and merged in order (later wins), then the file
itself is merged on top. Mappings merge key by key unless the overriding mapping says
``_delete_: true``, which replaces the mapping; lists and scalars replace.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, Field, PrivateAttr, field_validator

from hooktrain.errors import UserError, describe
from hooktrain.hooks import LoadedHook, build_hooks
from hooktrain.recipe.data import DataConfig
from hooktrain.recipe.model import ModelConfig
from hooktrain.recipe.optim import OptimizerConfig, ScheduleConfig
from hooktrain.recipe.section import Section

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"


class TrainConfig(Section):
    """How long and how the loop trains."""

    max_iters: int = Field(1000, gt=0, description="Optimizer steps to train for.")
    seed: int = Field(0, description="Seed of every RNG (model init, data order, augmentation).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast precision; fp16 needs a CUDA GPU, bf16 also works on CPU."
    )
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false

    strategy: Literal["ddp", "fsdp", "fsdp2"] = Field(
        "ddp", description="How several processes share the model: ddp replicates it; fsdp "
        "(FSDP1) and fsdp2 shard parameters, gradients and optimizer state, one unit per encoder "
        "block and per head. Checkpoints hold whole weights either way. Accelerate's own FSDP "
        "flags apply when this is ddp (docs/distributed.md)."
    )
    sharded_checkpoint: bool = Field(
        False, description="With fsdp or fsdp2: each process saves its shard of the model and "
        "optimizer state (torch.distributed.checkpoint) instead of gathering them whole, for models "
        "whose whole state does not fit one process's memory. Resumes with any number of processes; "
        "`hooktrain convert dcp CHECKPOINT` writes the whole model.safetensors that test, export and "
        "load_from read (docs/checkpoints.md)."
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (effective batch = batch_size x "
        "processes x grad_accum_steps)."
    )
    clip_grad_norm: float | None = Field(
        None, gt=0, description="Clip the global gradient norm to this value; null disables."
    )
    sync_bn: Literal["auto"] | bool = Field(
        "auto", description="BatchNorm across processes: auto uses SyncBatchNorm when training "
        "on several CUDA processes (as MMSegmentation's SyncBN configs do) and per-process "
        "BatchNorm otherwise; true forces SyncBatchNorm (CUDA only), false forces BatchNorm."
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN or infinite loss term or gradient norm: stop ends the run at "
        "that iteration (exit code 3) before the weights change; skip drops that optimizer step."
    )
    max_nonfinite_skips: int = Field(
        10, ge=0, description="With on_nonfinite: skip, stop after this many skipped steps in a row."
    )
    collective_timeout: float = Field(
        300.0, gt=0, description="Seconds a rank waits in a collective (an all-reduce, a barrier) "
        "for the others before every rank ends with an error naming the stage and the rank."
    )
    deterministic: bool = Field(
        False, description="Ask torch for deterministic algorithms (slower on GPU)."
    )


class HookSpec(BaseModel):
    """One hook of the recipe: ``type`` plus the hook's own options."""

    model_config = pydantic.ConfigDict(extra="allow")

    type: str = Field(description="Entry-point name (see `hooktrain plugins`) or module:Class.")
    priority: int | str | None = Field(
        None, description="Overrides the hook's default priority (lower runs first)."
    )


class Recipe(Section):
    """The whole recipe."""

    work_dir: str | None = Field(
        None, description="Run directory; default work_dirs/<recipe file name without .yaml>."
    )
    load_from: str | None = Field(
        None, description="Weights to start from (fine-tuning): a .safetensors file, a "
        "checkpoint directory, or a model shared with `hooktrain push` (hf://OWNER/NAME[@REVISION]); "
        "optimizer and progress are not loaded. Every tensor whose name and "
        "shape fit is loaded; the rest (e.g. decode_head.conv_seg.* for another class count) keeps "
        "its initialisation and is listed in one log line."
    )
    model: ModelConfig = Field(description="The segmentor.")
    data: DataConfig = Field(description="Datasets, transforms and loaders.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    hooks: list[HookSpec] = Field(
        default_factory=list, description="Hooks in the order they run on equal priority."
    )

    _loaded_hooks: list[LoadedHook] | None = PrivateAttr(None)

    def loaded_hooks(self) -> list[LoadedHook]:
        """The recipe's hooks in run order, their options checked: built once, when the
        recipe is validated (``check_recipe`` runs on them), and handed to the run."""
        if self._loaded_hooks is None:
            self._loaded_hooks = build_hooks([spec.model_dump(exclude_none=True) for spec in self.hooks])
        return self._loaded_hooks

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what is written to ``<work_dir>/recipe.yaml``)."""
        data = self.model_dump(mode="json")
        data["hooks"] = [spec.model_dump(mode="json", exclude_none=True) for spec in self.hooks]
        return data


# -- loading and merging ------------------------------------------------------------------


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base`` with MMSegmentation's rules."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict):
            value = dict(value)
            replace = value.pop(DELETE_KEY, False)
            if not replace and isinstance(merged.get(key), dict):
                merged[key] = merge(merged[key], value)
                continue
            merged[key] = _strip_delete(value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _strip_delete(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_delete(v) for k, v in value.items() if k != DELETE_KEY}
    if isinstance(value, list):
        return [_strip_delete(v) for v in value]
    return value


def load_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a recipe file and its ``_base_`` files into one merged mapping."""
    path = Path(path)
    if not path.is_file():
        hint = f" (in _base_ of {_chain[-1]})" if _chain else ""
        raise UserError(f"recipe file not found: {path}{hint}")
    resolved = path.resolve()
    if resolved in _chain:
        raise UserError(f"_base_ cycle: {' -> '.join(str(p) for p in (*_chain, resolved))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of recipe keys, not {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, load_yaml(path.parent / base, (*_chain, resolved)))
    return _strip_delete(merge(merged, data))


def apply_cfg_options(cfg: dict[str, Any], options: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML (``x=[1,2]``, ``y=null``).

    A numeric path part indexes a list: ``hooks.0.interval=5`` or ``hooks[0].interval=5``
    (the spelling errors print).
    """
    cfg = copy.deepcopy(cfg)
    for option in options:
        key, sep, raw = option.partition("=")
        if not sep or not key:
            raise UserError(f"--cfg-options '{option}' must look like key.path=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--cfg-options '{option}': the value is not valid YAML") from None
        parts = _key_parts(key, option)
        node: Any = cfg
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, create=True, where=".".join(parts[: depth + 1]))
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[last] = value
    return cfg


_KEY = re.compile(r"[^.\[\]=]+(\[-?\d+\]|\.[^.\[\]=]+)*")


def _key_parts(key: str, option: str) -> list[str]:
    """``hooks[0].interval`` -> ``['hooks', '0', 'interval']``."""
    if not _KEY.fullmatch(key):
        raise UserError(
            f"--cfg-options '{option}': '{key}' is not a key path like train.max_iters or hooks[0].interval"
        )
    return key.replace("[", ".").replace("]", "").split(".")


def _list_index(node: list, part: str, where: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise UserError(f"--cfg-options '{where}': '{part}' is not an index of a {len(node)}-item list")
    return int(part)


def _child(node: Any, part: str, create: bool, where: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        raise UserError(f"--cfg-options '{where}': the parent is a {type(node).__name__}, not a mapping")
    if part not in node or node[part] is None:
        if not create:
            raise KeyError(part)
        node[part] = {}
    return node[part]


# -- validation ---------------------------------------------------------------------------


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """Validate merged recipe data into a ``Recipe``; any problem is one ``UserError`` line."""
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        raise UserError(describe(exc, Recipe, data)) from None
    if recipe.train.strategy != "ddp" and recipe.model.compile:
        # torch 2.14's inductor fails on the graphs recompiled around FSDP's unit hooks
        # ("Cannot convert expression to float"), a minute into the first step.
        raise UserError(
            f"model.compile: true does not work with train.strategy: {recipe.train.strategy} yet (torch.compile "
            "fails on FSDP's units); set model.compile: false, or train.strategy: ddp"
        )
    if recipe.train.sharded_checkpoint and recipe.train.strategy == "ddp":
        raise UserError(
            "train.sharded_checkpoint: true needs train.strategy: fsdp or fsdp2 (under ddp every process "
            "holds the whole model); set train.strategy: fsdp2, or train.sharded_checkpoint: false"
        )
    hooks = recipe.loaded_hooks()
    for loaded in hooks:
        loaded.hook.check_recipe(recipe, hooks)
    return recipe


def load_recipe(
    path: str | os.PathLike, cfg_options: list[str] | None = None, work_dir: str | None = None
) -> Recipe:
    """Load, merge, override and validate a recipe. ``work_dir`` (the CLI's ``--work-dir``)
    wins over the recipe's; without either it is ``work_dirs/<recipe file stem>``."""
    data = apply_cfg_options(load_yaml(path), cfg_options or [])
    recipe = validate_recipe(data)
    if work_dir is not None:
        recipe.work_dir = work_dir
    elif recipe.work_dir is None:
        recipe.work_dir = str(Path("work_dirs") / Path(path).stem)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, width=100)
