"""The compiled seeded watershed (agglomeration/flood.py) against skimage's."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import watershed

from ssn_deploy.affinities import boundary_map
from ssn_deploy.agglomeration.flood import MAX_LEVELS, flood_levels, seeded_watershed
from ssn_deploy.agglomeration.fragments import stored_boundary_map


def random_case(rng: np.random.Generator, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    shape = tuple(int(n) for n in rng.integers(1, 9, ndim))
    image = rng.integers(0, 4, shape).astype(np.float32)  # many ties: plateaus everywhere
    k = min(4, image.size)
    where = rng.choice(image.size, k, replace=False)
    image.flat[where] = 10 + np.arange(k)  # seeds of distinct values
    seeds = np.zeros(shape, np.int32)
    seeds.flat[where] = np.arange(1, k + 1)
    return image, seeds


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_equals_skimage_when_seed_values_differ(ndim: int) -> None:
    """Same order (value raised along the flood, ties by arrival) as skimage; only the order
    of seeds of equal value may differ, so with distinct seed values the labels are equal."""
    rng = np.random.default_rng(ndim)
    for _ in range(300):
        image, seeds = random_case(rng, ndim)
        np.testing.assert_array_equal(
            seeded_watershed(image, seeds), watershed(image, markers=seeds)
        )


def test_floods_everything_from_every_seed_and_keeps_the_dtype() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((6, 20, 30)).astype(np.float32)
    seeds = np.zeros(image.shape, np.uint64)
    seeds[0, 0, 0], seeds[5, 19, 29], seeds[3, 10, 15] = 7, 9, 11
    labels = seeded_watershed(image, seeds)
    assert labels.dtype == np.uint64 and labels.shape == image.shape
    assert set(np.unique(labels)) == {7, 9, 11}
    assert (labels[seeds > 0] == seeds[seeds > 0]).all()


def test_levels_preserve_order_exactly_or_quantise_beyond_the_limit() -> None:
    values = np.array([0.3, 0.1, 0.1 + 1e-7, 0.9, 0.3], np.float32)
    levels, n = flood_levels(values)
    assert n == 4 and levels.tolist() == [2, 0, 1, 3, 2]  # a float a few ulps apart stays apart
    many = np.linspace(0, 1, MAX_LEVELS + 10, dtype=np.float64)
    levels, n = flood_levels(many)
    assert n == MAX_LEVELS and levels[0] == 0 and levels[-1] == MAX_LEVELS - 1
    assert (np.diff(levels.astype(int)) >= 0).all()
    with pytest.raises(ValueError, match="NaN"):
        flood_levels(np.array([0.1, np.nan], np.float32))
    with pytest.raises(ValueError, match="shape"):
        seeded_watershed(np.zeros((3, 3)), np.zeros((3, 4), np.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hashed_levels_equal_the_ranks_of_the_sorted_distinct_values(dtype) -> None:
    """The hash-table ranking = np.unique + searchsorted, on a boundary map of real-looking
    uint8 affinities (1 − mean of three: distinct floats a few ulps apart), with −0.0 = 0.0,
    and on integer-valued maps."""
    rng = np.random.default_rng(3)
    affs = rng.integers(0, 256, (3, 9, 40, 40)).astype(dtype) / dtype(255)
    boundary = (1.0 - affs.mean(axis=0, dtype=dtype)).astype(dtype)
    boundary.flat[:5] = [0.0, -0.0, 0.0, -0.0, 1.0]
    for values in (boundary, np.rint(boundary * 50)):
        levels, n = flood_levels(values)
        unique = np.unique(values)
        assert n == len(unique) and levels.dtype == np.uint16
        np.testing.assert_array_equal(levels, np.searchsorted(unique, values))
    assert flood_levels(np.array([-0.0, 0.0], dtype))[1] == 1
    with pytest.raises(ValueError, match="infinite"):
        flood_levels(np.array([0.1, -np.inf], dtype))


@pytest.mark.parametrize("channels", [1, 2, 3, 12])
def test_stored_boundary_map_equals_numpy_bit_for_bit(channels) -> None:
    """The one-pass boundary map of stored uint8 affinities = numpy's float32 ``1 − mean`` of
    ``stored / scale`` to the last bit (the flood's order depends on every bit), for any
    channel count and scale; other dtypes take numpy's path."""
    rng = np.random.default_rng(channels)
    stored = rng.integers(0, 256, (channels, 6, 25, 27)).astype(np.uint8)
    for scale in (255.0, 100.0, 1.0):
        expected = boundary_map(stored.astype(np.float32) / np.float32(scale))
        got = stored_boundary_map(stored, scale)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    pick = list(range(0, channels, 2))
    expected = boundary_map(stored.astype(np.float32) / np.float32(255), pick)
    np.testing.assert_array_equal(stored_boundary_map(stored, 255.0, pick), expected)
    floats = stored.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(stored_boundary_map(floats, 1.0), boundary_map(floats))
