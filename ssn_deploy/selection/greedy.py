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
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy import sparse

SWAP_ROUNDS = 10


class SelectionError(ValueError):
    """The budget cannot be met (too few non-overlapping windows)."""


class Exclusion:
    """Which windows a pick rules out: those sharing a patch with it (the paper's rule), or,
    given each window's first cell ``corners`` and a ``reach`` per axis (in cells), those whose
    corner lies closer than ``reach`` on every axis — windows whose *voxels* overlap, when
    patches overlap (stride < patch), so that nothing is annotated twice."""

    def __init__(
        self,
        windows: np.ndarray,
        corners: np.ndarray | None = None,
        reach: Sequence[int] | None = None,
    ) -> None:
        self.windows = windows
        self.corners = None if corners is None else np.asarray(corners)
        self.reach = None if reach is None else np.asarray(reach)
        self.used = np.zeros(int(windows.max()) + 1, bool)
        self.free = np.ones(len(windows), bool)

    def take(self, index: int) -> None:
        if self.corners is not None and self.reach is not None:
            near = (np.abs(self.corners - self.corners[index]) < self.reach).all(axis=1)
            self.free &= ~near
        self.used[self.windows[index]] = True
        self.free &= ~self.used[self.windows].any(axis=1)


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


def cgs(
    neighbours: np.ndarray,
    windows: np.ndarray,
    budget: int,
    exclusion: Callable[[], Exclusion] | None = None,
    swaps: int = SWAP_ROUNDS,
) -> list[int]:
    """Indices into ``windows`` of the ``budget`` windows CGS picks.

    Greedy: each pick adds the most patches not yet covered, among windows that overlap no
    earlier pick. Greedy picks can block each other (a central window rules out two good
    neighbours), so up to ``swaps`` rounds of 1-swap local search follow: a pick is replaced
    by the feasible window that covers most together with the others, when that is strictly
    more. Coverage never decreases; everything is deterministic (ties → lowest index)."""
    n = len(neighbours)
    reach = (_membership(windows, n) @ _cover_matrix(neighbours)).tocsr()  # window → covered
    reach.data[:] = 1.0
    fresh = exclusion or (lambda: Exclusion(windows))
    uncovered = np.ones(n, np.float32)
    taken = fresh()
    picks: list[int] = []
    for _ in range(budget):
        gain = reach @ uncovered
        gain[~taken.free] = -1
        best = int(np.argmax(gain))
        if gain[best] < 0:
            raise SelectionError(
                f"only {len(picks)} non-overlapping windows fit; lower the budget or the window"
            )
        picks.append(best)
        uncovered[reach[best].indices] = 0
        taken.take(best)
    for _ in range(swaps):
        if not _swap_once(reach, picks, fresh):
            break
    return picks


def _swap_once(reach: sparse.csr_matrix, picks: list[int],
               fresh: Callable[[], Exclusion]) -> bool:  # fmt: skip
    """One pass of 1-swaps over ``picks`` (in place); True if any pick was replaced."""
    changed = False
    for i in range(len(picks)):
        others = picks[:i] + picks[i + 1 :]
        uncovered = np.ones(reach.shape[1], np.float32)
        taken = fresh()
        for o in others:
            uncovered[reach[o].indices] = 0
            taken.take(o)
        gain = reach @ uncovered
        gain[~taken.free] = -1
        best = int(np.argmax(gain))
        if gain[best] > gain[picks[i]]:
            picks[i] = best
            changed = True
    return changed


def random_windows(
    windows: np.ndarray,
    budget: int,
    seed: int,
    exclusion: Callable[[], Exclusion] | None = None,
    attempts: int = 50,
) -> list[int]:
    """``budget`` non-overlapping windows drawn uniformly at random (seeded). A draw that
    cannot place them all (random placement packs worse than a tiling) is redrawn, up to
    ``attempts`` times."""
    rng = np.random.default_rng(seed)
    best: list[int] = []
    for _ in range(attempts):
        taken = exclusion() if exclusion else Exclusion(windows)
        picks: list[int] = []
        for index in rng.permutation(len(windows)):
            if taken.free[index]:
                picks.append(int(index))
                taken.take(int(index))
                if len(picks) == budget:
                    return picks
        best = max(best, picks, key=len)
    raise SelectionError(f"only {len(best)} non-overlapping windows fit in {attempts} random draws")


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
    positions: np.ndarray,
    window: Sequence[int],
    budget: int,
    seed: int,
    exclusion: Exclusion | None = None,
) -> list[int]:
    """One window per k-means++ centre: the free window whose middle is nearest (in grid
    cells) to the centre patch; centres are drawn until ``budget`` windows are placed.

    ``positions[i]`` is patch ``i``'s (z, y, x) cell in the grid (patches may be a subset).
    """
    positions = np.asarray(positions)
    middles = positions[windows[:, 0]] + (np.asarray(window) - 1) / 2
    exclusion = exclusion or Exclusion(windows)
    picks: list[int] = []
    centres = _kmeanspp(embeddings, seed)
    while len(picks) < budget:
        position = positions[next(centres)]
        if not exclusion.free.any():
            raise SelectionError(f"only {len(picks)} non-overlapping windows fit")
        distance = np.abs(middles - position).sum(axis=1) + np.where(exclusion.free, 0, np.inf)
        best = int(np.argmin(distance))
        picks.append(best)
        exclusion.take(best)
    return picks
