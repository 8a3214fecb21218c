"""Region graph edge statistics that sum exactly across blocks.

For every pair of touching fragments, the statistics are the number of affinity edges between
them, their affinity sum, and a 256-bin affinity histogram. All three are additive, so the
statistics of a volume are the sum of those of its blocks (each block counts the affinity edges
that start at its own voxels, including those that reach into the neighbouring block), and the
global region graph is one reduction away however the volume was cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ssn_deploy.affinities import DEFAULT_OFFSETS, Offset, validate_offsets

BINS = 256


def discretize(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Affinities in [0, 1] → histogram bins, as waterz does (NaN and ≤ 0 go to bin 0)."""
    scaled = np.nan_to_num(np.asarray(values, dtype=np.float32) * bins, nan=0.0)
    return np.clip(scaled, 0, bins - 1).astype(np.int64)


@dataclass(frozen=True)
class EdgeStats:
    """Statistics of the edges ``u[i] < v[i]`` (fragment ids), one row per fragment pair."""

    u: np.ndarray  # uint64[E]
    v: np.ndarray  # uint64[E]
    count: np.ndarray  # int64[E]
    total: np.ndarray  # float64[E], sum of affinities
    histogram: np.ndarray  # int64[E, BINS]

    def __len__(self) -> int:
        return len(self.u)

    @classmethod
    def empty(cls, bins: int = BINS) -> EdgeStats:
        return cls(
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float64),
            np.zeros((0, bins), np.int64),
        )

    @property
    def mean(self) -> np.ndarray:
        return self.total / np.maximum(self.count, 1)


def _group(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique ``(u, v)`` pairs and, for every input pair, the index of its unique row."""
    if len(u) == 0:
        return u, v, np.zeros(0, np.int64)
    pairs = np.stack([u, v], axis=1)
    order = np.lexsort((v, u))
    sorted_pairs = pairs[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = np.any(sorted_pairs[1:] != sorted_pairs[:-1], axis=1)
    group_of_sorted = np.cumsum(new) - 1
    inverse = np.empty(len(order), np.int64)
    inverse[order] = group_of_sorted
    unique = sorted_pairs[new]
    return unique[:, 0], unique[:, 1], inverse


def _pair_slices(
    shape: Sequence[int], offset: Offset
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    here, there = [], []
    for n, o in zip(shape, offset, strict=True):
        here.append(slice(max(-o, 0), n - max(o, 0)))
        there.append(slice(max(o, 0), n - max(-o, 0)))
    return tuple(here), tuple(there)


def edge_statistics(
    affs: np.ndarray,
    fragments: np.ndarray,
    offsets: Sequence[Sequence[int]] = DEFAULT_OFFSETS,
    *,
    owned: np.ndarray | None = None,
    bins: int = BINS,
) -> EdgeStats:
    """Edge statistics of ``fragments`` (uint64 ``[Z, Y, X]``) under ``affs`` (``[C, Z, Y, X]``).

    ``affs[c, p]`` is the affinity between voxel ``p`` and ``p + offsets[c]``. If ``owned`` (a
    boolean ``[Z, Y, X]``) is given, only affinity edges *starting* at owned voxels count — a
    block passes its core as owned and a one-voxel rim of its neighbours' fragments as context,
    so that every edge of the volume is counted by exactly one block.
    """
    offsets = validate_offsets(offsets)
    if affs.ndim != 4 or affs.shape[1:] != fragments.shape or affs.shape[0] != len(offsets):
        raise ValueError(
            f"affinities {affs.shape} do not match fragments {fragments.shape} "
            f"with {len(offsets)} offsets"
        )
    us, vs, bs, vals = [], [], [], []
    for c, off in enumerate(offsets):
        here, there = _pair_slices(fragments.shape, off)
        a, b = fragments[here], fragments[there]
        cut = a != b
        if owned is not None:
            cut &= owned[here]
        value = affs[c][here][cut]
        a, b = a[cut], b[cut]
        us.append(np.minimum(a, b))
        vs.append(np.maximum(a, b))
        vals.append(value.astype(np.float64))
        bs.append(discretize(value, bins))
    u, v = np.concatenate(us).astype(np.uint64), np.concatenate(vs).astype(np.uint64)
    value, binned = np.concatenate(vals), np.concatenate(bs)
    uu, vv, inverse = _group(u, v)
    n = len(uu)
    count = np.bincount(inverse, minlength=n).astype(np.int64)
    total = np.bincount(inverse, weights=value, minlength=n)
    hist = np.bincount(inverse * bins + binned, minlength=n * bins).reshape(n, bins)
    return EdgeStats(uu, vv, count, total, hist.astype(np.int64))


def merge_edge_stats(parts: Sequence[EdgeStats]) -> EdgeStats:
    """Sum the statistics of several blocks into one table (exact: every field is additive)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return EdgeStats.empty()
    u = np.concatenate([p.u for p in parts])
    v = np.concatenate([p.v for p in parts])
    uu, vv, inverse = _group(u, v)
    n = len(uu)
    count = np.bincount(inverse, weights=np.concatenate([p.count for p in parts]), minlength=n)
    total = np.bincount(inverse, weights=np.concatenate([p.total for p in parts]), minlength=n)
    hist = np.zeros((n, parts[0].histogram.shape[1]), np.int64)
    np.add.at(hist, inverse, np.concatenate([p.histogram for p in parts]))
    return EdgeStats(uu, vv, count.astype(np.int64), total, hist)
