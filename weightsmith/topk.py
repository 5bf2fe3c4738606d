"""Exact top-k by magnitude over a tensor read chunk by chunk: which ``k`` entries have the largest
(or smallest) ``|x|``, with ties at the cut broken towards the lower flat index — the order a
stable sort gives. Used by merging (TIES' trim, breadcrumbs) and by pruning.

No sort: the bit patterns of magnitudes, read as integers of the same width, are ordered like the
magnitudes, so a radix select (Knuth, TAOCP vol. 3, 5.2.5; one 16-bit digit histogram per pass over
the chunks) finds the magnitude at the cut and how many entries share it. Memory stays at one chunk
at a time plus one histogram per chunk. Every step is a function of the chunk's index, so the chunks
can be processed by several threads (``pmap``), in any order, with the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CHUNK",
    "Chunked",
    "ChunkMap",
    "Selection",
    "Selector",
    "first_true_prefix",
    "key_bits",
    "keep_largest",
    "keep_smallest",
    "magnitude_keys",
    "select",
]

RADIX = 16
#: Elements per chunk of :func:`keep_largest` / :func:`keep_smallest` unless told.
CHUNK = 1 << 18
_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Maps a function over chunk indices (in threads or not), returning the results in index order.
ChunkMap = Callable[[Callable[[int], Any], range], Sequence[Any]]


def _serial(fn: Callable[[int], Any], indices: range) -> list[Any]:
    return [fn(i) for i in indices]


@dataclass(frozen=True)
class Chunked:
    """The consecutive chunks of one flat tensor: ``count`` of them, ``get(j)`` computes chunk ``j``."""

    count: int
    get: Callable[[int], Tensor]


def key_bits(dtype: torch.dtype) -> int:
    """The width of the keys of ``dtype``'s magnitudes."""
    return 8 * torch.empty((), dtype=dtype).element_size()


def magnitude_keys(x: Tensor) -> Tensor:
    """Integers ordered like ``|x|``: the bit patterns of ``|x|`` (sign bit clear), as the signed
    integer type of the same width."""
    return x.abs().view(_VIEWS[x.element_size()])


def _value_of(key: int, dtype: torch.dtype) -> float:
    """The magnitude whose bit pattern is ``key``."""
    view = _VIEWS[torch.empty((), dtype=dtype).element_size()]
    return float(torch.tensor(key, dtype=view).view(dtype))


def _digits(keys: Tensor, shift: int, prefix: int, bits: int) -> Tensor:
    """The 16-bit digit at ``shift`` of the keys whose higher digits equal ``prefix`` (int16 keys of
    magnitudes are non-negative, so they are their own digit)."""
    keys = keys.cpu()
    if bits == RADIX:
        return keys
    wide = keys.to(torch.int64)
    if shift + RADIX < bits:
        wide = wide[(wide >> (shift + RADIX)) == prefix]
    return (wide >> shift) & ((1 << RADIX) - 1)


def _histogram(digits: Tensor) -> np.ndarray:
    """Counts of each 16-bit digit (torch's bincount releases the GIL, so threads histogram in parallel)."""
    return torch.bincount(digits, minlength=1 << RADIX).numpy().astype(np.int32)


def _radix_select(keys: Chunked, rank: int, bits: int, pmap: ChunkMap) -> tuple[int, int, int, tuple[int, ...]]:
    """The key at position ``rank`` of all keys in ascending order, how many keys are smaller, how
    many equal it, and how many equal it in each chunk. One pass over the chunks per 16-bit digit."""
    prefix, below, equal = 0, 0, 0
    per_chunk: Sequence[np.ndarray] = []
    for shift in range(max(bits - RADIX, 0), -1, -RADIX):
        per_chunk = pmap(lambda j, shift=shift, prefix=prefix: _histogram(_digits(keys.get(j), shift, prefix, bits)), range(keys.count))
        hist = np.sum(per_chunk, axis=0, dtype=np.int64)
        cumulative = np.cumsum(hist)
        digit = int(np.searchsorted(cumulative, rank - below, side="right"))
        below += int(cumulative[digit - 1]) if digit else 0
        equal = int(hist[digit])
        prefix = (prefix << RADIX) | digit
    return prefix, below, equal, tuple(int(h[prefix & ((1 << RADIX) - 1)]) for h in per_chunk)


@dataclass(frozen=True)
class Selection:
    """Which ``count`` of ``total`` keys to keep: the largest (or smallest) ones — every key beyond
    ``key``, and the first ``ties`` (by position) of those equal to it; ``chunk_ties`` counts the
    keys equal to ``key`` in each chunk."""

    total: int
    count: int
    largest: bool
    key: int = 0
    ties: int = 0
    chunk_ties: tuple[int, ...] = ()


