"""The Triton server's own virtual environment, created once and reused.

The ``tritonserver`` binary we run on machines without Docker ships inside the
``nvidia-pytriton`` wheel, which pins ``numpy<2`` while the main environment needs numpy 2
(zarr ≥ 3.1.6). So the server gets a virtual environment of its own, built from the same
interpreter (its python backend stub embeds that interpreter's ``libpython``): the wheel without
its client-side dependencies, ``numpy<2``, onnxruntime for the affinity model, and for the
``agglomerate`` and ``segment`` models what :mod:`ssn_deploy.agglomeration` imports, at versions
that work with numpy<2 (no torch, zarr or dask).

ssn-deploy itself is not installed there. Each server hands its stubs a folder holding only a
link to the running ``ssn_deploy`` package (:func:`link_package`, named in
``$SSN_DEPLOY_PACKAGE_PATH``, which the block models' ``model.py`` puts first on ``sys.path``;
the stubs' embedded interpreter ignores ``PYTHONPATH``). So a server runs the very code of the
process that started it, and one cached environment serves every checkout and installed
version: an installed copy would go stale, and rebuilding the shared cache for each checkout
would pull it from under a running server. Docker images install the same requirements plus
ssn-deploy itself (``docker/install.sh server``).

Only the python backend is bundled, so a backends folder ``backends/python/`` is assembled from
the wheel's files and the stub for this Python version.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ssn_deploy.errors import ServingError

PYTRITON = "nvidia-pytriton==0.7.0"
"""The wheel holding ``tritonserver`` 2.51 and its python backend."""
NUMPY = "numpy>=1.21,<2"
AGGLOMERATION = (
    "scipy==1.17.1",
    "scikit-image==0.26.0",
    "edt==3.1.2",
    "fastremap==1.21.0",
    "numba==0.68.1",  # the compiled watershed (agglomeration/flood.py); numpy >= 1.22
)
"""What :mod:`ssn_deploy.agglomeration` imports (waterz only for its reference method, which the
served models do not use), checked with numpy 1.26.4 on Python 3.11: the versions of the main
environment, so served and local segmentations agree."""
ENV_VAR = "SSN_DEPLOY_SERVER_ENV"
"""Overrides the default location of the server environment."""
PACKAGE_VAR = "SSN_DEPLOY_PACKAGE_PATH"
"""A folder the block models import ``ssn_deploy`` from, before any installed one."""
MARKER = "ssn-deploy-server-env.json"
"""Written last by :func:`ensure_environment`: a folder without it is incomplete."""
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def default_location() -> Path:
    """``$SSN_DEPLOY_SERVER_ENV``, else ``~/.cache/ssn-deploy/server-env-py3.X`` (honours
    ``XDG_CACHE_HOME``), so every run and test session reuses one environment."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ssn-deploy" / f"server-env-py{PY_VERSION}"


def onnxruntime_requirement() -> str:
    """The main environment's onnxruntime version, so that served and local results agree;
    any recent one if the main environment has none."""
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return f"onnxruntime=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "onnxruntime>=1.18"


def requirements(pytriton: bool = True) -> tuple[str, ...]:
    """What the server environment holds (``nvidia-pytriton`` is installed without its
    dependencies: they serve its Python API, which the server does not use). Without
    ``pytriton``: what the python backend of a Triton image needs (``docker/install.sh``)."""
    packages = (NUMPY, onnxruntime_requirement(), *AGGLOMERATION)
    return (PYTRITON, *packages) if pytriton else packages


def link_package(folder: str | Path) -> Path:
    """``folder`` with a link to the running ``ssn_deploy`` package and nothing else: first on
    the stubs' ``sys.path``, it imports this package without the main environment's other
    packages (numpy 2, torch). Returns ``folder``."""
    import ssn_deploy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ssn_deploy").symlink_to(Path(ssn_deploy.__file__).resolve().parent)
    return folder


