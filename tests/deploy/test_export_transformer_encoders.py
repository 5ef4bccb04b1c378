"""ViT (DINOv2 with registers, DINOv3 with RoPE) and Swin encoders through the two ways a model leaves
eager PyTorch: ONNX export (``hooktrain export``'s :func:`hooktrain.deploy.onnx_export.export_onnx`)
run in onnxruntime at dynamic sizes, and ``model.compile: true`` (``Segmentor.compile_mode``), both
against the eager model's logits (and, compiled, its loss and gradients). Tiny configurations of the
real timm models (fewer, narrower blocks through ``model.encoder.kwargs``): the same code paths."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import randomise

from hooktrain.deploy import onnx_export
from hooktrain.models import ModelConfig, build_segmentor

NARROW_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2}
ENCODERS = {
    # patch 14, 4 registers, learned position embeddings on a 37x37 grid (resized to every input)
    "dinov2_reg": {"name": "vit_small_patch14_reg4_dinov2", "out_indices": [0, 1], "kwargs": NARROW_VIT},
    # patch 16, 4 registers, RoPE (timm's Eva); its last block feeds all four levels of the neck
    "dinov3": {"name": "vit_small_patch16_dinov3", "out_indices": [1], "kwargs": NARROW_VIT},
    # four stages of two blocks (the second shifts its windows), patch merging, padding to whole windows
    "swin": {
        "name": "swin_tiny_patch4_window7_224",
        "kwargs": {"depths": [2, 2, 2, 2], "embed_dim": 16, "num_heads": [1, 1, 2, 2]},
    },
}
# Heads as the recipes pair them: a single-stride ViT with DINOv2's linear head, or through the
# MultiLevelNeck into UPerNet; Swin's four levels into UPerNet.
HEADS = {
    "dinov2_reg": {"decode_head": {"type": "linear"}},
    "dinov3": {
        "neck": {"type": "multilevel", "out_channels": 16, "scales": [4, 2, 1, 0.5]},
        "decode_head": {"type": "upernet", "channels": 16},
    },
    "swin": {"decode_head": {"type": "upernet", "channels": 16}},
}
# Sizes beyond the exporter's own verification (VERIFY_SIZES): the export size, another batch and
# odd size, and one wider than DINOv2's 518 px (its position embeddings enlarged along the width,
# shrunk along the height).
ORT_SIZES = [(1, *onnx_export.EXPORT_SIZE), (3, 45, 71), (1, 77, 533)]
# Compiling: inductor builds C++ kernels for every op, slowly on 2 cores (DINOv2 took 100 s and a
# two-stage Swin 130-330 s here, when each was checked once); the suite compiles DINOv3's RoPE ViT,
# with the smallest head (FCN on the last level).
COMPILE_HEAD = {"decode_head": {"type": "fcn", "channels": 8, "num_convs": 1, "concat_input": False, "dropout": 0.0}}
ONNX_BOUND = onnx_export.TOLERANCE  # 1e-4, relative to the largest logit
COMPILE_BOUND = 1e-4  # relative to the largest value of each compared tensor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and far faster on cores another process shares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def segmentor(encoder: dict, head: dict, **extra) -> torch.nn.Module:
    cfg = {"encoder": encoder, "aux_head": None, **head, **extra}
    torch.manual_seed(0)
    return build_segmentor(ModelConfig.model_validate(cfg), num_classes=4)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want| / max|want|``, the exporter's own measure."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


# -- ONNX --------------------------------------------------------------------------------------


def test_antialiased_bicubic_weights_are_pytorchs_resize():
    """The matrices that stand in for ``F.interpolate(bicubic, antialias=True)`` while tracing (ONNX
    opset 17 has no antialiased Resize) give PyTorch's resize, shrinking, keeping and enlarging."""
    for in_size in (37, 14, 5):
        line = torch.randn(3, in_size, in_size, generator=torch.Generator().manual_seed(in_size))
        for out_size in (1, 2, 4, 7, 13, in_size - 1, in_size, in_size + 1, 50, 111):
            want = F.interpolate(line[None], size=(out_size, in_size), mode="bicubic", antialias=True)[0]
            got = onnx_export.antialiased_bicubic_weights(out_size, in_size) @ line
            assert relative(got, want) <= 1e-5, (in_size, out_size)


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_transformer_encoders_export_to_onnx_with_dynamic_sizes(tmp_path, encoder):
    """The real export path writes a graph with dynamic batch, height and width (after its own
    onnxruntime check at VERIFY_SIZES), and onnxruntime's logits match PyTorch's within 1e-4
    (relative) at the export size, another batch and size, and a width above DINOv2's 518 px:
    DINOv2's antialiased position-embedding resize, DINOv3's RoPE grid and Swin's window padding
    and attention masks all follow the input size in the graph instead of being frozen at 65x97."""
    model = randomise(segmentor(ENCODERS[encoder], HEADS[encoder]))
    lines = []
    out = onnx_export.export_onnx(model, 3, {"format": onnx_export.FORMAT}, tmp_path / "m.onnx", report=lines.append)
    assert "dynamic batch/height/width" in lines[0] and "verified by onnxruntime" in lines[0]
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    for batch, height, width in ORT_SIZES:
        image = torch.randn(batch, 3, height, width, generator=generator)
        got = torch.from_numpy(session.run(["logits"], {"image": image.numpy()})[0])
        with torch.no_grad():
            want = model.logits(image)
        assert got.shape == want.shape == (batch, 4, height, width)
        error = relative(got, want)
        print(f"{encoder} onnxruntime vs torch at {batch}x3x{height}x{width}: {error:.1e}")
        assert error <= ONNX_BOUND, (height, width)
        assert np.isfinite(got.numpy()).all() and want.abs().max() > 0.1  # logits of order 1, not ~0


