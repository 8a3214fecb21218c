"""Hierarchical region merging by median boundary affinity (waterz ``aff50_his256``).

The edge with the lowest score ``1 − quantile(affinity histogram)`` is merged first; the merged
region's edges to a common neighbour combine their histograms and are rescored. Merging stops
at the first edge whose score reaches ``stop``. The recorded merge history serves every
threshold below ``stop``: the segmentation at threshold ``t`` applies the prefix of merges whose
score is below ``t`` — one run, a whole threshold sweep.

As in waterz (``InitWithMax``), an edge starts as one count in the histogram bin of its
*maximum* affinity; merged edges then sum histograms. ``init="all"`` uses
every affinity of the boundary from the start instead.

Speed: scores only take ``bins`` values, so the queue is one FIFO per histogram bin (waterz's
``discretize_queue``) instead of a heap, and an edge's histogram is kept as the list of its
bins (a multiset): with ``init="max"`` most edges hold one or a few entries, so combining two
edges is a list ``extend`` and a quantile a ``sort`` of a nearly sorted list, both in C.
"""

from __future__ import annotations

import contextlib
import gc
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import fastremap
import numpy as np

from ssn_deploy.agglomeration.region_graph import EdgeStats


@dataclass(frozen=True)
class MergeHistory:
    """Fragments and the merges between them in the order they happened.

    ``a[i]``, ``b[i]`` index :attr:`fragments` (the representatives at the time of merge: ``b``
    is absorbed into ``a``) and ``score[i]`` is the score the merge was made at.
    """

    fragments: np.ndarray  # uint64[N], sorted
    a: np.ndarray  # int64[M]
    b: np.ndarray  # int64[M]
    score: np.ndarray  # float64[M]

    def segment_ids(self, threshold: float) -> np.ndarray:
        """Segment id (a fragment id) of every fragment in :attr:`fragments`, for ``threshold``.

        Every merge absorbs a current representative ``b`` into another, ``a``, so the prefix of
        merges is a forest ``parent[b] = a``; pointer jumping finds the roots in O(N log depth)
        array operations instead of a Python union-find.
        """
        above = self.score >= threshold
        n_merges = int(np.argmax(above)) if above.any() else len(self.score)
        parent = np.arange(len(self.fragments))
        parent[self.b[:n_merges]] = self.a[:n_merges]
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return self.fragments[parent]
            parent = grand

    def lookup(self, threshold: float) -> dict[int, int]:
        """Fragment id → segment id for ``threshold`` (segments are named by a fragment id)."""
        segments = self.segment_ids(threshold)
        return dict(zip(self.fragments.tolist(), segments.tolist(), strict=True))


def _top_bins(histogram: np.ndarray) -> np.ndarray:
    """Highest non-empty bin of every row (waterz's ``InitWithMax``)."""
    bins = histogram.shape[1]
    return ((histogram > 0) * np.arange(bins, dtype=np.min_scalar_type(bins - 1))).max(axis=1)


def _quantile_bins(histogram: np.ndarray, quantile: int) -> np.ndarray:
    """Bin of the ``quantile``-th percentile of every row, with waterz's pivot rule.

    The pivot is the ``quantile · total // 100 + 1``-th smallest entry (clamped to the last bin).
    """
    cumulative = np.cumsum(histogram, axis=1)
    pivot = quantile * cumulative[:, -1] // 100 + 1
    below = (cumulative < pivot[:, None]).sum(axis=1)
    return np.minimum(below, histogram.shape[1] - 1)


def _initial_bins(stats: EdgeStats, init: str, quantile: int) -> tuple[list[list[int]], np.ndarray]:
    """Every edge's histogram as a list of bins, and the quantile bin it is first queued at."""
    if init == "max":
        top = _top_bins(stats.histogram)
        # one entry: its own bin is every percentile below the 100th (the pivot rule's clamp)
        first = top if quantile < 100 else np.full_like(top, stats.histogram.shape[1] - 1)
        return [[b] for b in top.tolist()], first
    if init != "all":
        raise ValueError(f"init must be 'max' or 'all', got {init!r}")
    rows, cols = np.nonzero(stats.histogram)
    flat = np.repeat(cols, stats.histogram[rows, cols]).tolist()
    ends = np.cumsum(stats.histogram.sum(axis=1)).tolist()
    starts = [0, *ends[:-1]]
    lists = [flat[s:e] for s, e in zip(starts, ends, strict=True)]
    return lists, _quantile_bins(stats.histogram, quantile)


def _fifo_queues(slots: np.ndarray, n: int) -> list[deque[int]]:
    """One FIFO per queue slot holding its edges in index order: waterz's tie-breaking."""
    order = np.argsort(slots, kind="stable").tolist()
    ends = np.cumsum(np.bincount(slots, minlength=n)).tolist()
    return [deque(order[s:e]) for s, e in zip([0, *ends[:-1]], ends, strict=True)]


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Pause CPython's cycle collector: merging allocates ~10⁵ lists and dicts (no cycles among
    them) that it would otherwise rescan again and again, ~10 % of the merging time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def agglomerate(
    stats: EdgeStats,
    fragments: Sequence[int] | np.ndarray | None = None,
    *,
    stop: float = 1.0,
    quantile: int = 50,
    init: str = "max",
) -> MergeHistory:
    """Merge greedily by lowest score until the lowest score reaches ``stop``.

    ``fragments`` lists every fragment id (isolated fragments included); by default the ids
    that appear in ``stats``.
    """
    with _without_cyclic_gc():
        return _merge(stats, fragments, stop, quantile, init)[0]


