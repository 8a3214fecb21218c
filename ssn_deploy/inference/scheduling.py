"""Running blocks on dask: a client (given, remote or in-process) and a bounded submit loop.

Every blockwise stage (affinities, fragments, edge statistics, relabelling) submits its blocks
through :func:`run_blocks`, so at most ``limit`` tasks are pending whatever the volume size, and
the first error cancels the rest.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

from ssn_deploy.errors import ConfigError, SsnDeployError
from ssn_deploy.geometry import Block


@contextlib.contextmanager
def dask_client(scheduler: Any, workers: int) -> Iterator[Any]:
    """A dask client: the given one, one connected to an address, or an in-process cluster."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
    elif scheduler:
        try:
            client = Client(scheduler, timeout="30s")
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
) -> None:
    """Keep ``limit`` blocks in flight until none is left; cancel the rest on the first error.

    A task returns its block's voxel count, or a payload that ``consume`` takes in (on the
    client, as results arrive) and turns into the voxel count; or an
    :class:`SsnDeployError`, which is raised here so that workers log no traceback.
    """
    from distributed import as_completed
    from tqdm import tqdm

    in_flight = as_completed()
    for block in take(pending, limit):
        in_flight.add(client.submit(task, block, pure=False))
    voxels, start = 0, time.perf_counter()
    with tqdm(total=total, initial=finished, desc=desc, unit="block", disable=not progress) as bar:
        for future in in_flight:
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
