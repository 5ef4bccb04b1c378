"""EoMT on timm's ViTs against transformers' ``EomtForUniversalSegmentation`` (DINOv2 with registers)
and ``EomtDinov3ForUniversalSegmentation`` (DINOv3, RoPE): tiny random-weight models of transformers'
own classes, converted by :mod:`hooktrain.models.eomt_keys`, compared layer by layer in training and
eval mode, with the masked attention on (``attn_mask_probs`` 1), off (0) and drawn at random (0.5,
seeded: both models draw the same ``torch.rand``)."""

from __future__ import annotations

from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F

from eomt_reference import random_transformers_eomt

from hooktrain.models.eomt import EoMT
from hooktrain.models.eomt_keys import (
    build_eomt_from_settings,
    eomt_keys_from_transformers,
    eomt_settings_from_transformers,
)

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
CASES = {
    "dinov2-patch16": ("EomtConfig", dict(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, image_size=64, patch_size=16,
        num_queries=6, num_blocks=2, num_labels=4,
    )),
    "dinov2-patch14-swiglu": ("EomtConfig", dict(
        hidden_size=64, num_hidden_layers=5, num_attention_heads=4, image_size=56, patch_size=14,
        num_queries=5, num_blocks=3, num_labels=3, use_swiglu_ffn=True, layer_norm_eps=1e-5,
    )),
    "dinov2-patch14-no-registers": ("EomtConfig", dict(
        hidden_size=96, num_hidden_layers=4, num_attention_heads=6, image_size=42, patch_size=14,
        num_queries=4, num_blocks=4, num_upscale_blocks=1, num_labels=2, num_register_tokens=0, mlp_ratio=2,
        hidden_act="gelu_pytorch_tanh",
    )),
    "dinov3-patch16": ("EomtDinov3Config", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=16,
        intermediate_size=128, num_queries=6, num_blocks=2, num_labels=4,
    )),
    "dinov3-patch16-gated": ("EomtDinov3Config", dict(
        hidden_size=96, num_hidden_layers=5, num_attention_heads=6, image_size=48, patch_size=16,
        intermediate_size=100, use_gated_mlp=True, hidden_act="silu", query_bias=False, value_bias=False,
        num_queries=5, num_blocks=3, num_labels=3, num_register_tokens=2, pos_embed_shift=0.1, pos_embed_jitter=1.5,
    )),
}  # fmt: skip
MASKING = {"on": 1.0, "off": 0.0, "random": 0.5}


def make_reference(case: str) -> torch.nn.Module:
    config_class, kwargs = CASES[case]
    return random_transformers_eomt(config_class, **kwargs)


def convert(reference: torch.nn.Module) -> EoMT:
    config = reference.config.to_diff_dict()  # what save_pretrained writes to config.json
    model = build_eomt_from_settings(eomt_settings_from_transformers(config))
    model.load_state_dict(eomt_keys_from_transformers(reference.state_dict(), config), strict=True)
    return model


