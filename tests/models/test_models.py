"""Segmentor zoo: shapes, losses, inference modes and encoder weights (tiny encoders, 64x64)."""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from hooktrain.errors import UserError
from hooktrain.models import ModelConfig, Segmentor, build_segmentor
from hooktrain.models.inference import slide_logits, slide_windows
from hooktrain.models.losses import HeadLoss, cross_entropy, dice, ohem_pixel_weights

NUM_CLASSES = 5
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "_base_" / "models"


def make(encoder: str | dict = "resnet18", head: str = "fpn", **overrides) -> Segmentor:
    """A segmentor on ``encoder`` (a timm name or a full ``encoder:`` section) with a ``head`` head."""
    encoder = {"name": encoder} if isinstance(encoder, str) else encoder
    cfg = {"encoder": encoder, "decode_head": {"type": head}, **overrides}
    torch.manual_seed(0)
    return build_segmentor(ModelConfig.model_validate(cfg), num_classes=NUM_CLASSES)


def batch(b: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=gen), torch.randint(0, NUM_CLASSES, (b, h, w), generator=gen)


# --- shapes and loss terms -------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["resnet18", "convnext_atto", "pvt_v2_b0", "mobilenetv3_small_100"])
@pytest.mark.parametrize("head", ["fcn", "fpn", "upernet", "segformer"])
def test_logits_and_losses_for_every_head_and_encoder(encoder, head):
    with_aux = head in ("fcn", "upernet")  # half the grid with an auxiliary head
    aux = {"channels": 16} if with_aux else None
    model = make(encoder, head, decode_head={"type": head, "channels": 32}, aux_head=aux)
    image, mask = batch(h=64, w=96)
    assert model(image).shape == (2, NUM_CLASSES, 64, 96)
    terms = model(image, mask)
    assert set(terms) == ({"decode.loss_ce", "aux.loss_ce"} if with_aux else {"decode.loss_ce"})
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())


def test_logits_match_odd_input_sizes():
    model = make("resnet18", "upernet", decode_head={"type": "upernet", "channels": 64}).eval()
    assert model(torch.randn(1, 3, 50, 70)).shape == (1, NUM_CLASSES, 50, 70)


def test_loss_terms_are_weighted_and_backward_reaches_every_head():
    losses = [{"type": "cross_entropy", "weight": 1.0}, {"type": "dice", "weight": 3.0}]
    head = {"type": "segformer", "losses": losses, "dropout": 0.0}
    model = make("resnet18", "segformer", aux_head={"dropout": 0.0}, decode_head=head)
    image, mask = batch()
    terms = model(image, mask)
    assert set(terms) == {"decode.loss_ce", "decode.loss_dice", "aux.loss_ce"}
    logits = F.interpolate(model.decode_head(model.encoder(image)), size=(64, 64), mode="bilinear")
    torch.testing.assert_close(terms["decode.loss_dice"], 3.0 * dice(logits, mask))
    aux_logits = F.interpolate(model.aux_head(model.encoder(image)), size=(64, 64), mode="bilinear")
    torch.testing.assert_close(terms["aux.loss_ce"], 0.4 * cross_entropy(aux_logits, mask))
    sum(v for k, v in terms.items() if "loss" in k).backward()
    # Every parameter is reached (timm zero-inits residual branches, so some grads are exactly 0).
    for part in (model.encoder, model.decode_head, model.aux_head):
        assert all(p.grad is not None for p in part.parameters())
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0


def test_a_few_optimizer_steps_fit_a_learnable_batch():
    # 16x16 blocks of random classes, each painted in its class's colour plus noise.
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, NUM_CLASSES, (2, 4, 4), generator=gen)
    mask = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    colours = torch.randn(NUM_CLASSES, 3, generator=gen)
    image = colours[mask].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 64, 64, generator=gen)
    model = make("resnet18", "fpn", decode_head={"type": "fpn", "channels": 32, "fpn_channels": 32})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = sum(model(image, mask).values())
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses


# --- inference -------------------------------------------------------------------------------


