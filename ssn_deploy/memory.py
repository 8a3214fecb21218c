"""Give freed memory back to the operating system promptly (glibc's malloc).

glibc keeps freed heap memory for reuse unless the top of a heap exceeds a trim threshold that
it raises on its own (up to 32 MiB, and the mmap threshold with it) after large frees. Blockwise
inference frees tens of MB per block, so the process's RSS kept whatever the largest mix of
patch activations, block buffers and fragment arrays once needed. Fixed thresholds keep it
down: allocations of 4 MiB or more are mapped (and unmapped on free), and free memory above
64 KiB at the top of a heap is returned. ``benchmarks/scaling.py`` ("malloc") compares with
and without: 1,490 against 1,648 MiB at 256³. The mmap threshold is set too because a trim
threshold alone pins it at glibc's 128 KiB, which made every mid-sized allocation a fresh
mapping and slowed infer down. An explicit ``MALLOC_TRIM_THRESHOLD_`` or
``MALLOC_MMAP_THRESHOLD_`` in the environment wins; ``SSN_DEPLOY_MALLOC_TRIM=0`` keeps glibc's
own behaviour; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
TRIM_THRESHOLD = 64 * 1024
MMAP_THRESHOLD = 4 * 1024 * 1024
log = logging.getLogger(__name__)


def trim_freed_memory_promptly() -> bool:
    """Fix glibc's mmap (4 MiB) and trim (64 KiB) thresholds in this process; whether set."""
    chosen = {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & set(os.environ)
    if not sys.platform.startswith("linux") or chosen:
        return False
    if os.environ.get("SSN_DEPLOY_MALLOC_TRIM", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mmap = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        return bool(mmap and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        log.debug("mallopt unavailable: freed memory returns at the C library's own pace")
        return False
