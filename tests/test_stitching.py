"""Stitching fragments cut by tile faces: flags, votes, exact statistics, history."""

from __future__ import annotations

import numpy as np
import pytest

from ssn_deploy.agglomeration import agglomerate, edge_statistics, relabel
from ssn_deploy.agglomeration.stitching import (
    HIGH,
    LOW,
    continuity_flags,
    face_votes,
    merge_stitched,
    merge_votes,
    stitch_mapping,
    stitched_pairs,
    with_stitches,
)

OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def test_continuity_flags_mark_labels_that_cross_the_core_faces() -> None:
    labels = np.zeros((1, 4, 6), np.uint64)
    labels[:, :, :3] = 1
    labels[:, :, 3:] = 2
    labels[:, 2:, 4] = 3  # a label that starts right at the core's upper x face
    core = (slice(0, 1), slice(0, 4), slice(1, 4))  # x in [1, 4): faces at x=1 and x=3
    flags = continuity_flags(labels, core)
    assert flags.shape == (1, 4, 3)
    low_x = (flags >> (LOW + 2)) & 1
    high_x = (flags >> (HIGH + 2)) & 1
    assert low_x[0, :, 0].tolist() == [1, 1, 1, 1]  # label 1 continues to x=0
    assert high_x[0, :, 2].tolist() == [1, 1, 0, 0]  # label 2 continues to x=4 only where no 3
    assert not flags[:, :, 1].any(), "only face voxels carry flags"
    assert not ((flags >> LOW) & 1).any(), "no context in z: never flagged"


def cut(labels: np.ndarray, tile: tuple[int, int, int]) -> np.ndarray:
    """``labels`` cut into pieces at every tile face, with ids unique per tile."""
    out = np.zeros_like(labels)
    grid = np.indices(labels.shape)
    tile_index = sum((g // t) * 1000**k for k, (g, t) in enumerate(zip(grid, tile, strict=True)))
    _, inverse = np.unique(tile_index * 10**6 + labels, return_inverse=True)
    out[...] = inverse.reshape(labels.shape) + 1
    return out.astype(np.uint64)


@pytest.fixture
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Four cells with random affinities inside and low ones across their boundaries."""
    rng = np.random.default_rng(0)
    labels = np.ones((8, 24, 24), np.uint64)
    labels[:, 12:, :] += 1
    labels[:, :, 10:] += 2
    affs = rng.uniform(0.6, 1.0, (3, *labels.shape)).astype(np.float32)
    for c, off in enumerate(OFFSETS):
        shifted = np.roll(labels, shift=[-o for o in off], axis=(0, 1, 2))
        affs[c][shifted != labels] = rng.uniform(0.0, 0.3, (shifted != labels).sum())
    return labels, affs


def test_stitched_statistics_equal_the_uncut_fragments(blobs) -> None:
    labels, affs = blobs
    tile = (8, 8, 8)
    pieces = cut(labels, tile)
    truth = {}
    for p, lab in zip(pieces.ravel().tolist(), labels.ravel().tolist(), strict=True):
        truth[p] = lab
    # what tiles would record: every face voxel continues (one watershed label per cell)
    flags = np.zeros(labels.shape, np.uint8)
    for axis, t in enumerate(tile):
        idx = np.arange(labels.shape[axis])
        shape = [1, 1, 1]
        shape[axis] = -1
        low, high = (idx % t == 0) & (idx > 0), (idx % t == t - 1) & (idx < labels.shape[axis] - 1)
        flags |= (low.reshape(shape) * np.uint8(1 << (LOW + axis))).astype(np.uint8)
        flags |= (high.reshape(shape) * np.uint8(1 << (HIGH + axis))).astype(np.uint8)
    owned = tuple(slice(0, s) for s in labels.shape)
    votes = face_votes(pieces, flags, (0, 0, 0), owned, tile)
    u, v = stitched_pairs(votes)
    assert all(truth[a] == truth[b] for a, b in zip(u.tolist(), v.tolist(), strict=True))
    mapping = stitch_mapping(u, v)
    groups = {}
    for piece, cell in truth.items():
        groups.setdefault(cell, set()).add(mapping.get(piece, piece))
    assert all(len(reps) == 1 for reps in groups.values()), "every cell is one fragment again"

    stitched = merge_stitched(edge_statistics(affs, pieces, OFFSETS), mapping)
    uncut = edge_statistics(affs, labels, OFFSETS)
    rep_of_cell = {cell: next(iter(reps)) for cell, reps in groups.items()}
    renamed = {}
    for i, (a, b) in enumerate(zip(uncut.u.tolist(), uncut.v.tolist(), strict=True)):
        ra, rb = rep_of_cell[a], rep_of_cell[b]
        renamed[(min(ra, rb), max(ra, rb))] = i
    assert len(stitched) == len(uncut)
    for i, (a, b) in enumerate(zip(stitched.u.tolist(), stitched.v.tolist(), strict=True)):
        j = renamed[(a, b)]
        assert stitched.count[i] == uncut.count[j]
        assert stitched.total[i] == pytest.approx(uncut.total[j])
        assert np.array_equal(stitched.histogram[i], uncut.histogram[j])

    history = with_stitches(agglomerate(stitched, stop=0.5), mapping)
    seg = relabel(pieces, history.lookup(0.5))
    reference = relabel(labels, agglomerate(uncut, stop=0.5).lookup(0.5))
    # the same partition: one segment per id pair, both ways
    pairs = set(zip(seg.ravel().tolist(), reference.ravel().tolist(), strict=True))
    assert len(pairs) == len(np.unique(seg)) == len(np.unique(reference))


def test_disagreeing_tiles_are_not_stitched() -> None:
    u = np.array([1, 1], np.uint64)
    v = np.array([5, 6], np.uint64)
    votes = merge_votes([(u, v, np.array([10, 10]), np.array([6, 2]))])
    a, b = stitched_pairs(votes)
    assert a.tolist() == [1] and b.tolist() == [5]
    again = merge_votes([votes, votes])
    assert again[2].tolist() == [20, 20] and again[3].tolist() == [12, 4]