def agglomerate_deferring(
    stats: EdgeStats, fragments: np.ndarray, frozen: np.ndarray, stop: float
) -> tuple[MergeHistory, list[tuple[int, int, list[int]]]]:
    """:func:`agglomerate` of a super-block's graph (histograms as multisets, ``init="all"``)
    with the ``frozen`` fragments' edges deferred: the history and the edges left between
    frozen regions (see :func:`_merge` and :mod:`.superblocks`)."""
    with _without_cyclic_gc():
        return _merge(stats, fragments, stop, 50, "all", frozen)


def _merge(
    stats: EdgeStats,
    fragments: Sequence[int] | np.ndarray | None,
    stop: float,
    quantile: int,
    init: str,
    frozen: np.ndarray | None = None,
) -> tuple[MergeHistory, list[tuple[int, int, list[int]]]]:
    """The merging itself: see :func:`agglomerate`.

    With ``frozen`` (a flag per fragment of ``ids``: it has edges this graph does not hold),
    an edge whose turn comes while one of its regions is frozen is not merged but deferred,
    and freezes the other region too (:mod:`.superblocks`). Returns the history and the edges
    left between frozen regions: (region, region, histogram as a list of bins).
    """
    ids = np.union1d(stats.u, stats.v) if fragments is None else np.unique(np.asarray(fragments))
    ids = ids.astype(np.uint64)
    bins = stats.histogram.shape[1]
    hists, first = _initial_bins(stats, init, quantile)
    # queue slot k holds the edges whose quantile bin is bins-1-k: slot 0 is the lowest score
    score_of_slot = [1.0 - (bins - 1 - k + 0.5) / bins for k in range(bins)]
    n_slots = sum(score < stop for score in score_of_slot)
    slots = bins - 1 - first
    queues = _fifo_queues(slots, bins)
    slot_now = slots.tolist()
    eu = np.searchsorted(ids, stats.u).tolist()
    ev = np.searchsorted(ids, stats.v).tolist()
    adjacency: list[dict[int, int]] = [{} for _ in range(len(ids))]  # node -> {neighbour: edge}
    for e, (a, b) in enumerate(zip(eu, ev, strict=True)):
        adjacency[a][b] = e
        adjacency[b][a] = e
    deleted = [False] * len(stats)
    stale = [False] * len(stats)
    lowest = list(range(len(ids)))  # lowest fragment of each region: waterz keeps that id
    merged_a: list[int] = []
    merged_b: list[int] = []
    scores: list[float] = []
    is_frozen = [False] * len(ids) if frozen is None else np.asarray(frozen, bool).tolist()
    slot = 0
    while slot < n_slots:
        queue = queues[slot]
        popleft = queue.popleft
        score = score_of_slot[slot]
        while queue:
            e = popleft()
            if deleted[e]:
                continue
            if stale[e]:  # its histogram grew since it was queued: requeue at the new score
                stale[e] = False
                hist = hists[e]
                hist.sort()
                i = quantile * len(hist) // 100
                new = bins - 1 - (hist[i] if i < len(hist) else bins - 1)
                slot_now[e] = new
                queues[new].append(e)
                if new < slot:
                    slot = new
                    break
                continue
            a, b = eu[e], ev[e]
            if is_frozen[a] or is_frozen[b]:  # its score may not be the lowest any more
                is_frozen[a] = is_frozen[b] = True  # once the frozen side's edges are known
                continue
            adj_a, adj_b = adjacency[a], adjacency[b]
            if len(adj_a) < len(adj_b):  # fold the smaller adjacency into the larger
                a, b, adj_a, adj_b = b, a, adj_b, adj_a
            merged_a.append(a)
            merged_b.append(b)
            scores.append(score)
            deleted[e] = True
            # waterz folds the region with the higher lowest id into the other, and on a score
            # tie keeps the folded region's edge: decide ties by that, whichever way we fold
            a_folded = lowest[a] > lowest[b]
            if a_folded:
                lowest[a] = lowest[b]
            del adj_a[b], adj_b[a]
            for c, eb in adj_b.items():
                adj_c = adjacency[c]
                del adj_c[b]
                ea = adj_a.get(c)
                if ea is not None:  # a and b both touch c: keep the better-scored edge
                    slot_a, slot_b = slot_now[ea], slot_now[eb]
                    keep_a = slot_a < slot_b or (slot_a == slot_b and a_folded)
                    keep, drop = (ea, eb) if keep_a else (eb, ea)
                    kept, dropped = hists[keep], hists[drop]
                    if len(kept) < len(dropped):  # extend the longer list (a multiset union)
                        hists[keep], kept, dropped = dropped, dropped, kept
                    kept.extend(dropped)
                    deleted[drop] = True
                    stale[keep] = True
                    if keep_a:
                        continue  # a's edge to c stays as it is
                adj_a[c] = eb
                adj_c[a] = eb
                eu[eb] = a
                ev[eb] = c
            adj_b.clear()
        else:
            slot += 1
    history = MergeHistory(
        fragments=ids,
        a=np.asarray(merged_a, np.int64),
        b=np.asarray(merged_b, np.int64),
        score=np.asarray(scores, np.float64),
    )
    left = [
        (eu[e], ev[e], hists[e])
        for e in range(len(stats))
        if not deleted[e] and is_frozen[eu[e]] and is_frozen[ev[e]]
    ] if frozen is not None else []  # fmt: skip
    return history, left


def relabel(fragments: np.ndarray, lookup: Mapping[int, int]) -> np.ndarray:
    """Apply a fragment → segment lookup table to a fragment array (ids absent stay as they are)."""
    return fastremap.remap(fragments, lookup, preserve_missing_labels=True, in_place=False)