def reference_predictions(reference: torch.nn.Module, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every ``(mask_logits, class_logits)`` transformers computes (it returns the last only)."""
    predictions = []
    predict = reference.predict

    def recording_predict(tokens):
        predictions.append(predict(tokens))
        return predictions[-1]

    with mock.patch.object(reference, "predict", recording_predict):
        reference(image)
    return predictions


def semantic_map(mask_logits: torch.Tensor, class_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], masks).argmax(1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("masking", MASKING)
@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(case, masking):
    reference = make_reference(case)
    reference.attn_mask_probs.fill_(MASKING[masking])
    model = convert(reference)
    size = reference.config.image_size
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    for training in (True, False):
        reference.train(training)
        model.train(training)
        with torch.no_grad():
            torch.manual_seed(3)
            want = reference_predictions(reference, image)
            torch.manual_seed(3)
            got = model.predictions(image)
        num_blocks = reference.config.num_blocks
        assert len(got) == len(want) == (1 if masking == "off" and not training else num_blocks + 1)
        errors = []
        for (got_masks, got_classes), (want_masks, want_classes) in zip(got, want):
            errors.append(max(relative_error(got_masks, want_masks), relative_error(got_classes, want_classes)))
            assert torch.equal(semantic_map(got_masks, got_classes, (size, size)),
                               semantic_map(want_masks, want_classes, (size, size)))  # fmt: skip
        print(f"{case} masking={masking} training={training}: max relative error per layer {errors}")
        assert max(errors) <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_masking_changes_the_prediction(case):
    """The comparisons above are meaningful: each query's mask, on the token grid, covers part of the
    image, and the masked attention changes the final prediction."""
    model = convert(make_reference(case)).eval()
    size = model.encoder.patch_embed.img_size
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        masked = model.predictions(image)
        model.attn_mask_probs.zero_()
        unmasked = model.predictions(image)
    on_grid = F.interpolate(masked[0][0], size=model.encoder.patch_embed.grid_size, mode="bilinear") > 0
    assert 0.1 < on_grid.float().mean() < 0.9
    assert relative_error(masked[-1][0], unmasked[-1][0]) > 1e-2


@pytest.mark.parametrize(
    ("config_class", "kwargs", "timm_name"),
    [
        ("EomtConfig", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                            image_size=518), "vit_small_patch14_reg4_dinov2"),
        ("EomtConfig", dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, patch_size=14,
                            image_size=518, use_swiglu_ffn=True), "vit_giant_patch14_reg4_dinov2"),
        ("EomtDinov3Config", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                  intermediate_size=1536), "vit_small_patch16_dinov3_qkvb"),
        ("EomtDinov3Config", dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                                  intermediate_size=5120, use_gated_mlp=True, hidden_act="silu", query_bias=False,
                                  value_bias=False), "vit_huge_plus_patch16_dinov3"),
    ],
)  # fmt: skip
def test_encoder_names_are_timms(config_class, kwargs, timm_name):
    """Under ``encoder.``, the parameters of timm's own model: its pretrained weights load."""
    config = getattr(transformers, config_class)(**kwargs).to_diff_dict()
    with torch.device("meta"):
        model = build_eomt_from_settings(eomt_settings_from_transformers(config))
        timm_model = timm.create_model(timm_name, num_classes=0, dynamic_img_size=True)
    ours = {name: tuple(value.shape) for name, value in model.encoder.state_dict().items()}
    assert ours == {name: tuple(value.shape) for name, value in timm_model.state_dict().items()}


def test_gradients_reach_queries_heads_and_blocks():
    model = convert(make_reference("dinov3-patch16")).train()
    predictions = model.predictions(torch.randn(2, 3, 64, 64))
    sum(masks.mean() + classes.mean() for masks, classes in predictions).backward()
    params = dict(model.named_parameters())
    for name in [
        "query.weight",
        "class_head.weight",
        "mask_head.fc1.weight",
        "upscale.1.depthwise.weight",
        "encoder.blocks.3.attn.qkv.weight",
        "encoder.blocks.2.mlp.fc1.weight",
        "encoder.patch_embed.proj.weight",
    ]:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_any_input_size_multiple_of_the_patch():
    model = convert(make_reference("dinov2-patch16")).eval()
    with torch.no_grad():
        predictions = model.predictions(torch.randn(1, 3, 48, 80))
    assert [tuple(masks.shape) for masks, _ in predictions] == [(1, 6, 12, 20)] * 3
    assert [tuple(classes.shape) for _, classes in predictions] == [(1, 6, 5)] * 3


@pytest.mark.parametrize(
    ("model_type", "change", "key"),
    [
        ("eomt_dinov3", {"key_bias": True}, "key_bias"),
        ("eomt_dinov3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 100.0}}, "rope_parameters"),
        ("eomt", {"hidden_act": "quick_gelu"}, "hidden_act"),
        ("mask2former", {}, "model_type"),
    ],
)
def test_unconvertible_config_names_the_key(model_type, change, key):
    with pytest.raises(ValueError, match=key):
        eomt_settings_from_transformers({"model_type": model_type, "num_labels": 2, **change})
