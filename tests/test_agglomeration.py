"""Fragments and waterz agglomeration on real labels of fib_medulla_250."""

from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import variation_of_information

from ssn_deploy.affinities import affinities_from_intensity, affinities_from_labels
from ssn_deploy.agglomeration import segment_affinities, watershed_fragments


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