def select(keys: Chunked, total: int, count: int, bits: int, *, largest: bool, pmap: ChunkMap = _serial) -> Selection:
    """Plan keeping the ``count`` largest (or smallest) of the ``total`` keys in ``keys``' chunks
    (``bits``: the keys' width, :func:`key_bits`)."""
    count = max(0, min(count, total))
    if count in (0, total):
        return Selection(total, count, largest)
    key, below, equal, per_chunk = _radix_select(keys, total - count if largest else count - 1, bits, pmap)
    ties = count - (total - below - equal) if largest else count - below
    return Selection(total, count, largest, key, ties, per_chunk)


def first_true_prefix(mask: Tensor, count: int, block: int = 1 << 14) -> int:
    """The length of the shortest prefix of the 1-D bool ``mask`` holding ``count`` True entries
    (``1 <= count <=`` the number of True entries): counts per block of ``block`` entries, then one
    ``nonzero`` inside the block where the count is reached."""
    n = mask.numel()
    full = n - n % block
    counts = mask[:full].view(-1, block).sum(dim=1, dtype=torch.int64)
    if full < n:
        counts = torch.cat([counts, mask[full:].sum(dtype=torch.int64).reshape(1)])
    cumulative = counts.cumsum(0)
    b = int(torch.searchsorted(cumulative, count))
    before = int(cumulative[b - 1]) if b else 0
    inside = torch.nonzero(mask[b * block : (b + 1) * block]).reshape(-1)
    return b * block + int(inside[count - before - 1]) + 1


class Selector:
    """Applies a :class:`Selection` to the chunks of a tensor, any chunk in any order: chunk ``j``
    takes the ties at the cut that the chunks before it left (the lower positions first)."""

    def __init__(self, selection: Selection, dtype: torch.dtype) -> None:
        self.selection = selection
        self.cut = _value_of(selection.key, dtype)
        self.at_or_above = _value_of(selection.key - 1, dtype) if selection.key > 0 else -1.0
        taken, quotas = 0, []
        for found in selection.chunk_ties:
            quotas.append(min(found, max(0, selection.ties - taken)))
            taken += found
        self.quotas = quotas
        self.found = selection.chunk_ties

    def _quota(self, j: int) -> tuple[int, int]:
        return (self.quotas[j], self.found[j]) if self.found else (0, 0)

    def mask(self, j: int, keys: Tensor) -> Tensor:
        """Bool mask of the selected entries of chunk ``j`` of the keys."""
        s = self.selection
        if s.count in (0, s.total):
            return torch.full(keys.shape, s.count == s.total, dtype=torch.bool, device=keys.device)
        mask = keys > s.key if s.largest else keys < s.key
        quota, found = self._quota(j)
        if quota:
            ties = keys == s.key
            if quota == found:
                mask |= ties
            else:
                stop = first_true_prefix(ties, quota)
                mask[:stop] |= ties[:stop]
        return mask

    def keep_largest(self, j: int, values: Tensor) -> Tensor:
        """Chunk ``j`` of ``values`` with all but the selected largest magnitudes zeroed (one fused
        ``hardshrink``; ties at the cut handled only in the chunks that keep some of them)."""
        s = self.selection
        assert s.largest
        if s.count == s.total:
            return values
        if s.count == 0:
            return torch.zeros_like(values)
        quota, found = self._quota(j)
        if not quota:
            return F.hardshrink(values, self.cut)
        keep_ties = values if self.at_or_above < 0 else F.hardshrink(values, self.at_or_above)
        if quota == found:
            return keep_ties
        stop = first_true_prefix(magnitude_keys(values) == s.key, quota)
        kept = F.hardshrink(values, self.cut)
        kept[:stop] = keep_ties[:stop]
        return kept


def _whole(values: Tensor, count: int, largest: bool, chunk: int) -> Tensor:
    flat = values.reshape(-1)
    parts = [slice(start, min(start + chunk, flat.numel())) for start in range(0, flat.numel(), chunk)]
    keys = Chunked(len(parts), lambda j: magnitude_keys(flat[parts[j]]))
    selector = Selector(select(keys, flat.numel(), count, key_bits(values.dtype), largest=largest), values.dtype)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=values.device)
    for j, p in enumerate(parts):
        mask[p] = selector.mask(j, keys.get(j))
    return mask.reshape(values.shape)


def keep_largest(values: Tensor, k: int, *, chunk: int = CHUNK) -> Tensor:
    """Bool mask of the ``k`` largest magnitudes of ``values`` (ties: lower flat index first),
    reading ``chunk`` elements at a time."""
    return _whole(values, k, True, chunk)


def keep_smallest(values: Tensor, m: int, *, chunk: int = CHUNK) -> Tensor:
    """Bool mask of the ``m`` smallest magnitudes of ``values`` (ties: lower flat index first),
    reading ``chunk`` elements at a time."""
    return _whole(values, m, False, chunk)
