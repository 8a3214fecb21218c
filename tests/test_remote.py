"""Volumes at fsspec URLs: memory:// (in this process), file://, a missing filesystem, s3://
on a real moto server (endpoint from the environment or from --storage-options), and
read-only http:// inputs served by a local http.server."""

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
import numpy as np
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


# --- --storage-options: the endpoint given on the command line, not in the environment ----


def aws_only(s3: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    """Credentials in this process's environment, the endpoint nowhere: returned, for
    --storage-options to name."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3[key])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL", raising=False)
    assert "endpoint_url" not in fsspec.config.conf.get("s3", {})
    return s3["FSSPEC_S3_ENDPOINT_URL"]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_storage_options_carry_the_endpoint_for_inputs_and_outputs(
    s3: dict, sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = aws_only(s3, monkeypatch)
    flat = json.dumps({"endpoint_url": endpoint})
    per_protocol = json.dumps({"s3": {"endpoint_url": endpoint}})
    raw, url = str(sample / "raw.zarr"), "s3://ssn-test/options"
    done = cli("convert", raw, f"{url}/raw.zarr", "--no-progress", "--storage-options", flat)
    assert done.exit_code == 0, done.output  # written through the option
    done = cli("infer", f"{url}/raw.zarr", "-o", str(tmp_path / "o.zarr"), "--model",
               "intensity", "-q", "--storage-options", per_protocol)  # fmt: skip
    assert done.exit_code == 0, done.output  # read through it
    reference = cli("infer", raw, "-o", str(tmp_path / "local.zarr"), "--model", "intensity", "-q")
    assert reference.exit_code == 0, reference.output
    local = open_volume(str(tmp_path / "local.zarr/segmentation"))[...]
    np.testing.assert_array_equal(open_volume(str(tmp_path / "o.zarr/segmentation"))[...], local)
    done = cli("segment", str(tmp_path / "o.zarr/affinities"), "-o", f"{url}/seg.zarr", "-q",
               "--storage-options", flat)  # fmt: skip
    assert done.exit_code == 0, done.output  # written through it
    local_seg = str(tmp_path / "local.zarr/segmentation")
    scores = cli("evaluate", f"{url}/seg.zarr/segmentation", local_seg, "--json",
                 "--storage-options", flat)  # fmt: skip
    assert scores.exit_code == 0, scores.output  # segment repeats infer's settings exactly
    assert json.loads(scores.stdout)["voi"] == pytest.approx(0.0, abs=1e-12)
    from ssn_deploy.volumes import storage_options

    with storage_options({"endpoint_url": endpoint}):  # the Python API of the option
        np.testing.assert_array_equal(open_volume(f"{url}/seg.zarr/segmentation")[...], local)


def test_pickled_url_volumes_reopen_with_their_storage_options(
    s3: dict, sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a dask worker elsewhere (--scheduler) does with a task's volume: a process that
    has neither the option nor the environment variable still reads the right server."""
    import pickle

    from ssn_deploy.volumes import convert, storage_options

    endpoint = aws_only(s3, monkeypatch)
    with storage_options({"endpoint_url": endpoint}):
        convert(str(sample / "raw.zarr"), "s3://ssn-test/pickled/raw.zarr", progress=False)
        volume = open_volume("s3://ssn-test/pickled/raw.zarr")
    assert volume.storage_options == {"endpoint_url": endpoint}
    expected = int(volume[40, :, :].astype(np.int64).sum())
    read = "import pickle, sys; v = pickle.loads(sys.stdin.buffer.read()); print(int(v[40].sum()))"
    env = {k: v for k, v in s3.items() if k != "FSSPEC_S3_ENDPOINT_URL"}
    worker = subprocess.run([sys.executable, "-c", read], input=pickle.dumps(volume), env=env,
                            capture_output=True, timeout=120)  # fmt: skip
    assert worker.returncode == 0, worker.stderr.decode()
    assert int(worker.stdout) == expected > 0


def test_bad_storage_options_are_one_line(
    s3: dict, sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = str(sample / "raw.zarr")
    for command in (["infer", raw], ["segment", raw, "-o", "s.zarr"], ["evaluate", raw, raw],
                    ["convert", raw, "c.zarr"], ["export-precomputed", raw, "p"],
                    ["view", raw], ["verify", raw], ["select", raw],
                    ["pretrain", raw]):  # fmt: skip
        for bad, reason in (("{endpoint_url: 1}", "not valid JSON"), ('["a"]', "JSON object")):
            result = cli(*command, "--storage-options", bad)
            assert result.exit_code == 1, (command, result.output)
            line = result.output.strip()
            assert "\n" not in line and "--storage-options" in line and reason in line, line
    endpoint = aws_only(s3, monkeypatch)
    # the right endpoint in fsspec's configuration, as FSSPEC_S3_ENDPOINT_URL puts it: the
    # option wins
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens there once the socket is closed
    wrong = {"endpoint_url": f"http://127.0.0.1:{closed}",
             "config_kwargs": {"retries": {"max_attempts": 1}}}  # fmt: skip
    infer_to = ["infer", raw, "-o", "s3://ssn-test/wrong.zarr", "--model", "intensity", "-q"]
    result = cli(*infer_to, "--storage-options", json.dumps(wrong))
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and f"127.0.0.1:{closed}" in line and "endpoint" in line, line
    typo = {"endpoint_url": endpoint, "retires": 2}
    result = cli(*infer_to, "--storage-options", json.dumps(typo))
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and "'retires' is not an option" in line, line
    assert not fsspec.filesystem("s3", endpoint_url=endpoint).exists("ssn-test/wrong.zarr")


# --- http(s):// inputs: read-only, served by a plain local http.server ------------------------


@pytest.fixture(scope="module")
def http(sample: Path):
    """A ThreadingHTTPServer on a free 127.0.0.1 port serving the sample's directory as
    static files (no directory listings, no Range requests, no PUT): its base URL, and the
    request lines it received."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            requests.append(str(self.requestline))

        def list_directory(self, path: str) -> None:  # a static server: no index pages
            self.send_error(404, "no directory listings")

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=sample))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def reference(sample: Path) -> Path:
    """infer's output of the local sample (served over http too): sharded, with a pyramid."""
    done = cli("infer", str(sample / "raw.zarr"), "-o", str(sample / "ref.zarr"), "--model",
               "intensity", "-q", "--no-preview")  # fmt: skip
    assert done.exit_code == 0, done.output
    return sample / "ref.zarr"


def test_infer_reads_an_http_volume_like_the_local_one(
    http, reference: Path, tmp_path: Path
) -> None:
    base, requests = http
    remote = cli("infer", f"{base}/raw.zarr", "-o", str(tmp_path / "local.zarr"), "--model",
                 "intensity", "-q")  # fmt: skip
    assert remote.exit_code == 0, remote.output
    assert any("GET /raw.zarr/0/c/" in r for r in requests)  # the chunks came over http
    seg = open_volume(str(tmp_path / "local.zarr/segmentation"))
    ref = open_volume(str(reference / "segmentation"))
    assert seg.shape == (80, 160, 160) and seg.voxel_size == ref.voxel_size == (10, 10, 10)
    assert seg.offset == ref.offset and len(np.unique(ref[...])) > 10
    np.testing.assert_array_equal(seg[...], ref[...])
    affinities = open_volume(str(tmp_path / "local.zarr/affinities"))
    assert affinities.attrs["ssn_deploy"]["source"] == f"{base}/raw.zarr"
    np.testing.assert_array_equal(affinities[...], open_volume(f"{reference}/affinities")[...])


def test_sharded_http_volumes_read_without_range_support(http, reference: Path) -> None:
    """infer's output is sharded (zarr reads byte ranges, which this server ignores): over
    http it equals itself locally; a missing node is one line, though the server lists no
    directories to say what there is."""
    base, _ = http
    local = str(reference / "labels/segmentation")
    scores = cli("evaluate", f"{base}/ref.zarr/segmentation", local, "--json")
    assert scores.exit_code == 0, scores.output
    assert json.loads(scores.stdout)["voi"] == pytest.approx(0.0, abs=1e-12)
    level = open_volume(f"{base}/ref.zarr/labels/segmentation/1")
    np.testing.assert_array_equal(level[...], open_volume(f"{local}/1")[...])
    missing = cli("evaluate", f"{base}/ref.zarr/nothing", local)
    assert missing.exit_code == 1 and "\n" not in missing.output.strip(), missing.output
    assert "no dataset 'nothing'" in missing.output and "lists no directories" in missing.output


def test_writing_to_http_is_refused_before_any_work(http, sample: Path) -> None:
    base, requests = http
    raw = str(sample / "raw.zarr")
    before = len(requests)
    for command in (["infer", raw, "-o", f"{base}/x.zarr", "--model", "intensity"],
                    ["segment", raw, "-o", f"{base}/x.zarr"],
                    ["convert", raw, f"{base}/x.zarr"],
                    ["convert", f"{base}/raw.zarr", "https://127.0.0.1:9/x.zarr"]):  # fmt: skip
        result = cli(*command, "-q")
        assert result.exit_code == 1, (command, result.output)
        line = result.output.strip()
        assert "\n" not in line and "read-only" in line and "x.zarr" in line, line
    assert not any("x.zarr" in r for r in requests[before:])  # not even asked whether it exists
    assert not (sample / "x.zarr").exists()


def test_default_output_of_an_http_volume_is_in_the_working_directory() -> None:
    from ssn_deploy.cli import default_output

    assert default_output("http://127.0.0.1:8000/data/raw.zarr") == "raw.ssn.zarr"
    assert default_output("https://host/raw.zarr/labels") == "raw.ssn.zarr"
    assert default_output("s3://bucket/dir/raw.zarr") == "s3://bucket/dir/raw.ssn.zarr"
    assert default_output("data.hdf:volumes/raw") == "data.ssn.zarr"
