"""Sparsifying task vectors (deltas from a base model) before they are merged, chunk by chunk.

* ``magnitude`` keeps the ``density`` share of entries with the largest magnitude (TIES,
  https://arxiv.org/abs/2306.01708).
* ``random`` keeps each entry with probability ``density`` (DARE, https://arxiv.org/abs/2311.03099),
  drawn chunk by chunk on the CPU from the generator given, so a seeded generator gives the same
  mask on every device.
* ``outliers`` first drops the ``gamma`` share of largest-magnitude entries, then the smallest
  ones, keeping ``density`` of them (Model Breadcrumbs, https://arxiv.org/abs/2312.06795).

Rescaling (``rescale=True``) multiplies the kept entries so that the task vector's L1 norm is
unchanged, as mergekit does (the DARE paper divides by ``density`` instead, which preserves the L1
norm on average over draws; matching it on every draw does so too).

Ranks are exact and need no sort: the bit patterns of magnitudes, read as integers, are ordered like
the magnitudes, so a radix select (a 16-bit digit histogram per pass over the chunks) finds the
magnitude at the cut. Where several entries share it, the ones with the lower flat index are kept —
the order a stable sort gives. Memory stays at one chunk of the task vector at a time (plus one
small histogram per chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from merge.chunks import chunks

__all__ = [
    "Chunks",
    "Selection",
    "Selector",
    "Sparsification",
    "SparsifyPlan",
    "keep_largest",
    "keep_smallest",
    "magnitude_keys",
    "plan_sparsify",
    "select",
    "sparsify",
]

RADIX = 16
_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}

#: A re-iterable source of consecutive chunks of one flat tensor.
Chunks = Callable[[], Iterable[Tensor]]


class Sparsification(str, Enum):
    magnitude = "magnitude"
    random = "random"
    outliers = "outliers"


def magnitude_keys(x: Tensor) -> Tensor:
    """Integers ordered like ``|x|``: the bit patterns of ``|x|`` (sign bit clear), as the signed
    integer type of the same width."""
    return x.abs().view(_VIEWS[x.element_size()])


def _value_of(key: int, dtype: torch.dtype) -> float:
    """The magnitude whose bit pattern is ``key``."""
    view = _VIEWS[torch.empty((), dtype=dtype).element_size()]
    return float(torch.tensor(key, dtype=view).view(dtype))


def _digits(keys: Tensor, shift: int, prefix: int, bits: int) -> np.ndarray:
    """The 16-bit digit at ``shift`` of the keys whose higher digits equal ``prefix``."""
    keys = keys.cpu()
    if bits == RADIX:
        return keys.numpy().view(np.uint16)
    wide = keys.to(torch.int64)
    if shift + RADIX < bits:
        wide = wide[(wide >> (shift + RADIX)) == prefix]
    return ((wide >> shift) & ((1 << RADIX) - 1)).numpy()


def _radix_select(keys: Chunks, rank: int, bits: int) -> tuple[int, int, int, tuple[int, ...]]:
    """The key at position ``rank`` of all keys in ascending order, how many keys are smaller, how
    many equal it, and how many equal it in each chunk. One pass over ``keys()`` per 16-bit digit."""
    prefix, below, equal = 0, 0, 0
    per_chunk: list[np.ndarray] = []
    for shift in range(max(bits - RADIX, 0), -1, -RADIX):
        per_chunk = [np.bincount(_digits(chunk, shift, prefix, bits), minlength=1 << RADIX).astype(np.int32) for chunk in keys()]
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


def select(keys: Chunks, total: int, count: int, bits: int, *, largest: bool) -> Selection:
    """Plan keeping the ``count`` largest (or smallest) of ``total`` keys yielded by ``keys()``."""
    count = max(0, min(count, total))
    if count in (0, total):
        return Selection(total, count, largest)
    key, below, equal, per_chunk = _radix_select(keys, total - count if largest else count - 1, bits)
    ties = count - (total - below - equal) if largest else count - below
    return Selection(total, count, largest, key, ties, per_chunk)


class Selector:
    """Applies a :class:`Selection` to consecutive chunks (remembers the ties taken so far)."""

    def __init__(self, selection: Selection, dtype: torch.dtype) -> None:
        self.selection = selection
        self.quota = selection.ties
        self.index = 0
        self.cut = _value_of(selection.key, dtype)
        self.at_or_above = _value_of(selection.key - 1, dtype) if selection.key > 0 else -1.0

    def _ties_here(self) -> int:
        s = self.selection
        found = s.chunk_ties[self.index] if s.chunk_ties else 0
        self.index += 1
        return found

    def mask(self, keys: Tensor) -> Tensor:
        """Bool mask of the selected entries of the next chunk of keys."""
        s = self.selection
        found = self._ties_here()
        if s.count in (0, s.total):
            return torch.full(keys.shape, s.count == s.total, dtype=torch.bool, device=keys.device)
        mask = keys > s.key if s.largest else keys < s.key
        if self.quota > 0 and found:
            ties = keys == s.key
            if found <= self.quota:
                mask |= ties
            else:
                mask[torch.nonzero(ties).reshape(-1)[: self.quota]] = True
            self.quota = max(0, self.quota - found)
        return mask

    def keep_largest(self, values: Tensor) -> Tensor:
        """The next chunk of ``values`` with all but the selected largest magnitudes zeroed (one
        fused ``hardshrink``; ties at the cut handled only in the chunks that hold kept ones)."""
        s = self.selection
        assert s.largest
        found = self._ties_here()
        if s.count == s.total:
            return values
        if s.count == 0:
            return torch.zeros_like(values)
        if self.quota <= 0 or not found:
            return F.hardshrink(values, self.cut)
        if found <= self.quota:
            self.quota -= found
            return values if self.at_or_above < 0 else F.hardshrink(values, self.at_or_above)
        kept = F.hardshrink(values, self.cut)
        where = torch.nonzero(values.abs() == self.cut).reshape(-1)[: self.quota]
        kept[where] = values[where]
        self.quota = 0
        return kept


def _key_bits(dtype: torch.dtype) -> int:
    return 8 * torch.empty((), dtype=dtype).element_size()


def _whole(values: Tensor, count: int, largest: bool) -> Tensor:
    flat = values.reshape(-1)
    parts = chunks(flat.numel())
    keys = lambda: (magnitude_keys(flat[p]) for p in parts)  # noqa: E731
    selector = Selector(select(keys, flat.numel(), count, _key_bits(values.dtype), largest=largest), values.dtype)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=values.device)
    for p, k in zip(parts, keys()):
        mask[p] = selector.mask(k)
    return mask.reshape(values.shape)


def keep_largest(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest magnitudes of ``values`` (ties: lower index first)."""
    return _whole(values, k, largest=True)


