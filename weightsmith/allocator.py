"""glibc's allocator thresholds for the streaming passes, applied around a pass and reset after it.

A chunked merge allocates and frees thousands of short-lived 1 MiB temporaries. With glibc's default,
adaptive thresholds, a freed block at the top of the heap goes back to the kernel once enough is free,
and the next chunk's temporaries fault fresh pages in again. Serving blocks up to 32 MiB from the heap
and keeping up to 256 MiB of freed heap lets the pass reuse its own pages instead. See mallopt(3).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["kept_freed_memory"]

log = logging.getLogger(__name__)

#: mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The ceiling of glibc's own adaptive M_MMAP_THRESHOLD on 64-bit systems.
MMAP_THRESHOLD_MAX = 32 << 20
#: glibc's initial values of both thresholds (DEFAULT_MMAP_THRESHOLD_MIN, DEFAULT_TRIM_THRESHOLD).
GLIBC_DEFAULT = 128 << 10


def _mallopt():
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def _set(mallopt, mmap_threshold: int, trim_threshold: int) -> bool:
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


@contextmanager
def kept_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 256 << 20) -> Iterator[bool]:
    """Within the block, serve blocks up to ``mmap_threshold`` bytes from the heap and keep up to
    ``trim_threshold`` bytes of freed heap for reuse; yields whether the settings took effect (False
    where the C library has no mallopt, i.e. not glibc, or refuses a value). Afterwards both
    thresholds are set back to glibc's initial values (mallopt cannot read the current ones, and
    once set, glibc no longer adapts them on its own)."""
    mallopt = _mallopt()
    if mallopt is None:
        log.debug("no mallopt in this C library; allocator settings left as they are")
        yield False
        return
    applied = _set(mallopt, mmap_threshold, trim_threshold)
    log.debug("allocator thresholds: mmap %d, trim %d bytes (%s)", mmap_threshold, trim_threshold, "applied" if applied else "refused")
    try:
        yield applied
    finally:
        if applied:
            _set(mallopt, GLIBC_DEFAULT, GLIBC_DEFAULT)
