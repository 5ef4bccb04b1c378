"""bench/route.py: the route from ``hooktrain RECIPE`` to the first iteration, traced in a real
run, stays short and does not wander back and forth between modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_route_to_the_first_iteration_is_short(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, str(ROOT / "bench" / "route.py")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    route = json.loads(result.stdout.strip().splitlines()[-1])
    order = route["module_order"]
    # the traced route: the CLI reads the recipe, then the runner builds data before the model
    assert order[0] == "hooktrain.recipe.schema" and "hooktrain.engine.runner" in order
    assert order.index("hooktrain.data.stream") < order.index("hooktrain.models.segmentor")
    # docs/architecture.md's figures: 30 stops in 12 modules, 9 climbs back (30, 12, 12 before
    # issue 31, which also added the work dir's lock: 3 stops)
    assert route["stops"] <= 30 and route["modules"] <= 12 and route["climbs_back"] <= 9, route
