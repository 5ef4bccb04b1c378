"""hooktrain's Mask2Former against MMSegmentation 1.2.2's own (mmdet 3.3.0's ``Mask2FormerHead``).

recipes/mmseg's two Mask2Former configs (ResNet-50, Swin-T) are built by MMSegmentation from its
own config files in the throwaway environment of ``tests/mmseg_ref`` (with mmdet beside it, as
test_mask2former_recipes.py installs it), with random weights, and saved as zoo checkpoints
(``tests/mmseg_ref/mask2former_reference.py``). ``hooktrain convert mmseg`` with the config's
recipe turns each into hooktrain's model, whose logits must be ``Mask2FormerHead.predict``'s
``seg_logits`` (through ``encode_decode``) at two input sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, run_cli
from test_mask2former_recipes import NAMES, R50, mmdet_site

from hooktrain.deploy.convert import convert
from hooktrain.deploy.export import load_exported
from hooktrain.errors import UserError

TOLERANCE = 1e-4
SIZES = "64x64,96x128"  # Swin-T's last stage 2x2 and 3x4: smaller than its 7x7 windows, padded to them


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def recipe(name: str) -> str:
    return str(RECIPES / "mmseg" / f"{name}.yaml")


@pytest.fixture(scope="module")
def references(mmseg_env, tmp_path_factory) -> dict[str, Path]:
    """Each config's zoo-format checkpoint, logits and attention-mask statistics, by name."""
    root = tmp_path_factory.mktemp("mask2former_mmseg")
    script = Path(__file__).parents[1] / "mmseg_ref" / "mask2former_reference.py"
    mmseg_env.run(script, "--mmdet", str(mmdet_site(mmseg_env)), ",".join(NAMES), "--out", str(root), "--sizes", SIZES)
    return {name: root / name for name in NAMES}


@pytest.fixture(scope="module")
def converted(references, tmp_path_factory) -> dict[str, Path]:
    """Each checkpoint through ``hooktrain convert mmseg``: the ResNet-50 one by the command line,
    the Swin-T one by :func:`hooktrain.deploy.convert.convert` (what the command calls)."""
    out = tmp_path_factory.mktemp("mask2former_converted")
    files = {name: out / f"{name}.safetensors" for name in NAMES}
    for name in NAMES:
        source = str(references[name] / "checkpoint.pth")
        if name == R50:
            result = run_cli("convert", "mmseg", source, "--recipe", recipe(name), "--out", str(files[name]))
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            convert("mmseg", source, recipe(name), files[name])
    return files


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_converted_mask2former_computes_mmsegmentations_function(references, converted, name):
    reference = references[name]
    model, _ = load_exported(converted[name])
    info = json.loads((reference / "info.json").read_text())
    assert info["decode_head"]["type"] == "Mask2FormerHead"
    assert sum(p.numel() for p in model.parameters()) == info["num_params"]
    cases = torch.load(reference / "logits.pt")
    assert sorted(cases) == sorted(SIZES.split(","))
    errors = {}
    for size, case in cases.items():
        with torch.no_grad():
            got = model(case["input"])
        assert got.shape == case["logits"].shape, size
        errors[size] = relative_error(got, case["logits"])
    print(name, "max relative error", errors)
    assert all(error <= TOLERANCE for error in errors.values()), errors
    # Not vacuous: at every size, some layer's cross-attention masked part of its level and let the
    # rest through, and some query's mask covered no pixel ("all masked": it then attends everywhere).
    # (The last call's mask is never used: it follows the last layer.)
    stats = json.loads((reference / "attention_masks.json").read_text())
    assert sorted(stats) == sorted(SIZES.split(","))
    for calls in stats.values():
        assert len(calls) == 10  # the initial queries' prediction and one per decoder layer
        used = calls[:-1]
        assert any(0.05 < call["masked_share"] < 0.95 for call in used), calls
        assert any(call["queries_all_masked"] > 0 for call in used), calls


@pytest.mark.slow
def test_a_key_mask2former_has_no_counterpart_for_is_named(references, tmp_path):
    checkpoint = torch.load(references[R50] / "checkpoint.pth", weights_only=True)
    checkpoint["state_dict"]["decode_head.transformer_decoder.layers.0.extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"1 keys hooktrain has no counterpart for "
                                        r"\(decode_head\.transformer_decoder\.layers\.0\.extra\.weight\); "
                                        r"is it MMSegmentation's Mask2Former"):  # fmt: skip
        convert("mmseg", str(tmp_path / "extra.pth"), recipe(R50), tmp_path / "x.safetensors")
    # a Swin-T checkpoint into the ResNet-50 recipe: the backbone does not fit
    with pytest.raises(UserError, match=r"does not fit the recipe's model: .*model tensors not filled"):
        convert("mmseg", str(references[NAMES[1]] / "checkpoint.pth"), recipe(R50), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
