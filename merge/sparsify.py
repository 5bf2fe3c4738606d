"""Sparsifying task vectors (deltas from a base model) before they are merged, chunk by chunk.

* ``magnitude`` keeps the ``density`` share of entries with the largest magnitude (TIES,
  https://arxiv.org/abs/2306.01708).
* ``random`` keeps each entry with probability ``density`` (DARE, https://arxiv.org/abs/2311.03099):
  each chunk draws 16-bit uniform integers on the CPU from its own stream, seeded by the tensor's
  seed and the chunk's index, and keeps the entries below ``round(density * 2**16)`` — the same mask
  on every device and whatever the number of threads (the keep probability is ``density`` to within
  2**-17).
* ``outliers`` first drops the ``gamma`` share of largest-magnitude entries, then the smallest
  ones, keeping ``density`` of them (Model Breadcrumbs, https://arxiv.org/abs/2312.06795).

Rescaling (``rescale=True``) multiplies the kept entries so that the task vector's L1 norm is
unchanged, as mergekit does (the DARE paper divides by ``density`` instead, which preserves the L1
norm on average over draws; matching it on every draw does so too).

Ranks are exact and need no sort: the bit patterns of magnitudes, read as integers, are ordered like
the magnitudes, so a radix select (a 16-bit digit histogram per pass over the chunks) finds the
magnitude at the cut. Where several entries share it, the ones with the lower flat index are kept —
the order a stable sort gives. Memory stays at one chunk of the task vector at a time (plus one
small histogram per chunk). Every step is a function of the chunk's index, so the chunks of one
tensor can be processed by several threads (``pmap``) with the very same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from merge.chunks import PMap, chunks, serial_map
from merge.flags import Sparsification
from merge.npmath import random_keep as np_random_keep

__all__ = [
    "Chunked",
    "Selection",
    "Selector",
    "Sparsification",
    "SparsifyPlan",
    "keep_largest",
    "keep_smallest",
    "first_true_prefix",
    "magnitude_keys",
    "plan_sparsify",
    "select",
    "sparsify",
]

RADIX = 16
_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Chunked:
    """The consecutive chunks of one flat tensor: ``count`` of them, ``get(j)`` computes chunk ``j``."""

    count: int
    get: Callable[[int], Tensor]


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


def _radix_select(keys: Chunked, rank: int, bits: int, pmap: PMap) -> tuple[int, int, int, tuple[int, ...]]:
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


def select(keys: Chunked, total: int, count: int, bits: int, *, largest: bool, pmap: PMap = serial_map) -> Selection:
    """Plan keeping the ``count`` largest (or smallest) of the ``total`` keys in ``keys``' chunks."""
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


def _key_bits(dtype: torch.dtype) -> int:
    return 8 * torch.empty((), dtype=dtype).element_size()


def _whole(values: Tensor, count: int, largest: bool) -> Tensor:
    flat = values.reshape(-1)
    parts = chunks(flat.numel())
    keys = Chunked(len(parts), lambda j: magnitude_keys(flat[parts[j]]))
    selector = Selector(select(keys, flat.numel(), count, _key_bits(values.dtype), largest=largest), values.dtype)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=values.device)
    for j, p in enumerate(parts):
        mask[p] = selector.mask(j, keys.get(j))
    return mask.reshape(values.shape)


