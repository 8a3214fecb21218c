"""Outputs at fsspec URLs: memory:// (in this process), file://, and a missing filesystem."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.volumes import open_volume


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    assert CliRunner().invoke(main, ["sample", str(root), "-q"]).exit_code == 0
    return root


def infer(raw: Path, out: str, *more: str):
    return CliRunner().invoke(main, ["infer", str(raw), "-o", out, "--model", "intensity",
                                     "-q", *more])  # fmt: skip


def test_infer_writes_every_array_and_the_preview_to_a_url(sample: Path) -> None:
    result = infer(sample / "raw.zarr", "memory://remote-test/o.zarr")
    assert result.exit_code == 0, result.output
    memory = fsspec.filesystem("memory")
    assert memory.exists("/remote-test/o.preview.png")
    assert memory.cat("/remote-test/o.preview.png")[:8] == b"\x89PNG\r\n\x1a\n"
    seg = open_volume("memory://remote-test/o.zarr/segmentation")
    assert seg.shape == (80, 160, 160) and seg[40:41].max() > 0
    scores = CliRunner().invoke(main, ["evaluate", "memory://remote-test/o.zarr/segmentation",
                                       str(sample / "labels.zarr"), "--json"])  # fmt: skip
    assert scores.exit_code == 0, scores.output
    assert json.loads(scores.stdout)["voi"] > 0


def test_an_existing_url_output_is_refused_unless_overwritten(sample: Path, tmp_path) -> None:
    url = f"file://{tmp_path}/o.zarr"
    assert infer(sample / "raw.zarr", url).exit_code == 0
    assert (tmp_path / "o.preview.png").exists()
    again = infer(sample / "raw.zarr", url)
    assert again.exit_code == 1 and "already exists" in again.output
    assert infer(sample / "raw.zarr", url, "--overwrite").exit_code == 0


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_a_missing_filesystem_package_is_one_line_naming_it(sample: Path) -> None:
    result = infer(sample / "raw.zarr", "s3://bucket/o.zarr")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "s3fs" in lines[0] and "ssn-deploy[remote]" in lines[0]
