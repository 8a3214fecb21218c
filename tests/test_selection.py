"""Selection numerics: kNN (exact and IVF), windows, CGS and its baselines, coverage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ssn_deploy.selection.cover import coverage, covered, grid_windows, knn, knn_recall
from ssn_deploy.selection.greedy import (
    Exclusion,
    SelectionError,
    cgs,
    kmeanspp_centres,
    kmeanspp_windows,
    random_windows,
)


def brute_knn(x: np.ndarray, k: int) -> np.ndarray:
    d = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def test_exact_knn_equals_brute_force() -> None:
    x = np.random.default_rng(0).normal(size=(150, 8)).astype(np.float32)
    got = knn(x, 5)
    np.testing.assert_array_equal(got, brute_knn(x, 5))
    assert (got[:, 0] == np.arange(150)).all(), "every patch covers itself first"


def test_every_patch_covers_itself_even_among_duplicates() -> None:
    x = np.zeros((6, 4), np.float32)  # all tied at distance 0
    got = knn(x, 3)
    assert (got[:, 0] == np.arange(6)).all() and all(len(set(r)) == 3 for r in got)


def test_approximate_knn_above_the_limit_has_measured_recall() -> None:
    """Clustered points (like patch embeddings, which have structure): IVF finds nearly every
    exact neighbour, and knn_recall says how many."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 16)) * 4
    x = (centres[rng.integers(40, size=6000)] + rng.normal(size=(6000, 16))).astype(np.float32)
    approx = knn(x, 10, exact_limit=1000)
    exact = knn(x, 10)
    assert (approx[:, 0] == np.arange(6000)).all()
    recall = knn_recall(x, approx, sample=300)
    truth = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(approx, exact, strict=True)])
    assert recall > 0.9 and abs(recall - truth) < 0.05
    assert knn_recall(x, exact, sample=300) == 1.0


def test_knn_refuses_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        knn(np.zeros((3, 2)), 4)


def test_grid_windows_are_adjacent_patches() -> None:
    windows = grid_windows((1, 3, 4), (1, 2, 2))
    assert windows.shape == (1 * 2 * 3, 4)
    assert windows[0].tolist() == [0, 1, 4, 5] and windows[-1].tolist() == [6, 7, 10, 11]
    with pytest.raises(ValueError, match="fit"):
        grid_windows((1, 3, 4), (1, 4, 2))


def clustered_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1×4×21 grid in three column bands (clusters of 48, 24 and 12 patches); each patch
    covers exactly its cluster; candidate windows lie inside one band."""
    grid = (1, 4, 21)
    columns = np.array([0] * 12 + [1] * 6 + [2] * 3)
    cluster = np.broadcast_to(columns, (4, 21)).ravel()
    members = [np.flatnonzero(cluster == c) for c in range(3)]
    k = max(len(m) for m in members)
    neighbours = np.stack([np.resize(members[c], k) for c in cluster])
    windows = grid_windows(grid, (1, 2, 2))
    inside = (cluster[windows] == cluster[windows][:, :1]).all(axis=1)
    return neighbours, windows[inside], cluster


def test_cgs_picks_one_window_per_cluster_before_a_second_in_any() -> None:
    neighbours, windows, cluster = clustered_grid()
    picks = cgs(neighbours, windows, 4)
    clusters = [int(cluster[windows[p][0]]) for p in picks]
    assert clusters[:3] == [0, 1, 2], "largest uncovered cluster first, each once"
    assert coverage(neighbours, windows[picks[:3]].ravel()) == 1.0
    assert cgs(neighbours, windows, 4) == picks, "deterministic"
    cells = windows[picks].ravel()
    assert len(np.unique(cells)) == len(cells), "no patch shared between picks"


def test_coverage_never_decreases_when_a_window_is_added() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1 * 8 * 8, 6)).astype(np.float32)
    neighbours = knn(x, 6)
    windows = grid_windows((1, 8, 8), (1, 2, 2))
    for _ in range(5):
        order = rng.permutation(len(windows))
        scores = [coverage(neighbours, windows[order[: i + 1]].ravel()) for i in range(10)]
        assert all(b >= a for a, b in itertools.pairwise(scores))
    picks = cgs(neighbours, windows, 3)
    best_random = max(
        coverage(neighbours, windows[random_windows(windows, 3, s)].ravel()) for s in range(5)
    )
    assert coverage(neighbours, windows[picks].ravel()) >= best_random
    assert len(covered(neighbours, [])) == 0


def test_baselines_are_seeded_and_never_overlap() -> None:
    x = np.random.default_rng(4).normal(size=(1 * 6 * 9, 4))
    windows = grid_windows((1, 6, 9), (1, 3, 3))
    for picks in (
        random_windows(windows, 4, seed=1),
        kmeanspp_windows(x, windows, np.argwhere(np.ones((1, 6, 9))), (1, 3, 3), 4, seed=1),
    ):
        cells = windows[picks].ravel()
        assert len(picks) == 4 and len(np.unique(cells)) == len(cells)
    assert random_windows(windows, 4, 1) == random_windows(windows, 4, 1)
    assert kmeanspp_centres(x, 5, 2) == kmeanspp_centres(x, 5, 2)[:5]
    assert kmeanspp_centres(x, 3, 2) == kmeanspp_centres(x, 5, 2)[:3]


def test_a_budget_that_does_not_fit_is_refused() -> None:
    neighbours = knn(np.random.default_rng(5).normal(size=(16, 3)), 3)
    windows = grid_windows((1, 4, 4), (1, 2, 2))
    with pytest.raises(SelectionError, match="non-overlapping windows fit"):
        cgs(neighbours, windows, 5)
    with pytest.raises(SelectionError):
        random_windows(windows, 5, seed=0)


def test_swaps_undo_a_greedy_pick_that_blocks_a_better_pair() -> None:
    """M and L overlap in space; greedy takes M (ties → lowest index), which leaves only R;
    one swap finds L + R, which covers 9 patches instead of 7."""
    n = 12
    neighbours = np.array([[i] * 5 for i in range(n)])
    neighbours[0] = [0, 4, 5, 6, 7]  # M
    neighbours[1] = [1, 8, 9, 10, 11]  # L
    neighbours[2] = [2, 4, 5, 6, 8]  # R
    windows = np.array([[0], [1], [2]])
    corners = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 5]])

    def exclusion() -> Exclusion:
        return Exclusion(windows, corners, (1, 1, 2))

    greedy = cgs(neighbours, windows, 2, exclusion, swaps=0)
    assert greedy == [0, 2] and coverage(neighbours, windows[greedy].ravel()) == 7 / n
    swapped = cgs(neighbours, windows, 2, exclusion)
    assert sorted(swapped) == [1, 2] and coverage(neighbours, windows[swapped].ravel()) == 9 / n
