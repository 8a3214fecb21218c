"""Test-time augmentation: average a predictor's affinities over flipped copies of each patch.

A flip along an axis turns an affinity to the voxel *before* (offset −1) into one to the voxel
*after*; flipping the output back and shifting that channel by its offset restores its meaning:
``aff_o[v] = aff_{−o}[v + o]`` (:func:`~ssn_deploy.affinities.at_offset`). The shift needs
``|o|`` voxels beyond each patch face, so the context grows by the offsets' reach (the engine
drops it with the margin). Cost: one model call per flip combination (4 for ``"yx"``, 8 for
``"zyx"``), measured in the README.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ssn_deploy.affinities import at_offset
from ssn_deploy.inference.predictor import Predictor

AXES = {"z": 0, "y": 1, "x": 2}


class FlipAveragedPredictor:
    """A :class:`Predictor` that averages ``inner`` over all flips of ``axes`` (e.g. "yx")."""

    def __init__(self, inner: Predictor, axes: str = "yx") -> None:
        if not axes or any(a not in AXES for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"flip axes must be a non-empty subset of 'zyx', got {axes!r}")
        self.inner = inner
        self.axes = "".join(a for a in "zyx" if a in axes)
        reach = np.abs(np.asarray(inner.offsets)).max(axis=0)
        self._context = tuple(int(c + r) for c, r in zip(inner.context, reach, strict=True))

    # geometry: the inner model's, with the context grown by the offsets' reach
    @property
    def context(self) -> tuple[int, int, int]:
        return self._context  # type: ignore[return-value]

    @property
    def granularity(self) -> tuple[int, int, int]:
        return self.inner.granularity

    @property
    def num_channels(self) -> int:
        return self.inner.num_channels

    @property
    def offsets(self) -> tuple[tuple[int, int, int], ...]:
        return self.inner.offsets

    @property
    def normalization(self) -> Any:
        return self.inner.normalization

    @property
    def voxel_size(self) -> tuple[float, float, float] | None:
        return self.inner.voxel_size

    @property
    def spec(self) -> Any:
        return getattr(self.inner, "spec", None)

    @property
    def provenance(self) -> dict[str, Any]:
        return {**self.inner.provenance, "tta": f"flips {self.axes}"}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        flips = [AXES[a] for a in self.axes]
        total = np.zeros((batch.shape[0], self.num_channels, *batch.shape[2:]), np.float32)
        combos = [c for n in range(len(flips) + 1) for c in itertools.combinations(flips, n)]
        for combo in combos:
            spatial = tuple(2 + a for a in combo)  # batch axes: N, C, Z, Y, X
            x = np.ascontiguousarray(np.flip(batch, spatial)) if combo else batch
            y = self.inner.predict(x)
            if combo:
                y = np.flip(y, spatial)
                for c, offset in enumerate(self.offsets):
                    y[:, c] = at_offset(y[:, c], [offset[a] if a in combo else 0 for a in range(3)])
            total += y
        return total / np.float32(len(combos))
