"""A dask cluster whose every worker dies: a clear error in bounded time, not a silent hang.

A real scheduler on 127.0.0.1 and a real worker process (no nanny, so nothing restarts it),
killed with SIGKILL while blocks are in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssn_deploy.geometry import Block, BlockGrid, Box
from ssn_deploy.inference.scheduling import ClusterLostError, run_blocks

REPO = Path(__file__).resolve().parents[1]


def slow_block(block: Block) -> int:
    time.sleep(0.5)
    return block.write_box.size


def test_all_workers_lost_is_an_error_within_the_timeout() -> None:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        env = os.environ | {"PYTHONPATH": str(REPO)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
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
            worker.kill()
            worker.wait()
