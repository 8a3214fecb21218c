"""Fragments and waterz agglomeration on real labels of fib_medulla_250."""

from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import variation_of_information

from ssn_deploy.affinities import (
    DEFAULT_OFFSETS,
    affinities_from_intensity,
    affinities_from_labels,
)
from ssn_deploy.agglomeration import agglomerate_waterz, segment_affinities, watershed_fragments
from ssn_deploy.agglomeration.hierarchical import agglomerate, relabel
from ssn_deploy.agglomeration.region_graph import (
    EdgeStats,
    _group_keys,
    _pair_slices,
    blockwise_edge_statistics,
    edge_statistics,
    merge_edge_stats,
)
from ssn_deploy.agglomeration.waterz_backend import _quiet_stdout


def prediction_like(labels: np.ndarray) -> np.ndarray:
    """Ground-truth affinities (widened, as trained) blurred like a network's output."""
    affs, _ = affinities_from_labels(labels)
    return ndimage.gaussian_filter(affs, (0, 1, 1, 1))


@pytest.fixture(scope="module")
def crop(medulla_250):
    with h5py.File(medulla_250, "r") as f:
        sl = (slice(0, 48), slice(0, 96), slice(0, 96))
        return f["volumes/raw"][sl], f["volumes/labels/neuron_ids"][sl]


def test_fragments_cover_every_voxel_and_are_unique_per_section(crop):
    _, labels = crop
    affs, _ = affinities_from_labels(labels)
    frags = watershed_fragments(affs, id_offset=1000)
    assert frags.dtype == np.uint64 and frags.min() > 1000
    per_section = watershed_fragments(affs, anisotropic=True)
    assert per_section.min() > 0
    ids_by_z = [set(np.unique(per_section[z]).tolist()) for z in range(per_section.shape[0])]
    for a, b in itertools.pairwise(ids_by_z):
        assert not a & b, "per-section fragments must not share ids across sections"


def test_fragments_do_not_straddle_bodies(crop):
    _, labels = crop
    frags = watershed_fragments(prediction_like(labels))
    fg = labels > 0
    _split, merge = variation_of_information(labels[fg], frags[fg])
    assert merge < 0.2, f"fragments mix bodies: H(gt|fragments) = {merge:.3f}"


def test_agglomeration_recovers_ground_truth_and_beats_intensity(crop):
    raw, labels = crop
    fg = labels > 0
    segs = segment_affinities(prediction_like(labels), [0.3, 0.5])
    voi_gt = [sum(variation_of_information(labels[fg], s[fg])) for s in segs]
    base = segment_affinities(affinities_from_intensity(raw), 0.5)
    voi_base = sum(variation_of_information(labels[fg], base[fg]))
    assert max(voi_gt) < 0.6, voi_gt
    assert max(voi_gt) < voi_base / 2, (voi_gt, voi_base)


def test_waterz_output_does_not_reach_stdout(crop, capfd):
    _, labels = crop
    affs, _ = affinities_from_labels(labels[:8, :32, :32])
    segment_affinities(affs, 0.5)
    out, _ = capfd.readouterr()
    assert out == ""


def test_own_agglomeration_reproduces_waterz(crop):
    raw, labels = crop
    for affs in (prediction_like(labels), affinities_from_intensity(raw)):
        frags = watershed_fragments(affs)
        thresholds = [0.3, 0.5, 0.7]
        reference = agglomerate_waterz(affs, frags, thresholds)
        history = agglomerate(edge_statistics(affs, frags))
        for t, ref in zip(thresholds, reference, strict=True):
            ours = relabel(frags, history.lookup(t))
            assert sum(variation_of_information(ref, ours)) < 1e-9, t


def test_edge_statistics_sum_exactly_over_blocks(crop):
    _, labels = crop
    affs = prediction_like(labels)
    frags = watershed_fragments(affs)
    whole = edge_statistics(affs, frags)
    # two halves along y: each counts the edges that start at its own voxels
    parts = []
    for lo, hi in ((0, 40), (40, labels.shape[1])):
        owned = np.zeros(frags.shape, bool)
        owned[:, lo:hi] = True
        parts.append(edge_statistics(affs, frags, owned=owned))
    summed = merge_edge_stats(parts)
    np.testing.assert_array_equal(summed.u, whole.u)
    np.testing.assert_array_equal(summed.v, whole.v)
    np.testing.assert_array_equal(summed.count, whole.count)
    np.testing.assert_array_equal(summed.histogram, whole.histogram)
    np.testing.assert_allclose(summed.total, whole.total, rtol=1e-12)
    assert (whole.histogram.sum(axis=1) == whole.count).all()


