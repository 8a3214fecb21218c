"""Give freed memory back to the operating system promptly (glibc's malloc).

glibc keeps freed heap memory for reuse unless the top of a heap exceeds a trim threshold that
it raises on its own (up to 32 MiB, and the mmap threshold with it) after large frees. Blockwise
inference frees tens of MB per block, so the process's RSS kept whatever the largest mix of
patch activations, block buffers and fragment arrays once needed. A fixed 64 KiB trim threshold
(what dask's nanny sets for its workers) lowered ``ssn-deploy infer``'s peak RSS on a 256³ crop
from 1,673 to 1,444 MiB (``benchmarks/scaling.py``, its "malloc" entry). An explicit
``MALLOC_TRIM_THRESHOLD_`` in the environment wins; ``SSN_DEPLOY_MALLOC_TRIM=0`` keeps glibc's
own behaviour (the benchmark's comparison); other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
TRIM_THRESHOLD = 64 * 1024
log = logging.getLogger(__name__)


def trim_freed_memory_promptly() -> bool:
    """Set glibc's trim threshold to 64 KiB in this process; whether it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    if os.environ.get("SSN_DEPLOY_MALLOC_TRIM", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        log.debug("mallopt unavailable: freed memory returns at the C library's own pace")
        return False
