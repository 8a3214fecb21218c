"""Where outputs go: checked before any work, and write failures said in one line.

Before its first block a command checks that its output can be created where it is named
(:func:`check_writable`) and that it can fit on that filesystem (:func:`check_free_space`),
so a read-only directory or a nearly full disk is a one-line refusal with nothing written, not
a traceback after an hour. A write that fails anyway (the disk filled up meanwhile, a quota)
becomes a :class:`~ssn_deploy.errors.StorageError` naming the output and how to continue
(:func:`storage_errors`): finished blocks are kept, so ``--resume`` picks up after space is
freed. Only local paths are checked; URLs (``s3://``, ``memory://``) are left to their store,
except ``http(s)://``, which is read-only (:func:`refuse_read_only`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ssn_deploy.errors import StorageError

SPACE_CHECK_ENV = "SSN_DEPLOY_SPACE_CHECK"
"""Set to ``0`` to skip :func:`check_free_space` (a filesystem whose free space is not what
``df`` says, or data known to compress far better than assumed)."""

WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
"""Errors of the storage, not of the program: said in one line, never as a traceback."""

MIN_RATIO_INTENSITY = 2.0
"""zstd stores raw EM and uint8 affinities at no better than this (measured 1.1-1.8x on the
bundled demo, fib_medulla_250 and vnc outputs), so size / 2 is a lower bound of what they need."""
MIN_RATIO_LABELS = 128.0
"""uint32/uint64 label images compress far better (measured 36-116x on the same outputs)."""

_CONTAINER = re.compile(r"^(.*?\.(?:zarr|n5|hdf5?|h5))(?:[:/].*)?$", re.IGNORECASE)


def is_local(spec: str | os.PathLike) -> bool:
    return "://" not in str(spec).removeprefix("file://")


READ_ONLY_SCHEMES = ("http://", "https://")
"""URLs that volumes are read from, never written to (fsspec's HTTP filesystem cannot write)."""


def refuse_read_only(spec: str | os.PathLike) -> None:
    """One line, before any work, for an output at a read-only URL (``http(s)://``)."""
    if str(spec).lower().startswith(READ_ONLY_SCHEMES):
        raise StorageError(
            f"cannot write {spec}: http(s):// URLs are read-only (inputs only); write to a "
            "local path or to an object store (s3://, gs://)"
        )


def exists(spec: str | os.PathLike) -> bool:
    """Whether a local path or an fsspec URL (``s3://``, ``memory://``, ``file://``) exists."""
    if is_local(spec):
        return on_disk(spec).exists() if str(spec).startswith("file://") else os.path.exists(spec)
    from ssn_deploy.volumes import url_filesystem

    fs, path = url_filesystem(str(spec))
    return bool(fs.exists(path))


def on_disk(spec: str | os.PathLike) -> Path:
    """The file or directory a spec is stored in (``x.zarr/labels/seg`` → ``x.zarr``)."""
    text = str(spec).removeprefix("file://")
    match = _CONTAINER.match(text)
    return Path(os.path.abspath(match.group(1) if match else text))


def absolute_spec(spec: str) -> str:
    """``spec`` with a relative local container made absolute, for processes with another
    working directory (dask workers); links are kept as named, since workers may mount the
    same data elsewhere. URLs are returned as they are."""
    text = str(spec).removeprefix("file://")
    if not is_local(text):
        return spec
    match = _CONTAINER.match(text)
    container = match.group(1) if match else text
    return os.path.abspath(container) + text[len(container) :]


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (where a new output would be created)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _refuse(spec: str | os.PathLike, directory: Path) -> None:
    if not directory.is_dir():
        raise StorageError(f"cannot write {spec}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write {spec}: {directory} is not writable")


def check_writable(spec: str | os.PathLike, replace: bool = False) -> None:
    """Refuse, before anything is written, an output that cannot be created (or, existing,
    written into; with ``replace`` also deleted) by this process."""
    refuse_read_only(spec)
    if not is_local(spec):
        return
    path = on_disk(spec)
    if not path.exists() or replace:
        _refuse(spec, nearest_existing(path.parent))
    if path.is_dir():
        _refuse(spec, path)
    elif path.exists() and not os.access(path, os.W_OK):
        raise StorageError(f"cannot write {spec}: the file is not writable")


def stored_bytes(shape: Iterable[int], dtype: Any) -> tuple[int, int]:
    """(at least, uncompressed) bytes an array of ``shape`` and ``dtype`` takes on disk."""
    dtype = np.dtype(dtype)
    raw = math.prod(int(n) for n in shape) * dtype.itemsize
    labels = dtype.kind in "ui" and dtype.itemsize >= 4
    return int(raw / (MIN_RATIO_LABELS if labels else MIN_RATIO_INTENSITY)), raw


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def check_free_space(spec: str | os.PathLike, needed: int, uncompressed: int) -> None:
    """Refuse an output that cannot fit: ``needed`` (a lower bound of its compressed size) is
    more than its filesystem has free. Skipped for URLs and with ``SSN_DEPLOY_SPACE_CHECK=0``."""
    if not is_local(spec) or os.environ.get(SPACE_CHECK_ENV, "1") == "0":
        return
    where = nearest_existing(on_disk(spec))
    free = shutil.disk_usage(where).free
    if needed > free:
        raise StorageError(
            f"{spec} needs at least {_size(needed)} ({_size(uncompressed)} uncompressed) but "
            f"{where} has {_size(free)} free; free space or choose another output "
            f"({SPACE_CHECK_ENV}=0 skips this check)"
        )


def write_error(exc: OSError) -> str | None:
    """One line for a storage error (``path: no space left on device``), else None."""
    reason = WRITE_ERRORS.get(exc.errno) if isinstance(exc.errno, int) else None
    if reason is None:
        return None
    return f"{exc.filename}: {reason}" if exc.filename else reason


def settle_zarr_writes(timeout: float = 30.0) -> None:
    """Let the chunk writes zarr still has in flight finish after one of them failed.

    zarr gathers a region's chunk writes on its I/O loop: the first error propagates while the
    others are still pending there, and zarr closes that loop at exit, each of them then
    printing a traceback after the one-line error. Their own errors are retrieved (they are
    the same storage failure)."""
    from zarr.core import sync as zarr_sync

    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def drain() -> None:
        for _ in range(100):  # pending writes may start others; bounded
            me = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not pending:
                return
            done, _ = await asyncio.wait(pending, timeout=timeout)
            for task in done:
                if not task.cancelled():
                    task.exception()
            if len(done) < len(pending):
                return

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout + 5)


@contextlib.contextmanager
def storage_errors(spec: str | os.PathLike, then: str) -> Iterator[None]:
    """Turn a storage error while writing ``spec`` into one line that says ``then`` (what to
    do next, e.g. ``free space and rerun with --resume``)."""
    try:
        yield
    except OSError as exc:
        message = write_error(exc)
        if message is None:
            raise
        settle_zarr_writes()
        where = "" if exc.filename else f"cannot write {spec}: "
        raise StorageError(f"{where}{message}; {then}") from None


ZARR_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")
"""zarr's local store writes ``NAME.<uuid4 hex>.partial`` and renames it; a killed write
leaves it behind (harmless to zarr, but clutter)."""


def remove_temporaries(spec: str | os.PathLike) -> int:
    """Delete zarr's leftover temporary files under a local output (before ``--resume``, when
    no other process writes it); returns how many."""
    path = on_disk(spec)
    if not is_local(spec) or not path.is_dir():
        return 0
    removed = 0
    for root, _, files in os.walk(path):
        for name in files:
            if ZARR_TEMPORARY.search(name):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    return removed
