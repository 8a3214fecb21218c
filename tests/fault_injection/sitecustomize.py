"""Fault injection for the fault tests: imported at start-up by every Python process that has
this directory on ``PYTHONPATH`` (the tests' ``ssn-deploy`` subprocesses and dask workers),
and inert unless ``SSN_TEST_FAULT`` is set. Nothing in ssn_deploy knows about it.

``SSN_TEST_FAULT=ACTION:PATTERN:N`` acts on zarr's local writes whose path contains
``PATTERN``. Every chunk, shard, marker and ``zarr.json`` goes through
``zarr.storage._local._put``, which writes a temporary file and renames it into place:

- ``kill``: SIGKILL this process just before the N-th matching write;
- ``killmid``: SIGKILL it halfway through writing the N-th one (its temporary file is left);
- ``enospc``: the N-th matching write and every later one, whatever its path, fail with
  ENOSPC, as on a disk that just filled up (zarr removes the temporary file, as for real);
- ``slow``: sleep N seconds before every matching write (so that a test can act meanwhile).

Tests in the pytest process itself install :func:`faulty` with ``monkeypatch`` instead.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any


def faulty(original: Callable[..., Any], action: str, pattern: str, n: float) -> Callable:
    """zarr's ``_put`` (``original``) with the fault ``action`` at the ``n``-th write whose
    path contains ``pattern``."""
    import zarr.storage._local as local

    lock = threading.Lock()
    state = {"seen": 0, "full": False}

    def _put(path: Any, value: Any, exclusive: bool = False) -> Any:
        with lock:
            match = pattern in str(path)
            state["seen"] += match
            hit = match and state["seen"] == n
            state["full"] |= action == "enospc" and hit
        if action == "slow" and match:
            time.sleep(n)
        elif action == "kill" and hit:
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "killmid" and hit:
            path.parent.mkdir(parents=True, exist_ok=True)
            with local._atomic_write(path, "wb") as f:
                f.write(value.as_buffer_like()[: len(value) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        if state["full"]:  # no new directory either; a file's temporary copy is removed
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if not path.parent.is_dir():
                raise full
            with local._atomic_write(path, "wb", exclusive=exclusive):
                raise full
        return original(path, value, exclusive=exclusive)

    return _put


def _install(spec: str) -> None:
    import zarr.storage._local as local

    action, pattern, n = spec.split(":")
    local._put = faulty(local._put, action, pattern, float(n))


if os.environ.get("SSN_TEST_FAULT"):
    _install(os.environ["SSN_TEST_FAULT"])
