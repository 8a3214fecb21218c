"""Triton serving against a real ``tritonserver`` (the ``nvidia-pytriton`` wheel's, CPU only).

One server for the whole test run (fixtures in ``conftest.py``, shared with
``test_triton_inference.py``): its environment is set up once and cached
(``~/.cache/ssn-deploy`` or ``$SSN_DEPLOY_SERVER_ENV``; about a minute on a fresh machine),
the repository is generated from the packaged model, and the server binds random free ports
on 127.0.0.1. Requests carry real EM from the test region of ``fib_medulla_250``; answers
are compared with local onnxruntime on the same ONNX file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ssn_deploy.cli import main
from ssn_deploy.errors import OutputExistsError, ServingError
from ssn_deploy.inference.loader import default_model
from ssn_deploy.inference.onnx_backend import OnnxPredictor
from ssn_deploy.models.spec import ModelSpec
from ssn_deploy.serving import affinity_model
from ssn_deploy.serving.client import TritonClient
from ssn_deploy.serving.environment import ENV_VAR, ServerEnvironment, ensure_environment
from ssn_deploy.serving.repository import (
    AFFINITY_ONNX,
    AFFINITY_PY,
    AGGLOMERATE,
    MANIFEST,
    SEGMENT,
    OnnxModel,
    build_repository,
)
from ssn_deploy.serving.server import TritonServer, free_port, loadable_models
from tests.conftest import MAX_BATCH, MAX_PATCH

PROTOCOLS = ("http", "grpc")
SERVED = [AFFINITY_PY, AGGLOMERATE, SEGMENT]
"""What the CPU-only server loads: every python-backend model."""


@pytest.fixture(scope="session")
def reference(local: OnnxPredictor, patch: np.ndarray) -> np.ndarray:
    return local.predict(patch)


def _url(server: TritonServer, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_affinities_equal_local_onnxruntime(
    server: TritonServer, protocol: str, patch: np.ndarray, reference: np.ndarray
) -> None:
    with TritonClient(_url(server, protocol), protocol=protocol, timeout=120) as client:
        assert client.is_ready()
        started = time.perf_counter()
        served = client.infer(patch)
        seconds = time.perf_counter() - started
    assert served.dtype == np.float32 and served.shape == reference.shape == (2, 3, 48, 64, 64)
    diff = float(np.abs(served - reference).max())
    print(f"{protocol}: max |served - local| = {diff:.1e}, {seconds * 1000:.0f} ms per request")
    assert diff <= 1e-5
    assert 0.0 <= served.min() and served.max() <= 1.0 and served.std() > 0.05


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_are_refused_and_the_server_keeps_serving(
    server: TritonServer, protocol: str, patch: np.ndarray, local: OnnxPredictor
) -> None:
    small = np.ascontiguousarray(patch[:1, :, :32, :32, :32])
    bad = {
        "FP64": small.astype(np.float64),
        "shape": small[:, 0],  # rank 4
        "maximum patch": np.zeros((1, 1, MAX_PATCH[0] + 16, 32, 32), np.float32),
        "granularity": np.zeros((1, 1, 24, 32, 32), np.float32),
        "batch-size": np.zeros((MAX_BATCH + 1, 1, 16, 16, 16), np.float32),
    }
    with TritonClient(_url(server, protocol), protocol=protocol, timeout=60) as client:
        for what, request in bad.items():
            with pytest.raises(ServingError, match=what) as caught:
                client.infer(request)
            assert "refused the request" in str(caught.value) and "\n" not in str(caught.value)
        served = client.infer(small)
    assert server.running
    assert float(np.abs(served - local.predict(small)).max()) <= 1e-5


def test_unreachable_server_is_one_line_error() -> None:
    port = free_port()
    for protocol in PROTOCOLS:
        with TritonClient(f"127.0.0.1:{port}", protocol=protocol, timeout=5) as client:
            assert not client.is_ready()
            with pytest.raises(ServingError, match="cannot reach") as caught:
                client.infer(np.zeros((1, 1, 16, 16, 16), np.float32))
        assert "\n" not in str(caught.value)


def _config(repository: Path, model: str) -> model_config_pb2.ModelConfig:
    text = (repository / model / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_configs_carry_the_models_metadata(repository: Path, server: TritonServer) -> None:
    model = OnnxModel.read(default_model("onnxruntime"))
    expected = model.spec.to_metadata()
    for name in (AFFINITY_PY, AFFINITY_ONNX):
        config = _config(repository, name)
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert {k: params[k] for k in expected} == expected
        assert ModelSpec.from_metadata(params, name) == model.spec
        assert params["ssn_deploy.max_patch"] == "[64, 64, 64]"
        assert config.max_batch_size == MAX_BATCH
        assert config.HasField("dynamic_batching")
        assert config.instance_group[0].count == 1
        assert list(config.input[0].dims) == [1, -1, -1, -1]
        assert list(config.output[0].dims) == [model.spec.num_channels, -1, -1, -1]
        warmup = config.model_warmup[0].inputs["raw"]
        assert warmup.zero_data and all(d % 16 == 0 for d in warmup.dims[1:])
    assert _config(repository, AFFINITY_PY).backend == "python"
    onnx_config = _config(repository, AFFINITY_ONNX)
    assert onnx_config.platform == "onnxruntime_onnx"
    assert not onnx_config.optimization.execution_accelerators.gpu_execution_accelerator
    assert (repository / "MODEL_CARD.md").read_text().startswith("# Isotropic model")
    assert (repository / MANIFEST).is_file()
    # The server reports the same metadata to clients, and loaded only what it can run here.
    assert server.models == SERVED
    with TritonClient(server.http_url, protocol="http") as client:
        served = client.parameters()
    assert served["ssn_deploy.offsets"] == [list(o) for o in model.spec.offsets]
    assert served["ssn_deploy.granularity"] == list(model.spec.granularity)


def test_tensorrt_accelerator_and_anisotropic_model(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    build_repository(default_model("onnxruntime", "aniso"), out, tensorrt="fp16", warmup=False)
    config = _config(out, AFFINITY_ONNX)
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    params = {k: v.string_value for k, v in _config(out, AFFINITY_PY).parameters.items()}
    assert params["ssn_deploy.voxel_size"] == "[50.0, 10.0, 10.0]"
    assert params["ssn_deploy.granularity"] == "[1, 16, 16]"
    assert params["ssn_deploy.max_patch"] == "[32, 160, 160]"  # infer's default patch
    assert not _config(out, AFFINITY_PY).model_warmup
    assert "Anisotropic" in (out / "MODEL_CARD.md").read_text()


def test_build_repo_refuses_an_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    runner = CliRunner()
    args = ["serve", "build-repo", "-o", str(out), "--max-patch", "64,64,64", "--max-batch", "2"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    stamp = (out / MANIFEST).stat().st_mtime_ns
    again = runner.invoke(main, args)
    assert again.exit_code == 1
    assert "already exists; pass --overwrite" in again.output
    assert (out / MANIFEST).stat().st_mtime_ns == stamp
    replaced = runner.invoke(main, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    # --overwrite never deletes a folder this package did not write
    other = tmp_path / "not_a_repo"
    other.mkdir()
    (other / "keep.txt").write_text("data")
    with pytest.raises(OutputExistsError, match="not a model repository"):
        build_repository(default_model("onnxruntime"), other, overwrite=True)
    assert (other / "keep.txt").is_file()
    bad = runner.invoke(main, [*args[:-4], "--overwrite", "--max-patch", "60,64,64"])
    assert bad.exit_code == 1 and "granularity" in bad.output


def test_python_model_checks_patches() -> None:
    check = affinity_model.check_patch
    g, m = [16, 16, 16], [64, 64, 64]
    assert check(np.dtype(np.float32), (2, 1, 48, 64, 64), g, m) is None
    assert "FP32" in check(np.dtype(np.float64), (2, 1, 48, 64, 64), g, m)
    assert "N x 1" in check(np.dtype(np.float32), (2, 48, 64, 64), g, m)
    assert "N x 1" in check(np.dtype(np.float32), (2, 2, 48, 64, 64), g, m)
    assert "granularity" in check(np.dtype(np.float32), (1, 1, 0, 64, 64), g, m)
    assert "maximum patch" in check(np.dtype(np.float32), (1, 1, 80, 64, 64), g, m)


def test_only_backends_the_server_has_are_loaded(repository: Path, server_env) -> None:
    assert loadable_models(repository, server_env.backends) == SERVED


def test_a_server_that_cannot_load_its_model_names_its_log(
    server_env: ServerEnvironment, repository: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(repository, broken)
    (broken / AFFINITY_PY / "1" / "model.onnx").unlink()
    log = tmp_path / "server.log"
    with pytest.raises(ServingError, match="exited with status") as caught:
        TritonServer(broken, environment=server_env, log=log, ready_timeout=120).start()
    assert str(log) in str(caught.value) and "\n" not in str(caught.value)


def test_serve_start_runs_until_sigint(server_env: ServerEnvironment, repository: Path) -> None:
    """The CLI: ready before it says so, serves, and stops cleanly on Ctrl-C."""
    command = [sys.executable, "-m", "ssn_deploy.cli", "serve", "start", str(repository)]
    command += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    command += ["--log", str(repository.parent / "cli-server.log")]
    env = dict(os.environ, **{ENV_VAR: str(server_env.root)})
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        lines = []
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        if not lines or not lines[-1].startswith("Ctrl-C"):
            pytest.fail(
                f"serve start did not report ready: {''.join(lines)} {process.stderr.read()}"
            )
        http = next(line.split()[1] for line in lines if line.strip().startswith("HTTP"))
        with TritonClient(http, protocol="http", timeout=30) as client:
            assert client.is_ready()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert out.strip().endswith("stopped")
    with TritonClient(http, protocol="http", timeout=5) as client:
        assert not client.is_ready()


def test_a_failing_pip_install_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssn_deploy.serving import environment

    monkeypatch.setattr(environment, "PYTRITON", "nvidia-pytriton==0.0.0")  # no such release
    with pytest.raises(
        ServingError, match=r"pip install nvidia-pytriton==0\.0\.0 failed"
    ) as caught:
        ensure_environment(tmp_path / "env")
    message = str(caught.value)
    assert "\n" not in message and "install.log" in message
    assert not environment.is_valid(ServerEnvironment.at(tmp_path / "env"))
