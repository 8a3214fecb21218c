"""Affinities for one block: read raw around it, normalise, predict its patches, blend.

Everything here is a function of the block's write box and the global patch lattice only, so
the same voxel gets the same value whichever block computes it (see :mod:`.blend`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssn_deploy.geometry import Box
from ssn_deploy.inference.blend import PatchGrid
from ssn_deploy.inference.predictor import Predictor
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.volumes import Volume, reflect_read


def normalize(raw: np.ndarray, normalization: Normalization) -> np.ndarray:
    """uint8 raw, or float raw already in [0, 1], → the model's (global) input scale."""
    if raw.dtype == np.uint8:
        return normalization(raw)
    return normalization.from_unit(raw.astype(np.float32, copy=False))


def _bounding_box(boxes: Sequence[Box]) -> Box:
    begin = np.min([b.begin for b in boxes], axis=0)
    end = np.max([b.end for b in boxes], axis=0)
    return Box.from_bounds(begin.tolist(), end.tolist())


def predict_block(
    raw: Volume, write_box: Box, predictor: Predictor, grid: PatchGrid, batch_size: int = 1
) -> np.ndarray:
    """``float32[C, *write_box.shape]`` affinities for ``write_box`` of the 3D volume ``raw``.

    Memory: the raw under the block's patches (about the block grown by one patch each side)
    as float32, plus the C-channel accumulator of the block.
    """
    cores = grid.cores_for(write_box)
    region = _bounding_box([grid.input_box(c) for c in cores])
    x = normalize(reflect_read(raw, region), predictor.normalization)
    window = grid.window()
    acc = np.zeros((predictor.num_channels, *write_box.shape), dtype=np.float32)
    weight = np.zeros(write_box.shape, dtype=np.float32)
    for start in range(0, len(cores), batch_size):
        batch_cores = cores[start : start + batch_size]
        patches = [x[grid.input_box(c).relative_to(region).slices] for c in batch_cores]
        out = predictor.predict(np.stack(patches)[:, None])
        for core, y in zip(batch_cores, out, strict=True):
            valid = core.intersect(write_box)
            w = window[valid.relative_to(core).slices]
            src = (slice(None), *valid.relative_to(grid.input_box(core)).slices)
            dst = valid.relative_to(write_box).slices
            acc[(slice(None), *dst)] += w * y[src]
            weight[dst] += w
    return acc / weight
