"""The no-network baseline as a Predictor: every affinity channel is the raw intensity.

Membranes are dark in these EM stains, so intensity alone is a (poor) affinity map. Running it
through the very same engine, fragments and agglomeration as a model makes it the floor every
model is measured against (``ssn-deploy infer VOLUME --model intensity``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssn_deploy.affinities import DEFAULT_OFFSETS
from ssn_deploy.inference.predictor import SpecGeometry
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.models.spec import ModelSpec

NAME = "intensity"


class IntensityPredictor(SpecGeometry):
    """``predict`` returns the input intensity (raw / 255) once per affinity channel."""

    def __init__(self) -> None:
        self.spec = ModelSpec(
            offsets=DEFAULT_OFFSETS,
            granularity=(1, 1, 1),
            context=(0, 0, 0),
            normalization=Normalization(mean=0.0, std=1.0),
        )

    @property
    def provenance(self) -> dict[str, Any]:
        return {"model": NAME, "backend": "baseline", "precision": "fp32"}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        return np.repeat(np.clip(batch, 0.0, 1.0), self.num_channels, axis=1)
