"""Acceptance: on a real 128³ crop, small blocks give the single block's result.

Through the whole ``ssn-deploy infer`` pipeline with the packaged default model: affinities
agree within 1e-5 and the segmentation is the same partition (VOI 0).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.metrics import evaluate
from ssn_deploy.volumes import create_volume, open_volume


@pytest.fixture(scope="module")
def crop(medulla_250: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seams")
    with h5py.File(medulla_250, "r") as f:
        raw = f["volumes/raw"][122:250, 61:189, 61:189]
    vol = create_volume(str(root / "raw.zarr"), raw.shape, np.uint8, voxel_size=(10, 10, 10))
    vol[...] = raw
    return root


def run(root: Path, name: str, block: str) -> str:
    out = str(root / f"{name}.zarr")
    args = ["infer", str(root / "raw.zarr"), "-o", out, "--model", "default"]
    args += ["--block-shape", block, "--fragment-tile", "64,64,64", "--patch-shape", "64,64,64"]
    args += ["--affinity-dtype", "float32", "--no-progress", "--no-preview"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def test_small_blocks_equal_one_block(crop: Path) -> None:
    single = run(crop, "single", "128,128,128")
    small = run(crop, "small", "64,64,64")
    a = open_volume(f"{single}/affinities")[...]
    b = open_volume(f"{small}/affinities")[...]
    assert np.abs(a - b).max() <= 1e-5
    seg_single = open_volume(f"{single}/segmentation")[...]
    seg_small = open_volume(f"{small}/segmentation")[...]
    assert len(np.unique(seg_single)) > 20, "a real model gives a real segmentation"
    scores = evaluate(seg_small, seg_single)
    assert scores["voi"] == pytest.approx(0.0, abs=1e-12), scores
