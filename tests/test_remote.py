"""Outputs at fsspec URLs: memory:// (in this process), file://, and a missing filesystem."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
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


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_missing_filesystem_package_is_one_line_naming_it(sample: Path) -> None:
    result = infer(sample / "raw.zarr", "gs://bucket/o.zarr")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "gcsfs" in lines[0] and "ssn-deploy[remote]" in lines[0]


# --- s3:// on a real local S3-compatible server (moto in server mode) ---------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on a free 127.0.0.1 port and the environment that points s3fs at it
    (the documented convention: FSSPEC_S3_ENDPOINT_URL plus the usual AWS variables)."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = os.environ | {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    make = [sys.executable, "-c", "import s3fs; s3fs.S3FileSystem().mkdir('ssn-test')"]
    for _ in range(50):
        if subprocess.run(make, env=env, capture_output=True).returncode == 0:
            break
        time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("moto server did not start")
    yield env
    server.terminate()
    server.wait(timeout=10)


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "ssn-deploy")
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)


def test_s3_round_trip_infer_segment_evaluate_convert(s3: dict, sample: Path) -> None:
    raw = str(sample / "raw.zarr")
    done = run_cli(s3, "infer", raw, "-o", "s3://ssn-test/o.zarr", "--model", "intensity", "-q")
    assert done.returncode == 0, done.stderr
    scores = run_cli(s3, "evaluate", "s3://ssn-test/o.zarr/segmentation",
                     str(sample / "labels.zarr"), "--json")  # fmt: skip
    assert scores.returncode == 0, scores.stderr
    local = CliRunner().invoke(main, ["infer", raw, "-o", str(sample / "local.zarr"),
                                      "--model", "intensity", "-q"])  # fmt: skip
    assert local.exit_code == 0
    reference = CliRunner().invoke(main, ["evaluate", str(sample / "local.zarr/segmentation"),
                                          str(sample / "labels.zarr"), "--json"])  # fmt: skip
    assert json.loads(scores.stdout)["voi"] == json.loads(reference.stdout)["voi"]
    segmented = run_cli(s3, "segment", "s3://ssn-test/o.zarr/affinities", "-o",
                        "s3://ssn-test/seg.zarr", "-q")  # fmt: skip
    assert segmented.returncode == 0, segmented.stderr
    converted = run_cli(s3, "convert", raw, "s3://ssn-test/raw.zarr", "--no-progress")
    assert converted.returncode == 0, converted.stderr


def test_s3_missing_bucket_and_credentials_are_one_line(s3: dict, sample: Path) -> None:
    raw = str(sample / "raw.zarr")
    missing = run_cli(s3, "infer", raw, "-o", "s3://no-such-bucket/o.zarr", "--model",
                      "intensity", "-q")  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "bucket" in missing.stderr
    anonymous = {k: v for k, v in s3.items() if not k.startswith("AWS_")}
    anonymous |= {"HOME": str(sample), "AWS_EC2_METADATA_DISABLED": "true"}
    denied = run_cli(anonymous, "infer", raw, "-o", "s3://ssn-test/x.zarr", "--model",
                     "intensity", "-q")  # fmt: skip
    assert denied.returncode == 1, denied.stderr
    assert denied.stderr.strip().count("\n") == 0 and "credentials" in denied.stderr
