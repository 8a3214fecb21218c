"""Triton-backed inference and the block models, against a real ``tritonserver``.

The session's server (``conftest.py``) serves the packaged isotropic model; ``ssn-deploy infer
--backend triton`` runs on a real 48×96×144 crop of the ``fib_medulla_250`` test region and is
compared with ``--backend onnxruntime`` on the same ONNX file. A second server is killed in the
middle of a run (a one-line error, exit 1) and a third lets ``--resume`` finish it. The
``segment`` and ``agglomerate`` models are compared with ``ssn-deploy segment``'s code path and
with :func:`segment_affinities` on the same block.
"""

from __future__ import annotations

import functools
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import ssn_deploy
from ssn_deploy.agglomeration import segment_affinities
from ssn_deploy.cli import main
from ssn_deploy.errors import ConfigError, ServingError, SsnDeployError
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.inference.triton_backend import (
    TritonOptions,
    TritonPredictor,
    served_model,
    with_retries,
)
from ssn_deploy.models import Normalization
from ssn_deploy.serving import block_models
from ssn_deploy.serving.client import TransientServingError, TritonClient, is_local, split_url
from ssn_deploy.serving.environment import link_package
from ssn_deploy.serving.repository import AFFINITY_PY, AGGLOMERATE, SEGMENT
from ssn_deploy.serving.server import TritonServer, free_port
from ssn_deploy.volumes import create_volume, open_volume
from tests.conftest import MAX_BATCH, MAX_PATCH

