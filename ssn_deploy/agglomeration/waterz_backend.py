"""waterz ``aff50_his256`` agglomeration: the reference our own agglomeration is measured against.

waterz's C++ core prints to stdout and cannot be silenced from Python, so the call runs with the
process's stdout file descriptor redirected to /dev/null.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
from collections.abc import Iterator, Sequence

import fastremap
import numpy as np

from ssn_deploy.affinities import DEFAULT_OFFSETS, Offset

AFF50_HIS256 = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256>>"


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 and ``sys.stdout`` so C++ and Python prints cannot reach users.

    The C stdio buffers are flushed before the descriptor is restored, or buffered C++ output
    would surface later in the user's pipe.
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def waterz_core(affs: np.ndarray, fragments: np.ndarray, thresholds: Sequence[float]) -> list:
    """The waterz C++ call alone: ``fragments`` already numbered 1..n, thresholds ascending.

    waterz writes into ``fragments`` and yields one view of it per threshold, so each result is
    copied (or remapped) before the next threshold overwrites it.
    """
    import waterz

    with _quiet_stdout():
        return [
            seg.copy()
            for seg in waterz.agglomerate(
                affs,
                thresholds=list(thresholds),
                fragments=fragments,
                scoring_function=AFF50_HIS256,
                discretize_queue=256,
            )
        ]


def agglomerate_waterz(
    affs: np.ndarray,
    fragments: np.ndarray,
    thresholds: Sequence[float],
    *,
    offsets: Sequence[Offset] = DEFAULT_OFFSETS,
) -> list[np.ndarray]:
    """One uint64 segmentation per threshold, merging fragments by median boundary affinity."""
    if tuple(map(tuple, offsets)) != DEFAULT_OFFSETS:
        raise ValueError("waterz needs the three nearest-neighbour offsets, in z, y, x order")
    affs = np.ascontiguousarray(affs[: len(DEFAULT_OFFSETS)], dtype=np.float32)
    # waterz sizes its tables by the largest id: renumber to 1..n, keeping the ids' order
    # (waterz breaks score ties by edge order, which follows the ids)
    fragments = np.asarray(fragments, dtype=np.uint64)
    ids = fastremap.unique(fragments)  # sorted
    order = {int(old): new for new, old in enumerate(ids.tolist(), start=1)}
    frags = fastremap.remap(fragments, order).astype(np.uint64)
    back = {new: old for old, new in order.items()}
    results = [
        fastremap.remap(seg, back, preserve_missing_labels=True)
        for seg in waterz_core(affs, frags, sorted(thresholds))
    ]
    rank = np.argsort(np.argsort(thresholds))
    return [results[i] for i in rank]
