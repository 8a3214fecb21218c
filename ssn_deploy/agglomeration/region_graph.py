"""Region graph edge statistics that sum exactly across blocks.

For every pair of touching fragments, the statistics are the number of affinity edges between
them, their affinity sum, and a 256-bin affinity histogram. All three are additive, so the
statistics of a volume are the sum of those of its blocks (each block counts the affinity edges
that start at its own voxels, including those that reach into the neighbouring block), and the
global region graph is one reduction away however the volume was cut.

Speed: fragment ids are made dense (order-preserving) so a pair is one int64 key; boundary
voxels come out in raster order, where neighbouring cut voxels often share their pair, so only
the runs of equal keys are grouped, by a vectorised hash table rather than a sort (the sort
was half the time); every statistic is then one ``bincount``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fastremap
import numpy as np

from ssn_deploy.affinities import (
    DEFAULT_OFFSETS,
    Offset,
    nearest_channels,
    nearest_offsets,
    validate_offsets,
)

BINS = 256
_DIRECT_MAX_ID = 2**31  # ids below this are their own dense index: id² fits an int64 key
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier (2⁶⁴ / golden ratio)


def discretize(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Affinities in [0, 1] → histogram bins, as waterz does (NaN and ≤ 0 go to bin 0)."""
    scaled = np.asarray(values, dtype=np.float32) * bins
    return np.where(scaled > 0, np.minimum(scaled, bins - 1), 0).astype(np.int64)  # NaN: > fails


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
    """Unique ``(u, v)`` pairs (sorted) and, for every input pair, the index of its unique row."""
    if len(u) == 0:
        return u, v, np.zeros(0, np.int64)
    order = np.lexsort((v, u))
    su, sv = u[order], v[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (su[1:] != su[:-1]) | (sv[1:] != sv[:-1])
    inverse = np.empty(len(order), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return su[new], sv[new], inverse


def sum_pairs(
    u: np.ndarray, v: np.ndarray, count: np.ndarray, total: np.ndarray, histogram: np.ndarray
) -> EdgeStats:
    """One row per ``(u, v)`` pair (``u < v`` given), every statistic summed over the rows that
    repeat it — rows renamed by merges or stitches, or one pair's parts from several blocks."""
    gu, gv, inverse = _group(u, v)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])

    def add(values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values[order], starts, axis=0) if len(values) else values

    return EdgeStats(gu, gv, add(count), add(total), add(histogram))


