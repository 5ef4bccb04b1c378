"""The session-wide MMSegmentation environment, installed on first use, and the zoo models
it builds (random weights, MMSegmentation's own code) for the parity tests and the docs' commands.

tests/conftest.py exposes it to every test module with
``from mmseg_ref.fixtures import mmseg_env  # noqa: F401``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmseg_ref import ZOO_CONFIGS
from mmseg_ref.env import MmsegEnv


@pytest.fixture(scope="session")
def mmseg_env() -> MmsegEnv:
    """MMSegmentation 1.2.2 in its own ``pip --target`` directory: ``$HOOKTRAIN_MMSEG_CACHE`` or
    ``~/.cache/hooktrain/mmseg-1.2.2``; ~15-20 s the first time (PyPI), then reused."""
    return MmsegEnv.install()


CONFIGS = ZOO_CONFIGS
# DeepLabV3 has no recipe of its own here: PSPNet's with the ASPP head.
DEEPLABV3 = "deeplabv3_r50-d8_4xb4-160k_ade20k-512x512"
DEEPLABV3_HEAD = (
    "model.decode_head={type: aspp, in_index: 3, channels: 512, dilations: [1, 12, 24, 36], dropout: 0.1,"
    " losses: [{type: cross_entropy, avg_non_ignore: false}]}"
)
# Odd sides; and at 128x160 no Swin stage map (32x40 .. 4x5) is a whole number of 7x7 windows.
SIZES = "97x131,128x160"


@pytest.fixture(scope="session")
def mmseg_zoo_references(mmseg_env, tmp_path_factory) -> dict[str, Path]:
    """Each config's zoo-format checkpoint and logits (``reference.py build``), by name."""
    script = Path(__file__).parent / "reference.py"
    root = tmp_path_factory.mktemp("mmseg_references")
    names = [*CONFIGS, DEEPLABV3]
    mmseg_env.run(script, "build-all", ",".join(names), "--out", str(root), "--sizes", SIZES)
    return {name: root / name for name in names}
