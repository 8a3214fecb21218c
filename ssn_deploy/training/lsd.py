"""Local shape descriptors (Sheridan et al. 2022), an auxiliary training target.

For a voxel v of object s, the 10 descriptors summarise the part of s within a Gaussian window
of width ``sigma`` around v: the offset from v to that part's centre of mass (3), its variance
along each axis (3), its Pearson correlations between axes (3) and its mass, the fraction of the
window it fills (1). Predicting them next to the affinities makes the network encode object
shape, not just boundaries (the "lsd-lite" auxiliary task); a training-only head predicts them,
so shipped models and inference are unchanged.

Computed per object on its bounding box grown by the window's reach, on a grid ``downsample``
times coarser (per axis: 1×2×2 keeps 50 nm sections whole), as the reference implementation
does, then repeated back to full resolution.
Every component is scaled into [0, 1] so one squared-error loss on sigmoid outputs fits all.
"""

from __future__ import annotations

from collections.abc import Sequence

import fastremap
import numpy as np
from scipy import ndimage

CHANNELS = 10
TRUNCATE = 3.0
_PAIRS = ((0, 1), (0, 2), (1, 2))


def local_shape_descriptors(
    labels: np.ndarray,
    sigma: float,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    downsample: int | Sequence[int] = 1,
) -> np.ndarray:
    """``float32[10, Z, Y, X]`` in [0, 1] for ``labels`` (0 = background: all zeros there).

    ``sigma`` is in the units of ``voxel_size`` (nm): anisotropic voxels get a window of the
    same physical width along each axis.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    factors = (downsample,) * 3 if isinstance(downsample, int) else tuple(downsample)
    if not sigma > 0 or len(factors) != 3 or min(factors) < 1:
        raise ValueError(f"sigma must be > 0 and downsample >= 1, got {sigma}, {downsample}")
    step = np.asarray(voxel_size, float) * factors
    coarse = labels[tuple(slice(None, None, f) for f in factors)]
    sigmas = sigma / step
    reach = np.ceil(TRUNCATE * sigmas).astype(int)
    out = np.zeros((CHANNELS, *coarse.shape), np.float32)
    # objects numbered 1..n (0 kept) so that find_objects gives each one's box
    dense, _ = fastremap.renumber(coarse, start=1, preserve_zero=True, in_place=False)
    for index, box in enumerate(ndimage.find_objects(dense), start=1):
        if box is None:
            continue
        grown = tuple(
            slice(max(b.start - r, 0), min(b.stop + r, n))
            for b, r, n in zip(box, reach, coarse.shape, strict=True)
        )
        mask = dense[grown] == index
        descriptors = _descriptors(mask, sigmas, step, sigma)
        out[(slice(None), *grown)][:, mask] = descriptors[:, mask]
    if factors == (1, 1, 1):
        return out
    return _upsample(out, labels, factors)


def _upsample(coarse: np.ndarray, labels: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Each fine voxel takes its coarse sample's descriptors (nearest neighbour, as the
    reference implementation does); voxels of background at full resolution get zeros."""
    full = coarse
    for axis, factor in enumerate(factors, start=1):
        full = np.repeat(full, factor, axis=axis)
    full = np.array(full[(slice(None), *(slice(0, n) for n in labels.shape))])
    full[:, labels == 0] = 0.0
    return full


def _descriptors(
    mask: np.ndarray, sigmas: np.ndarray, step: np.ndarray, sigma: float
) -> np.ndarray:
    """The 10 scaled descriptors at every voxel of ``mask``'s box (valid where mask holds)."""

    def smooth(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigmas, mode="constant", truncate=TRUNCATE)

    m = mask.astype(np.float64)
    coords = np.meshgrid(
        *(np.arange(n) * s for n, s in zip(mask.shape, step, strict=True)), indexing="ij"
    )
    mass = smooth(m)
    safe = np.where(mass > 1e-8, mass, 1.0)
    means = [smooth(m * c) / safe for c in coords]
    second = {
        (i, j): smooth(m * coords[i] * coords[j]) / safe - means[i] * means[j]
        for i in range(3)
        for j in range(i, 3)
    }
    variances = [np.maximum(second[(i, i)], 0.0) for i in range(3)]
    result = np.empty((CHANNELS, *mask.shape), np.float32)
    for i in range(3):
        result[i] = np.clip((means[i] - coords[i]) / sigma * 0.5 + 0.5, 0.0, 1.0)
        result[3 + i] = np.clip(variances[i] / sigma**2, 0.0, 1.0)
    for k, (i, j) in enumerate(_PAIRS):
        denom = np.sqrt(variances[i] * variances[j])
        pearson = np.divide(second[(i, j)], denom, out=np.zeros_like(denom), where=denom > 1e-8)
        result[6 + k] = np.clip(pearson * 0.5 + 0.5, 0.0, 1.0)
    result[9] = np.clip(mass, 0.0, 1.0)
    return result
