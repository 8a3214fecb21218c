"""Running blocks on dask: a client (given, remote or in-process) and a bounded submit loop.

Every blockwise stage (affinities, fragments, edge statistics, relabelling) submits its blocks
through :func:`run_blocks`, so at most ``limit`` tasks are pending whatever the volume size, and
the first error cancels the rest. :func:`timed_stage` adds a stage's wall seconds to the
:func:`recording_stages` around it (``infer``'s ``stage_seconds``).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ssn_deploy.errors import ConfigError, SsnDeployError
from ssn_deploy.geometry import Block

CONNECT_TIMEOUT = "10s"
"""A scheduler that does not answer in this long is unreachable (a LAN connects in ms)."""

_STAGE_SECONDS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "stage_seconds", default=None
)


@contextlib.contextmanager
def recording_stages(seconds: dict[str, float]) -> Iterator[dict[str, float]]:
    """Add the wall seconds of every :func:`timed_stage` run inside to ``seconds``, by name."""
    token = _STAGE_SECONDS.set(seconds)
    try:
        yield seconds
    finally:
        _STAGE_SECONDS.reset(token)


@contextlib.contextmanager
def timed_stage(name: str) -> Iterator[None]:
    """Time the enclosed code as stage ``name`` (only inside :func:`recording_stages`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = _STAGE_SECONDS.get()
        if seconds is not None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def dask_client(scheduler: Any, workers: int) -> Iterator[Any]:
    """A dask client: the given one, one connected to an address, or an in-process cluster."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
    elif scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: not an address
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
        with client:
            yield client
    else:
        with (
            LocalCluster(
                processes=False,
                n_workers=1,
                threads_per_worker=workers,
                # its status pages would otherwise listen on every interface
                dashboard_address="127.0.0.1:0",
                worker_dashboard_address="127.0.0.1:0",
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client


def _unusable(reads: list[str], probes: list[str], write: bool = True) -> list[str]:
    """Run on a worker (or the scheduler): the client's paths this process cannot use."""
    problems = []
    for path in reads:
        if not os.path.exists(path):
            problems.append(f"cannot see {path}")
        elif not os.access(path, os.R_OK):
            problems.append(f"cannot read {path}")
    for probe in probes:
        directory = os.path.dirname(probe)
        if not os.path.exists(probe):  # not there, or a local directory of the same name
            problems.append(f"cannot see {directory} (the output's directory)")
        elif write and not os.access(directory, os.W_OK | os.X_OK):
            problems.append(f"cannot write in {directory}")
    return problems


def check_cluster_paths(scheduler: Any, reads: Sequence[str], writes: Sequence[str]) -> None:
    """Refuse a cluster whose processes cannot use the client's paths, before any work.

    Workers read the inputs and write the outputs by the names the client gives; the
    scheduler opens them too (it unpickles the tasks, which reopen their volumes). Local
    ``reads`` that exist here (inputs, a model file) must be readable there. For each output,
    a probe file briefly put into its directory (the output, or where it will be created)
    must be visible there, so that a worker's own local directory of the same name (whose
    blocks would never reach this machine) is caught too; workers must be able to write
    beside it. Names that are not local paths here (URLs, packaged model names) are skipped.
    """
    import tempfile

    from ssn_deploy.storage import is_local, nearest_existing, on_disk

    paths = [str(on_disk(r)) for r in reads if is_local(r) and on_disk(r).exists()]
    dirs = [nearest_existing(on_disk(w)) for w in writes if is_local(w)]
    probes = [tempfile.mkstemp(dir=d, prefix=".ssn-deploy-probe-") for d in dirs]
    try:
        names = [name for _, name in probes]
        with dask_client(scheduler, 1) as client:
            found = {f"worker at {a}": p for a, p in client.run(_unusable, paths, names).items()}
            found["scheduler"] = client.run_on_scheduler(_unusable, paths, names, write=False)
    finally:
        for fd, name in probes:
            os.close(fd)
            os.unlink(name)
    for where, problems in found.items():
        if problems:
            raise ConfigError(
                f"the dask {where} {problems[0]}: every worker and the scheduler must reach "
                "the volumes and the model by the paths given here (a shared filesystem, or URLs)"
            )


WORKER_TIMEOUT = float(os.environ.get("SSN_DEPLOY_WORKER_TIMEOUT", "120"))
"""Seconds a run waits with no dask worker alive before it stops with an error (resumable)."""
POLL = 0.5


class ClusterLostError(SsnDeployError):
    """Every dask worker (or the scheduler) is gone: stop instead of waiting forever."""


def _workers(client: Any) -> int:
    try:
        return len(client.scheduler_info().get("workers", {}))
    except (OSError, TimeoutError) as exc:
        raise ClusterLostError(f"lost the dask scheduler ({exc}); rerun with --resume") from None


def run_blocks(
    client: Any,
    task: Callable[[Block], Any],
    pending: Iterator[Block],
    limit: int,
    total: int,
    finished: int,
    progress: bool,
    desc: str,
    consume: Callable[[Any], int] = int,
    worker_timeout: float | None = None,
) -> None:
    """Keep ``limit`` blocks in flight until none is left; cancel the rest on the first error.

    A task returns its block's voxel count, or a payload that ``consume`` takes in (on the
    client, as results arrive) and turns into the voxel count; or an
    :class:`SsnDeployError`, which is raised here so that workers log no traceback (a
    storage error, e.g. a full disk, is returned the same way by :func:`_run`). A lost
    worker's blocks are rescheduled by dask; with no worker at all for ``worker_timeout``
    seconds (default :data:`WORKER_TIMEOUT`, env ``SSN_DEPLOY_WORKER_TIMEOUT``) the run stops
    with :class:`ClusterLostError` (finished blocks are kept: ``--resume`` continues).
    """
    from distributed import as_completed
    from tqdm import tqdm

    timeout = WORKER_TIMEOUT if worker_timeout is None else worker_timeout
    in_flight = as_completed(loop=client.loop)  # not the default client's: it may be another
    # a cluster whose workers have not joined yet has no threads: still submit (and wait for
    # them), or no block would run and the output would be left all zeros
    for block in take(pending, max(1, limit)):
        in_flight.add(client.submit(_run, task, block, pure=False))
    voxels, start = 0, time.perf_counter()
    watchdog = _Watchdog(client, timeout)
    with tqdm(total=total, initial=finished, desc=desc, unit="block", disable=not progress) as bar:
        try:
            while not in_flight.is_empty():
                done = in_flight.next_batch(block=False)
                if not done:
                    watchdog.check()
                    _wait_for_one(in_flight.futures)
                    continue
                for future in done:
                    result = _result(future, watchdog)
                    if isinstance(result, SsnDeployError | OSError):
                        raise result
                    voxels += consume(result)
                    bar.update()
                    rate = voxels / (time.perf_counter() - start) / 1e6
                    bar.set_postfix_str(f"{rate:.2f} MVox/s")
                    for block in take(pending, 1):
                        in_flight.add(client.submit(_run, task, block, pure=False))
        except BaseException:
            client.cancel(list(in_flight.futures))
            raise


def _wait_for_one(futures: Any) -> None:
    """Block until one of ``futures`` finishes, at most :data:`POLL` s (then the watchdog looks
    again). Sleeping a fixed poll instead left each stage's last task unnoticed for half a poll
    on average, ~0.2 s of the test region's seven segment stages."""
    from distributed import wait

    start = time.perf_counter()
    try:
        wait(list(futures), timeout=POLL, return_when="FIRST_COMPLETED")
    except TimeoutError:
        return
    if time.perf_counter() - start < 1e-3:  # finished, but as_completed has not seen it yet
        time.sleep(1e-3)


class _Watchdog:
    """Raises :class:`ClusterLostError` once no worker has been alive for ``timeout`` s."""

    def __init__(self, client: Any, timeout: float) -> None:
        self.client, self.timeout = client, timeout
        self.alone_since: float | None = None
        self.last_check = 0.0

    def check(self) -> None:
        now = time.perf_counter()
        if now - self.last_check <= 1.0:
            return
        self.last_check = now
        if _workers(self.client):
            self.alone_since = None
        elif self.alone_since is None:
            self.alone_since = now
        elif now - self.alone_since > self.timeout:
            raise ClusterLostError(
                f"no dask worker has been alive for {self.timeout:.0f} s; finished blocks "
                "are kept: start workers and rerun with --resume"
            )


def _result(future: Any, watchdog: _Watchdog) -> Any:
    """A finished task's result. It lives on the worker until gathered, so a worker lost in
    between makes dask compute it again: wait for that under the watchdog, not forever."""
    while True:
        try:
            return future.result(timeout=1.0)
        except TimeoutError:
            watchdog.check()


def _run(task: Callable[[Block], Any], block: Block) -> Any:
    """One block on a worker. A storage error (a full disk, a read-only directory) is returned,
    not raised, so that the worker logs no traceback and the client says it in one line."""
    from ssn_deploy.storage import write_error

    try:
        return task(block)
    except OSError as exc:
        if write_error(exc) is None:
            raise
        return exc


def take(blocks: Iterator[Block], n: int) -> list[Block]:
    return list(itertools.islice(blocks, n))
