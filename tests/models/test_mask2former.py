"""Mask2Former against transformers' ``Mask2FormerForUniversalSegmentation``: a tiny random-weight
model of transformers' own classes (Swin backbone), its config read into a recipe ``model`` section
(:func:`mask2former_model_from_transformers`) and built by :func:`build_segmentor`, its state dict
converted by :mod:`hooktrain.models.mask2former_keys`; every layer's class and mask logits and the
semantic scores compared at two input sizes. A ResNet backbone is compared too."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from eomt_reference import semantic_map

from hooktrain.deploy.convert import fit_to_model
from hooktrain.errors import UserError
from hooktrain.models.mask2former import Mask2Former
from hooktrain.models.mask2former_decoder import MaskedAttentionDecoder
from hooktrain.models.mask2former_keys import mask2former_keys_from_transformers, mask2former_model_from_transformers
from hooktrain.models.segmentor import build_segmentor
from hooktrain.models.segmentor_keys import UnknownKeys
from hooktrain.recipe.model import ModelConfig

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
STAGES = ["stage1", "stage2", "stage3", "stage4"]
SWIN = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7, out_features=STAGES)
MASK2FORMER = dict(
    feature_size=32, hidden_dim=32, mask_feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64,
    encoder_layers=2, decoder_layers=5, num_attention_heads=4, num_queries=5, num_labels=4,
)  # fmt: skip
SIZES = [(64, 64), (96, 128)]


def randomise(model: torch.nn.Module) -> None:
    """Norms (BatchNorm statistics too), biases and the deformable attention's offset and weight
    projections randomised (transformers initialises them to 1, 0 or 0), so that no mixed-up key
    goes unnoticed."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        for name, param in model.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            elif name.endswith("bias") and "sampling_offsets" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "relative_position_bias_table" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # ResNet's
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = transformers.SwinConfig(**SWIN)
    config = transformers.Mask2FormerConfig(backbone_config=backbone, output_auxiliary_logits=True, **MASK2FORMER)
    model = transformers.Mask2FormerForUniversalSegmentation(config)
    randomise(model)
    return model.float().eval()


def convert(reference: torch.nn.Module) -> Mask2Former:
    config = reference.config.to_diff_dict()  # what save_pretrained writes to config.json
    model_cfg = ModelConfig.model_validate(mask2former_model_from_transformers(config))
    model = build_segmentor(model_cfg, num_classes=reference.config.num_labels)
    converted = mask2former_keys_from_transformers(reference.state_dict())
    model.load_state_dict(fit_to_model(converted, model, "the reference"))
    return model


@pytest.fixture(scope="module")
def model(reference) -> Mask2Former:
    return convert(reference).eval()


