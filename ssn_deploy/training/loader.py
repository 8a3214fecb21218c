"""Training batches built in worker processes, so a GPU is not left waiting on augmentation.

On a GPU one update of the paper-sized network takes a fraction of the ~0.15 s one CPU core
needs to crop, deform and target a 64×128×128 sample, so samples are made by a pool of
processes and prefetched. Each sample's random streams are seeded from (seed, iteration,
index in the batch) alone, so the batches do not depend on the number of workers or their
timing, and a resumed run draws exactly the batches the uninterrupted run would have.

Workers do not fork the trainer: its process runs torch's OpenMP pool, zarr's event
loop and other threads, and a child forked from it can deadlock on a lock one of them held
(a CI machine hung here). A pool of ``concurrent.futures`` raises when a worker dies (e.g.
killed for memory) where ``multiprocessing.Pool`` would wait forever for the lost task.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from ssn_deploy.training.data import Batch, BatchSource

_SOURCE: BatchSource | None = None


def _init(source: BatchSource) -> None:
    global _SOURCE
    _SOURCE = source


def _sample(seed: int, iteration: int, index: int) -> tuple[np.ndarray, ...]:
    assert _SOURCE is not None
    seed_sampler, seed_augmenter = np.random.SeedSequence([seed, iteration, index]).spawn(2)
    _SOURCE.sampler.rng = np.random.default_rng(seed_sampler)
    _SOURCE.augmenter.rng = np.random.default_rng(seed_augmenter)
    return _SOURCE.sample()


def _context() -> mp.context.BaseContext:
    """forkserver: workers fork from a clean single-threaded server that has imported this
    module once (spawn's cost is paid once per process, not per worker); spawn elsewhere."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class ParallelBatches:
    """Batches for iterations ``start, start + 1, …`` made by ``workers`` processes.

    ``prefetch`` samples are in flight at a time (at least two batches), which bounds memory.
    """

    def __init__(
        self,
        source: BatchSource,
        *,
        workers: int,
        batch_size: int,
        seed: int,
        start: int,
        prefetch: int | None = None,
    ) -> None:
        self.pool = ProcessPoolExecutor(
            workers, mp_context=_context(), initializer=_init, initargs=(source,)
        )
        self.batch_size, self.seed = batch_size, seed
        self.prefetch = max(prefetch or 2 * workers, 2 * batch_size)
        self.tasks = ((it, k) for it in range(start, 2**62) for k in range(batch_size))
        self.pending: collections.deque[Future[Any]] = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.prefetch:
            iteration, index = next(self.tasks)
            self.pending.append(self.pool.submit(_sample, self.seed, iteration, index))

    def next(self) -> Batch:
        items = [self.pending.popleft().result() for _ in range(self.batch_size)]
        self._fill()
        return Batch(*(np.stack(parts) for parts in zip(*items, strict=True)))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
