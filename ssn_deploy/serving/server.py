"""Start and stop a real ``tritonserver`` on a model repository.

Locally the server is the binary of the ``nvidia-pytriton`` wheel in its own environment
(:mod:`.environment`); it bundles only the python backend, so only models whose backend is in
the backends folder are loaded (``--model-control-mode=explicit``), the others stay on disk for
GPU images. The server binds 127.0.0.1 unless told otherwise, logs to a file, and counts as
started only once ``/v2/health/ready`` answers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from ssn_deploy.errors import ConfigError, InputNotFoundError, ServingError
from ssn_deploy.serving.environment import ServerEnvironment, ensure_environment, link_package

PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "pytorch_libtorch": "pytorch",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; another process could take it before
    the server binds, in which case the server exits and :meth:`TritonServer.start` says so)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def model_backend(config_text: str) -> str | None:
    """The backend a ``config.pbtxt`` needs: its ``backend``, or the one behind its
    ``platform``; ``ensemble`` for ensembles; None if it names neither."""
    backend = re.search(r'^\s*backend:\s*"([^"]+)"', config_text, re.M)
    if backend:
        return backend.group(1)
    platform = re.search(r'^\s*platform:\s*"([^"]+)"', config_text, re.M)
    if platform:
        return PLATFORM_BACKENDS.get(platform.group(1), platform.group(1))
    return None


def loadable_models(repository: Path, backends: Path) -> list[str]:
    """Models of ``repository`` whose backend is in the ``backends`` folder (sorted)."""
    available = {p.name for p in backends.iterdir() if p.is_dir()} if backends.is_dir() else set()
    names = []
    for config in sorted(repository.glob("*/config.pbtxt")):
        if model_backend(config.read_text()) in available:
            names.append(config.parent.name)
    return names


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int


def resolve_ports(host: str, http: int, grpc: int, metrics: int) -> Ports:
    """0 means a free port; the three ports must differ."""
    given = [p for p in (http, grpc, metrics) if p]
    if any(p < 0 or p > 65535 for p in given) or len(set(given)) != len(given):
        raise ConfigError(f"HTTP, gRPC and metrics ports must differ, in 0..65535: {given}")
    chosen: list[int] = []
    for port in (http, grpc, metrics):
        while port == 0 or port in chosen:
            port = free_port(host)
        chosen.append(port)
    return Ports(*chosen)


PYTHON_BACKEND_REGION = "triton_python_backend_shm_region"
"""Prefix of the ``/dev/shm`` region each python-backend stub shares with the server."""


def python_backend_regions(group: int, proc: Path = Path("/proc")) -> list[str]:
    """Shared-memory regions of the python-backend stubs in process group ``group`` (read from
    their command lines), which the server removes on a clean stop but not when killed."""
    regions = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != group:  # state, ppid, pgrp
                continue
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        regions += [a.decode() for a in args if a.startswith(PYTHON_BACKEND_REGION.encode())]
    return sorted(set(regions))


def remove_regions(names: Sequence[str], shm: Path = Path("/dev/shm")) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (shm / name).unlink()


def _tail(log: Path, lines: int = 40) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _telling_line(log: Path) -> str:
    """The last error-looking line of the server log (Triton prefixes errors with ``E``)."""
    lines = [line.strip() for line in _tail(log, 200) if line.strip()]
    errors = [
        line
        for line in lines
        if line.startswith("E") or "error" in line.lower() or "failed" in line.lower()
    ]
    line = (errors or lines or ["(empty log)"])[-1]
    return line[:300]


class TritonServer:
    """A ``tritonserver`` process on ``repository``; a context manager that stops it.

    ``models`` defaults to those the server can load here (:func:`loadable_models`). Ports 0
    are picked free; ``log`` defaults to a temporary file. ``ready_timeout`` bounds start-up
    (model loading and warm-up included); ``extra_args`` go to ``tritonserver`` as they are.
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log: str | Path | None = None,
        models: Sequence[str] | None = None,
        environment: ServerEnvironment | None = None,
        ready_timeout: float = 120.0,
        stop_timeout: float = 20.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository).absolute()
        if not self.repository.is_dir():
            raise InputNotFoundError(f"model repository not found: {self.repository}")
        self.host = host
        self._requested = (http_port, grpc_port, metrics_port)
        self.log = Path(log).absolute() if log else None
        self._models = list(models) if models is not None else None
        self._environment = environment
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = tuple(extra_args)
        self.ports: Ports | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.models: list[str] = []
        self._package: Path | None = None

    # -- addresses

    def _address(self, port: int) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{port}"

    @property
    def http_url(self) -> str:
        return self._address(self._ports.http)

    @property
    def grpc_url(self) -> str:
        return self._address(self._ports.grpc)

    @property
    def metrics_url(self) -> str:
        return f"http://{self._address(self._ports.metrics)}/metrics"

    @property
    def _ports(self) -> Ports:
        if self.ports is None:
            raise ServingError("the server has not been started")
        return self.ports

    # -- life cycle

    def command(self, env: ServerEnvironment, ports: Ports, models: Sequence[str]) -> list[str]:
        """The ``tritonserver`` command line (explicit model control: only ``models``)."""
        return [
            str(env.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={env.backends}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in models),
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout) - 2)}",
            f"--http-address={self.host}",
            f"--http-port={ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={ports.metrics}",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        """Start the server and wait until it is ready; a one-line error naming the log if it
        exits or times out first."""
        if self.process is not None:
            raise ServingError("the server is already running")
        env = self._environment or ensure_environment()
        available = loadable_models(self.repository, env.backends)
        models = self._models if self._models is not None else available
        if not models:
            raise ConfigError(
                f"{self.repository} has no model this server can load (its backends: "
                f"{', '.join(sorted(p.name for p in env.backends.iterdir()))}); build one "
                "with ssn-deploy serve build-repo"
            )
        missing = [m for m in models if not (self.repository / m / "config.pbtxt").is_file()]
        if missing:
            raise InputNotFoundError(f"{self.repository} has no model {', '.join(missing)}")
        self.ports = resolve_ports(self.host, *self._requested)
        if self.log is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log = Path(name)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # The block models import ssn_deploy: this process's own, linked for the stubs.
        self._package = link_package(tempfile.mkdtemp(prefix="ssn-deploy-package-"))
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                self.command(env, self.ports, models),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env.variables(package=self._package),
                cwd=self.repository,
                start_new_session=True,  # signals reach it only through us; stop() kills its group
            )
        self.models = list(models)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, timeout: float = 2.0) -> int:
        url = f"http://{self.http_url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, urllib.error.URLError):
            return 0

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServingError(
                    f"tritonserver exited with status {code} before it was ready: "
                    f"{_telling_line(self.log)} (log: {self.log})"  # type: ignore[arg-type]
                )
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.2)
        raise ServingError(
            f"tritonserver was not ready after {self.ready_timeout:.0f} s (log: {self.log})"
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        return self.running and self._get("/v2/health/ready") == 200

    def stop(self) -> int | None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL to the server's process
        group (its python stubs too) after ``stop_timeout`` s. Returns the exit status."""
        process, self.process = self.process, None
        if process is None:
            return self._reaped(None)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                # Still alive, so its group is still ours: the server and its python stubs.
                _kill_group(process.pid)
        return self._reaped(process)

    def _reaped(self, process: subprocess.Popen[bytes] | None) -> int | None:
        """The exit status, once the server is gone and its package link removed."""
        code = None if process is None else process.wait()
        if self._package is not None:
            shutil.rmtree(self._package, ignore_errors=True)  # the link, never its target
            self._package = None
        return code

    def kill(self) -> int | None:
        """What a crash looks like: SIGKILL to the server and its python stubs at once, then
        their shared memory removed (a killed server leaves it in ``/dev/shm``)."""
        process, self.process = self.process, None
        if process is None:
            return self._reaped(None)
        if process.poll() is None:
            _kill_group(process.pid)
        return self._reaped(process)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a server and its stubs), then remove the
    stubs' shared-memory regions."""
    regions = python_backend_regions(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    remove_regions(regions)


def serve(server: TritonServer, on_ready: Callable[[TritonServer], None] | None = None) -> int:
    """Run ``server`` until it exits or this process gets SIGINT/SIGTERM, which are forwarded
    as a clean stop. ``on_ready(server)`` is called once it is ready (the CLI prints the URLs).
    Returns 0 after a requested stop; raises :class:`ServingError` if the server died."""
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if server.process is not None and server.process.poll() is None:
            server.process.terminate()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except ServingError:
            if stopping:  # interrupted while starting
                return 0
            raise
        if on_ready is not None:
            on_ready(server)
        assert server.process is not None
        while server.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(0.5)
        code = server.process.returncode
        if not stopping:
            raise ServingError(
                f"tritonserver exited with status {code}: {_telling_line(server.log)} "  # type: ignore[arg-type]
                f"(log: {server.log})"
            )
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
