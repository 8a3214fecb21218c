"""Affinity targets on hand-made labels, boundary widening and class-balance weights."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ssn_deploy.affinities import (
    DEFAULT_OFFSETS,
    affinities_from_labels,
    boundary_map,
    class_balance_weights,
    validate_offsets,
    widen_boundaries,
)


def brute_force_affinities(labels, offsets):
    affs = np.zeros((len(offsets), *labels.shape), np.float32)
    mask = np.zeros_like(affs)
    for c, off in enumerate(offsets):
        for v in np.ndindex(labels.shape):
            u = tuple(a + o for a, o in zip(v, off, strict=True))
            if all(0 <= x < n for x, n in zip(u, labels.shape, strict=True)):
                mask[(c, *v)] = 1
                affs[(c, *v)] = labels[v] == labels[u] and labels[v] != 0
    return affs, mask


def test_two_bodies_split_along_x():
    labels = np.zeros((2, 3, 4), np.uint64)
    labels[:, :, :2] = 1
    labels[:, :, 2:] = 2
    affs, mask = affinities_from_labels(labels, widen=False)
    # z affinity: first section has no partner -> masked, else inside bodies -> 1
    assert (mask[0, 0] == 0).all() and (mask[0, 1] == 1).all()
    assert (affs[0, 1] == 1).all()
    # x affinity: 0 at the seam (x=2 looks back to x=1), 1 elsewhere except masked x=0
    np.testing.assert_array_equal(affs[2, 0, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(mask[2, 0, 0], [0, 1, 1, 1])


@pytest.mark.parametrize("offsets", [DEFAULT_OFFSETS, ((-2, 0, 0), (0, 3, 0), (1, -1, 2))])
def test_matches_brute_force_on_random_labels(offsets):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(4, 5, 6)).astype(np.uint64)
    affs, mask = affinities_from_labels(labels, offsets, widen=False)
    ref_affs, ref_mask = brute_force_affinities(labels, offsets)
    np.testing.assert_array_equal(affs, ref_affs)
    np.testing.assert_array_equal(mask, ref_mask)


def test_widening_clears_in_plane_edges_only():
    labels = np.zeros((3, 6, 6), np.uint64)
    labels[:, :, :3] = 5
    labels[:, :, 3:] = 7
    labels[1, 0, 0] = 0  # a background voxel must not widen anything
    wide = widen_boundaries(labels)
    # columns 2 and 3 touch the other label in their 3x3 neighbourhood
    assert (wide[:, :, 2:4] == 0).all()
    assert (wide[:, :, [0, 1]] == 5).sum() == 3 * 6 * 2 - 1
    assert (wide[:, :, [4, 5]] == 7).all()
    assert labels[0, 0, 2] == 5, "the input must not be modified"


def test_unknown_voxels_are_masked_in_both_directions():
    labels = np.ones((1, 1, 4), np.uint64)
    unknown = np.array([[[False, False, True, False]]])
    _, mask = affinities_from_labels(labels, unknown=unknown, widen=False)
    np.testing.assert_array_equal(mask[2, 0, 0], [0, 1, 0, 0])


def test_class_balance_weights():
    affs = np.array([[[[1, 1, 1, 0]]]], np.float32)
    mask = np.array([[[[1, 1, 1, 1]]]], np.float32)
    w = class_balance_weights(affs, mask)
    np.testing.assert_allclose(w[0, 0, 0], [1 / 3, 1 / 3, 1 / 3, 1])
    # weighted positives and negatives balance
    assert np.isclose((w * affs).sum(), (w * (1 - affs)).sum())
    # a crop with no positives stays finite
    w0 = class_balance_weights(np.zeros_like(affs), mask)
    assert np.isfinite(w0).all()


def test_real_labels_give_sensible_affinities(medulla_250):
    with h5py.File(medulla_250, "r") as f:
        labels = f["volumes/labels/neuron_ids"][:32, :64, :64]
    affs, mask = affinities_from_labels(labels)
    frac = affs[mask > 0].mean()
    assert 0.5 < frac < 0.98, frac
    bmap = boundary_map(affs)
    assert bmap.shape == labels.shape and 0 <= bmap.min() and bmap.max() <= 1


def test_bad_offsets_raise():
    with pytest.raises(ValueError, match="non-zero"):
        validate_offsets([(0, 0, 0)])
    with pytest.raises(ValueError, match="at least one"):
        validate_offsets([])