def keep_largest(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest magnitudes of ``values`` (ties: lower index first)."""
    return _whole(values, k, largest=True)


def keep_smallest(values: Tensor, m: int) -> Tensor:
    """Bool mask of the ``m`` smallest magnitudes of ``values`` (ties: lower index first)."""
    return _whole(values, m, largest=False)


def random_keep(seed: int, j: int, n: int, density: float) -> Tensor:
    """Chunk ``j``'s keep mask of a DARE draw: ``n`` uint8 ones and zeros, each 1 with probability
    ``density`` (to within 2**-17), from the chunk's own stream of ``seed`` (the draws of
    :func:`merge.npmath.random_keep`, shared with the numpy engine)."""
    return torch.from_numpy(np_random_keep(seed, j, n, density).view(np.uint8))


@dataclass(frozen=True)
class SparsifyPlan:
    """How one task vector is sparsified, decided before its chunks are merged."""

    method: Sparsification
    density: float
    dtype: torch.dtype
    selections: tuple[Selection, ...] = ()
    seed: int | None = None
    factor: Tensor | None = None
    #: random masks drawn by a ``remember`` masker, taken (and freed) by the next masker
    kept_draws: dict[int, Tensor] = field(default_factory=dict)

    def masker(self, remember: bool = False) -> Callable[[int, Tensor], Tensor]:
        """A function sparsifying chunk ``j`` of the task vector: ``masker()(j, delta)``. With
        ``remember`` the random masks it draws are kept for the next masker (the L1 measure and the
        merge then share one draw; memory: one byte per entry of one tensor)."""
        if self.method is Sparsification.magnitude:
            drop: Callable[[int, Tensor], Tensor] = Selector(self.selections[0], self.dtype).keep_largest
        elif self.method is Sparsification.outliers:
            upto, below = (Selector(s, self.dtype) for s in self.selections)

            def drop(j: int, delta: Tensor) -> Tensor:
                keys = magnitude_keys(delta)
                return delta * (upto.mask(j, keys) & ~below.mask(j, keys))

        else:
            assert self.seed is not None
            seed, density = self.seed, self.density

            draws = self.kept_draws

            def drop(j: int, delta: Tensor) -> Tensor:
                keep = draws.pop(j, None)
                if keep is None:
                    keep = random_keep(seed, j, delta.numel(), density)
                if remember:
                    draws[j] = keep
                return delta * keep.to(device=delta.device, dtype=delta.dtype)

        factor = self.factor
        return drop if factor is None else (lambda j, delta: drop(j, delta) * factor)


def _l1_factor(plan: SparsifyPlan, deltas: Chunked, pmap: PMap, eps: float = 1e-7) -> Tensor | None:
    """The factor restoring the task vector's L1 norm after sparsification (None when either norm is
    below ``eps``); sums in float64 per chunk, added in chunk order, rounded to the task vector's
    dtype — float64, so that the summation order (torch's or numpy's) cannot show in the rounded norms."""
    sparsified = plan.masker(remember=True)

    def norms(j: int) -> tuple[float, float]:
        delta = deltas.get(j)
        return float(delta.abs().sum(dtype=torch.float64)), float(sparsified(j, delta).abs().sum(dtype=torch.float64))

    before = after = 0.0
    for b, a in pmap(norms, range(deltas.count)):
        before += b
        after += a
    before_t, after_t = torch.tensor(before, dtype=plan.dtype), torch.tensor(after, dtype=plan.dtype)
    if before_t < eps or after_t < eps:
        return None
    return before_t / after_t


def plan_sparsify(
    deltas: Chunked,
    total: int,
    dtype: torch.dtype,
    density: float,
    method: Sparsification,
    *,
    rescale: bool = False,
    gamma: float = 0.0,
    seed: int | None = None,
    pmap: PMap = serial_map,
) -> SparsifyPlan | None:
    """Plan sparsifying the task vector whose chunks are ``deltas`` (``total`` entries); None when
    ``density >= 1`` (nothing is dropped). Reads the chunks once per radix digit, and once more to
    measure the L1 norms when ``rescale``."""
    if density >= 1:
        return None
    bits = _key_bits(dtype)
    keys = Chunked(deltas.count, lambda j: magnitude_keys(deltas.get(j)))
    if method is Sparsification.magnitude:
        k = 0 if density <= 0 or total == 0 else max(1, int(density * total))
        plan = SparsifyPlan(method, density, dtype, (select(keys, total, k, bits, largest=True, pmap=pmap),))
    elif method is Sparsification.outliers:
        target = int(density * total)
        bottom = max(0, total - target - int(gamma * total))
        upto = select(keys, total, bottom + target, bits, largest=False, pmap=pmap)
        plan = SparsifyPlan(method, density, dtype, (upto, select(keys, total, bottom, bits, largest=False, pmap=pmap)))
    elif method is Sparsification.random:
        if seed is None:
            raise ValueError("random sparsification needs a seed")
        plan = SparsifyPlan(method, density, dtype, seed=seed)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    return replace(plan, factor=_l1_factor(plan, deltas, pmap)) if rescale else plan


def sparsify(
    delta: Tensor,
    density: float,
    method: Sparsification,
    *,
    rescale: bool = False,
    gamma: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """``delta`` with all but ``density`` of its entries zeroed by ``method`` (see the module notes);
    ``density >= 1`` returns it untouched."""
    flat = delta.reshape(-1)
    parts = chunks(flat.numel())
    plan = plan_sparsify(
        Chunked(len(parts), lambda j: flat[parts[j]]), flat.numel(), delta.dtype, density, method, rescale=rescale, gamma=gamma, seed=seed
    )
    if plan is None:
        return delta
    apply = plan.masker()
    out = torch.empty_like(flat)
    for j, p in enumerate(parts):
        out[p] = apply(j, flat[p])
    return out.reshape(delta.shape)
