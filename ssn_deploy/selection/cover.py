"""Who covers whom: each patch covers its k nearest neighbours in embedding space.

:func:`knn` is an exact search by blocks of queries *and* references, keeping a running top-k,
so memory is O(query block × reference block + N·k) whatever N is: no N×N matrix is ever
built (a grid of 10^6 patches would need 4 TB for one). Distances use
``|a|² − 2 a·b + |b|²`` (one matrix product per block pair); ties are broken by the smaller
index, so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

QUERY_BLOCK = 2048
REFERENCE_BLOCK = 32768


def knn(
    embeddings: np.ndarray,
    k: int,
    *,
    query_block: int = QUERY_BLOCK,
    reference_block: int = REFERENCE_BLOCK,
) -> np.ndarray:
    """Indices ``int64[N, k]`` of every row's k nearest rows (itself first), nearest first."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be [N, D] with N > 0, got {x.shape}")
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} patches, got {k}")
    norms = np.einsum("ij,ij->i", x, x)
    out = np.empty((n, k), np.int64)
    for q0 in range(0, n, query_block):
        q = x[q0 : q0 + query_block]
        best_d = np.full((len(q), k), np.inf, np.float32)
        best_i = np.zeros((len(q), k), np.int64)
        for r0 in range(0, n, reference_block):
            r = x[r0 : r0 + reference_block]
            d = norms[q0 : q0 + len(q), None] - 2 * (q @ r.T) + norms[None, r0 : r0 + len(r)]
            np.maximum(d, 0, out=d)
            index = np.broadcast_to(np.arange(r0, r0 + len(r)), d.shape)
            cand_d = np.concatenate([best_d, d], axis=1)
            cand_i = np.concatenate([best_i, index], axis=1)
            keep = min(k, cand_d.shape[1])
            part = np.argpartition(cand_d, keep - 1, axis=1)[:, :keep]
            best_d = np.take_along_axis(cand_d, part, axis=1)
            best_i = np.take_along_axis(cand_i, part, axis=1)
        order = np.lexsort((best_i, best_d), axis=1)  # by distance, then index
        out[q0 : q0 + len(q)] = np.take_along_axis(best_i, order, axis=1)
    return out


def covered(neighbours: np.ndarray, patches: Iterable[int] | np.ndarray) -> np.ndarray:
    """Sorted ids of the patches covered by ``patches`` (the union of their neighbour lists)."""
    ids = np.asarray(list(patches) if not isinstance(patches, np.ndarray) else patches, np.int64)
    if ids.size == 0:
        return np.zeros(0, np.int64)
    return np.unique(neighbours[ids].ravel())


def coverage(neighbours: np.ndarray, patches: Iterable[int] | np.ndarray) -> float:
    """Fraction of all patches covered by ``patches``: the score CGS maximises."""
    return len(covered(neighbours, patches)) / len(neighbours)


def grid_windows(grid: Sequence[int], window: Sequence[int]) -> np.ndarray:
    """Every window of ``window`` adjacent grid cells in a patch grid, as ``int64[W, cells]``
    of flat patch ids (C order), windows in C order of their first corner."""
    grid, window = tuple(int(g) for g in grid), tuple(int(w) for w in window)
    if (
        len(grid) != 3
        or len(window) != 3
        or any(w < 1 or w > g for w, g in zip(window, grid, strict=True))
    ):
        raise ValueError(f"window {window} (patches) must fit in the patch grid {grid}")
    ids = np.arange(int(np.prod(grid))).reshape(grid)
    view = np.lib.stride_tricks.sliding_window_view(ids, window)
    return view.reshape(-1, int(np.prod(window))).copy()
