"""Running blocks on dask: a client (given, remote or in-process) and a bounded submit loop.

Every blockwise stage (affinities, fragments, edge statistics, relabelling) submits its blocks
through :func:`run_blocks`, so at most ``limit`` tasks are pending whatever the volume size, and
the first error cancels the rest.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from ssn_deploy.errors import ConfigError, SsnDeployError
from ssn_deploy.geometry import Block

CONNECT_TIMEOUT = "10s"
"""A scheduler that does not answer in this long is unreachable (a LAN connects in ms)."""


@contextlib.contextmanager
def dask_client(scheduler: Any, workers: int) -> Iterator[Any]:
    """A dask client: the given one, one connected to an address, or an in-process cluster."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
    elif scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
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


WORKER_TIMEOUT = float(os.environ.get("SSN_DEPLOY_WORKER_TIMEOUT", "120"))
"""Seconds a run waits with no dask worker alive before it stops with an error (resumable)."""
POLL = 0.05


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
    :class:`SsnDeployError`, which is raised here so that workers log no traceback. A lost
    worker's blocks are rescheduled by dask; with no worker at all for ``worker_timeout``
    seconds (default :data:`WORKER_TIMEOUT`, env ``SSN_DEPLOY_WORKER_TIMEOUT``) the run stops
    with :class:`ClusterLostError` (finished blocks are kept: ``--resume`` continues).
    """
    from distributed import as_completed
    from tqdm import tqdm

    timeout = WORKER_TIMEOUT if worker_timeout is None else worker_timeout
    in_flight = as_completed()
    for block in take(pending, limit):
        in_flight.add(client.submit(task, block, pure=False))
    voxels, start = 0, time.perf_counter()
    alone_since: float | None = None
    last_check = 0.0
    with tqdm(total=total, initial=finished, desc=desc, unit="block", disable=not progress) as bar:
        while not in_flight.is_empty():
            done = in_flight.next_batch(block=False)
            if not done:
                now = time.perf_counter()
                if now - last_check > 1.0:
                    last_check = now
                    if _workers(client):
                        alone_since = None
                    elif alone_since is None:
                        alone_since = now
                    elif now - alone_since > timeout:
                        client.cancel(list(in_flight.futures))
                        raise ClusterLostError(
                            f"no dask worker has been alive for {timeout:.0f} s; finished blocks "
                            "are kept: start workers and rerun with --resume"
                        )
                time.sleep(POLL)
                continue
            for future in done:
                try:
                    result = future.result()
                    if isinstance(result, SsnDeployError):
                        raise result
                except BaseException:
                    client.cancel(list(in_flight.futures))
                    raise
                voxels += consume(result)
                bar.update()
                bar.set_postfix_str(f"{voxels / (time.perf_counter() - start) / 1e6:.2f} MVox/s")
                for block in take(pending, 1):
                    in_flight.add(client.submit(task, block, pure=False))


def take(blocks: Iterator[Block], n: int) -> list[Block]:
    return list(itertools.islice(blocks, n))
