"""Agglomeration level by level over super-blocks, finalising what no other super-block can
change (the ABISS scheme: Lu, Zlateski & Seung, bioRxiv 2021), so no one process ever holds
the whole region graph.

Every node (a fragment, later a region) belongs to one *group*, given by ``group_of(ids,
level)``: at level 0 e.g. the super-block of the tile its id comes from, and at each level the
groups coarsen (2×2×2 super-blocks join) until one group holds everything. In each group, the
edges between its own nodes are merged by :func:`~.hierarchical.agglomerate`'s rule (lowest
score first, histograms joined, rescored) — except that a node with an edge to another group
is *frozen*: an edge whose turn comes while one of its regions is frozen is deferred (another
group's edge might come first) and freezes the other region too. What stays unfrozen is final:
all its edges are known, and those left score at least the threshold, which joining them with
other edges cannot lower (the median of two multisets whose medians are ≥ t is ≥ t). Only the
edges between frozen regions, and the edges between groups, go up a level, relabelled by the
merges made; merged regions take their smallest fragment id, the order in which waterz breaks
ties. Ties between equal scores may be taken in another order than in one global run, which
is why the result is measured against it (``benchmarks/hierarchical_agglomeration.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import fastremap
import numpy as np

from ssn_deploy.agglomeration.hierarchical import _top_bins, agglomerate_deferring
from ssn_deploy.agglomeration.region_graph import EdgeStats, sum_pairs

GroupOf = Callable[[np.ndarray, int], np.ndarray]
"""``group_of(ids, level)`` → an int64 group key per id; keys of one level must coarsen those
of the level below (two ids in one group stay in one group), and all ids share one group at
the top level."""


@dataclass(frozen=True)
class LevelReport:
    """What one level did: groups, edges in, merges made, edges sent up."""

    level: int
    groups: int
    edges: int
    merges: int
    edges_up: int


def as_multisets(stats: EdgeStats) -> EdgeStats:
    """Each edge's histogram replaced by one count in its highest bin: the merge rule's start
    (waterz's ``InitWithMax``), as a histogram that later levels can keep adding to."""
    top = _top_bins(stats.histogram).astype(np.int64)
    histogram = np.zeros_like(stats.histogram)
    histogram[np.arange(len(stats)), top] = 1
    return EdgeStats(stats.u, stats.v, np.ones(len(stats), np.int64), stats.total, histogram)


def _subset(stats: EdgeStats, keep: np.ndarray) -> EdgeStats:
    return EdgeStats(
        stats.u[keep], stats.v[keep], stats.count[keep], stats.total[keep], stats.histogram[keep]
    )


def ordered_pairs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(u, v), np.maximum(u, v)


def sum_duplicates(parts: list[EdgeStats], bins: int) -> EdgeStats:
    """The parts as one table, one row per pair: relabelled edges between groups repeat pairs
    (two fragments merged at this level touched the same neighbour), which
    :func:`~.region_graph.merge_edge_stats` does not expect within one part."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return EdgeStats.empty(bins)
    return sum_pairs(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


_FIELDS = ("u", "v", "count", "total", "histogram")


def merge_group(
    stats: EdgeStats, frozen_ids: np.ndarray, stop: float
) -> tuple[dict[int, int], EdgeStats]:
    """Merge one group's internal edges (histograms as multisets) with the nodes in
    ``frozen_ids`` frozen: the new region id (its smallest fragment) of every node, and the
    edges left between frozen regions, relabelled."""
    ids = np.union1d(stats.u, stats.v).astype(np.uint64)
    frozen = np.isin(ids, frozen_ids)
    history, left = agglomerate_deferring(stats, ids, frozen, stop)
    roots = history.segment_ids(stop)  # a fragment id of each node's region
    smallest = {}
    for fragment, root in zip(ids.tolist(), roots.tolist(), strict=True):
        if root not in smallest or fragment < smallest[root]:
            smallest[root] = fragment
    region = {f: smallest[r] for f, r in zip(ids.tolist(), roots.tolist(), strict=True)}
    bins = stats.histogram.shape[1]
    histogram = np.zeros((len(left), bins), np.int64)
    u = np.empty(len(left), np.uint64)
    v = np.empty(len(left), np.uint64)
    for i, (a, b, hist) in enumerate(left):
        u[i], v[i] = region[int(ids[a])], region[int(ids[b])]
        histogram[i] = np.bincount(hist, minlength=bins)
    u, v = ordered_pairs(u, v)
    up = EdgeStats(u, v, histogram.sum(axis=1), np.zeros(len(left)), histogram)
    return region, up


def agglomerate_by_groups(
    stats: EdgeStats, group_of: GroupOf, levels: int, stop: float
) -> tuple[dict[int, int], list[LevelReport]]:
    """Fragment id → segment id (its smallest fragment) for every fragment in ``stats``,
    merged group by group over ``levels`` + 1 levels (the last has one group), and a report
    per level. Each group is independent of the others at its level (a dask task each)."""
    fragments = np.union1d(stats.u, stats.v).astype(np.uint64)
    segment = fragments.copy()  # each fragment's current region
    graph = as_multisets(stats)
    reports = []
    for level in range(levels + 1):
        gu, gv = group_of(graph.u, level), group_of(graph.v, level)
        if level == levels and len(graph) and (np.unique(np.r_[gu, gv]).size > 1):
            raise ValueError(f"group_of leaves more than one group at the top level {levels}")
        inside = gu == gv
        between = _subset(graph, ~inside)
        frozen = np.union1d(between.u, between.v)
        region: dict[int, int] = {}
        parts = [between]
        groups = np.unique(gu[inside])
        for group in groups.tolist():
            here = _subset(graph, inside & (gu == group))
            mapping, up = merge_group(here, frozen, stop)
            region.update(mapping)
            parts.append(up)
        relabel = {k: r for k, r in region.items() if k != r}
        if relabel:
            segment = fastremap.remap(segment, relabel, preserve_missing_labels=True)
            between = EdgeStats(
                *ordered_pairs(
                    fastremap.remap(between.u, relabel, preserve_missing_labels=True),
                    fastremap.remap(between.v, relabel, preserve_missing_labels=True),
                ),
                between.count,
                between.total,
                between.histogram,
            )
            parts[0] = between
        graph = sum_duplicates(parts, stats.histogram.shape[1])
        reports.append(LevelReport(level, len(groups), int(inside.sum()), len(relabel), len(graph)))
    return dict(zip(fragments.tolist(), segment.tolist(), strict=True)), reports


def tile_groups(tile_shape: tuple[int, int, int], tile_grid: tuple[int, int, int]) -> GroupOf:
    """Groups for ids made by :func:`~.blockwise.segment_blockwise` (``tile · voxels per tile
    + local id``): at level ``k`` the super-block of 2ᵏ × 2ᵏ × 2ᵏ tiles an id's tile lies in."""
    voxels = int(np.prod(tile_shape))
    grid = np.asarray(tile_grid, np.int64)

    def group_of(ids: np.ndarray, level: int) -> np.ndarray:
        tile = (np.asarray(ids, np.uint64) - np.uint64(1)) // np.uint64(voxels)
        coords = np.stack(np.unravel_index(tile.astype(np.int64), tuple(grid)))
        coarse = coords >> level
        sizes = -(-grid // (1 << level))
        return np.ravel_multi_index(tuple(coarse), tuple(sizes)).astype(np.int64)

    return group_of


def levels_for(tile_grid: tuple[int, int, int]) -> int:
    """Levels until 2ᵏ tiles span the grid on every axis (one group)."""
    return int(max(int(np.ceil(np.log2(max(n, 1)))) for n in tile_grid))
