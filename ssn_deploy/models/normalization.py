"""Global intensity normalisation of uint8 raw, carried by the model (never per block).

Per-block statistics would make a voxel's prediction depend on which block it fell in; a fixed
mapping stored in the checkpoint keeps blockwise inference seamless and reproducible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ssn_deploy.errors import ConfigError


@dataclass(frozen=True)
class Normalization:
    """``(raw / 255 − mean) / std``; the default maps [0, 255] onto [−1, 1]."""

    mean: float = 0.5
    std: float = 0.5
    kind: str = "scale"

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """uint8 raw → normalised float32."""
        return self.from_unit(np.asarray(raw, dtype=np.float32) / np.float32(255.0))

    def from_unit(self, x: np.ndarray) -> np.ndarray:
        """Raw already scaled to [0, 1] (e.g. after intensity augmentation) → normalised."""
        return ((x - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32, copy=False)

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`from_unit`: model input back to [0, 1] intensities."""
        return (x * np.float32(self.std) + np.float32(self.mean)).astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        norm = cls(**d)
        if norm.kind not in ("scale", "meanstd") or not norm.std > 0:
            raise ConfigError(f"normalization: invalid {d!r}")
        return norm

    @classmethod
    def measure(cls, raw: np.ndarray) -> Normalization:
        """Mean/std of a whole training volume (in [0, 1] units)."""
        x = np.asarray(raw, dtype=np.float64) / 255.0
        return cls(mean=float(x.mean()), std=max(float(x.std()), 1e-3), kind="meanstd")