def test_slide_windows_follow_the_mmseg_grid():
    # ceil((100 - 64) / 32) + 1 = 3 rows, the last shifted back inside; 1 column for a narrow image.
    assert slide_windows(100, 40, (64, 64), (32, 32)) == [(0, 64, 0, 40), (32, 96, 0, 40), (36, 100, 0, 40)]
    windows = slide_windows(200, 150, (64, 48), (40, 30))
    assert len(windows) == (4 + 1) * (4 + 1)
    assert all(y2 - y1 == 64 and x2 - x1 == 48 for y1, y2, x1, x2 in windows)


def test_slide_averages_overlapping_windows():
    # A per-pixel model gives the same logits whatever window a pixel is seen in, so the
    # sum-and-count average must reproduce the whole-image logits exactly.
    pointwise = torch.nn.Conv2d(3, NUM_CLASSES, 1)
    image = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(pointwise, image, (32, 48), (20, 25)), pointwise(image))


def test_slide_with_one_window_equals_whole():
    model = make("resnet18", "fpn").eval()
    image, _ = batch(b=1, h=64, w=64)
    whole = model.predict(image, [(64, 64)], [(64, 64)])[0]
    model.inference = model.inference.model_copy(update={"mode": "slide", "crop_size": (64, 64), "stride": (32, 32)})
    torch.testing.assert_close(model.predict(image, [(64, 64)], [(64, 64)])[0], whole)


def test_flip_averages_the_probabilities_of_the_flipped_prediction():
    model = make("convnext_atto", "segformer").eval()
    image, _ = batch(b=1)
    plain = model.predict(image, [(64, 64)], [(64, 64)])[0]
    model.inference = model.inference.model_copy(update={"flip": True})
    flipped = model.predict(image, [(64, 64)], [(64, 64)])[0]
    with torch.no_grad():
        expected = (model(image)[0].softmax(0) + model(image.flip(-1)).flip(-1)[0].softmax(0)) / 2
    torch.testing.assert_close(flipped, expected)  # as MMSegmentation's SegTTAModel averages
    assert not torch.allclose(flipped, plain)  # a conv net is not flip-equivariant


def test_predict_batch_of_different_sizes_returns_each_original_size():
    model = make("resnet18", "fpn", inference={"mode": "slide", "crop_size": [32, 32], "stride": [24, 24]}).eval()
    images = [torch.randn(3, 64, 48), torch.randn(3, 40, 64)]
    padded = torch.zeros(2, 3, 64, 64)
    for i, img in enumerate(images):
        padded[i, :, : img.shape[1], : img.shape[2]] = img
    img_shapes = [(64, 48), (40, 64)]
    ori_shapes = [(128, 96), (30, 48)]
    out = model.predict(padded, img_shapes, ori_shapes)
    assert [tuple(o.shape) for o in out] == [(NUM_CLASSES, 128, 96), (NUM_CLASSES, 30, 48)]
    assert all(o.dtype == torch.float32 for o in out)
    # Slide inference reads only each image's own region, so the padding changes nothing.
    alone = model.predict(images[1][None], [(40, 64)], [(30, 48)])[0]
    torch.testing.assert_close(out[1], alone)


def test_predict_whole_runs_each_image_without_the_padding():
    model = make("pvt_v2_b0", "segformer", inference={"flip": True}).eval()
    image, _ = batch(b=2)
    out = model.predict(image, [(64, 64), (32, 48)], [(64, 64), (64, 96)])
    crop = image[1:, :, :32, :48]
    with torch.no_grad():
        variants = [model(crop), model(crop.flip(-1)).flip(-1)]
    # each variant back at the original size, then its softmax, then the mean (mmseg's TTA order)
    expected = sum(F.interpolate(v, size=(64, 96), mode="bilinear")[0].softmax(0) for v in variants) / 2
    torch.testing.assert_close(out[1], expected)


def test_a_prediction_does_not_depend_on_the_rest_of_the_batch():
    model = make("resnet18", "fpn").eval()
    image, _ = batch(b=3)
    shapes = [(64, 64), (40, 56), (64, 64)]
    together = model.predict(image, shapes, shapes)
    for i, shape in enumerate(shapes):
        alone = model.predict(image[i : i + 1, :, : shape[0], : shape[1]], [shape], [shape])[0]
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)