@dataclass(frozen=True)
class ServerEnvironment:
    """Paths of a ready server environment and what it takes to start ``tritonserver``."""

    root: Path
    site_packages: Path
    libdir: Path
    """The interpreter's ``LIBDIR``: the stub must load this very ``libpython``."""

    @classmethod
    def at(cls, root: Path) -> ServerEnvironment:
        root = Path(root).absolute()
        site = root / "lib" / f"python{PY_VERSION}" / "site-packages"
        return cls(root, site, Path(str(sysconfig.get_config_var("LIBDIR"))))

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def tritonserver(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    @property
    def backends(self) -> Path:
        """``--backend-directory``: holds ``python/`` only."""
        return self.root / "backends"

    @property
    def stub(self) -> Path:
        return self.backends / "python" / "triton_python_backend_stub"

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def is_complete(self) -> bool:
        files = (self.python, self.tritonserver, self.stub, self.marker)
        return all(f.exists() for f in files) and self.libs.is_dir()

    def variables(
        self, base: Mapping[str, str] | None = None, package: Path | None = None
    ) -> dict[str, str]:
        """``base`` (default: ``os.environ``) with what the server and its stubs need:
        ``nvidia_pytriton.libs`` and the interpreter's LIBDIR first on ``LD_LIBRARY_PATH`` and
        this environment's ``bin/`` first on ``PATH`` (the embedded interpreter finds its
        site-packages through it). ``PYTHONPATH``/``PYTHONHOME`` are dropped so that the stub
        never imports the main environment's numpy 2; ``package`` (a :func:`link_package`
        folder) goes to the block models in :data:`PACKAGE_VAR`."""
        env = dict(os.environ if base is None else base)
        for key in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", PACKAGE_VAR):
            env.pop(key, None)
        if package is not None:
            env[PACKAGE_VAR] = str(package)
        env["LD_LIBRARY_PATH"] = _prepend(env.get("LD_LIBRARY_PATH"), self.libs, self.libdir)
        env["PATH"] = _prepend(env.get("PATH"), self.root / "bin")
        env["VIRTUAL_ENV"] = str(self.root)
        return env


def _prepend(current: str | None, *paths: Path) -> str:
    return os.pathsep.join([*(str(p) for p in paths), *([current] if current else [])])


def _expected_marker() -> dict[str, object]:
    return {
        "requirements": list(requirements()),
        "python": sys.version.split()[0],
        "base_prefix": sys.base_prefix,
    }


def is_valid(env: ServerEnvironment) -> bool:
    """Complete, and made from the same interpreter and requirements as asked for now."""
    if not env.is_complete():
        return False
    try:
        recorded = json.loads(env.marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in _expected_marker().items())


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One installer at a time (parallel test sessions, two CLI calls)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], log: Path, what: str, timeout: float) -> None:
    """Run an installer step, its output appended to ``log``; one-line error on failure."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        try:
            result = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise ServingError(f"{what} took over {timeout:.0f} s; see {log}") from None
    if result.returncode != 0:
        raise ServingError(
            f"{what} failed (exit {result.returncode}): {_last_error(log)}; see {log}"
        )


def _last_error(log: Path) -> str:
    """The most telling line of a pip log: its last ``ERROR:`` line, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]


def _assemble_backends(env: ServerEnvironment) -> None:
    """``backends/python/``: the backend library, its utilities and this Python's stub."""
    server = env.site_packages / "pytriton" / "tritonserver"
    sources = [
        server / "backends" / "python" / "libtriton_python.so",
        server / "backends" / "python" / "triton_python_backend_utils.py",
        server / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub",
    ]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise ServingError(
            f"{PYTRITON} lacks {', '.join(missing)} (no python backend stub for Python "
            f"{PY_VERSION}?)"
        )
    target = env.backends / "python"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for source in sources:
        shutil.copy2(source, target / source.name)
    env.tritonserver.chmod(env.tritonserver.stat().st_mode | 0o111)
    env.stub.chmod(env.stub.stat().st_mode | 0o111)


def _check_replaceable(root: Path) -> None:
    """Never delete a folder we did not make (a mistyped ``SSN_DEPLOY_SERVER_ENV``)."""
    ours = (root / MARKER).exists() or (root / "pyvenv.cfg").exists()
    if root.exists() and any(root.iterdir()) and not ours:
        raise ServingError(
            f"{root} exists and is not a server environment; remove it or set {ENV_VAR} "
            "to another folder"
        )


def _install(env: ServerEnvironment, timeout: float) -> None:
    started = time.perf_counter()
    root = env.root
    _check_replaceable(root)
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    log = root.parent / f"{root.name}.install.log"
    log.write_text("")
    # The base interpreter, not a virtualenv's python: the stub embeds the base libpython.
    base_python = Path(sys.base_prefix) / "bin" / f"python{PY_VERSION}"
    python = str(base_python if base_python.exists() else sys.executable)
    _run([python, "-m", "venv", str(root)], log, "creating the server environment", timeout)
    pip = [str(env.python), "-m", "pip", "install", "--quiet"]
    pytriton, *rest = requirements()
    _run([*pip, "--no-deps", pytriton], log, f"pip install {pytriton}", timeout)
    _run([*pip, *rest], log, f"pip install {' '.join(rest)}", timeout)
    _assemble_backends(env)
    record = {**_expected_marker(), "seconds": round(time.perf_counter() - started, 1)}
    env.marker.write_text(json.dumps(record, indent=1))


def ensure_environment(
    root: str | Path | None = None, *, timeout: float = 900.0
) -> ServerEnvironment:
    """The server environment at ``root`` (default :func:`default_location`), installed from
    the package index on first use (about a minute) and reused afterwards; rebuilt when the
    interpreter or the requirements changed. Raises :class:`ServingError` when pip fails."""
    env = ServerEnvironment.at(Path(root).expanduser() if root else default_location())
    if is_valid(env):
        return env
    if sys.platform != "linux":
        raise ServingError(
            "the pip-installed tritonserver runs on Linux only; use the Docker image"
        )
    with _locked(env.root):
        if not is_valid(env):  # another process may have finished it while we waited
            _install(env, timeout)
    return env


if __name__ == "__main__":  # docker/install.sh reads the list from here: one source
    import argparse

    parser = argparse.ArgumentParser(description="Print the server environment's requirements.")
    parser.add_argument("--no-pytriton", action="store_true", help="for a Triton image")
    print("\n".join(requirements(pytriton=not parser.parse_args().no_pytriton)))
