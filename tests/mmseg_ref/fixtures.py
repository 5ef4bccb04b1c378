"""The session-wide MMSegmentation environment, installed on first use."""

from __future__ import annotations

import pytest

from mmseg_ref.env import MmsegEnv


@pytest.fixture(scope="session")
def mmseg_env() -> MmsegEnv:
    """MMSegmentation 1.2.2 in its own ``pip --target`` directory (cached across sessions)."""
    return MmsegEnv.install()
