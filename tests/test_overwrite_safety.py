"""``--overwrite`` never deletes or replaces what a command reads (issue: Reliability).

Each case puts the output on (or around) one of the command's own inputs, passes
``--overwrite``, and expects a one-line error naming that input, exit status 1, and every
input byte-identical afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.models import ModelConfig, build_model
from ssn_deploy.models.checkpoint import save_checkpoint
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.volumes import create_volume
from tests.conftest import sha256

REPO = Path(__file__).resolve().parents[1]


def refused(args: list[object], protected: Path) -> str:
    before = sha256(protected)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "which this command reads" in lines[0], result.output
    assert protected.exists() and sha256(protected) == before, "the input is untouched"
    return lines[0]


def labels(path: Path) -> Path:
    data = np.arange(8 * 16 * 16, dtype=np.uint64).reshape(8, 16, 16) // 64 + 1
    create_volume(str(path), data.shape, np.uint64, voxel_size=(10, 10, 10))[...] = data
    return path


def test_evaluate_output_onto_the_ground_truth(tmp_path: Path) -> None:
    gt = tmp_path / "gt.hdf"
    with h5py.File(gt, "w") as f:
        f.create_dataset("volumes/labels", data=np.arange(512, dtype=np.uint64).reshape(8, 8, 8))
    seg = labels(tmp_path / "seg.zarr")
    line = refused(["evaluate", seg, f"{gt}:volumes/labels", "--output", gt, "--overwrite"], gt)
    assert "gt.hdf" in line


def test_train_overwrite_of_the_directory_holding_its_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    config = yaml.safe_load((REPO / "configs" / "fib_tiny_train.yaml").read_text())
    for key in ("raw", "labels"):  # absolute, so that the copied config still finds its data
        path, _, node = config["data"][key].partition(":")
        config["data"][key] = f"{(REPO / 'configs' / path).resolve()}:{node}"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    refused(["train", run / "config.yaml", "-o", run, "--overwrite"], run / "config.yaml")


def test_train_overwrite_of_the_directory_holding_its_data(
    tmp_path: Path, tiny_train: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_train, run / "data.hdf")
    config = yaml.safe_load((REPO / "configs" / "fib_tiny_train.yaml").read_text())
    config["data"]["raw"] = f"{run / 'data.hdf'}:volumes/raw"
    config["data"]["labels"] = f"{run / 'data.hdf'}:volumes/labels/neuron_ids"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    refused(["train", tmp_path / "config.yaml", "-o", run, "--overwrite"], run / "data.hdf")


def test_pretrain_overwrite_of_the_directory_holding_its_volume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    raw = run / "raw.zarr"
    data = np.random.default_rng(0).integers(0, 255, (16, 64, 64), dtype=np.uint8)
    create_volume(str(raw), data.shape, np.uint8, voxel_size=(50, 10, 10))[...] = data
    refused(["pretrain", raw, "-o", run, "--overwrite", "--crop", "8,32,32"], raw)


def test_export_over_its_own_checkpoint(tmp_path: Path) -> None:
    model = build_model(ModelConfig(filters=(4, 8), poolings=((1, 2, 2),), embed_kernel=(1, 3, 3)))
    ckpt = save_checkpoint(
        tmp_path / "model.ckpt", model, normalization=Normalization(), voxel_size=(50, 10, 10)
    )
    refused(["export", ckpt, "-o", tmp_path, "--overwrite"], ckpt)


def test_segment_into_its_affinities(tmp_path: Path) -> None:
    affs = tmp_path / "affs.zarr"
    data = np.full((3, 8, 32, 32), 200, np.uint8)
    vol = create_volume(str(affs), data.shape, np.uint8, voxel_size=(10, 10, 10))
    vol[...] = data
    refused(["segment", affs, "-o", affs, "--overwrite", "--threshold", "0.5"], affs)


def test_select_into_the_folder_holding_its_volume(tmp_path: Path) -> None:
    raw = tmp_path / "raw.zarr"
    data = np.random.default_rng(0).integers(0, 255, (20, 96, 96), dtype=np.uint8)
    create_volume(str(raw), data.shape, np.uint8, voxel_size=(50, 10, 10))[...] = data
    refused(["select", raw, "-o", tmp_path, "--overwrite", "--no-progress"], raw)


def test_an_unrelated_output_is_still_written(tmp_path: Path) -> None:
    gt = labels(tmp_path / "gt.zarr")
    report = tmp_path / "report.json"
    report.write_text("old")
    result = CliRunner().invoke(
        main, ["evaluate", str(gt), str(gt), "--output", str(report), "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["voi"] == pytest.approx(0.0, abs=1e-9)
