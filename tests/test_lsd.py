"""Local shape descriptors: the geometry they encode, on shapes whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from ssn_deploy.training.lsd import CHANNELS, local_shape_descriptors


def ball(shape=(40, 40, 40), radius=12.0, voxel=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Label 7: a ball of ``radius`` (physical units) at the centre; 0 elsewhere."""
    grids = np.indices(shape).astype(float)
    centre = [(n - 1) / 2 for n in shape]
    r2 = sum(((g - c) * v) ** 2 for g, c, v in zip(grids, centre, voxel, strict=True))
    return np.where(r2 <= radius**2, 7, 0).astype(np.uint64)


def test_descriptors_of_a_ball_point_inward_and_are_round() -> None:
    labels = ball()
    d = local_shape_descriptors(labels, sigma=4.0)
    assert d.shape == (CHANNELS, 40, 40, 40) and d.dtype == np.float32
    assert d.min() >= 0 and d.max() <= 1
    assert not d[:, labels == 0].any()  # background carries nothing
    c = (19, 19, 19)
    # deep inside, the window is filled: no offset, isotropic spread, no correlation, full mass
    np.testing.assert_allclose(d[(slice(0, 3), *c)], 0.5, atol=0.02)
    np.testing.assert_allclose(d[(slice(3, 6), *c)], d[3][c], atol=0.01)
    np.testing.assert_allclose(d[(slice(6, 9), *c)], 0.5, atol=0.02)
    assert d[9][c] > 0.97
    # at the ball's +x surface the centre of mass lies towards -x, and the window is part empty
    edge = (19, 19, 19 + 11)
    assert d[2][edge] < 0.4 and abs(d[0][edge] - 0.5) < 0.02 and abs(d[1][edge] - 0.5) < 0.02
    assert d[9][edge] < 0.75 and d[5][edge] < d[3][edge]  # thinner along x there
    # on a diagonal of the surface the object spreads along the tangent: where the normal is
    # (+y, +x) the tangent is (+y, -x), so y and x anticorrelate; at (+y, -x) they correlate
    assert d[8][19, 27, 27] < 0.4 and d[8][19, 27, 11] > 0.6


def test_objects_are_described_separately_and_by_their_own_id() -> None:
    labels = ball()
    labels[:, :, 20:] = np.where(labels[:, :, 20:] > 0, 9, 0)  # two halves, two objects
    d = local_shape_descriptors(labels, sigma=4.0)
    left, right = (19, 19, 17), (19, 19, 22)
    assert d[2][left] < 0.5 < d[2][right]  # each half's mass lies away from the cut


def test_coarse_grid_and_anisotropic_voxels_agree_with_the_fine_isotropic_answer() -> None:
    labels = ball(radius=15)
    fine = local_shape_descriptors(labels, sigma=8.0)
    coarse = local_shape_descriptors(labels, sigma=8.0, downsample=2)
    assert not coarse[:, labels == 0].any()
    assert np.abs(fine - coarse)[:, labels > 0].mean() < 0.05  # measured 0.036
    # the same physical ball at 4×1×1 voxels: its spread is as round in z as in x
    aniso = ball(shape=(12, 40, 40), voxel=(4.0, 1.0, 1.0))
    d = local_shape_descriptors(aniso, sigma=4.0, voxel_size=(4.0, 1.0, 1.0))
    centre = (5, 19, 19)
    assert abs(d[3][centre] - d[5][centre]) < 0.06


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="3D"):
        local_shape_descriptors(np.zeros((4, 4), np.uint64), sigma=2.0)
    with pytest.raises(ValueError, match="sigma"):
        local_shape_descriptors(np.zeros((4, 4, 4), np.uint64), sigma=0.0)