def keep_smallest(values: Tensor, m: int) -> Tensor:
    """Bool mask of the ``m`` smallest magnitudes of ``values`` (ties: lower index first)."""
    return _whole(values, m, largest=False)


@dataclass(frozen=True)
class SparsifyPlan:
    """How one task vector is sparsified, decided before its chunks are merged."""

    method: Sparsification
    density: float
    dtype: torch.dtype
    selections: tuple[Selection, ...] = ()
    generator: torch.Generator | None = None
    generator_state: Tensor | None = None
    factor: Tensor | None = None

    def masker(self) -> Callable[[Tensor], Tensor]:
        """A function sparsifying the task vector's chunks, fed in order from the first."""
        if self.method is Sparsification.magnitude:
            selector = Selector(self.selections[0], self.dtype)
            drop: Callable[[Tensor], Tensor] = selector.keep_largest
        elif self.method is Sparsification.outliers:
            upto, below = (Selector(s, self.dtype) for s in self.selections)

            def drop(delta: Tensor) -> Tensor:
                keys = magnitude_keys(delta)
                return delta * (upto.mask(keys) & ~below.mask(keys))

        else:
            assert self.generator is not None and self.generator_state is not None
            generator, density = self.generator, self.density
            generator.set_state(self.generator_state)

            def drop(delta: Tensor) -> Tensor:
                draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32)
                keep = torch.sign(torch.relu(density - draws))
                return delta * keep.to(device=delta.device, dtype=delta.dtype)

        factor = self.factor
        return drop if factor is None else (lambda delta: drop(delta) * factor)


def _l1_factor(plan: SparsifyPlan, deltas: Chunks, eps: float = 1e-7) -> Tensor | None:
    """The factor restoring the task vector's L1 norm after sparsification (None when either norm is
    below ``eps``); sums in float32, rounded to the task vector's dtype."""
    sparsified = plan.masker()
    before = after = 0.0
    for delta in deltas():
        before += float(delta.abs().sum(dtype=torch.float32))
        after += float(sparsified(delta).abs().sum(dtype=torch.float32))
    before_t, after_t = torch.tensor(before, dtype=plan.dtype), torch.tensor(after, dtype=plan.dtype)
    if before_t < eps or after_t < eps:
        return None
    return before_t / after_t


def plan_sparsify(
    deltas: Chunks,
    total: int,
    dtype: torch.dtype,
    density: float,
    method: Sparsification,
    *,
    rescale: bool = False,
    gamma: float = 0.0,
    generator: torch.Generator | None = None,
) -> SparsifyPlan | None:
    """Plan sparsifying the task vector whose chunks ``deltas()`` yields (``total`` entries); None
    when ``density >= 1`` (nothing is dropped). Reads the chunks once per radix digit, and once more
    to measure the L1 norms when ``rescale``."""
    if density >= 1:
        return None
    bits = _key_bits(dtype)
    keys = lambda: (magnitude_keys(d) for d in deltas())  # noqa: E731
    if method is Sparsification.magnitude:
        k = 0 if density <= 0 or total == 0 else max(1, int(density * total))
        plan = SparsifyPlan(method, density, dtype, (select(keys, total, k, bits, largest=True),))
    elif method is Sparsification.outliers:
        target = int(density * total)
        bottom = max(0, total - target - int(gamma * total))
        upto = select(keys, total, bottom + target, bits, largest=False)
        plan = SparsifyPlan(method, density, dtype, (upto, select(keys, total, bottom, bits, largest=False)))
    elif method is Sparsification.random:
        if generator is None:
            raise ValueError("random sparsification needs a seeded generator")
        plan = SparsifyPlan(method, density, dtype, generator=generator, generator_state=generator.get_state())
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    return replace(plan, factor=_l1_factor(plan, deltas)) if rescale else plan


def sparsify(
    delta: Tensor,
    density: float,
    method: Sparsification,
    *,
    rescale: bool = False,
    gamma: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``delta`` with all but ``density`` of its entries zeroed by ``method`` (see the module notes);
    ``density >= 1`` returns it untouched."""
    flat = delta.reshape(-1)
    parts = chunks(flat.numel())
    plan = plan_sparsify(
        lambda: (flat[p] for p in parts), flat.numel(), delta.dtype, density, method, rescale=rescale, gamma=gamma, generator=generator
    )
    if plan is None:
        return delta
    apply = plan.masker()
    out = torch.empty_like(flat)
    for p in parts:
        out[p] = apply(flat[p])
    return out.reshape(delta.shape)
