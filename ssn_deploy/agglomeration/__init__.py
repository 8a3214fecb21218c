"""Fragments, region graph and hierarchical agglomeration into a neuron segmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssn_deploy.affinities import DEFAULT_OFFSETS, Offset
from ssn_deploy.agglomeration.fragments import watershed_fragments
from ssn_deploy.agglomeration.waterz_backend import agglomerate_waterz

__all__ = ["agglomerate_waterz", "segment_affinities", "watershed_fragments"]


def segment_affinities(
    affs: np.ndarray,
    threshold: float | Sequence[float] = 0.5,
    *,
    offsets: Sequence[Offset] = DEFAULT_OFFSETS,
    anisotropic: bool = False,
) -> np.ndarray | list[np.ndarray]:
    """Affinities ``[C, Z, Y, X]`` → uint64 segmentation(s): fragments, then aff50_his256.

    A single threshold returns one array; a sequence returns one array per threshold, all from
    one merge history.
    """
    frags = watershed_fragments(affs, offsets=offsets, anisotropic=anisotropic)
    thresholds = [threshold] if np.isscalar(threshold) else list(threshold)
    segs = agglomerate_waterz(affs, frags, thresholds, offsets=offsets)
    return segs[0] if np.isscalar(threshold) else segs
