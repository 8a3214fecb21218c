"""Affinities for one block: read raw around it, normalise, predict its patches, blend.

Everything here is a function of the block's write box and the global patch lattice only, so
the same voxel gets the same value whichever block computes it (see :mod:`.blend`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssn_deploy.errors import InvalidInputError, SsnDeployError
from ssn_deploy.geometry import Box
from ssn_deploy.inference.blend import PatchGrid
from ssn_deploy.inference.predictor import Predictor
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.volumes import Volume, reflect_read


class NonFiniteOutputError(SsnDeployError):
    """The model returned NaN or infinite affinities (a broken model or backend)."""


def check_float_raw(raw: np.ndarray, origin: Sequence[int]) -> None:
    """Every voxel of float raw finite and in [0, 1] (check_raw only samples chunks); names the
    first bad voxel in volume coordinates. uint8 raw needs no check."""
    if raw.dtype == np.uint8:
        return
    bad = ~np.isfinite(raw) | (raw < 0) | (raw > 1)
    if bad.any():
        first = tuple(int(i) + int(o) for i, o in zip(np.argwhere(bad)[0], origin, strict=True))
        value = float(raw[tuple(np.argwhere(bad)[0])])
        raise InvalidInputError(
            f"raw voxel {first} is {value:g}: float raw must be finite and in [0, 1]"
        )


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
    data = reflect_read(raw, region)
    inside = region.intersect(Box.from_shape(raw.shape))  # the rest mirrors these voxels
    check_float_raw(data[inside.relative_to(region).slices], inside.begin)
    x = normalize(data, predictor.normalization)
    window = grid.window()
    acc = np.zeros((predictor.num_channels, *write_box.shape), dtype=np.float32)
    weight = np.zeros(write_box.shape, dtype=np.float32)
    for start in range(0, len(cores), batch_size):
        batch_cores = cores[start : start + batch_size]
        patches = [x[grid.input_box(c).relative_to(region).slices] for c in batch_cores]
        out = predictor.predict(np.stack(patches)[:, None])
        if not np.isfinite(out).all():
            raise NonFiniteOutputError(
                f"the model returned NaN or infinite affinities for the patch at "
                f"{batch_cores[0].begin} (check the model file and backend precision)"
            )
        for core, y in zip(batch_cores, out, strict=True):
            valid = core.intersect(write_box)
            w = window[valid.relative_to(core).slices]
            src = (slice(None), *valid.relative_to(grid.input_box(core)).slices)
            dst = valid.relative_to(write_box).slices
            acc[(slice(None), *dst)] += w * y[src]
            weight[dst] += w
    return acc / weight
