"""Test-time augmentation: flips are undone exactly, affinity directions included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.errors import ConfigError
from ssn_deploy.inference.baseline import IntensityPredictor
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.inference.tta import FlipAveragedPredictor
from ssn_deploy.volumes import create_volume, open_volume


@pytest.mark.parametrize("axes", ["x", "yx", "zyx"])
def test_flips_restore_affinity_directions(axes: str) -> None:
    """The baseline's affinity min(I(v), I(v + offset)) is direction-aware and flip-covariant,
    so averaging it over flips must give it back exactly (away from the patch faces)."""
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 6, 10, 12)).astype(np.float32)
    plain = IntensityPredictor()
    tta = FlipAveragedPredictor(plain, axes)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(tta.predict(x)[inner], plain.predict(x)[inner], atol=1e-6)
    assert tta.context == (2, 2, 2), "context grows by the offsets' reach"
    assert tta.provenance["tta"] == f"flips {axes}"


def test_a_real_model_is_averaged_over_its_flips() -> None:
    model = load_predictor("aniso")
    x = np.random.default_rng(1).random((1, 1, 4, 32, 32)).astype(np.float32)
    plain = model.predict(x)
    flipped = np.flip(model.predict(np.ascontiguousarray(np.flip(x, 4))), 4).copy()
    flipped[:, 2, :, :, 1:] = flipped[:, 2, :, :, :-1].copy()  # x channel: v+1 → v−1 partner
    expected = (plain + flipped) / 2
    got = FlipAveragedPredictor(model, "x").predict(x)
    np.testing.assert_allclose(got[..., 1:], expected[..., 1:], atol=1e-5)


def test_bad_axes_are_refused() -> None:
    with pytest.raises(ConfigError, match="--tta"):
        load_predictor("intensity", tta="xq")


def test_infer_records_tta(tmp_path: Path) -> None:
    raw = (np.random.default_rng(2).random((8, 32, 32)) * 255).astype(np.uint8)
    create_volume(str(tmp_path / "raw.zarr"), raw.shape, np.uint8, voxel_size=(10, 10, 10))[...] = (
        raw
    )
    out = tmp_path / "out.zarr"
    args = ["infer", str(tmp_path / "raw.zarr"), "-o", str(out), "--model", "intensity"]
    result = CliRunner().invoke(main, [*args, "--tta", "yx", "--no-progress", "--no-preview"])
    assert result.exit_code == 0, result.output
    attrs = open_volume(f"{out}/affinities").attrs["ssn_deploy"]
    assert attrs["settings"]["tta"] == "flips yx"
