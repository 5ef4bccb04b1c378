"""MMSegmentation's parameter groups for a config: run INSIDE its environment (``MmsegEnv.run``).

    optim_reference.py OUT_DIR CONFIG[:KEY=VALUE,...] [...]

Builds each CONFIG's model (as ``reference.py build`` does) and runs the config's own optimizer
constructor (``optim_wrapper.constructor``, e.g. ``LearningRateDecayOptimizerConstructor``, with
its ``paramwise_cfg``, updated by the KEY=VALUE pairs: ``:decay_type=layer_wise,num_layers=12``)
on it. OUT_DIR/<the argument>.json maps every trainable parameter's name (the segmentor's,
``backbone.stages.0.0.gamma``) to ``[lr, weight_decay, shape]``. ``AmpOptimWrapper`` is built as a
plain ``OptimWrapper`` (it needs CUDA), which changes no group.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
from reference import build_model


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
    }


def main(argv: list[str]) -> None:
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
        model, cfg, _ = build_model(name)
        (out / f"{argument}.json").write_text(json.dumps(param_groups(model, cfg, update), indent=0))


if __name__ == "__main__":
    main(sys.argv[1:])
