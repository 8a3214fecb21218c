"""Cluster faults: a lost worker, all workers lost, and paths the workers cannot see.

A real scheduler on 127.0.0.1 and real worker processes (``dask worker`` without a nanny, so
nothing restarts it, or a ``LocalCluster`` of processes), killed with SIGKILL while blocks are
in flight. The ``infer`` cases run the CLI on the 32×64×64 crop of ``test_faults.py`` and
compare every array with its uninterrupted in-process run; workers slow their block marking
down through ``tests/fault_injection`` so that a kill lands mid-stage.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ssn_deploy.geometry import Block, BlockGrid, Box
from ssn_deploy.inference import scheduling
from ssn_deploy.inference.scheduling import ClusterLostError, run_blocks
from tests.test_faults import (
    INFER,
    assert_identical,
    cli,
    fault_env,
    finished_blocks,
    ok,
    one_line_error,
    workspace,
)

REPO = Path(__file__).resolve().parents[1]
SLOW = "slow:affinities/done/c/:0.2"
"""Workers take 0.2 s more per affinity block, so a kill lands while blocks are in flight."""


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, medulla_250: Path) -> Path:
    """The crop and its uninterrupted in-process outputs (as in test_faults.py)."""
    return workspace(tmp_path_factory, medulla_250)


def start_worker(
    address: str, cwd: Path = REPO, fault: str | None = None, prefix: Sequence[str] = ()
) -> subprocess.Popen:
    """A ``dask worker`` process (no nanny) for ``address``, in ``cwd``, with the fault hook;
    returned once it has joined."""
    from distributed import Client

    command = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
               "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"]  # fmt: skip
    with Client(address) as client:
        joined = len(client.nthreads())
        worker = subprocess.Popen([*prefix, *command], cwd=cwd, env=fault_env(fault),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        client.wait_for_workers(joined + 1, timeout=60)
    return worker


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def kill_when_started(out: Path, pid: int) -> threading.Thread:
    """SIGKILL ``pid`` (from a thread) once two affinity blocks of ``out`` are finished."""

    def wait_and_kill() -> None:
        deadline = time.monotonic() + 120
        while finished_blocks(out, "affinities") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=wait_and_kill, daemon=True)
    thread.start()
    return thread


def slow_block(block: Block) -> int:
    time.sleep(0.5)
    return block.write_box.size


def test_all_workers_lost_is_an_error_within_the_timeout() -> None:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        worker = start_worker(cluster.scheduler_address)
        try:
            client.wait_for_workers(1, timeout=60)
            blocks = BlockGrid(Box.from_shape((40, 8, 8)), (1, 8, 8), 0)
            killer = subprocess.Popen(
                [sys.executable, "-c",
                 f"import os, time; time.sleep(3); os.kill({worker.pid}, {signal.SIGKILL})"],
            )  # fmt: skip
            start = time.perf_counter()
            with pytest.raises(ClusterLostError, match=r"no dask worker.*--resume"):
                run_blocks(client, slow_block, iter(blocks), 2, len(blocks), 0, False, "test",
                           worker_timeout=3)  # fmt: skip
            elapsed = time.perf_counter() - start
            killer.wait()
            assert 3 < elapsed < 30, elapsed
        finally:
            stop(worker)


def test_all_workers_lost_during_infer_is_one_line_and_resumable(
    w: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the CLI: the only worker is killed mid-stage; within the configured timeout the
    run ends in one line, and with a new worker ``--resume`` finishes it bit-identically."""
    from distributed import LocalCluster

    monkeypatch.setattr(scheduling, "WORKER_TIMEOUT", 3.0)  # SSN_DEPLOY_WORKER_TIMEOUT=3
    out = tmp_path / "out.zarr"
    args = ["infer", w / "raw.zarr", "-o", out, *INFER]
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        args += ["--scheduler", cluster.scheduler_address]
        worker = start_worker(cluster.scheduler_address, fault=SLOW)
        try:
            killer = kill_when_started(out, worker.pid)
            lost = cli(args)
            killer.join()
            killed_at = time.monotonic()
        finally:
            stop(worker)
        line = one_line_error(lost.stderr, lost.exit_code, "no dask worker", "--resume")
        assert "3 s" in line, line
        assert time.monotonic() - killed_at < 1, "the error is said once the timeout is over"
        worker = start_worker(cluster.scheduler_address)
        try:
            ok(cli([*args, "--resume"]))
        finally:
            stop(worker)
    assert_identical(w / "ref.zarr", out)


