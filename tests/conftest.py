"""Shared fixtures: the real EM volumes in ../shared/data, and byte-identity checks on inputs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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
