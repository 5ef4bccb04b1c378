"""The plugin authoring kit: examples/hooktrain-ema installs as its own distribution, is
listed by `hooktrain plugins`, and its average is evaluated and checkpointed in a real run."""

from __future__ import annotations

import torch
from conftest import ENV, QUICKSTART, ROOT, ensure_installed, read_probe, run_cli, tiny
from probe_hooks import digest


def test_ema_plugin_package_is_discovered_evaluated_and_checkpointed(tmp_path, data_root):
    ensure_installed("hooktrain-ema", ROOT / "examples" / "hooktrain-ema")
    listing = run_cli("plugins")
    line = next(line for line in listing.stdout.splitlines() if line.startswith("ema "))
    assert "hooktrain-ema" in line and "exponential moving average" in line

    prefix, work_dir = tmp_path / "p", tmp_path / "run"
    hooks = (
        "hooks=[{type: ema, momentum: 0.2}, {type: eval, interval: 4, num_samples: 0}, "
        f"{{type: checkpoint, interval: 4}}, {{type: 'probe_hooks:ProbeHook', prefix: '{prefix}'}}]"
    )
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(work_dir),
        "--cfg-options", *tiny(data_root, 4), hooks, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_probe(prefix)
    ema_state = torch.load(work_dir / "checkpoints" / "iter_4" / "hooks.pt", weights_only=False)["ema"]
    assert int(ema_state["n_averaged"]) == 4
    param_names = {name for name, _ in quickstart_model().named_parameters()}
    averaged = [(k, v) for k, v in ema_state["weights"].items() if k in param_names]
    # The eval hook saw the average (swapped in at before_val) ...
    assert record["before_val_params_sha256"] == digest(averaged)
    # ... and training continued from the raw weights, which differ from it.
    assert record["params_sha256"] != record["before_val_params_sha256"]


def quickstart_model() -> torch.nn.Module:
    """The quickstart's segmentor (for its parameter names; buffers are not parameters)."""
    from hooktrain.models import build_segmentor
    from hooktrain.recipe.schema import load_recipe

    recipe = load_recipe(QUICKSTART)
    return build_segmentor(recipe.model, num_classes=recipe.data.num_classes, in_channels=recipe.data.in_channels)