def test_predict_ignores_the_aux_head_and_returns_float32_under_autocast():
    model = make("resnet18", "fpn", aux_head={}).eval()
    with torch.no_grad():
        for p in model.aux_head.parameters():
            p.fill_(float("nan"))
    image, _ = batch(b=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.predict(image, [(64, 64)], [(64, 64)])[0]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# --- losses ----------------------------------------------------------------------------------


def test_losses_ignore_255_exactly():
    logits, target = torch.randn(2, NUM_CLASSES, 16, 16), torch.randint(0, NUM_CLASSES, (2, 16, 16))
    target[:, :5] = 255
    changed = logits.clone()
    changed[:, :, :5] = torch.randn(2, NUM_CLASSES, 5, 16) * 10
    for loss in (cross_entropy, dice):
        assert loss(changed, target) == loss(logits, target)
        assert loss(changed, target.masked_fill(target == 255, 0)) != loss(logits, target.masked_fill(target == 255, 0))


def test_all_ignored_batch_gives_zero_loss_not_nan():
    logits = torch.randn(1, NUM_CLASSES, 8, 8, requires_grad=True)
    target = torch.full((1, 8, 8), 255)
    loss = cross_entropy(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_cross_entropy_class_weights_match_the_mmseg_reference():
    logits, target = torch.randn(2, NUM_CLASSES, 8, 8), torch.randint(0, NUM_CLASSES, (2, 8, 8))
    target[0, 0] = 255
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.0])
    valid = (target != 255).sum()
    reference = F.cross_entropy(logits, target, weight=weight, reduction="sum", ignore_index=255) / valid
    torch.testing.assert_close(cross_entropy(logits, target, class_weight=weight), reference)
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target, ignore_index=255))
    all_pixels = F.cross_entropy(logits, target, reduction="sum", ignore_index=255) / target.numel()
    torch.testing.assert_close(cross_entropy(logits, target, avg_non_ignore=False), all_pixels)


def test_class_weight_in_the_recipe_reaches_the_loss():
    ce = {"type": "cross_entropy", "class_weight": [0.0, 0.0, 0.0, 0.0, 1.0]}
    model = make("resnet18", "fcn", decode_head={"type": "fcn", "losses": [ce]})
    image, mask = batch()
    mask[mask == 4] = 0  # only zero-weight classes left
    assert model(image, mask)["decode.loss_ce"].item() == 0.0


def test_dice_matches_a_straightforward_reference():
    logits, target = torch.randn(2, 3, 6, 7), torch.randint(0, 3, (2, 6, 7))
    target[1, 2:4] = 255
    probs = logits.softmax(1)
    per_image = []
    for b in range(2):
        valid = target[b] != 255
        terms = []
        for c in range(3):
            p, t = probs[b, c][valid], (target[b][valid] == c).float()
            terms.append(1 - (2 * (p * t).sum() + 1) / ((p**2).sum() + (t**2).sum() + 1))
        per_image.append(torch.stack(terms).mean())
    torch.testing.assert_close(dice(logits, target), torch.stack(per_image).mean())


def test_ohem_keeps_at_least_min_kept_and_every_pixel_below_thresh():
    logits, target = torch.randn(2, NUM_CLASSES, 16, 16) * 4, torch.randint(0, NUM_CLASSES, (2, 16, 16))
    target[0, :4] = 255
    prob = logits.softmax(1).gather(1, target.clamp(max=NUM_CLASSES - 1)[:, None])[:, 0]
    weights = ohem_pixel_weights(logits, target, min_kept=30, thresh=0.05)
    assert weights[target == 255].sum() == 0
    assert weights.sum() >= 2 * 30
    assert (weights[(prob < 0.05) & (target != 255)] == 1).all()
    # Without a threshold: exactly the min_kept * B highest-loss pixels.
    weights = ohem_pixel_weights(logits, target, min_kept=30, thresh=None)
    assert weights.sum() == 60
    pixel_loss = F.cross_entropy(logits, target, reduction="none", ignore_index=255)
    assert pixel_loss[weights == 1].min() >= pixel_loss[(weights == 0) & (target != 255)].max()
    # Fewer labelled pixels than min_kept * B: every one of them, and no ignored pixel.
    target[:, 2:] = 255
    for thresh in (None, 0.05):
        weights = ohem_pixel_weights(logits, target, min_kept=30, thresh=thresh)
        assert torch.equal(weights, (target != 255).float())


