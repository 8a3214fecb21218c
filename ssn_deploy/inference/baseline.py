"""The no-network baseline as a Predictor: an edge is as bright as its darker end.

Membranes are dark in these EM stains, so intensity alone is a (poor) affinity map: the
affinity of voxel v to v + offset is min(I(v), I(v + offset)). Taking the darker end matters
for serial sections: a plain I(v) for the z edge links every bright cell interior to whatever
lies in the next section, so all cells merge through z (measured worse than one segment on
``fib_medulla_250_aniso5``); with the minimum, a membrane on either side breaks the edge.
Running it through the very same engine, fragments and agglomeration as a model makes it the
floor every model is measured against (``ssn-deploy infer VOLUME --model intensity``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssn_deploy.affinities import DEFAULT_OFFSETS, at_offset
from ssn_deploy.inference.predictor import SpecGeometry
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.models.spec import ModelSpec

NAME = "intensity"


class IntensityPredictor(SpecGeometry):
    """``predict`` returns min(I(v), I(v + offset)) per offset, I = raw / 255 clipped to [0, 1].

    Its context is the offsets' reach: a patch's last voxels use themselves for the missing
    neighbour and are dropped as margin.
    """

    def __init__(self) -> None:
        self.spec = ModelSpec(
            offsets=DEFAULT_OFFSETS,
            granularity=(1, 1, 1),
            context=(1, 1, 1),
            normalization=Normalization(mean=0.0, std=1.0),
        )

    @property
    def provenance(self) -> dict[str, Any]:
        return {"model": NAME, "backend": "baseline", "precision": "fp32"}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        x = np.clip(batch[:, 0], 0.0, 1.0)
        out = np.empty((x.shape[0], self.num_channels, *x.shape[1:]), np.float32)
        for c, offset in enumerate(self.offsets):
            out[:, c] = np.minimum(x, at_offset(x, offset))
        return out
