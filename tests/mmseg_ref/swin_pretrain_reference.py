"""Run inside the MMSegmentation environment: the Swin-T pretrain files MMSegmentation's Swin
configs start from, and the features its ``SwinTransformer`` computes after loading them.

    python swin_pretrain_reference.py OUT

Writes into OUT:

- ``swin_tiny_patch4_window7_224.pth``: a random Swin-T in the layout of Microsoft's ImageNet
  release (``{"model": ...}``; ``layers.i`` with PatchMerging at the end of stage i, the
  ``relative_position_index`` and ``attn_mask`` buffers, the final ``norm`` and the ``head``);
- ``swin_tiny_mmseg_pretrain.pth``: that file through MMSegmentation's own
  ``tools/model_converters/swin2mmseg.py``, the format of its
  ``swin_tiny_patch4_window7_224_20220317-1cdeb081.pth``;
- ``reference.pth``: ``{"input", "features"}`` of the config's backbone after loading the
  converted file as its ``init_weights`` does (``load_state_dict(strict=False)``: ``norm0..3``
  keep their initialisation), on a 97x131 input.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import mmseg
import torch
from mmseg.registry import MODELS
from reference import build_model, randomise  # the launcher puts this directory on sys.path

CONFIG = "swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512"
CONVERTER = Path(mmseg.__file__).parent / ".mim" / "tools" / "model_converters" / "swin2mmseg.py"


def microsoft_layout(state: dict, model) -> dict:
    """A Microsoft-layout state dict with the shapes of ``model`` (mmseg's Swin-T). The values are
    ``state``'s, renamed without reordering: any values do, the reference is what mmseg computes
    from the converted file."""
    out = {}
    for key, value in state.items():
        if key.startswith("norm"):  # mmseg's per-level norms: not in an ImageNet checkpoint
            continue
        key = key.replace("patch_embed.projection.", "patch_embed.proj.").replace("attn.w_msa.", "attn.")
        key = key.replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
        out[re.sub(r"^stages\.", "layers.", key)] = value
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            if block.attn.shift_size:  # the 224x224 model's mask buffers (stage 3 is one window: no shift)
                windows = (56 // 2**i // 7) ** 2
                if windows > 1:
                    out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(windows, 49, 49)
    generator = torch.Generator().manual_seed(1)
    out["norm.weight"] = torch.rand(768, generator=generator) + 0.5
    out["norm.bias"] = torch.randn(768, generator=generator) * 0.1
    out["head.weight"] = torch.randn(1000, 768, generator=generator) * 0.03
    out["head.bias"] = torch.zeros(1000)
    return out


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.spec_from_file_location("swin2mmseg", CONVERTER)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)

    torch.manual_seed(0)
    segmentor, _, model_cfg = build_model(CONFIG)
    source = segmentor.backbone
    randomise(source)
    microsoft = microsoft_layout(source.state_dict(), source)
    torch.save({"model": microsoft}, out / "swin_tiny_patch4_window7_224.pth")
    converted = converter.convert_swin(microsoft)
    torch.save(converted, out / "swin_tiny_mmseg_pretrain.pth")

    backbone = MODELS.build(model_cfg["backbone"])
    result = backbone.load_state_dict(converted, strict=False)
    assert sorted(result.missing_keys) == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")], result
    backbone.eval()
    image = torch.randn(1, 3, 97, 131, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = [f.contiguous() for f in backbone(image)]
    torch.save({"input": image, "features": features}, out / "reference.pth")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
