"""Fragments, region graph and hierarchical agglomeration into a neuron segmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssn_deploy.affinities import DEFAULT_OFFSETS, Offset
from ssn_deploy.agglomeration.fragments import watershed_fragments
from ssn_deploy.agglomeration.hierarchical import MergeHistory, agglomerate, relabel
from ssn_deploy.agglomeration.region_graph import EdgeStats, edge_statistics, merge_edge_stats
from ssn_deploy.agglomeration.waterz_backend import agglomerate_waterz

__all__ = [
    "EdgeStats",
    "MergeHistory",
    "agglomerate",
    "agglomerate_waterz",
    "edge_statistics",
    "merge_edge_stats",
    "relabel",
    "segment_affinities",
    "watershed_fragments",
]

METHODS = ("hierarchical", "waterz")


def segment_affinities(
    affs: np.ndarray,
    threshold: float | Sequence[float] = 0.5,
    *,
    offsets: Sequence[Offset] = DEFAULT_OFFSETS,
    anisotropic: bool = False,
    method: str = "hierarchical",
) -> np.ndarray | list[np.ndarray]:
    """Affinities ``[C, Z, Y, X]`` → uint64 segmentation(s): fragments, then aff50_his256.

    A single threshold returns one array; a sequence returns one array per threshold, all from
    one merge history. ``method="waterz"`` runs the waterz reference instead of our own
    (identical) region merging.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    frags = watershed_fragments(affs, offsets=offsets, anisotropic=anisotropic)
    thresholds = [threshold] if np.isscalar(threshold) else list(threshold)
    if method == "waterz":
        segs = agglomerate_waterz(affs, frags, thresholds, offsets=offsets)
    else:
        history = agglomerate(edge_statistics(affs, frags, offsets))
        segs = [relabel(frags, history.lookup(t)) for t in thresholds]
    return segs[0] if np.isscalar(threshold) else segs
