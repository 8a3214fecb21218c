"""Affinity offsets and targets: labels → affinities, boundary widening, masks, class weights.

``aff[c, v] = 1`` iff voxel ``v`` and ``v + offsets[c]`` carry the same non-zero label. Offsets
are z,y,x voxel steps; the default is the three nearest neighbours looking backwards, as in the
"superhuman" U-Net and waterz.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Offset = tuple[int, int, int]
DEFAULT_OFFSETS: tuple[Offset, ...] = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def validate_offsets(offsets: Sequence[Sequence[int]]) -> tuple[Offset, ...]:
    """Offsets as a tuple of int triples; raises ``ValueError`` on a zero or malformed offset."""
    result = []
    for off in offsets:
        off = tuple(int(o) for o in off)
        if len(off) != 3 or off == (0, 0, 0):
            raise ValueError(f"an offset is a non-zero z,y,x triple, got {off}")
        result.append(off)
    if not result:
        raise ValueError("at least one offset is required")
    return tuple(result)  # type: ignore[return-value]


def nearest_channels(offsets: Sequence[Sequence[int]]) -> list[int]:
    """Channels of the nearest-neighbour offsets (one voxel along one axis): the affinities
    fragments and the region graph read. Longer offsets are auxiliary outputs of training
    (long-range affinities shape the features); mixed into the boundary map or the edge
    statistics they would join non-adjacent fragments."""
    channels = [c for c, off in enumerate(offsets) if sorted(map(abs, off)) == [0, 0, 1]]
    if not channels:
        raise ValueError(f"no nearest-neighbour offsets among {list(offsets)}")
    return channels


def nearest_offsets(offsets: Sequence[Sequence[int]]) -> list[Sequence[int]]:
    """The offsets of :func:`nearest_channels`, in order."""
    return [offsets[c] for c in nearest_channels(offsets)]


def widen_boundaries(labels: np.ndarray) -> np.ndarray:
    """A copy of ``labels`` with in-plane label edges set to 0 (3×3 neighbourhood per section).

    A voxel is cleared when its 3×3 (y, x) neighbourhood holds more than one non-zero label,
    which thickens every boundary to two voxels so the network sees membranes, not one-voxel
    label seams (DESIGN §2). Zeros never widen anything, and z is never widened.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be z,y,x, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    footprint = np.ones((1, 3, 3), dtype=bool)
    high = ndimage.maximum_filter(labels, footprint=footprint, mode="reflect")
    zero_as_max = np.where(labels == 0, np.iinfo(labels.dtype).max, labels)
    low = ndimage.minimum_filter(zero_as_max, footprint=footprint, mode="reflect")
    return np.where(high == low, labels, 0).astype(labels.dtype, copy=False)


def _pair_slices(
    shape: Sequence[int], offset: Offset
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices selecting voxels ``v`` and their partners ``v + offset`` that lie inside ``shape``."""
    here, there = [], []
    for n, o in zip(shape, offset, strict=True):
        if o >= 0:
            here.append(slice(0, max(n - o, 0)))
            there.append(slice(o, n))
        else:
            here.append(slice(-o, n))
            there.append(slice(0, max(n + o, 0)))
    return tuple(here), tuple(there)


def at_offset(x: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    """``x`` at ``v + offset`` over its last three axes (z, y, x), and ``x`` itself where
    ``v + offset`` falls outside: the partner of every voxel along one affinity edge."""
    out = x.copy()
    lead = [slice(None)] * (x.ndim - 3)
    dst, src = list(lead), list(lead)
    for o, n in zip(offset, x.shape[-3:], strict=True):
        dst.append(slice(max(0, -o), n - max(0, o)))
        src.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = x[tuple(src)]
    return out


def affinities_from_labels(
    labels: np.ndarray,
    offsets: Sequence[Sequence[int]] = DEFAULT_OFFSETS,
    *,
    widen: bool = True,
    unknown: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Affinity targets and their validity mask, both float32 ``[C, Z, Y, X]``.

    ``mask`` is 0 where the partner voxel lies outside the array, or where either voxel is
    ``unknown`` (e.g. unannotated regions): such affinities carry no loss. Label 0 is *known*
    background/boundary and yields affinity 0 with full weight.
    """
    offsets = validate_offsets(offsets)
    if labels.ndim != 3:
        raise ValueError(f"labels must be z,y,x, got shape {labels.shape}")
    if unknown is not None and unknown.shape != labels.shape:
        raise ValueError(f"unknown mask {unknown.shape} does not match labels {labels.shape}")
    seg = widen_boundaries(labels) if widen else labels
    affs = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    mask = np.zeros_like(affs)
    for c, off in enumerate(offsets):
        here, there = _pair_slices(labels.shape, off)
        a, b = seg[here], seg[there]
        affs[c][here] = (a == b) & (a != 0)
        valid = np.ones(a.shape, dtype=bool)
        if unknown is not None:
            valid &= ~unknown[here] & ~unknown[there]
        mask[c][here] = valid
    return affs, mask


def class_balance_weights(
    affs: np.ndarray, mask: np.ndarray, min_fraction: float = 1e-3
) -> np.ndarray:
    """Per-channel loss weights: positives ``(1 − f) / f``, negatives 1, times ``mask``.

    ``f`` is the positive fraction among valid voxels of the channel, clipped to
    ``[min_fraction, 1 − min_fraction]`` so an all-boundary or all-inside crop stays finite.
    Affinities are mostly 1 inside neurons, so this down-weights the easy positives.
    """
    if affs.shape != mask.shape:
        raise ValueError(f"affinities {affs.shape} and mask {mask.shape} differ")
    weights = np.empty_like(affs, dtype=np.float32)
    for c in range(affs.shape[0]):
        valid = mask[c] > 0
        n = int(valid.sum())
        f = float(affs[c][valid].sum()) / n if n else 0.5
        f = min(max(f, min_fraction), 1.0 - min_fraction)
        weights[c] = np.where(affs[c] > 0.5, (1.0 - f) / f, 1.0) * mask[c]
    return weights


def boundary_map(affs: np.ndarray, channels: Sequence[int] | None = None) -> np.ndarray:
    """``1 − mean`` of the chosen affinity channels: high on membranes (for fragment seeds)."""
    chosen = affs if channels is None else affs[list(channels)]
    return 1.0 - chosen.mean(axis=0, dtype=np.float32)


def affinities_from_intensity(
    raw: np.ndarray, num_channels: int = len(DEFAULT_OFFSETS)
) -> np.ndarray:
    """No-network baseline: every affinity channel is the normalised raw intensity.

    In these EM stains membranes are dark, so bright voxels are likely inside a neuron; fed to
    the same fragments + agglomeration as a network's output, it is the floor a model must beat.
    """
    if raw.ndim != 3:
        raise ValueError(f"raw must be z,y,x, got shape {raw.shape}")
    scale = 255.0 if raw.dtype == np.uint8 else 1.0
    intensity = np.clip(raw.astype(np.float32) / scale, 0.0, 1.0)
    return np.broadcast_to(intensity, (num_channels, *raw.shape)).copy()
