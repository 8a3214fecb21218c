"""Coverage-based greedy selection (CGS) of annotation windows, and its baselines.

Given every patch's neighbour list (:func:`.cover.knn`) and the candidate windows of adjacent
patches (:func:`.cover.grid_windows`), CGS picks windows one at a time, each the one that adds
the most not-yet-covered patches, among windows sharing no patch with an earlier pick (paper:
N = 4 windows of 1×9×9 patches). The gain of every candidate is one sparse product per pick:
``windows × patches`` (membership) times ``patches × patches`` (covers), masked by what is
still uncovered. Ties go to the first window in C order, so a selection is deterministic.

Baselines at the same budget: :func:`random_windows` (non-overlapping, seeded) and
:func:`kmeanspp_windows` (k-means++ seeding in embedding space, each centre's window centred on
it). :func:`.cover.coverage` scores any of them, or a user's own choice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import sparse


class SelectionError(ValueError):
    """The budget cannot be met (too few non-overlapping windows)."""


def _cover_matrix(neighbours: np.ndarray) -> sparse.csr_matrix:
    n, k = neighbours.shape
    rows = np.repeat(np.arange(n), k)
    data = np.ones(n * k, np.float32)
    return sparse.csr_matrix((data, (rows, neighbours.ravel())), shape=(n, n))


def _membership(windows: np.ndarray, n: int) -> sparse.csr_matrix:
    w, cells = windows.shape
    rows = np.repeat(np.arange(w), cells)
    data = np.ones(w * cells, np.float32)
    return sparse.csr_matrix((data, (rows, windows.ravel())), shape=(w, n))


def cgs(neighbours: np.ndarray, windows: np.ndarray, budget: int) -> list[int]:
    """Indices into ``windows`` of the ``budget`` windows CGS picks, in the order picked."""
    n = len(neighbours)
    reach = (_membership(windows, n) @ _cover_matrix(neighbours)).tocsr()  # window → covered
    reach.data[:] = 1.0
    uncovered = np.ones(n, np.float32)
    available = np.ones(len(windows), bool)
    used = np.zeros(n, bool)
    picks: list[int] = []
    for _ in range(budget):
        gain = reach @ uncovered
        gain[~available] = -1
        best = int(np.argmax(gain))
        if gain[best] < 0:
            raise SelectionError(
                f"only {len(picks)} non-overlapping windows fit; lower the budget or the window"
            )
        picks.append(best)
        uncovered[reach[best].indices] = 0
        used[windows[best]] = True
        available &= ~used[windows].any(axis=1)
    return picks


def random_windows(windows: np.ndarray, budget: int, seed: int) -> list[int]:
    """``budget`` non-overlapping windows drawn uniformly at random (seeded)."""
    rng = np.random.default_rng(seed)
    used = np.zeros(int(windows.max()) + 1, bool)
    picks: list[int] = []
    for index in rng.permutation(len(windows)):
        if not used[windows[index]].any():
            picks.append(int(index))
            used[windows[index]] = True
            if len(picks) == budget:
                return picks
    raise SelectionError(f"only {len(picks)} non-overlapping windows fit in one random draw")


def _kmeanspp(embeddings: np.ndarray, seed: int) -> Iterator[int]:
    """k-means++ seeding, endlessly: each next centre is drawn with probability ∝ squared
    distance to the nearest centre so far (Arthur & Vassilvitskii 2007)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(embeddings, np.float64)
    pick = int(rng.integers(len(x)))
    nearest = np.full(len(x), np.inf)
    while True:
        yield pick
        nearest = np.minimum(nearest, ((x - x[pick]) ** 2).sum(axis=1))
        total = nearest.sum()
        pick = (
            int(rng.choice(len(x), p=nearest / total)) if total > 0 else int(rng.integers(len(x)))
        )


def kmeanspp_centres(embeddings: np.ndarray, count: int, seed: int) -> list[int]:
    """The first ``count`` k-means++ centres (patch indices)."""
    return list(itertools.islice(_kmeanspp(embeddings, seed), count))


def kmeanspp_windows(
    embeddings: np.ndarray,
    windows: np.ndarray,
    grid: Sequence[int],
    window: Sequence[int],
    budget: int,
    seed: int,
) -> list[int]:
    """One window per k-means++ centre: the free window whose centre cell is nearest (in grid
    cells) to the centre patch; centres are drawn until ``budget`` windows are placed."""
    grid, window = np.asarray(grid), np.asarray(window)
    corners = np.array(np.unravel_index(windows[:, 0], tuple(grid))).T
    middles = corners + (window - 1) / 2
    used = np.zeros(int(np.prod(grid)), bool)
    picks: list[int] = []
    centres = _kmeanspp(embeddings, seed)
    while len(picks) < budget:
        centre = next(centres)
        position = np.array(np.unravel_index(centre, tuple(grid)))
        free = ~used[windows].any(axis=1)
        if not free.any():
            raise SelectionError(f"only {len(picks)} non-overlapping windows fit")
        distance = np.abs(middles - position).sum(axis=1) + np.where(free, 0, np.inf)
        best = int(np.argmin(distance))
        picks.append(best)
        used[windows[best]] = True
    return picks
