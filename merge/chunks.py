"""Fixed-size chunks: large tensors are processed a slice at a time, so temporaries stay small
(cache-sized, and reused by the allocator instead of fresh pages) and the results do not depend on
the device or on how many threads ran."""

from __future__ import annotations

__all__ = ["CHUNK", "chunks"]

#: Elements per chunk (4 MiB of float32).
CHUNK = 1 << 20


def chunks(n: int, size: int | None = None) -> list[slice]:
    """``[0, n)`` cut into consecutive slices of ``size`` (default :data:`CHUNK`) elements; the
    last may be shorter."""
    size = size or CHUNK
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
