"""Run inside the MMSegmentation environment: backbones beyond the six zoo configs.

Builds MMSegmentation's ``MixVisionTransformer`` (MiT-B1, B2) and ``ResNetV1c`` (depth 101,
plain and D8) with random weights and BN statistics, and saves for each, in ``OUT/<name>.pth``,
its state dict (MMSegmentation's backbone-file format), an input and its features.

    python backbone_reference.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from mmseg.models.backbones import MixVisionTransformer, ResNetV1c
from reference import randomise  # the launcher puts this directory on sys.path

BACKBONES = {
    "mit_b1": lambda: MixVisionTransformer(embed_dims=64, num_layers=[2, 2, 2, 2], num_heads=[1, 2, 5, 8]),
    "mit_b2": lambda: MixVisionTransformer(embed_dims=64, num_layers=[3, 4, 6, 3], num_heads=[1, 2, 5, 8]),
    "resnet101_v1c": lambda: ResNetV1c(depth=101),
    "resnet101_v1c_d8": lambda: ResNetV1c(
        depth=101,
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        contract_dilation=True,  # as the D8 configs
    ),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, make) in enumerate(BACKBONES.items()):
        torch.manual_seed(seed)
        model = make()
        randomise(model)
        model.eval()  # mmseg's ResNet.train() returns None, so no chaining
        image = torch.randn(1, 3, 67, 91)
        with torch.no_grad():
            features = list(model(image))
        params = sum(p.numel() for p in model.parameters())
        torch.save({"state_dict": model.state_dict(), "input": image, "features": features, "params": params},
                   out / f"{name}.pth")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