def test_threshold_sweep_is_monotone_and_reuses_one_history(crop):
    _, labels = crop
    affs = prediction_like(labels)
    frags = watershed_fragments(affs)
    history = agglomerate(edge_statistics(affs, frags))
    counts = [len(set(history.lookup(t).values())) for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    assert counts[0] == len(np.unique(frags))
    assert counts == sorted(counts, reverse=True)
    lower = history.lookup(0.3)
    higher = history.lookup(0.6)
    # the lower threshold's segments nest inside the higher one's
    for frag, seg in lower.items():
        assert higher[seg] == higher[frag]


def tie_heavy_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi fragments whose every boundary carries one of 4 affinity levels: ties everywhere."""
    rng = np.random.default_rng(seed)
    shape, n = (10, 20, 20), 40
    seeds = np.zeros(shape, np.int64)
    seeds[tuple(rng.integers(0, shape, size=(n, 3)).T)] = np.arange(1, n + 1)
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    _, frags = np.unique(seeds[tuple(nearest)], return_inverse=True)
    frags = frags.reshape(shape) + 1
    level = rng.integers(0, 4, size=(n + 1, n + 1)) * 0.3 + 0.05
    affs = np.ones((3, *shape), np.float32)
    for c, off in enumerate(DEFAULT_OFFSETS):
        here, there = _pair_slices(shape, off)
        a, b = frags[here], frags[there]
        affs[c][here] = level[np.minimum(a, b), np.maximum(a, b)]
    return affs, frags.astype(np.uint64)


@pytest.mark.parametrize(("quantile", "init"), [(50, "max"), (50, "all"), (25, "max"), (75, "all")])
def test_own_agglomeration_reproduces_waterz_on_score_ties(quantile, init):
    """With equal scores everywhere, waterz's tie rules decide: FIFO order within a score, and
    which of two parallel edges survives a merge. Keeping the absorbed side's edge on a tie
    without asking which region waterz absorbs (the one with the higher lowest id) failed here
    on 83 of 300 seeds, and on the whole fib_medulla_250 test region (VOI 2e-5)."""
    import waterz

    with_max = "true" if init == "max" else "false"
    function = (
        f"OneMinus<HistogramQuantileAffinity<RegionGraphType, {quantile}, ScoreValue, 256, "
        f"{with_max}>>"
    )
    thresholds = [0.3, 0.5, 0.7]
    for seed in range(20):
        affs, frags = tie_heavy_case(seed)
        with _quiet_stdout():
            reference = [
                seg.copy()
                for seg in waterz.agglomerate(
                    affs,
                    thresholds=thresholds,
                    fragments=frags.copy(),
                    scoring_function=function,
                    discretize_queue=256,
                )
            ]
        history = agglomerate(edge_statistics(affs, frags), quantile=quantile, init=init)
        for t, ref in zip(thresholds, reference, strict=True):
            ours = relabel(frags, history.lookup(t))
            assert sum(variation_of_information(ref, ours)) < 1e-9, (seed, t)


def assert_same_stats(a: EdgeStats, b: EdgeStats) -> None:
    np.testing.assert_array_equal(a.u, b.u)
    np.testing.assert_array_equal(a.v, b.v)
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_array_equal(a.histogram, b.histogram)
    np.testing.assert_allclose(a.total, b.total, rtol=1e-12)


@pytest.mark.parametrize("block_shape", [(16, 96, 96), (20, 40, 50)])
def test_blockwise_edge_statistics_equal_whole_volume(crop, block_shape):
    _, labels = crop
    affs = prediction_like(labels)
    frags = watershed_fragments(affs)
    whole = edge_statistics(affs, frags)
    blocks = blockwise_edge_statistics(affs, frags, block_shape=block_shape, workers=2)
    assert_same_stats(blocks, whole)


def test_edge_statistics_of_ids_beyond_int32_keep_their_order(crop):
    """Block-unique ids are huge and sparse; they are renumbered inside, in order."""
    _, labels = crop
    affs = prediction_like(labels)
    frags = watershed_fragments(affs)
    big = frags * np.uint64(1_000_003) + np.uint64(2**40)
    small, large = edge_statistics(affs, frags), edge_statistics(affs, big)
    np.testing.assert_array_equal(large.u, small.u * np.uint64(1_000_003) + np.uint64(2**40))
    np.testing.assert_array_equal(large.v, small.v * np.uint64(1_000_003) + np.uint64(2**40))
    np.testing.assert_array_equal(large.histogram, small.histogram)
    np.testing.assert_array_equal(large.total, small.total)
    blocks = blockwise_edge_statistics(affs, big, block_shape=(24, 96, 96), workers=2)
    assert_same_stats(blocks, large)


def test_group_keys_matches_numpy_unique():
    """The vectorised hash table against a sort, on runs, wide keys and patterned keys."""
    rng = np.random.default_rng(0)
    cases = [
        np.zeros(0, np.int64),
        np.array([7]),
        np.repeat(rng.integers(0, 10, 1000), rng.integers(1, 4, 1000)),
        rng.integers(0, 2**40, 100_000),
        np.arange(50_000) * 2**20,
        rng.integers(0, 300, 50_000),
    ]
    for key in cases:
        unique, inverse = _group_keys(key.astype(np.int64))
        ref_unique, ref_inverse = np.unique(key, return_inverse=True)
        np.testing.assert_array_equal(unique, ref_unique)
        np.testing.assert_array_equal(inverse, ref_inverse)


@pytest.mark.parametrize("anisotropic", [False, True])
def test_long_range_channels_are_auxiliary(crop, anisotropic: bool) -> None:
    """A model with long-range outputs segments exactly as its 3 nearest channels do: the
    boundary map, the fragments and the region graph read nearest-neighbour affinities only
    (mixed in, long-range edges would join non-adjacent fragments)."""
    _, labels = crop
    long_range = ((-3, 0, 0), (0, -3, 0), (0, 0, -9))
    offsets = (*DEFAULT_OFFSETS[:2], long_range[0], DEFAULT_OFFSETS[2], *long_range[1:])
    affs, _ = affinities_from_labels(labels, offsets)
    affs = ndimage.gaussian_filter(affs, (0, 1, 1, 1))
    nearest = affs[[0, 1, 3]]
    kw = {"anisotropic": anisotropic}
    with_long = segment_affinities(affs, [0.3, 0.7], offsets=offsets, **kw)
    without = segment_affinities(nearest, [0.3, 0.7], **kw)
    for a, b in zip(with_long, without, strict=True):
        np.testing.assert_array_equal(a, b)
    stats = blockwise_edge_statistics(affs, with_long[0], offsets, block_shape=(16, 48, 48))
    assert_same_stats(stats, edge_statistics(nearest, with_long[0]))
