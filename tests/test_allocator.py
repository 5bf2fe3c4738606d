"""The allocator settings the merge command applies to its own process."""

from __future__ import annotations

import platform

import pytest

from weightsmith.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_thresholds():
    assert keep_freed_memory() is True

