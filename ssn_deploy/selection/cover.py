"""Who covers whom: each patch covers its k nearest neighbours in embedding space.

:func:`knn` never builds an N×N matrix (a grid of 10^6 patches would need 4 TB for one). It
uses faiss, chosen by measurement (``benchmarks/selection.py``): an exact flat search up to
:data:`EXACT_LIMIT` patches (5.4× faster than a blocked numpy search with identical results on
50,000 80-d points), and above it an inverted-file index (IVF, 4·√N lists, :data:`NPROBE`
probed), whose recall :func:`knn_recall` measures on a sample of exact searches. Every patch
covers itself (first in its row), whatever ties or the approximate search say.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

EXACT_LIMIT = 100_000
NPROBE = 32
TRAIN_SAMPLE = 100_000


def _faiss():  # imported late: selection is the only user
    import faiss

    return faiss


def _self_first(neighbours: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Put each row's own id (``rows``) first: moved forward, or in place of the farthest."""
    for j in np.flatnonzero(neighbours[:, 0] != rows):
        row = neighbours[j]
        neighbours[j] = np.concatenate([[rows[j]], row[row != rows[j]][: len(row) - 1]])
    return neighbours


def knn(embeddings: np.ndarray, k: int, *, exact_limit: int = EXACT_LIMIT,
        seed: int = 0) -> np.ndarray:  # fmt: skip
    """Indices ``int64[N, k]`` of every row's k nearest rows (itself first), nearest first;
    exact up to ``exact_limit`` rows, IVF above (see :func:`knn_recall`)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be [N, D] with N > 0, got {x.shape}")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} patches, got {k}")
    faiss = _faiss()
    if n <= exact_limit:
        index = faiss.IndexFlatL2(d)
    else:
        lists = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, lists)
        sample = np.random.default_rng(seed).choice(n, min(n, TRAIN_SAMPLE), replace=False)
        index.cp.seed = seed
        index.train(x[np.sort(sample)])
        index.nprobe = NPROBE
    index.add(x)
    _, neighbours = index.search(x, k)
    return _self_first(neighbours.astype(np.int64), np.arange(n))


def knn_recall(embeddings: np.ndarray, neighbours: np.ndarray, sample: int = 1000,
               seed: int = 0) -> float:  # fmt: skip
    """Mean fraction of the exact k nearest neighbours that ``neighbours`` holds, over
    ``sample`` random rows (exact search of those rows against all: cheap)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    rows = np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False)
    index = _faiss().IndexFlatL2(x.shape[1])
    index.add(x)
    _, exact = index.search(x[rows], neighbours.shape[1])
    exact = _self_first(exact.astype(np.int64), rows)
    hits = [len(np.intersect1d(a, b)) for a, b in zip(exact, neighbours[rows], strict=True)]
    return float(np.mean(hits) / neighbours.shape[1])


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