def test_ohem_weights_the_decode_cross_entropy():
    sampler = {"type": "ohem", "thresh": None, "min_kept": 10}
    loss = HeadLoss(
        [ModelConfig().decode_head.losses[0]],
        ModelConfig.model_validate({"decode_head": {"type": "fpn", "sampler": sampler}}).decode_head.sampler,
        num_classes=NUM_CLASSES,
        ignore_index=255,
        align_corners=False,
        where="test",
    )
    logits, target = torch.randn(1, NUM_CLASSES, 8, 8), torch.randint(0, NUM_CLASSES, (1, 8, 8))
    pixel_loss = F.cross_entropy(logits, target, reduction="none")
    # mmseg semantics: the 10 hardest pixels' losses, divided by all non-ignored pixels.
    torch.testing.assert_close(loss(logits, target)["loss_ce"], pixel_loss.flatten().topk(10).values.sum() / 64)


# --- encoders and weights --------------------------------------------------------------------


def test_unknown_encoder_suggests_a_name():
    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        make("resnett18")


def test_pretrained_offline_fails_fast_with_the_fix(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    for offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # refuses at once
        for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(var, raising=False)
        start = time.perf_counter()
        with pytest.raises(UserError, match="could not be downloaded.*model.encoder.pretrained_path"):
            make({"name": "resnet18", "pretrained": True})
        assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("name", ["resnet18", "pvt_v2_b0"])
def test_pretrained_path_loads_a_timm_safetensors_checkpoint(tmp_path, name):
    torch.manual_seed(1)
    source = timm.create_model(name).eval()
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    model = make({"name": name, "pretrained_path": str(tmp_path / "weights.safetensors")}).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(image)[-1], source.forward_features(image))


def test_pretrained_path_loads_a_nested_torch_checkpoint_and_reports_keys(tmp_path, caplog):
    source = timm.create_model("convnext_atto", features_only=True, out_indices=(-4, -3, -2, -1)).eval()
    state = dict(source.state_dict())
    state["unused.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    model = make({"name": "convnext_atto", "pretrained_path": str(tmp_path / "ckpt.pth")})
    assert "unused.weight" in caplog.text
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(model.encoder.eval()(image), source(image)):
            torch.testing.assert_close(got, want)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        make({"name": "resnet18", "pretrained_path": str(tmp_path / "missing.safetensors")})
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="matches timm model 'resnet18'"):
        make({"name": "resnet18", "pretrained_path": str(tmp_path / "other.safetensors")})


# --- configuration ---------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_head_types():
    with pytest.raises(ValidationError, match="pool_scales"):
        ModelConfig.model_validate({"decode_head": {"type": "fpn", "pool_scales": [1, 2]}})
    with pytest.raises(ValidationError, match="segformer"):
        ModelConfig.model_validate({"decode_head": {"type": "deeplab"}})


def test_bad_indices_and_class_weights_are_user_errors():
    with pytest.raises(UserError, match="in_index"):
        make(aux_head={"in_index": 7})
    with pytest.raises(UserError, match="class_weight"):
        make(decode_head={"type": "fpn", "losses": [{"type": "cross_entropy", "class_weight": [1.0, 2.0]}]})


