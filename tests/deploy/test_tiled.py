"""Tiled prediction (hooktrain.deploy.tiled): blending, seams, forward-only reads, nodata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooktrain.deploy.tiled import ArraySource, TiledPredictor
from hooktrain.models.blending import WindowWeights, axis_weights
from hooktrain.models.inference import image_logits, slide_logits, slide_windows
from hooktrain.recipe.model import InferenceConfig

CLASSES = 4


def conv_stack(layers: int, seed: int = 0) -> torch.nn.Module:
    """Stride-1 3x3 convolutions (zero padding): a receptive field of radius ``layers``."""
    torch.manual_seed(seed)
    convs = []
    for i in range(layers):
        convs += [torch.nn.Conv2d(3 if i == 0 else 8, 8 if i < layers - 1 else CLASSES, 3, padding=1), torch.nn.Tanh()]
    return torch.nn.Sequential(*convs[:-1]).eval()


def as_input(tile: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tile).permute(2, 0, 1).float() / 127.5 - 1


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(coarse.repeat(8, 0).repeat(8, 1)[:height, :width])


def tiled(source, model, blend: str, crop=(32, 32), stride=(24, 24), **kwargs) -> TiledPredictor:
    cfg = InferenceConfig(mode="slide", crop_size=crop, stride=stride, blend=blend)
    return TiledPredictor(source, as_input, model, cfg, **kwargs)


def assemble(predictor: TiledPredictor):
    blocks = list(predictor.rows())
    assert [b.top for b in blocks] == sorted({b.top for b in blocks}) and blocks[0].top == 0
    labels = np.concatenate([b.labels for b in blocks])
    probs = None if blocks[0].probabilities is None else np.concatenate([b.probabilities for b in blocks], 1)
    valid = None if blocks[0].valid is None else np.concatenate([b.valid for b in blocks])
    return labels, probs, valid


def whole_logits(model, image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(as_input(image)[None])[0]


def distance_to_a_tile_edge(windows, height: int, width: int) -> np.ndarray:
    """Per pixel, the smallest distance to a cut edge (one inside the image) of any tile
    covering it: where this reaches a receptive field's radius, every tile saw it whole."""
    worst = np.full((height, width), 10**6, np.int64)
    for y1, y2, x1, x2 in windows:
        ys, xs = np.arange(y1, y2), np.arange(x1, x2)
        # image borders are not seams: a zero-padded convolution sees them the same in the tile
        dy = np.minimum(np.where(y1 == 0, 10**6, ys - y1), np.where(y2 == height, 10**6, y2 - 1 - ys))
        dx = np.minimum(np.where(x1 == 0, 10**6, xs - x1), np.where(x2 == width, 10**6, x2 - 1 - xs))
        margin = np.minimum(dy[:, None], dx[None, :])
        worst[y1:y2, x1:x2] = np.minimum(worst[y1:y2, x1:x2], margin)
    return worst


def test_blend_windows():
    hann, gaussian = axis_weights(8, "hann"), axis_weights(8, "gaussian")
    for weights in (hann, gaussian):
        assert weights.min() > 0 and torch.equal(weights, weights.flip(0)) and weights.argmax() in (3, 4)
    assert torch.equal(axis_weights(5, "mean"), torch.ones(5))
    # center: every pixel is kept by exactly one window, the one whose centre is nearest
    windows = slide_windows(100, 70, (32, 32), (24, 24))
    weights = WindowWeights(windows, 100, 70, "center")
    cover = torch.zeros(100, 70)
    for window in windows:
        y1, y2, x1, x2 = window
        cover[y1:y2, x1:x2] += weights(window)
    assert torch.equal(cover, torch.ones(100, 70))
    with pytest.raises(ValueError, match="one of mean, hann"):
        WindowWeights(windows, 100, 70, "median")


@pytest.mark.parametrize("blend", ["mean", "hann", "gaussian", "center"])
def test_tiles_equal_slide_inference_over_the_whole_image(blend):
    """Strip by strip with rows finished early gives what slide inference gives holding the whole image."""
    model, image = conv_stack(6), random_image(83, 110)
    cfg = InferenceConfig(mode="slide", crop_size=(32, 32), stride=(24, 24), blend=blend)
    with torch.no_grad():
        expected = image_logits(model, as_input(image)[None], cfg)[0]  # the recipe's key reaches slide inference
    assert torch.equal(expected, slide_logits(model, as_input(image)[None], (32, 32), (24, 24), blend)[0])
    with torch.no_grad():
        labels, probs, valid = assemble(tiled(ArraySource(image), model, blend, batch_size=3, probabilities="float32"))
    assert valid is None
    torch.testing.assert_close(torch.from_numpy(probs), expected.softmax(0), atol=2e-6, rtol=0)
    confident = expected.softmax(0).topk(2, 0).values.diff(dim=0).abs()[0] > 1e-4
    assert np.array_equal(labels[confident.numpy()], expected.argmax(0).numpy()[confident.numpy()])