def _hash_keys(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys (≥ 0) and every key's index among them, by vectorised hashing.

    Open addressing with linear probing, one array operation per probe round: every key writes
    its slot (the last writer wins it), the losers probe the next free slot, and so on. With
    the table at least twice the number of keys, a few rounds settle all; O(len) unlike a sort.
    """
    bits = len(key).bit_length() + 1
    mask = (1 << bits) - 1
    slot = ((key.view(np.uint64) * _GOLDEN) >> np.uint64(64 - bits)).astype(np.int64)
    table = np.full(mask + 1, -1, np.int64)
    table[slot] = key
    pending = np.flatnonzero(table[slot] != key)
    while len(pending):
        probe = (slot[pending] + 1) & mask
        slot[pending] = probe
        wanted = key[pending]
        free = table[probe] == -1
        table[probe[free]] = wanted[free]
        pending = pending[table[probe] != wanted]
    used = np.flatnonzero(table != -1)
    unique = table[used]
    order = np.argsort(unique)
    rank = np.empty(mask + 1, np.int64)
    rank[used[order]] = np.arange(len(used))
    return unique[order], rank[slot]


def _group_keys(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and every key's index among them, hashing only runs of equal keys."""
    if len(key) == 0:
        return key, np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    unique, run_group = _hash_keys(key[starts])
    return unique, np.repeat(run_group, np.diff(starts, append=len(key)))


def _dense_ids(fragments: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Fragments as small integers that keep the ids' order, the ids they stand for, and a bound.

    Ids below ``_DIRECT_MAX_ID`` stand for themselves (``None``): only a narrower dtype is
    needed. Larger ids (unique across blocks) are renumbered, then ranked to keep their order.
    """
    top = int(fragments.max()) if fragments.size else 0
    if top < _DIRECT_MAX_ID:
        return fragments.astype(np.uint16 if top < 2**16 else np.uint32), None, top + 1
    dense, remap = fastremap.renumber(fragments, start=0, preserve_zero=False)
    ids = np.empty(len(remap), np.uint64)
    ids[np.fromiter(remap.values(), np.int64, len(remap))] = np.fromiter(
        remap.keys(), np.uint64, len(remap)
    )
    order = np.argsort(ids)
    rank = np.empty(len(ids), dense.dtype)
    rank[order] = np.arange(len(ids), dtype=dense.dtype)
    return rank[dense], ids[order], len(ids)


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
    so that every edge of the volume is counted by exactly one block. Only nearest-neighbour
    channels count (:func:`~ssn_deploy.affinities.nearest_channels`): the region graph joins
    adjacent fragments; long-range channels are auxiliary outputs of training.
    """
    offsets = validate_offsets(offsets)
    if affs.ndim != 4 or affs.shape[1:] != fragments.shape or affs.shape[0] != len(offsets):
        raise ValueError(
            f"affinities {affs.shape} do not match fragments {fragments.shape} "
            f"with {len(offsets)} offsets"
        )
    dense, ids, n = _dense_ids(fragments)
    flat = dense.ravel()  # C order, whatever the layout: so are the strides below
    strides = np.cumprod([1, *fragments.shape[:0:-1]])[::-1]
    keys, values = [], []
    for c in nearest_channels(offsets):  # longer offsets would join non-adjacent fragments
        off = offsets[c]
        here, there = _pair_slices(fragments.shape, off)
        cut = np.zeros(fragments.shape, bool)  # flat indices beat boolean masks of strided views
        np.not_equal(dense[here], dense[there], out=cut[here])
        if owned is not None:
            cut[here] &= owned[here]
        start = np.flatnonzero(cut)
        a, b = flat[start], flat[start + int(strides @ off)]
        key = np.minimum(a, b).astype(np.int64)
        key *= n
        key += np.maximum(a, b)
        keys.append(key)
        values.append(np.asarray(affs[c]).ravel()[start])
    unique, inverse = _group_keys(np.concatenate(keys))
    value = np.concatenate(values)
    e = len(unique)
    count = np.bincount(inverse, minlength=e)
    total = np.bincount(inverse, weights=value, minlength=e)
    inverse *= bins
    inverse += discretize(value, bins)
    hist = np.bincount(inverse, minlength=e * bins).reshape(e, bins)
    u, v = np.divmod(unique, n)
    if ids is None:
        return EdgeStats(u.astype(np.uint64), v.astype(np.uint64), count, total, hist)
    return EdgeStats(ids[u], ids[v], count, total, hist)


def merge_edge_stats(parts: Sequence[EdgeStats]) -> EdgeStats:
    """Sum the statistics of several blocks into one table (exact: every field is additive)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return EdgeStats.empty()
    u, v, inverse = _group(
        np.concatenate([p.u for p in parts]), np.concatenate([p.v for p in parts])
    )
    n = len(u)
    count = np.zeros(n, np.int64)
    total = np.zeros(n, np.float64)
    # histograms dominate (E × 256): write every row once, add only pairs seen in several parts
    hist = np.empty((n, parts[0].histogram.shape[1]), np.int64)
    seen = np.zeros(n, bool)
    start = 0
    for p in parts:  # a part holds each pair once, so fancy-index += never sees duplicates
        rows = inverse[start : start + len(p)]
        start += len(p)
        count[rows] += p.count
        total[rows] += p.total
        again = rows[seen[rows]]  # pairs an earlier part had too (across a block face)
        earlier = hist[again]
        hist[rows] = p.histogram
        hist[again] += earlier
        seen[rows] = True
    return EdgeStats(u, v, count, total, hist)


def blockwise_edge_statistics(
    affs: np.ndarray,
    fragments: np.ndarray,
    offsets: Sequence[Sequence[int]] = DEFAULT_OFFSETS,
    *,
    block_shape: Sequence[int],
    workers: int = 1,
    bins: int = BINS,
) -> EdgeStats:
    """:func:`edge_statistics` of the volume computed block by block, ``workers`` at a time.

    Each block sees its core (owned) plus the halo its offsets reach into, so the merged result
    equals the whole-volume statistics exactly. Threads suffice: the heavy numpy calls release
    the GIL.
    """
    offsets = validate_offsets(offsets)
    shape = fragments.shape
    reach = np.asarray(nearest_offsets(offsets))
    before, after = np.maximum(-reach, 0).max(axis=0), np.maximum(reach, 0).max(axis=0)
    corners = itertools.product(*(range(0, n, s) for n, s in zip(shape, block_shape, strict=True)))

    def block(corner: tuple[int, ...]) -> EdgeStats:
        end = np.minimum(np.add(corner, block_shape), shape)
        lo = np.maximum(corner - before, 0)
        hi = np.minimum(end + after, shape)
        outer = tuple(map(slice, lo, hi))
        owned = np.zeros(hi - lo, bool)
        owned[tuple(map(slice, corner - lo, end - lo))] = True
        return edge_statistics(
            affs[(slice(None), *outer)], fragments[outer], offsets, owned=owned, bins=bins
        )

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return merge_edge_stats(list(pool.map(block, corners)))
