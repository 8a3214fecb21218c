"""Fragments: a seeded watershed over the boundary map that floods every voxel.

The boundary map is 1 − mean affinity: of the in-plane channels per section for anisotropic
data (DESIGN §2), of all channels in 3D for isotropic data (otherwise membranes that lie in
the x-y plane are invisible). Seeds are the maxima of the distance transform of the cell
interior (boundary < 0.5), plus one seed for every interior component that holds no maximum
(a thin process beside a thick one loses the maximum-filter contest and would be swallowed).
The watershed then floods the whole block, boundary voxels included, so fragments cover the
foreground without gaps: fragments that only touch through a leak would otherwise merge in
agglomeration (DESIGN §2, measured as VOI 3+ on ``fib_medulla_250``).
"""

from __future__ import annotations

from collections.abc import Sequence

import edt
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from ssn_deploy.affinities import DEFAULT_OFFSETS, Offset, boundary_map
from ssn_deploy.agglomeration.flood import seeded_watershed

BOUNDARY_THRESHOLD = 0.5


def xy_channels(offsets: Sequence[Offset]) -> list[int]:
    """Channels of the in-plane (z = 0) offsets; the boundary map uses them only."""
    channels = [c for c, off in enumerate(offsets) if off[0] == 0]
    if not channels:
        raise ValueError(f"no in-plane offsets among {list(offsets)}")
    return channels


def _seeds(interior: np.ndarray, min_seed_distance: int, sampling: Sequence[float]) -> np.ndarray:
    """Connected maxima of the interior's distance transform, labelled 1..n (0 elsewhere)."""
    distance = edt.edt(interior.astype(np.uint8), anisotropy=tuple(sampling), parallel=1)
    size = 2 * min_seed_distance + 1
    footprint = np.ones((size,) * interior.ndim, dtype=bool)
    maxima = (distance == ndimage.maximum_filter(distance, footprint=footprint)) & interior
    seeds, n = ndimage.label(maxima)
    components, _ = ndimage.label(interior)
    seeded = np.zeros(components.max() + 1, dtype=bool)
    seeded[components[maxima]] = True
    unseeded = ~seeded[components] & interior
    extra, _ = ndimage.label(unseeded)
    seeds[unseeded] = extra[unseeded] + n
    return seeds


FLOODS = {
    "bucket": seeded_watershed,  # compiled bucket queue (flood.py): the default, ~4x faster
    "skimage": lambda boundary, seeds: watershed(boundary, markers=seeds),
}
"""Seeded watershed implementations; ``skimage`` stays for comparison (benchmarks)."""


def _watershed(
    boundary: np.ndarray, min_seed_distance: int, flood: str = "bucket"
) -> tuple[np.ndarray, int]:
    interior = boundary < BOUNDARY_THRESHOLD
    seeds = _seeds(interior, min_seed_distance, (1.0,) * boundary.ndim)
    if seeds.max() == 0:  # no interior at all: one fragment for the whole region
        return np.ones(boundary.shape, np.uint64), 1
    frags = FLOODS[flood](boundary, seeds)
    return frags.astype(np.uint64), int(seeds.max())


def watershed_fragments(
    affs: np.ndarray,
    *,
    offsets: Sequence[Offset] = DEFAULT_OFFSETS,
    anisotropic: bool = False,
    min_seed_distance: int = 3,
    id_offset: int = 0,
    flood: str = "bucket",
) -> np.ndarray:
    """Fragments (uint64, 1-based plus ``id_offset``, no zeros) from affinities ``[C, Z, Y, X]``.

    ``anisotropic`` runs a 2D watershed per section (serial-section EM, where z context is
    unreliable); otherwise 3D (isotropic FIB-SEM). ``id_offset`` makes ids unique across blocks.
    """
    if affs.ndim != 4 or affs.shape[0] != len(offsets):
        raise ValueError(f"affinities must be [{len(offsets)}, Z, Y, X], got {affs.shape}")
    if not anisotropic:
        boundary = boundary_map(affs)
        frags, _ = _watershed(boundary, min_seed_distance, flood)
        return frags + np.uint64(id_offset) if id_offset else frags
    boundary = boundary_map(affs, xy_channels(offsets))
    out = np.empty(boundary.shape, np.uint64)
    next_id = id_offset
    for z in range(boundary.shape[0]):
        frags, n = _watershed(boundary[z], min_seed_distance, flood)
        out[z] = frags + np.uint64(next_id)
        next_id += n
    return out