def test_channels_last_gives_the_same_logits():
    head = {"type": "upernet", "channels": 64}
    plain = make("resnet18", "upernet", decode_head=head).eval()
    fast = make("resnet18", "upernet", decode_head=head, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    image, _ = batch(b=1)
    with torch.no_grad():
        torch.testing.assert_close(fast(image), plain(image), atol=1e-4, rtol=1e-4)


def test_channels_last_model_saves_contiguous_checkpoints(tmp_path):
    model = make("resnet18", "fpn", channels_last=True)
    assert not model.encoder.conv1.weight.is_contiguous()
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # refuses strided tensors
    plain = make("resnet18", "fpn")
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(plain.encoder.conv1.weight, model.encoder.conv1.weight)


SMALL_COMPILE_MODEL = {  # inductor compiles C++ kernels for every op, slowly on 2 cores
    "encoder": {"name": "test_resnet", "out_indices": [0, 1]},
    "aux_head": None,
    "decode_head": {"type": "fcn", "channels": 8, "num_convs": 1, "concat_input": False, "dropout": 0.0},
}


@pytest.mark.parametrize("sampler", [None, {"type": "ohem", "thresh": 0.7, "min_kept": 100}])
def test_training_forward_compiles_to_one_graph_with_the_upsample_and_the_loss(sampler):
    """What ``compile: true`` hands to torch.compile: encoder, head, the logits' upsampling to
    the mask size and the loss (OHEM's pixel selection included), in one graph without breaks."""
    head = {**SMALL_COMPILE_MODEL["decode_head"], "sampler": sampler}
    cfg = ModelConfig.model_validate({**SMALL_COMPILE_MODEL, "decode_head": head, "compile": True})
    model = build_segmentor(cfg, num_classes=4)
    assert model.compile_mode == "default" and all(m._compiled_call_impl is None for m in model.modules())
    image, mask = batch(2, 32, 32)
    mask = mask.clamp(max=3)
    mask[:, :4] = 255
    explained = torch._dynamo.explain(Segmentor._loss_terms)(model, image, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = {getattr(op, "__name__", str(op)) for graph in explained.ops_per_graph for op in graph}
    assert {"conv2d", "batch_norm", "interpolate", "cross_entropy"} <= ops


def test_compiled_model_routes_training_and_inference_through_torch_compile(monkeypatch):
    """Training calls the compiled loss function in the recipe's mode (marking a new CUDA-graph
    step in reduce-overhead); inference calls the compiled logits without CUDA graphs."""
    from hooktrain.models import segmentor_base

    calls, steps = [], []

    def fake_compiled(method, mode):
        def run(*args):
            calls.append((method.__name__, mode))
            return method(*args)

        return run

    monkeypatch.setattr(segmentor_base, "compiled", fake_compiled)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(len(calls)))
    cfg = ModelConfig.model_validate({**SMALL_COMPILE_MODEL, "compile": True, "compile_mode": "reduce-overhead"})
    model = build_segmentor(cfg, num_classes=4)
    image, mask = batch(2, 32, 32)
    terms = model(image, mask.clamp(max=3))
    model.eval()
    logits = model(image)
    predicted = model.predict(image, [(32, 32)] * 2, [(32, 32)] * 2)
    assert set(terms) == {"decode.loss_ce"} and logits.shape == (2, 4, 32, 32) and len(predicted) == 2
    assert calls == [("_loss_terms", "reduce-overhead"), ("_logits", "default"), ("_logits", "default")]
    assert steps == [0]
    eager = build_segmentor(ModelConfig.model_validate(SMALL_COMPILE_MODEL), num_classes=4)
    eager(image, mask.clamp(max=3))
    assert len(calls) == 3


def test_compile_mode_without_compile_is_refused():
    with pytest.raises(ValidationError, match="set model.compile: true as well"):
        ModelConfig.model_validate({"compile_mode": "reduce-overhead"})


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_base_model_recipes_validate(recipe):
    from hooktrain.models.mit import is_mit
    from hooktrain.recipe.schema import load_yaml

    cfg = ModelConfig.model_validate(load_yaml(RECIPES / recipe)["model"])
    assert timm.is_model(cfg.encoder.name) or is_mit(cfg.encoder.name)


def test_quickstart_recipe_builds():
    """recipes/quickstart.yaml, resolved as `hooktrain` resolves it (its _base_ files and own
    overrides), builds its model: ResNet-18 strides 4-16 + FPN, the shapes' classes, its losses."""
    from hooktrain.recipe.schema import load_recipe

    recipe = load_recipe(RECIPES.parents[1] / "quickstart.yaml")
    data = recipe.data
    model = build_segmentor(
        recipe.model, num_classes=data.num_classes, ignore_index=data.ignore_index, in_channels=data.in_channels
    )
    assert (recipe.model.encoder.name, recipe.model.encoder.out_indices) == ("resnet18", [1, 2, 3])
    assert recipe.model.decode_head.type == "fpn" and data.num_classes == 5
    image = torch.randn(2, data.in_channels, 64, 64)
    assert model(image).shape == (2, data.num_classes, 64, 64)
    terms = model(image, torch.randint(0, data.num_classes, (2, 64, 64)))
    assert sorted(terms) == ["decode.loss_ce", "decode.loss_dice"]  # the recipe's two losses, no aux head
    assert all(torch.isfinite(v) for v in terms.values())
