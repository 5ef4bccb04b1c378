"""The random draws of MMSegmentation's transforms, for hooktrain's transforms to make too."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class MmsegDraws:
    """The draws ``np.random.seed(seed)`` gives MMSegmentation's transforms (``random_sample``,
    ``randint``, ``uniform``; RandomFlip's ``choice`` with p=[0.5, 0.5] takes one
    ``random_sample``), behind the ``Generator`` methods hooktrain's ``TrainTransform`` calls,
    without touching numpy's global state. With the seed MMSegmentation's side was given,
    hooktrain's pipeline makes the same random choices and so produces the same crops."""

    def __init__(self, seed: int | Sequence[int]) -> None:
        self._state = np.random.RandomState(seed)

    def random(self) -> float:
        return self._state.random_sample()

    def integers(self, low: int, high: int | None = None) -> int:
        return self._state.randint(low, high)

    def uniform(self, low: float, high: float) -> float:
        return self._state.uniform(low, high)
