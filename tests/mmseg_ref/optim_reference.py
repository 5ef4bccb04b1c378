"""MMSegmentation's parameter groups for a config: run INSIDE its environment (``MmsegEnv.run``).

    optim_reference.py [--mmdet DIR] OUT_DIR CONFIG[:KEY=VALUE,...] [...]

Builds each CONFIG's model (as ``reference.py build`` does) and runs the config's own optimizer
constructor (``optim_wrapper.constructor``, e.g. ``LearningRateDecayOptimizerConstructor``, with
its ``paramwise_cfg``, updated by the KEY=VALUE pairs: ``:decay_type=layer_wise,num_layers=12``)
on it. OUT_DIR/<the argument>.json maps every trainable parameter's name (the segmentor's,
``backbone.stages.0.0.gamma``) to ``[lr, weight_decay, shape]``. ``AmpOptimWrapper`` is built as a
plain ``OptimWrapper`` (it needs CUDA), which changes no group. Parameters that do not train
(``requires_grad=False``, e.g. a ``norm_cfg=dict(..., requires_grad=False)`` backbone's norms,
which MMEngine still hands the optimizer) are left out.

``--mmdet DIR``: configs whose head is mmdet's (``custom_imports`` of ``mmdet.models``: the
Mask2Former configs) with ``pip install --no-deps --target DIR mmdet==3.3.0 six``. Importing
``mmdet.models`` then needs what mmcv-lite and the environment lack: mmcv's pure-Python
``MultiScaleDeformableAttention`` class (its module loads with the compiled-ops loader answered by
placeholders; building the module computes nothing) and placeholder modules for pycocotools,
shapely and terminaltables (mmdet's datasets and masks import them; no model uses them). The model
is built from a ``ConfigDict`` (mmdet's head reads its sub-configs as attributes).
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
from reference import build_model, config_path, model_config

_MMDET_PLACEHOLDERS = ("pycocotools", "shapely", "terminaltables")


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of :data:`_MMDET_PLACEHOLDERS` give empty packages whose attributes are empty classes."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in _MMDET_PLACEHOLDERS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attribute(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

        module.__getattr__ = attribute
        return module

    def exec_module(self, module):
        pass


def enable_mmdet(site: str) -> None:
    """Make ``import mmdet.models`` work from ``site`` (see the module docstring)."""
    import mmcv.ops
    import mmcv.utils.ext_loader as ext_loader

    ext_loader.load_ext = lambda name, funcs: types.SimpleNamespace(**dict.fromkeys(funcs))
    deform = importlib.import_module("mmcv.ops.multi_scale_deform_attn")
    mmcv.ops.MultiScaleDeformableAttention = deform.MultiScaleDeformableAttention
    sys.meta_path.insert(0, _Placeholders())
    sys.path.insert(0, site)


def build_mmdet_model(name: str):
    """``reference.build_model`` for a config with mmdet's head: the model from a ``ConfigDict``."""
    from mmengine import Config, ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config_path(name))
    return MODELS.build(ConfigDict(model_config(cfg))), cfg, None


def param_groups(model, cfg, paramwise_update: dict) -> dict[str, list]:
    wrapper = copy.deepcopy(cfg.to_dict()["optim_wrapper"])
    constructor = wrapper.pop("constructor", "DefaultOptimWrapperConstructor")
    paramwise_cfg = {**(wrapper.pop("paramwise_cfg", None) or {}), **paramwise_update}
    wrapper.pop("loss_scale", None)
    wrapper["type"] = "OptimWrapper"
    build = OPTIM_WRAPPER_CONSTRUCTORS.build(
        {"type": constructor, "optim_wrapper_cfg": wrapper, "paramwise_cfg": paramwise_cfg}
    )
    optimizer = build(model).optimizer
    names = {id(param): name for name, param in model.named_parameters()}
    return {
        names[id(param)]: [group["lr"], group["weight_decay"], list(param.shape)]
        for group in optimizer.param_groups
        for param in group["params"]
        if param.requires_grad
    }


def main(argv: list[str]) -> None:
    build = build_model
    if argv[:1] == ["--mmdet"]:
        enable_mmdet(argv[1])
        build, argv = build_mmdet_model, argv[2:]
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for argument in argv[1:]:
        name, _, pairs = argument.partition(":")
        update = {}
        for pair in filter(None, pairs.split(",")):
            key, value = pair.split("=", 1)
            update[key] = int(value) if value.isdigit() else float(value) if "." in value else value
        model, cfg, _ = build(name)
        (out / f"{argument}.json").write_text(json.dumps(param_groups(model, cfg, update), indent=0))


if __name__ == "__main__":
    main(sys.argv[1:])