# -- torch.compile -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["dinov3"])
def test_compiled_transformer_segmentor_matches_eager(encoder):
    """``model.compile: true`` (inductor on the CPU) gives the eager model's training loss and
    gradients (one forward/backward with a mask) and its inference logits at another size, within
    1e-4 relative each: the ViT's dynamic patch grid and position embeddings, and Swin's padded,
    shifted windows, compile to the same numbers, with the encoder's blocks checkpointed
    (recomputed in the backward pass)."""
    torch._dynamo.reset()
    # The blocks recomputed in the backward pass (model.encoder.grad_checkpointing) compile too.
    model = segmentor({**ENCODERS[encoder], "grad_checkpointing": True}, COMPILE_HEAD, compile=True)
    assert model.compile_mode == "default" and model.encoder.model.grad_checkpointing
    eager = copy.deepcopy(model)
    eager.compile_mode = None
    generator = torch.Generator().manual_seed(1)
    image, mask = torch.randn(2, 3, 56, 56, generator=generator), torch.randint(0, 4, (2, 56, 56), generator=generator)
    losses, grads = [], []
    for net in (eager, model):
        net.train()
        loss = sum(net(image, mask).values())
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad for k, p in net.named_parameters() if p.grad is not None})
    assert relative(losses[1], losses[0]) <= COMPILE_BOUND
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    worst = max(relative(grads[1][k], grads[0][k]) for k in grads[0])
    assert worst <= COMPILE_BOUND
    test_image = torch.randn(1, 3, 45, 61, generator=generator)
    with torch.no_grad():
        logits = [net.eval()(test_image) for net in (eager, model)]
    assert logits[1].shape == (1, 4, 45, 61)
    print(f"{encoder} compiled vs eager: loss {relative(losses[1], losses[0]):.1e}, gradients {worst:.1e}, "
          f"logits {relative(logits[1], logits[0]):.1e}")  # fmt: skip
    assert relative(logits[1], logits[0]) <= COMPILE_BOUND
