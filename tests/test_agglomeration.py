"""Fragments and waterz agglomeration on real labels of fib_medulla_250."""

from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import variation_of_information

from ssn_deploy.affinities import affinities_from_intensity, affinities_from_labels
from ssn_deploy.agglomeration import agglomerate_waterz, segment_affinities, watershed_fragments
from ssn_deploy.agglomeration.hierarchical import agglomerate, relabel
from ssn_deploy.agglomeration.region_graph import edge_statistics, merge_edge_stats


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
