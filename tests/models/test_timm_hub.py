"""``model.encoder.pretrained: true`` loads timm weights through timm's own Hub path
(``timm/<model>.<tag>`` with huggingface_hub), here from the local Hub stand-in serving a
timm-format repository with random weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from hub_server import HubServer
from safetensors.torch import save_file

from hooktrain.models.backbone_keys import to_encoder_keys

LOAD = """
import sys, torch
from hooktrain.recipe.model import EncoderConfig
from hooktrain.models.encoder import build_encoder
encoder = build_encoder(EncoderConfig(name=sys.argv[2], pretrained=True, out_indices=[1, 2, 3]))
torch.save({k: v for k, v in encoder.state_dict().items()}, sys.argv[1])
"""


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        pytest.param("vit_small_patch14_reg4_dinov2.lvd142m", marks=pytest.mark.slow),
        pytest.param("vit_small_patch16_dinov3.lvd1689m", marks=pytest.mark.slow),
        pytest.param("swin_tiny_patch4_window7_224.ms_in1k", marks=pytest.mark.slow),
    ],
)
def test_pretrained_timm_weights_come_through_timms_hub_download(name, tmp_path):
    """DINOv2 and DINOv3 ViTs (patch 14 with registers, patch 16 with RoPE) and Swin, each built
    its own way: the weights timm downloads from ``timm/<model>.<tag>`` are the encoder's. (ConvNeXt,
    DINOv3's included, is a features_only model as ResNet is.)"""
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    torch.manual_seed(5)
    classifier = timm.create_model(name)  # the full classifier, as timm's Hub repos hold it
    served = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    save_file(served, str(repo_dir / "model.safetensors"))
    out = tmp_path / "encoder.pt"
    with HubServer() as hub:
        hub.add(repo, repo_dir, repo_type="model")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
        result = subprocess.run([sys.executable, "-c", LOAD, str(out), name], env={**os.environ, **env},
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(path.endswith(f"{repo}/resolve/main/model.safetensors") for path in fetched), fetched
    loaded = torch.load(out, weights_only=True)
    served = to_encoder_keys(served, set(loaded))
    tensors = [key for key in loaded if "num_batches_tracked" not in key]
    compared = [key for key in tensors if key in served]
    # the encoder keeps (or renames) timm's names; a fresh init (weights ignored) would differ everywhere
    assert len(compared) > 0.9 * len(tensors) and len(compared) > 20, sorted(set(tensors) - set(served))[:5]
    for key in compared:
        torch.testing.assert_close(loaded[key], served[key], msg=key)
