"""The Predictor protocol: the seam between the block engine and whatever can predict.

The engine only sees ``predict(float32[N,1,Z,Y,X]) -> float32[N,C,Z,Y,X]`` and the geometry
of :class:`~ssn_deploy.models.spec.ModelSpec`, so torch, onnxruntime, TensorRT or Triton
backends are interchangeable.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ssn_deploy.errors import InvalidInputError
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.models.spec import METADATA_KEYS, METADATA_PREFIX, ModelSpec, Triple

__all__ = [
    "METADATA_KEYS",
    "METADATA_PREFIX",
    "ModelSpec",
    "Predictor",
    "SpecGeometry",
    "Triple",
]


@runtime_checkable
class Predictor(Protocol):
    """Maps normalised raw patches to affinities, and says what geometry it needs.

    ``predict`` takes ``float32[N, 1, Z, Y, X]`` with Z, Y, X multiples of ``granularity`` and
    returns ``float32[N, num_channels, Z, Y, X]`` in [0, 1] ("same" shape). Outputs within
    ``context`` of a patch border saw padding, so the engine crops them. Inputs are normalised
    by the caller with ``normalization`` (global, never per block).
    """

    @property
    def context(self) -> Triple: ...

    @property
    def granularity(self) -> Triple: ...

    @property
    def num_channels(self) -> int: ...

    @property
    def offsets(self) -> tuple[Triple, ...]: ...

    @property
    def normalization(self) -> Normalization: ...

    @property
    def voxel_size(self) -> tuple[float, float, float] | None:
        """nm of the training data, if known (the engine warns on a mismatch)."""
        ...

    @property
    def provenance(self) -> dict[str, Any]:
        """Model, backend and options, recorded in the output's attributes."""
        ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


class SpecGeometry:
    """The :class:`Predictor` geometry of a backend that holds a :class:`ModelSpec`."""

    spec: ModelSpec

    @property
    def context(self) -> Triple:
        return self.spec.context

    @property
    def granularity(self) -> Triple:
        return self.spec.granularity

    @property
    def num_channels(self) -> int:
        return self.spec.num_channels

    @property
    def offsets(self) -> tuple[Triple, ...]:
        return self.spec.offsets

    @property
    def normalization(self) -> Normalization:
        return self.spec.normalization

    @property
    def voxel_size(self) -> tuple[float, float, float] | None:
        return self.spec.voxel_size

    def check_batch(self, batch: np.ndarray) -> None:
        """Raise a clear error instead of a backend's opaque one for a malformed batch."""
        g = self.spec.granularity
        if (
            batch.ndim != 5
            or batch.shape[1] != 1
            or batch.dtype != np.float32
            or any(s % m or s == 0 for s, m in zip(batch.shape[2:], g, strict=True))
        ):
            raise InvalidInputError(
                f"predictor input must be float32 N×1×Z×Y×X with Z,Y,X multiples of {g}, "
                f"got {batch.dtype} {batch.shape}"
            )
