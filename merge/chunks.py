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

#: Elements per chunk (1 MiB of float32): small enough that a chunk's temporaries stay in cache and
#: each thread's working memory stays small, large enough that the few dozen array calls a chunk
#: costs (each handing the GIL over) stay cheap beside its arithmetic. Tensors are cut at fixed
#: offsets, not into one share per thread, for the same reason: the chunk is the unit of work.
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
    their loops): the indices are cut into ``threads`` consecutive shares of equal count, the
    calling thread computes the first and each pool thread one other, so one call costs one
    hand-off per thread rather than one per chunk (waking a thread for each of thousands of chunks
    costs more than small chunks' arithmetic). :func:`serial_map` for one thread."""
    if threads == 1:
        yield serial_map
        return
    with ThreadPoolExecutor(threads - 1, "merge-math") as pool:

        def pmap(fn: Callable[[int], T], indices: range) -> list[T]:
            n = len(indices)
            shares = min(threads, n)
            if shares <= 1:
                return [fn(i) for i in indices]
            bounds = [k * n // shares for k in range(shares + 1)]

            def share(k: int) -> list[T]:
                return [fn(indices[i]) for i in range(bounds[k], bounds[k + 1])]

            others = [pool.submit(share, k) for k in range(1, shares)]
            results = share(0)
            for future in others:
                results.extend(future.result())
            return results

        yield pmap
