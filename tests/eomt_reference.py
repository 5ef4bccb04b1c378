"""transformers' EoMT as the tests' reference: tiny random-weight models of its own classes, and
the semantic map of their outputs (Mask2Former's semantic inference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers


def random_transformers_eomt(config_class: str, **config) -> torch.nn.Module:
    """``EomtForUniversalSegmentation`` (``config_class`` ``EomtConfig``) or its DINOv3 variant
    (``EomtDinov3Config``) with random weights, the encoder's norms, layer scales, biases and tokens
    randomised too (transformers initialises them to 1, 0 or constants), so that no mixed-up key goes
    unnoticed. Eager attention, float32, in training mode as built."""
    torch.manual_seed(0)
    model_class = getattr(transformers, config_class.replace("Config", "ForUniversalSegmentation"))
    model = model_class(getattr(transformers, config_class)(**config, attn_implementation="eager"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("upscale_block", "mask_head", "class_predictor")):
                continue  # random already; their own norms and biases at 1 and 0 keep the masks mixed
            if name.endswith("lambda1") or (param.ndim == 1 and "norm" in name and name.endswith("weight")):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif param.ndim == 1 or "token" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.float()


def semantic_map(outputs, size: tuple[int, int]) -> torch.Tensor:
    """``einsum("bqc,bqhw->bchw", softmax(class)[..., :-1], sigmoid(masks))`` of transformers' EoMT
    ``outputs``, the final masks resized bilinearly (``align_corners=False``) to ``size``."""
    masks = F.interpolate(outputs.masks_queries_logits, size=size, mode="bilinear", align_corners=False)
    return torch.einsum("bqc,bqhw->bchw", outputs.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())
