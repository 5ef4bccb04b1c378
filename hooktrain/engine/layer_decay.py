"""MMSegmentation 1.2.2's layer-wise LR decay (``LearningRateDecayOptimizerConstructor`` and
``LayerDecayOptimizerConstructor``, mmseg/engine/optimizers/layer_decay_optimizer_constructor.py)
on hooktrain's timm parameter names.

mmseg numbers its backbone's parameters (``get_layer_id_for_convnext``,
``get_stage_id_for_convnext``, ``get_layer_id_for_vit``), gives everything else ``num_layers +
1``, and scales the LR by ``rate ** (num_layers + 1 - id)``. The same numbering, read off timm's
names: a ConvNeXt's ``encoder.stem_*`` is mmseg's ``downsample_layers.0``,
``encoder.stages_i.downsample`` its ``downsample_layers.i`` and ``encoder.stages_i.blocks.j`` its
``stages.i.j``; a ViT's ``encoder.model.{cls_token, pos_embed, patch_embed}`` and
``encoder.model.blocks.i`` (EoMT's: without ``model.``) are its ``cls_token``/``pos_embed``/
``patch_embed`` and ``layers.i``.

``decay_type: eomt`` is EoMT's numbering instead (tue-mps/eomt, training/lightning_module.py,
``configure_optimizers``): see ``_eomt_lr_mults``.
"""

from __future__ import annotations

import re

from torch import nn

from hooktrain.errors import UserError
from hooktrain.recipe.optim import LayerDecay

_CONVNEXT_STEM = re.compile(r"encoder\.stem[._]\d")
_CONVNEXT_STAGE = re.compile(r"encoder\.stages[._](\d+)\.(downsample|blocks\.(\d+))\.")
# reg_token (DINOv2's registers) has no mmseg counterpart; it is an embedding like cls_token.
# A ViT encoder is ``encoder.model`` (ViTFeatures) in the encoder-decoder family, ``encoder`` in EoMT.
_VIT_EMBED = re.compile(r"encoder\.(?:model\.)?(cls_token|reg_token|mask_token|pos_embed|patch_embed\.)")
_VIT_BLOCK = re.compile(r"encoder\.(?:model\.)?blocks\.(\d+)\.")
_VIT_MODEL_PREFIX = "encoder."


def encoder_kind(names: list[str]) -> str | None:
    """``convnext``, ``vit`` or None, from a segmentor's parameter names."""
    if any(_CONVNEXT_STAGE.match(n) and ".conv_dw." in n for n in names):
        return "convnext"
    if any(_VIT_BLOCK.match(n) for n in names):
        return "vit"
    return None


def _convnext_layer_wise(name: str, num_layers: int) -> int:
    """mmseg's ``get_layer_id_for_convnext``: stage 2 in groups of 3 blocks, stage 3 ``num_layers``."""
    if _CONVNEXT_STEM.match(name):
        return 0
    match = _CONVNEXT_STAGE.match(name)
    if match is None:
        return num_layers + 1
    stage = int(match[1])
    if match[3] is None:  # a downsample layer
        return {1: 2, 2: 3, 3: num_layers}[stage]
    return {0: 1, 1: 2, 2: 3 + int(match[3]) // 3, 3: num_layers}[stage]


def _convnext_stage_wise(name: str, num_layers: int) -> int:
    """mmseg's ``get_stage_id_for_convnext``: stem and downsamples 0, stage i's blocks i + 1."""
    if _CONVNEXT_STEM.match(name):
        return 0
    match = _CONVNEXT_STAGE.match(name)
    if match is None:
        return num_layers + 1
    return 0 if match[3] is None else int(match[1]) + 1


def _vit_layer_wise(name: str, num_layers: int) -> int:
    """mmseg's ``get_layer_id_for_vit``: embeddings 0, block i i + 1."""
    if _VIT_EMBED.match(name):
        return 0
    match = _VIT_BLOCK.match(name)
    return num_layers + 1 if match is None else int(match[1]) + 1


def _eomt_lr_mults(names: list[str], rate: float, num_layers: int) -> dict[str, float]:
    """EoMT's LR multipliers for ``names`` in the model's parameter order.

    EoMT walks its parameters in reverse, carrying the index of the last ``blocks.i`` seen: block i
    gets ``rate ** (num_layers - 1 - i)``; a ViT parameter registered before block 0 (patch_embed,
    cls_token, reg_token, pos_embed) still sees index 0 and gets block 0's rate; one after the
    blocks (the final norm) sees none and keeps the full lr, as does everything outside the ViT.
    Walking forward gives the same numbering: before the first block, block 0's rate."""
    mults = {}
    seen_block = False
    for name in names:
        match = _VIT_BLOCK.match(name)
        if match is not None:
            seen_block = True
            block = int(match[1])
            if block >= num_layers:
                raise UserError(
                    f"optimizer.layer_decay.num_layers: {num_layers}, and the ViT has block {block}; "
                    "set num_layers to the ViT's depth"
                )
            mults[name] = rate ** (num_layers - 1 - block)
        elif name.startswith(_VIT_MODEL_PREFIX) and not seen_block:
            mults[name] = rate ** (num_layers - 1)
        else:
            mults[name] = 1.0
    return mults


def layer_decay_mults(model: nn.Module, cfg: LayerDecay) -> dict[str, tuple[float, float]]:
    """Each trainable parameter's (lr multiplier, weight-decay multiplier), as mmseg's constructor
    sets them. Weight decay is 0 for 1-D parameters and biases; mmseg's further rule for
    ``pos_embed`` and ``cls_token`` compares bare names with the segmentor's ``backbone.``-prefixed
    ones and never matches, so they keep their decay here too.

    ``decay_type: eomt``: EoMT's multipliers (``_eomt_lr_mults``), and weight decay on every
    parameter, as EoMT's AdamW has it."""
    kind = encoder_kind([name for name, _ in model.named_parameters()])
    if kind is None:
        raise UserError(
            "optimizer.layer_decay: the encoder is neither a ConvNeXt nor a ViT, the backbones MMSegmentation's "
            "layer decay numbers; remove optimizer.layer_decay or choose such an encoder (convnext_*, vit_*)"
        )
    if kind == "vit" and cfg.decay_type == "stage_wise":
        raise UserError(
            "optimizer.layer_decay.decay_type: stage_wise numbers ConvNeXt stages, and the encoder is a ViT; "
            "set decay_type: layer_wise"
        )
    if kind != "vit" and cfg.decay_type == "eomt":
        raise UserError(
            "optimizer.layer_decay.decay_type: eomt numbers a ViT's blocks, and the encoder is a ConvNeXt; "
            "set decay_type: layer_wise or stage_wise"
        )
    if cfg.decay_type == "eomt":
        lr_mults = _eomt_lr_mults([name for name, _ in model.named_parameters()], cfg.rate, cfg.num_layers)
        return {name: (lr_mults[name], 1.0) for name, param in model.named_parameters() if param.requires_grad}
    layer_id = {
        ("convnext", "layer_wise"): _convnext_layer_wise,
        ("convnext", "stage_wise"): _convnext_stage_wise,
        ("vit", "layer_wise"): _vit_layer_wise,
    }[kind, cfg.decay_type]
    mults = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # mmseg: num_layers + 2 "layers", scale rate ** (num_layers + 2 - id - 1)
            scale = cfg.rate ** (cfg.num_layers + 2 - layer_id(name, cfg.num_layers) - 1)
            mults[name] = (scale, 0.0 if param.ndim == 1 or name.endswith(".bias") else 1.0)
    return mults