def test_one_of_two_workers_killed_gives_identical_output(
    w: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LocalCluster of two worker processes; one is SIGKILLed mid-stage, its blocks are
    rescheduled and the run completes as if nothing happened."""
    from distributed import Client, LocalCluster

    for key, value in fault_env(SLOW).items():  # the worker processes inherit the hook
        monkeypatch.setenv(key, value)
    out = tmp_path / "out.zarr"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                     dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        pids = sorted(client.run(os.getpid).values())
        killer = kill_when_started(out, pids[0])
        ok(cli(["infer", w / "raw.zarr", "-o", out, *INFER,
                "--scheduler", cluster.scheduler_address]))  # fmt: skip
        killer.join()
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # it was killed while the run went on
    assert_identical(w / "ref.zarr", out)


# --- paths as the workers see them


def hiding(directory: Path) -> list[str] | None:
    """A command prefix that runs a process in a private mount namespace where ``directory``
    is an empty tmpfs (root: ``unshare -m``; others: a user namespace), or None if not here."""
    mount = ["sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(directory)]
    if shutil.which("unshare") is None:
        return None
    for unshare in (["unshare", "-m"], ["unshare", "-Urm"]):
        if subprocess.run([*unshare, *mount, "true"], capture_output=True).returncode == 0:
            return [*unshare, *mount]
    return None


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path | None]]:
    """A scheduler and one worker whose working directory is another one and which, where a
    private mount namespace is allowed, sees an empty tmpfs over the directory ``hidden``."""
    from distributed import LocalCluster

    root = tmp_path_factory.mktemp("elsewhere")
    hidden, cwd = root / "hidden", root / "cwd"
    hidden.mkdir()
    cwd.mkdir()
    prefix = hiding(hidden)
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        worker = start_worker(cluster.scheduler_address, cwd, prefix=prefix or ())
        try:
            yield cluster.scheduler_address, hidden if prefix else None
        finally:
            stop(worker)


def test_relative_paths_on_a_cluster_are_made_absolute(
    w: Path, tmp_path: Path, elsewhere: tuple[str, Path | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers in another working directory get the paths as absolute ones."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(w / "raw.zarr", tmp_path / "raw.zarr")
    ok(cli(["infer", "raw.zarr", "-o", "out.zarr", *INFER, "--scheduler", elsewhere[0]]))
    assert_identical(w / "ref.zarr", tmp_path / "out.zarr")


def test_paths_the_workers_cannot_see_are_one_line(
    w: Path, elsewhere: tuple[str, Path | None]
) -> None:
    """Input or output in a directory the worker does not have: refused before any work,
    naming the worker and the path."""
    address, hidden = elsewhere
    if hidden is None:
        pytest.skip("no private mount namespace here (unshare -m / -Urm) to hide a directory")
    shutil.copytree(w / "raw.zarr", hidden / "raw.zarr", dirs_exist_ok=True)
    for volume, out in [
        (hidden / "raw.zarr", w / "never.zarr"),
        (w / "raw.zarr", hidden / "o.zarr"),
    ]:
        r = cli(["infer", volume, "-o", out, *INFER, "--scheduler", address])
        line = one_line_error(r.stderr, r.exit_code, "dask worker at tcp://127.0.0.1", "cannot see")
        assert str(hidden) in line, line
        assert not out.exists(), "nothing is written"
    assert not [p for p in w.iterdir() if p.name.startswith(".ssn-deploy-probe")]
