"""Fixed-size chunks: large tensors are processed a slice at a time, so temporaries stay small
(cache-sized, and reused by the allocator instead of fresh pages) and the results do not depend on
the device or on how many threads ran."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["CHUNK", "PMap", "chunks", "serial_map", "thread_map"]

T = TypeVar("T")
#: Maps a function over chunk indices — in several threads or in one — returning the results in
#: index order. Chunks are computed independently, so the result does not depend on which.
PMap = Callable[[Callable[[int], T], range], Sequence[T]]

#: Elements per chunk (1 MiB of float32): the temporaries of a chunk's arithmetic stay in cache and
#: small per thread (measured on the merge set with two threads: slerp peak RSS 645 -> 555 MiB and
#: no slower than with 4 MiB chunks).
CHUNK = 1 << 18


def chunks(n: int, size: int | None = None) -> list[slice]:
    """``[0, n)`` cut into consecutive slices of ``size`` (default :data:`CHUNK`) elements; the
    last may be shorter."""
    size = size or CHUNK
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def serial_map(fn: Callable[[int], T], indices: range) -> list[T]:
    """The one-thread :data:`PMap`."""
    return [fn(i) for i in indices]


@contextmanager
def thread_map(threads: int) -> Iterator[PMap]:
    """A :data:`PMap` running chunks in ``threads`` threads (torch and numpy release the GIL in
    their loops); :func:`serial_map` for one thread or a single chunk."""
    if threads == 1:
        yield serial_map
        return
    with ThreadPoolExecutor(threads, "merge-math") as pool:
        yield lambda fn, indices: list(pool.map(fn, indices)) if len(indices) > 1 else [fn(i) for i in indices]
