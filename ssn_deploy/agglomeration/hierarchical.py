"""Hierarchical region merging by median boundary affinity (waterz ``aff50_his256``).

The edge with the lowest score ``1 − quantile(affinity histogram)`` is merged first; the merged
region's edges to a common neighbour combine their histograms and are rescored. Merging stops
at the first edge whose score reaches ``stop``. The recorded merge history serves every
threshold below ``stop``: the segmentation at threshold ``t`` applies the prefix of merges whose
score is below ``t`` — one run, a whole threshold sweep.

As in waterz (``InitWithMax``), an edge starts as one count in the histogram bin of its
*maximum* affinity; merged edges then sum histograms. ``init="all"`` uses
every affinity of the boundary from the start instead.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import fastremap
import numpy as np

from ssn_deploy.agglomeration.region_graph import EdgeStats


@dataclass(frozen=True)
class MergeHistory:
    """Fragments and the merges between them in the order they happened.

    ``a[i]``, ``b[i]`` index :attr:`fragments` (the representatives at the time of merge) and
    ``score[i]`` is the score the merge was made at.
    """

    fragments: np.ndarray  # uint64[N], sorted
    a: np.ndarray  # int64[M]
    b: np.ndarray  # int64[M]
    score: np.ndarray  # float64[M]

    def lookup(self, threshold: float) -> dict[int, int]:
        """Fragment id → segment id for ``threshold`` (segments are named by a fragment id)."""
        above = self.score >= threshold
        n_merges = int(np.argmax(above)) if above.any() else len(self.score)
        parent = np.arange(len(self.fragments))

        def find(i: int) -> int:
            root = i
            while parent[root] != root:
                root = parent[root]
            while parent[i] != root:
                parent[i], i = root, parent[i]
            return root

        for a, b in zip(self.a[:n_merges], self.b[:n_merges], strict=True):
            ra, rb = find(int(a)), find(int(b))
            if ra != rb:
                parent[rb] = ra
        roots = np.array([find(i) for i in range(len(parent))], dtype=np.int64)
        return dict(zip(self.fragments.tolist(), self.fragments[roots].tolist(), strict=True))


def _quantile_score(hist: np.ndarray, quantile: int, bins: int) -> float:
    """``1 − value`` of the ``quantile``-th percentile bin, with waterz's pivot rule."""
    total = int(hist.sum())
    pivot = quantile * total // 100 + 1
    b = int(np.searchsorted(np.cumsum(hist), pivot))
    return 1.0 - (min(b, bins - 1) + 0.5) / bins


def _initial_histograms(stats: EdgeStats, init: str) -> np.ndarray:
    if init == "all":
        return stats.histogram.copy()
    if init != "max":
        raise ValueError(f"init must be 'max' or 'all', got {init!r}")
    hist = np.zeros_like(stats.histogram)
    if len(stats):
        nonzero = stats.histogram > 0
        top = stats.histogram.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
        rows = np.arange(len(stats))
        hist[rows, top] = 1
    return hist


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
    ids = np.union1d(stats.u, stats.v) if fragments is None else np.unique(np.asarray(fragments))
    ids = ids.astype(np.uint64)
    bins = stats.histogram.shape[1]
    u = np.searchsorted(ids, stats.u)
    v = np.searchsorted(ids, stats.v)
    hist = _initial_histograms(stats, init)
    # adjacency: node -> {neighbour: edge index}; every edge keeps its histogram row
    adjacency: list[dict[int, int]] = [{} for _ in range(len(ids))]
    for e, (a, b) in enumerate(zip(u.tolist(), v.tolist(), strict=True)):
        adjacency[a][b] = e
        adjacency[b][a] = e
    scores_now = [_quantile_score(hist[e], quantile, bins) for e in range(len(stats))]
    # (score, push order, edge): ties pop first-in first-out, like waterz's bin queue
    heap = [(score, e, e) for e, score in enumerate(scores_now)]
    heapq.heapify(heap)
    pushes = len(heap)
    deleted = np.zeros(len(stats), bool)
    stale = np.zeros(len(stats), bool)
    endpoints = np.stack([u, v], axis=1) if len(stats) else np.zeros((0, 2), np.int64)
    merged_a, merged_b, scores = [], [], []
    while heap and heap[0][0] < stop:
        score, _, e = heapq.heappop(heap)
        if deleted[e]:
            continue
        if stale[e]:  # its histogram grew since it was queued: requeue at the new score
            stale[e] = False
            scores_now[e] = _quantile_score(hist[e], quantile, bins)
            heapq.heappush(heap, (scores_now[e], pushes, e))
            pushes += 1
            continue
        a, b = int(endpoints[e, 0]), int(endpoints[e, 1])
        if len(adjacency[a]) < len(adjacency[b]):
            a, b = b, a  # fold the smaller adjacency into the larger
        merged_a.append(a)
        merged_b.append(b)
        scores.append(score)
        deleted[e] = True
        del adjacency[a][b]
        for c, eb in adjacency[b].items():
            if c == a:
                continue
            del adjacency[c][b]
            ea = adjacency[a].get(c)
            if ea is not None:  # a and b both touch c: keep the better-scored edge
                keep, drop = (ea, eb) if scores_now[ea] < scores_now[eb] else (eb, ea)
                hist[keep] += hist[drop]
                deleted[drop] = True
                stale[keep] = True
            else:
                keep = eb
            adjacency[a][c] = keep
            adjacency[c][a] = keep
            endpoints[keep] = (a, c)
        adjacency[b] = {}
    return MergeHistory(
        fragments=ids,
        a=np.asarray(merged_a, np.int64),
        b=np.asarray(merged_b, np.int64),
        score=np.asarray(scores, np.float64),
    )


def relabel(fragments: np.ndarray, lookup: dict[int, int]) -> np.ndarray:
    """Apply a fragment → segment lookup table to a fragment array (ids absent stay as they are)."""
    return fastremap.remap(fragments, lookup, preserve_missing_labels=True, in_place=False)