CROP = (slice(125, 173), slice(64, 160), slice(64, 208))
"""48×96×144 voxels of the test region: six 48³ blocks, one 64³ patch each."""
OPTIONS = [
    *("--patch-shape", "64,64,64", "--block-shape", "48,48,48", "--fragment-tile", "48,48,48"),
    *("--affinity-dtype", "float32", "--no-progress", "--no-preview"),
]
BLOCKS = 6
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crop(medulla_250: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    with h5py.File(medulla_250, "r") as f:
        raw = f["volumes/raw"][CROP]
    path = str(tmp_path_factory.mktemp("triton-infer") / "raw.zarr")
    create_volume(path, raw.shape, np.uint8, voxel_size=(10, 10, 10))[...] = raw
    return path


def infer(crop: str, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["infer", crop, "-o", str(out), *OPTIONS, *extra])


def outputs(out: Path) -> tuple[np.ndarray, np.ndarray]:
    return open_volume(f"{out}/affinities")[...], open_volume(f"{out}/segmentation")[...]


@pytest.fixture(scope="module")
def onnxruntime_run(crop: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out.zarr"
    result = infer(crop, out, "--backend", "onnxruntime", "--model", "iso")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def triton_run(crop: str, server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gRPC, one worker: requests one at a time, so results do not depend on batching."""
    out = tmp_path_factory.mktemp("triton") / "out.zarr"
    result = infer(crop, out, "--backend", "triton", "--url", server.grpc_url)
    assert result.exit_code == 0, result.output
    return out


# --- results equal the local backend


def test_infer_through_triton_equals_onnxruntime(triton_run: Path, onnxruntime_run: Path) -> None:
    served, local = outputs(triton_run), outputs(onnxruntime_run)
    diff = float(np.abs(served[0] - local[0]).max())
    print(f"grpc, shared memory: max |Δ affinities| = {diff:.1e}")
    assert served[0].dtype == np.float32 and diff <= 1e-5
    assert np.array_equal(served[1], local[1])
    attrs = open_volume(f"{triton_run}/affinities").attrs["ssn_deploy"]
    used = attrs["predictor"]
    assert used["backend"] == "triton" and used["model"] == f"triton:{AFFINITY_PY}"
    assert used["shared_memory"] is True  # the server is on this host
    local_attrs = open_volume(f"{onnxruntime_run}/affinities").attrs["ssn_deploy"]
    assert attrs["settings"]["model_sha256"] == local_attrs["settings"]["model_sha256"]


def test_two_workers_share_the_server_over_http(
    crop: str, server: TritonServer, onnxruntime_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "http.zarr"
    result = infer(
        crop, out, "--url", server.http_url, "--protocol", "http", "--workers", "2"
    )  # --url alone implies --backend triton
    assert result.exit_code == 0, result.output
    served, local = outputs(out), outputs(onnxruntime_run)
    assert float(np.abs(served[0] - local[0]).max()) <= 1e-5
    assert open_volume(f"{out}/affinities").attrs["ssn_deploy"]["predictor"]["protocol"] == "http"


@pytest.mark.parametrize(
    ("protocol", "shared_memory"), [("grpc", "off"), ("grpc", "on"), ("http", "on")]
)
def test_predictor_splits_batches_and_matches_local(
    server: TritonServer, local: Any, patch: np.ndarray, protocol: str, shared_memory: str
) -> None:
    batch = np.concatenate([patch, patch[:1]])  # 3 patches > the served maximum batch of 2
    url = server.grpc_url if protocol == "grpc" else server.http_url
    predictor = TritonPredictor(url, protocol=protocol, shared_memory=shared_memory)
    try:
        assert predictor.max_batch == MAX_BATCH and predictor.max_patch == MAX_PATCH
        assert predictor.spec == local.spec  # geometry and normalisation from the server
        assert predictor.provenance["shared_memory"] is (shared_memory == "on")
        served = predictor.predict(batch)
    finally:
        predictor.close()
    assert float(np.abs(served - local.predict(batch)).max()) <= 1e-5


def test_predictor_factory_pickles_for_dask_workers(server: TritonServer) -> None:
    factory = functools.partial(
        load_predictor, "default", "triton", triton=TritonOptions(server.grpc_url)
    )
    predictor = pickle.loads(pickle.dumps(factory))()
    try:
        assert predictor.provenance["url"] == server.grpc_url
    finally:
        predictor.close()  # type: ignore[attr-defined]


# --- the server killed in the middle of a run


def _finished_blocks(out: Path) -> int:
    try:
        return int(np.count_nonzero(open_volume(f"{out}/affinities/done")[...]))
    except SsnDeployError:
        return 0  # not created yet


def test_server_killed_mid_run_then_resume_finishes_the_run(
    server_env: Any, repository: Path, crop: str, triton_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed.zarr"
    first = TritonServer(
        repository, environment=server_env, models=[AFFINITY_PY], log=tmp_path / "first.log"
    ).start()
    command = [sys.executable, "-m", "ssn_deploy.cli", "infer", crop, "-o", str(out)]
    command += ["--backend", "triton", "--url", first.grpc_url, *OPTIONS]
    run = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while _finished_blocks(out) == 0 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.poll() is None, f"the run ended before the kill: {run.communicate()}"
        first.kill()
        _, err = run.communicate(timeout=120)
    finally:
        first.kill()
        if run.poll() is None:
            run.kill()
            run.wait()
    lines = err.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "cannot reach" in lines[0] and "--resume" in lines[0]
    done = _finished_blocks(out)
    assert 0 < done < BLOCKS
    with TritonServer(
        repository, environment=server_env, models=[AFFINITY_PY], log=tmp_path / "second.log"
    ) as second:  # new ports: the server's address is not part of the run's settings
        result = infer(crop, out, "--backend", "triton", "--url", second.grpc_url, "--resume")
    assert result.exit_code == 0, result.output
    resumed, uninterrupted = outputs(out), outputs(triton_run)
    assert np.array_equal(resumed[0], uninterrupted[0])
    assert np.array_equal(resumed[1], uninterrupted[1])
    print(f"killed after {done} of {BLOCKS} blocks; --resume finished the run")


# --- one-line errors before any work


def test_unreachable_server_is_one_line_error(crop: str, tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    result = infer(crop, tmp_path / "out.zarr", "--backend", "triton", "--url", url)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: cannot reach")
    assert "gave up after 4 retries over 7.5 s" in result.output
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--triton-model", AGGLOMERATE], "does not serve what the engine expects"),
        (["--triton-model", "nope"], "refused the request to nope"),
        (["--patch-shape", "96,96,96"], "exceeds the maximum patch (64, 64, 64)"),
        (["--model", "aniso"], "runs the model the server serves"),
        (["--precision", "bf16"], "do not apply to --backend triton"),
    ],
)
def test_what_the_server_cannot_do_is_refused_in_one_line(
    crop: str, server: TritonServer, tmp_path: Path, extra: list[str], message: str
) -> None:
    out = tmp_path / "out.zarr"
    result = infer(crop, out, "--backend", "triton", "--url", server.grpc_url, *extra)
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert not out.exists()


def test_backend_and_url_must_agree(crop: str, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    result = infer(crop, out, "--backend", "triton")
    assert result.exit_code == 1 and "needs the server's address" in result.output
    result = infer(crop, out, "--backend", "onnxruntime", "--url", "127.0.0.1:8001")
    assert result.exit_code == 1 and "pass --backend triton" in result.output


def _config(params: dict[str, str], **overrides: Any) -> dict[str, Any]:
    config = {
        "max_batch_size": 2,
        "input": [{"name": "raw", "data_type": "TYPE_FP32", "dims": ["1", "-1", "-1", "-1"]}],
        "output": [{"name": "affs", "data_type": "TYPE_FP32", "dims": ["3", "-1", "-1", "-1"]}],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }
    return config | overrides


def test_served_metadata_is_checked(local: Any) -> None:
    params = {**local.spec.to_metadata(), "ssn_deploy.max_patch": "[64, 64, 64]"}
    model = served_model(_config(params), "m")
    assert model.spec == local.spec and model.max_patch == (64, 64, 64)
    assert (model.input_name, model.output_name, model.max_batch) == ("raw", "affs", 2)
    with pytest.raises(ServingError, match=r"lacks ssn_deploy\.offsets.*build-repo"):
        served_model(_config({}), "m")
    with pytest.raises(ServingError, match="max_batch_size 0"):
        served_model(_config(params, max_batch_size=0), "m")
    two = [{"name": "affs", "data_type": "TYPE_FP32", "dims": [2, -1, -1, -1]}]
    with pytest.raises(ServingError, match="for 3 offsets"):
        served_model(_config(params, output=two), "m")


def test_retries_back_off_exponentially_and_refusals_are_not_retried() -> None:
    waits: list[float] = []
    calls = iter([TransientServingError("down"), TransientServingError("down"), "answer"])

    def call() -> str:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert with_retries(call, retries=4, backoff=0.5, sleep=waits.append) == "answer"
    assert waits == [0.5, 1.0]
    waits.clear()
    with pytest.raises(TransientServingError, match=r"down \(gave up after 2 retries over 3 s\)$"):
        with_retries(
            lambda: (_ for _ in ()).throw(TransientServingError("down")),
            retries=2,
            backoff=1.0,
            sleep=waits.append,
        )
    assert waits == [1.0, 2.0]
    with pytest.raises(ServingError, match="refused"):
        with_retries(lambda: (_ for _ in ()).throw(ServingError("refused")), sleep=waits.append)
    assert waits == [1.0, 2.0]


def test_urls() -> None:
    assert split_url("grpc://127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert split_url("triton.lab:8000") == ("triton.lab", 8000)
    assert is_local("localhost:8001") and is_local("127.0.0.1:1")
    assert not is_local("10.0.0.5:8001")
    with pytest.raises(ConfigError, match="shared memory"):
        TritonPredictor("127.0.0.1:1", shared_memory="maybe")


# --- the block models


@pytest.fixture(scope="module")
def raw_block(medulla_250: Path) -> np.ndarray:
    with h5py.File(medulla_250, "r") as f:
        return np.ascontiguousarray(f["volumes/raw"][125:173, 64:128, 64:128])


def _tensor(module: Any, name: str, array: np.ndarray, datatype: str) -> Any:
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(np.ascontiguousarray(array))
    return tensor


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming: the pairs (a, b) are as many as the ids of either."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_segment_model_equals_ssn_deploy_segment(
    server: TritonServer, local: Any, raw_block: np.ndarray
) -> None:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(server.grpc_url)
    started = time.perf_counter()
    result = client.infer(SEGMENT, [_tensor(grpc, "raw", raw_block, "UINT8")], client_timeout=120)
    seconds = time.perf_counter() - started
    seg, served_affs = result.as_numpy("segmentation"), result.as_numpy("affinities")
    affs = local.predict(local.normalization(raw_block)[None, None])[0]
    assert float(np.abs(served_affs - affs).max()) <= 1e-5
    threshold = local.spec.threshold  # the model's own, the served default
    cli = ssn_deploy.segment(
        affs,
        voxel_size=(10, 10, 10),
        threshold=threshold,
        block_shape=raw_block.shape,
        fragment_tile=raw_block.shape,
    )  # ssn-deploy segment's code path, one block that is one fragment tile
    assert seg.dtype == np.uint64 and seg.shape == raw_block.shape
    assert len(np.unique(seg)) > 10
    assert _same_partition(seg, cli)
    assert np.array_equal(seg, segment_affinities(affs, threshold))
    print(f"segment model: {seg.shape} block in {seconds:.1f} s, {len(np.unique(seg))} segments")


def test_agglomerate_model_takes_a_threshold(
    server: TritonServer, local: Any, raw_block: np.ndarray
) -> None:
    import tritonclient.http as http

    affs = local.predict(local.normalization(raw_block)[None, None])[0]
    with TritonClient(server.http_url, protocol="http", model=AGGLOMERATE) as c:
        assert c.config()["max_batch_size"] == 0
    client = http.InferenceServerClient(server.http_url, network_timeout=120)
    for threshold in (0.2, 0.7):
        inputs = [
            _tensor(http, "affinities", affs, "FP32"),
            _tensor(http, "threshold", np.array([threshold], np.float32), "FP32"),
        ]
        seg = client.infer(AGGLOMERATE, inputs).as_numpy("segmentation")
        assert np.array_equal(seg, segment_affinities(affs, threshold))
    default = client.infer(AGGLOMERATE, inputs[:1]).as_numpy("segmentation")
    assert np.array_equal(default, segment_affinities(affs, local.spec.threshold))


def test_bad_block_requests_are_refused_and_the_server_keeps_serving(
    server: TritonServer, raw_block: np.ndarray
) -> None:
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(server.grpc_url)
    affs = np.full((3, 16, 16, 16), 0.9, np.float32)
    bad = {
        "UINT8": (SEGMENT, [_tensor(grpc, "raw", raw_block.astype(np.float32), "FP32")]),
        "maximum": (SEGMENT, [_tensor(grpc, "raw", np.zeros((80, 64, 64), np.uint8), "UINT8")]),
        "granularity": (SEGMENT, [_tensor(grpc, "raw", np.zeros((24, 32, 32), np.uint8), "UINT8")]),
        "in [0, 1]": (
            AGGLOMERATE,
            [
                _tensor(grpc, "affinities", affs, "FP32"),
                _tensor(grpc, "threshold", np.array([1.5], np.float32), "FP32"),
            ],
        ),
        "[3,-1,-1,-1]": (AGGLOMERATE, [_tensor(grpc, "affinities", affs[:2], "FP32")]),
    }
    for what, (model, inputs) in bad.items():
        with pytest.raises(InferenceServerException, match=what.replace("[", r"\[")):
            client.infer(model, inputs, client_timeout=60)
    seg = client.infer(AGGLOMERATE, [_tensor(grpc, "affinities", affs, "FP32")]).as_numpy(
        "segmentation"
    )
    assert np.array_equal(seg, np.ones((16, 16, 16), np.uint64))
    assert server.running


def test_block_model_settings_and_checks() -> None:
    params = {
        "ssn_deploy.offsets": "[[-1, 0, 0], [0, -1, 0], [0, 0, -1]]",
        "ssn_deploy.threshold": "null",
        "ssn_deploy.anisotropic": "true",
        "ssn_deploy.max_block": "[8, 64, 64]",
    }
    settings = block_models.block_settings(params)
    assert settings.threshold == 0.5 and settings.anisotropic and settings.max_block == (8, 64, 64)
    check = block_models.check_affinities
    assert check(np.dtype(np.float32), (3, 8, 64, 64), settings) is None
    assert "FP32" in check(np.dtype(np.float64), (3, 8, 64, 64), settings)
    assert "3 x Z" in check(np.dtype(np.float32), (2, 8, 64, 64), settings)
    assert "exceeds" in check(np.dtype(np.float32), (3, 9, 64, 64), settings)
    assert block_models.check_threshold(None, 0.3) == (0.3, None)
    assert block_models.check_threshold(np.array([0.4], np.float32), 0.3) == (
        pytest.approx(0.4),
        None,
    )
    assert "in [0, 1]" in block_models.check_threshold(np.array([np.nan], np.float32), 0.3)[1]
    raw = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    for norm in (Normalization(), Normalization(mean=0.3, std=0.2, kind="meanstd")):
        assert np.array_equal(block_models.normalize(raw, norm.to_dict()), norm(raw))


def test_server_environment_has_agglomeration_without_torch(
    server_env: Any, tmp_path: Path
) -> None:
    """What the stubs see: the server's packages (numpy<2) and this very ssn_deploy, linked."""
    variables = server_env.variables(package=link_package(tmp_path / "package"))
    code = (
        "import os, sys; sys.path.insert(0, os.environ['SSN_DEPLOY_PACKAGE_PATH']); "
        "import numpy, ssn_deploy.agglomeration, ssn_deploy.serving.block_models; "
        "print(numpy.__version__, 'torch' in sys.modules, 'zarr' in sys.modules, "
        "ssn_deploy.__file__)"
    )
    out = subprocess.run(
        [str(server_env.python), "-c", code],
        capture_output=True,
        text=True,
        env=variables,
        cwd="/",
        check=True,
    ).stdout.split()
    assert out[0].startswith("1.") and out[1:3] == ["False", "False"]
    assert Path(out[3]).resolve() == Path(ssn_deploy.__file__).resolve()
    no_torch = subprocess.run(
        [str(server_env.python), "-c", "import torch"], capture_output=True, env=variables, cwd="/"
    )
    assert no_torch.returncode != 0