def reference_predictions(reference, image: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object]:
    """Every ``(mask_logits, class_logits)`` transformers computes: its auxiliary ones, then the final."""
    outputs = reference(pixel_values=image)
    aux = [(layer["masks_queries_logits"], layer["class_queries_logits"]) for layer in outputs.auxiliary_logits]
    return [*aux, (outputs.masks_queries_logits, outputs.class_queries_logits)], outputs


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("size", SIZES)
def test_matches_transformers(reference, model, size):
    """Every layer's mask and class logits (the initial queries' and the 4 decoder layers', which
    cycle the three levels and wrap around) and the semantic scores at the input size: those of
    transformers within 1e-4 relative."""
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        want, outputs = reference_predictions(reference, image)
        got = model.predictions(image)
        scores = model(image)
    assert len(got) == len(want) == MASK2FORMER["decoder_layers"]
    assert got[-1][0].shape == (2, 5, size[0] // 4, size[1] // 4) and got[-1][1].shape == (2, 5, 5)
    errors = [max(relative_error(gm, wm), relative_error(gc, wc)) for (gm, gc), (wm, wc) in zip(got, want)]
    score_error = relative_error(scores, semantic_map(outputs, size))
    print(f"{size}: max relative error per layer {errors}, semantic scores {score_error:.2e}")
    assert max(errors) <= TOLERANCE and score_error <= TOLERANCE


def test_masked_attention_is_exercised(model):
    """The comparisons above are meaningful: the masks the cross-attention reads cover part of each
    level, and without them the final prediction changes."""
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        predictions = model.predictions(image)
        with mock.patch.object(MaskedAttentionDecoder, "_attention_mask", staticmethod(lambda logits, size: None)):
            unmasked = model.predictions(image)
    covered = [(mask.sigmoid() >= 0.5).float().mean().item() for mask, _ in predictions[:-1]]
    assert all(0.05 < share < 0.95 for share in covered), covered
    assert relative_error(predictions[-1][0], unmasked[-1][0]) > 1e-2


def test_a_query_whose_mask_covers_nothing_attends_everywhere():
    """transformers' rule: a row of the cross-attention mask that would block every pixel is lifted."""
    logits = torch.tensor([[[[1.0, -1.0], [-2.0, 3.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])  # [1, 2 queries, 2, 2]
    attend = MaskedAttentionDecoder._attention_mask(logits, (2, 2))
    assert attend.tolist() == [[[[True, False, False, True], [True, True, True, True]]]]


def test_resnet_backbone_matches_transformers():
    """A transformers Mask2Former with a ``ResNetBackbone`` (bottleneck layers, stride on the 3x3, as
    timm's ``resnet50``, here with 1, 1, 2, 1 layers and narrow stages) converts as well."""
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], out_features=STAGES)
    config = transformers.Mask2FormerConfig(backbone_config=backbone, output_auxiliary_logits=True, **MASK2FORMER)
    reference = transformers.Mask2FormerForUniversalSegmentation(config)
    randomise(reference)
    reference.float().eval()
    model = convert(reference).eval()
    assert model.encoder.feature_info.channels() == [32, 64, 128, 256]
    image = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, outputs = reference_predictions(reference, image)
        got = model.predictions(image)
        scores = model(image)
    errors = [max(relative_error(gm, wm), relative_error(gc, wc)) for (gm, gc), (wm, wc) in zip(got, want)]
    score_error = relative_error(scores, semantic_map(outputs, (96, 128)))
    print(f"resnet (96, 128): max relative error per layer {errors}, semantic scores {score_error:.2e}")
    assert len(got) == len(want) and max(errors) <= TOLERANCE and score_error <= TOLERANCE


def test_training_supervises_every_layer_and_gradients_reach_every_part(model):
    """A train-mode ``forward(image, mask)`` gives finite ``decode.*`` class, mask and Dice terms for
    the final layer and every earlier one (``d0`` .. ``d3``), and their sum's gradient reaches the
    encoder, its per-level norms, the pixel decoder, the decoder and both heads."""
    trained = copy.deepcopy(model).train()
    trained.criterion.num_points = 64
    image = torch.randn(2, 3, 64, 64)
    mask = torch.randint(0, 4, (2, 64, 64))
    mask[:, :8] = 255
    terms = trained(image, mask)
    layers = MASK2FORMER["decoder_layers"]
    for name in ("loss_cls", "loss_mask", "loss_dice"):
        assert f"decode.{name}" in terms
        assert all(f"decode.d{i}.{name}" in terms for i in range(layers - 1))
    assert len(terms) == 3 * layers and all(torch.isfinite(value) for value in terms.values())
    sum(terms.values()).backward()
    params = dict(trained.named_parameters())
    for name in [
        "encoder.model.patch_embed.proj.weight",
        "encoder.model.layers.3.blocks.0.attn.qkv.weight",
        "out_norms.3.weight",
        "pixel_decoder.layers.0.self_attn.sampling_offsets.weight",
        "pixel_decoder.lateral_convs.0.0.weight",
        "pixel_decoder.mask_proj.weight",
        "decoder.query_feat.weight",
        "decoder.layers.0.cross_attn.k_proj.weight",
        "decoder.layers.3.self_attn.q_proj.weight",
        "decoder.mask_embed.layers.2.weight",
        "decoder.class_head.weight",
    ]:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_a_vit_encoder_is_refused_in_one_line():
    """A ViT gives one-stride maps, not Mask2Former's pyramid: one line naming model.encoder.name."""
    cfg = ModelConfig.model_validate(
        {"encoder": {"name": "vit_small_patch16_224"}, "decode_head": {"type": "mask2former"}}
    )
    with pytest.raises(UserError, match="model.encoder.name") as err:
        build_segmentor(cfg, num_classes=3)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        "model.transformer_module.decoder.layers.0.cross_attn.bias_k",
        "model.pixel_level_module.decoder.adapter_1.2.weight",
        "model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.0.attention.gate.weight",
        "backbone.conv1.weight",
    ],
)
def test_an_unknown_key_is_named(reference, key):
    """A key no rule maps, in the backbone, the pixel decoder, the decoder or outside them, is named."""
    state = {**reference.state_dict(), key: torch.zeros(1)}
    with pytest.raises(UnknownKeys, match=key.replace(".", r"\.")):
        mask2former_keys_from_transformers(state)


def test_a_missing_key_is_named(reference, model):
    """A converted state dict that leaves a tensor of the model unfilled is refused, naming it."""
    state = dict(reference.state_dict())
    del state["model.transformer_module.decoder.layers.1.cross_attn.in_proj_weight"]
    with pytest.raises(UserError, match=r"decoder\.layers\.1\.cross_attn\.q_proj\.weight"):
        fit_to_model(mask2former_keys_from_transformers(state), model, "the reference")
