"""Shared fixtures: the real EM volumes in ../shared/data, byte-identity checks on inputs, and
one real Triton server for the whole test run (``test_serving.py``, ``test_triton_inference.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DATA_DIR = Path(
    os.environ.get("SSN_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def sha256(path: Path) -> str:
    """Digest of a file, or of every file under a directory (sorted), to prove inputs unchanged."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"real EM data not found at {DATA_DIR}; set SSN_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def medulla_250(data_dir: Path) -> Path:
    return data_dir / "fib_medulla_250.hdf"


@pytest.fixture(scope="session")
def tiny_train(data_dir: Path) -> Path:
    return data_dir / "fib_tiny_train.hdf"


@pytest.fixture(scope="session")
def tiny_test(data_dir: Path) -> Path:
    return data_dir / "fib_tiny_test.hdf"


@pytest.fixture(scope="session")
def vnc(data_dir: Path) -> Path:
    return data_dir / "vnc_sstem_2dlabels.hdf"


# --- one Triton server for the test run (serving modules are imported inside the fixtures)

MAX_PATCH = (64, 64, 64)
MAX_BATCH = 2


@pytest.fixture(scope="session")
def server_env() -> Any:
    """The server's own virtualenv (created once, about a minute; cached across runs)."""
    from ssn_deploy.serving.environment import ensure_environment

    return ensure_environment()


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model repository of the packaged isotropic model, small request limits."""
    from ssn_deploy.inference.loader import default_model
    from ssn_deploy.serving.repository import build_repository

    out = tmp_path_factory.mktemp("serving") / "repo"
    build_repository(
        default_model("onnxruntime"), out, max_patch=MAX_PATCH, max_batch=MAX_BATCH, threads=2
    )
    return out


@pytest.fixture(scope="session")
def server(server_env: Any, repository: Path) -> Iterator[Any]:
    """A real tritonserver on random free ports of 127.0.0.1."""
    from ssn_deploy.serving.server import TritonServer

    log = repository.parent / "tritonserver.log"
    with TritonServer(repository, environment=server_env, log=log, ready_timeout=180) as s:
        yield s


@pytest.fixture(scope="session")
def local(repository: Path) -> Any:
    """onnxruntime in this process on the very file the server runs."""
    from ssn_deploy.inference.onnx_backend import OnnxPredictor
    from ssn_deploy.serving.repository import AFFINITY_PY

    return OnnxPredictor(repository / AFFINITY_PY / "1" / "model.onnx")


@pytest.fixture(scope="session")
def patch(medulla_250: Path, local: Any) -> np.ndarray:
    """Two 48×64×64 crops of the test region (z ≥ 125), normalised as the model asks."""
    import h5py

    with h5py.File(medulla_250, "r") as f:
        raw = f["volumes/raw"][125:173, 64:192, 64:128]
    crops = np.stack([raw[:, :64], raw[:, 64:]])[:, None]
    return np.ascontiguousarray(local.normalization(crops))
