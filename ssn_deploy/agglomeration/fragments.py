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
import numba
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from ssn_deploy.affinities import DEFAULT_OFFSETS, Offset, boundary_map, nearest_channels
from ssn_deploy.agglomeration.flood import seeded_watershed

BOUNDARY_THRESHOLD = 0.5


def xy_channels(offsets: Sequence[Offset]) -> list[int]:
    """Channels of the in-plane (z = 0) nearest-neighbour offsets: the boundary map of 2D
    fragments uses them only."""
    channels = [c for c in nearest_channels(offsets) if offsets[c][0] == 0]
    if not channels:
        raise ValueError(f"no in-plane offsets among {list(offsets)}")
    return channels


def boundary_channels(offsets: Sequence[Offset], anisotropic: bool) -> list[int] | None:
    """The channels the boundary map averages; None for all (no copy of the affinities)."""
    channels = xy_channels(offsets) if anisotropic else nearest_channels(offsets)
    return None if channels == list(range(len(offsets))) else channels


def _seeds(interior: np.ndarray, min_seed_distance: int, sampling: Sequence[float]) -> np.ndarray:
    """Connected maxima of the interior's distance transform, labelled 1..n (0 elsewhere)."""
    # squared distances: the same maxima (sqrt is strictly increasing), without the sqrt pass
    distance = edt.edtsq(interior.astype(np.uint8), anisotropy=tuple(sampling), parallel=1)
    size = 2 * min_seed_distance + 1
    footprint = np.ones((size,) * interior.ndim, dtype=bool)
    maxima = (distance == ndimage.maximum_filter(distance, footprint=footprint)) & interior
    seeds, n = ndimage.label(maxima)
    components, n_components = ndimage.label(interior)
    seeded = np.zeros(n_components + 1, dtype=bool)
    seeded[components[maxima]] = True
    # components without a maximum get seeds n+1, n+2, … in the raster order of their first
    # voxel, as labelling them again would number them (ndimage numbers in that order)
    unseeded = np.flatnonzero(~seeded[1:]) + 1
    extra = np.zeros(n_components + 1, dtype=seeds.dtype)
    extra[unseeded] = np.arange(n + 1, n + 1 + len(unseeded), dtype=seeds.dtype)
    return seeds + extra[components]


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


def stored_boundary_map(
    stored: np.ndarray, scale: float, channels: Sequence[int] | None = None
) -> np.ndarray:
    """:func:`~ssn_deploy.affinities.boundary_map` of ``stored / scale`` (uint8 affinities as
    written), bit for bit, in one pass: no float32 copy of every channel (two passes over
    4 bytes per affinity were 0.3 s of the 7.8 MVox test region's fragments)."""
    chosen = stored if channels is None else stored[list(channels)]
    if chosen.dtype != np.uint8:
        return boundary_map(chosen.astype(np.float32) / np.float32(scale))
    flat = np.ascontiguousarray(chosen).reshape(len(chosen), -1)
    return _stored_boundary(flat, np.float32(scale)).reshape(chosen.shape[1:])


@numba.njit(nogil=True, cache=True)
def _stored_boundary(flat, scale):  # pragma: no cover - compiled
    """``1 − mean`` in numpy's float32 order: each channel divided by ``scale``, summed channel
    after channel, divided by the count (``tests/test_flood.py`` checks bit equality)."""
    channels, n = flat.shape
    out = np.empty(n, np.float32)
    count = np.float32(channels)
    one = np.float32(1.0)
    for i in range(n):
        total = np.float32(flat[0, i]) / scale
        for c in range(1, channels):
            total = total + np.float32(flat[c, i]) / scale
        out[i] = one - total / count
    return out


def watershed_fragments(
    affs: np.ndarray,
    *,
    offsets: Sequence[Offset] = DEFAULT_OFFSETS,
    anisotropic: bool = False,
    min_seed_distance: int = 3,
    id_offset: int = 0,
    flood: str = "bucket",
    scale: float | None = None,
) -> np.ndarray:
    """Fragments (uint64, 1-based plus ``id_offset``, no zeros) from affinities ``[C, Z, Y, X]``
    in [0, 1], or as stored (uint8) divided by ``scale`` when it is given.

    ``anisotropic`` runs a 2D watershed per section (serial-section EM, where z context is
    unreliable); otherwise 3D (isotropic FIB-SEM). ``id_offset`` makes ids unique across blocks.
    """
    if affs.ndim != 4 or affs.shape[0] != len(offsets):
        raise ValueError(f"affinities must be [{len(offsets)}, Z, Y, X], got {affs.shape}")
    channels = boundary_channels(offsets, anisotropic)
    if scale is not None:
        boundary = stored_boundary_map(affs, scale, channels)
    else:
        boundary = boundary_map(affs, channels)
    if not anisotropic:
        frags, _ = _watershed(boundary, min_seed_distance, flood)
        return frags + np.uint64(id_offset) if id_offset else frags
    out = np.empty(boundary.shape, np.uint64)
    next_id = id_offset
    for z in range(boundary.shape[0]):
        frags, n = _watershed(boundary[z], min_seed_distance, flood)
        out[z] = frags + np.uint64(next_id)
        next_id += n
    return out