def test_tiles_equal_whole_image_inference_where_the_receptive_field_fits_the_overlap():
    # Receptive-field radius 4 <= (crop - stride) / 2 = 4: every pixel is kept from a tile in
    # which its whole receptive field lies, so "center" tiles equal the whole image run at once.
    model, image = conv_stack(4), random_image(150, 131, seed=1)
    whole = whole_logits(model, image)
    with torch.no_grad():
        labels, probs, _ = assemble(tiled(ArraySource(image), model, "center", probabilities="float32"))
    torch.testing.assert_close(torch.from_numpy(probs), whole.softmax(0), atol=2e-6, rtol=0)
    confident = (whole.softmax(0).topk(2, 0).values.diff(dim=0).abs()[0] > 1e-4).numpy()
    assert np.array_equal(labels[confident], whole.argmax(0).numpy()[confident])


def test_seam_error_where_the_receptive_field_outgrows_the_overlap():
    """Radius 9 > the 4 pixels of margin: only pixels that some tile saw nearer its edge than
    their receptive field differ from whole-image inference. The errors are printed (-s)."""
    model, image = conv_stack(9, seed=2), random_image(150, 131, seed=3)
    whole = whole_logits(model, image).softmax(0).numpy()
    windows = slide_windows(150, 131, (32, 32), (24, 24))
    margin = distance_to_a_tile_edge(windows, 150, 131)
    seam_error = {}
    for blend in ("mean", "hann", "gaussian", "center"):
        with torch.no_grad():
            _, probs, _ = assemble(tiled(ArraySource(image), model, blend, probabilities="float32"))
        error = np.abs(probs - whole).max(0)
        assert error[margin >= 9].max() < 2e-6, blend  # every covering tile saw the whole field
        seam_error[blend] = error[margin < 9]
        print(f"{blend}: seam error max {seam_error[blend].max():.4f} mean {seam_error[blend].mean():.5f}")
    # The cut-off fields show; windows that fall off toward the tile edges show them less
    # (measured: mean 0.0071, hann and gaussian 0.0008, center 0.0012 at most).
    assert min(error.max() for error in seam_error.values()) > 1e-4
    assert max(seam_error[blend].max() for blend in ("hann", "gaussian", "center")) < seam_error["mean"].max() / 3


def test_rows_are_read_forward_once_and_finished_early():
    class Recording(ArraySource):
        reads: list[tuple[int, int]] = []

        def read(self, top, bottom):
            self.reads.append((top, bottom))
            return super().read(top, bottom)

    image = random_image(200, 64)
    source = Recording(image)
    predictor = tiled(source, conv_stack(2), "hann")
    tops = []
    with torch.no_grad():
        for block in predictor.rows():
            tops.append((block.top, len(block.labels)))
            assert max(bottom for _, bottom in source.reads) <= block.top + 32 + 24  # rows in flight only
    assert [top for top, _ in source.reads] == sorted(top for top, _ in source.reads)
    covered = [row for top, bottom in source.reads for row in range(top, bottom)]
    assert covered == list(range(200))  # every row read exactly once
    assert sum(n for _, n in tops) == 200 and len(tops) == len({w[:2] for w in predictor.windows})


def test_nodata_tiles_are_skipped_and_stay_invalid():
    image = random_image(96, 120, seed=4)
    valid = np.ones(image.shape[:2], bool)
    valid[:, :40] = False  # a collar wider than a tile
    valid[70:, 100:] = False
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return conv_stack(3)(batch)

    predictor = tiled(ArraySource(image, valid), counting, "gaussian")
    with torch.no_grad():
        labels, _, got_valid = assemble(predictor)
    assert np.array_equal(got_valid, valid)
    skipped = sum(1 for _, _, x1, x2 in predictor.windows if not valid[:, x1:x2].any())
    assert skipped and sum(calls) == len(predictor.windows) - skipped
    reference, _, _ = assemble(tiled(ArraySource(image), conv_stack(3), "gaussian"))
    # a skipped tile holds no valid pixel, so every valid pixel has all its tiles
    assert np.array_equal(labels[valid], reference[valid])
