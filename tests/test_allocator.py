"""The allocator thresholds the streaming passes run under, and their reset after the pass."""

from __future__ import annotations

import ctypes
import platform

import pytest

from weightsmith.allocator import kept_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mmapped_blocks_after_malloc(size: int) -> int:
    """How many more blocks glibc serves by mmap once a ``size``-byte block is allocated."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    try:
        return libc.mallinfo2().hblks - before
    finally:
        libc.free(block)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_thresholds_apply_inside_and_reset_after():
    with kept_freed_memory() as applied:
        assert applied is True
        assert mmapped_blocks_after_malloc(8 << 20) == 0  # an 8 MiB block comes from the heap
    # glibc's initial 128 KiB threshold again: a 16 MiB block (more than the free heap) is mmapped
    assert mmapped_blocks_after_malloc(16 << 20) == 1
