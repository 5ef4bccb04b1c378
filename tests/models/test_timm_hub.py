"""``model.encoder.pretrained: true`` loads timm weights through timm's own Hub path
(``timm/<model>.<tag>`` with huggingface_hub), here from the local Hub stand-in serving a
timm-format repository with random weights."""

from __future__ import annotations

import os
import subprocess
import sys

import timm
import torch
from hub_server import HubServer
from safetensors.torch import save_file

REPO = timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k

LOAD = """
import sys, torch
from hooktrain.recipe.model import EncoderConfig
from hooktrain.models.encoder import build_encoder
encoder = build_encoder(EncoderConfig(name="resnet18", pretrained=True, out_indices=[1, 2, 3]))
torch.save({k: v for k, v in encoder.state_dict().items()}, sys.argv[1])
"""


def test_pretrained_timm_weights_come_through_timms_hub_download(tmp_path):
    torch.manual_seed(5)
    classifier = timm.create_model("resnet18")  # the full classifier, as timm's Hub repos hold it
    served = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    save_file(served, str(repo_dir / "model.safetensors"))
    out = tmp_path / "encoder.pt"
    with HubServer() as hub:
        hub.add(REPO, repo_dir, repo_type="model")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
        result = subprocess.run([sys.executable, "-c", LOAD, str(out)], env={**os.environ, **env},
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(path.endswith(f"{REPO}/resolve/main/model.safetensors") for path in fetched), fetched
    loaded = torch.load(out, weights_only=True)
    assert len(loaded) > 50
    # features_only keeps timm's names; a fresh init (weights ignored) would differ everywhere
    for key, value in loaded.items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(value, served[key], msg=key)
