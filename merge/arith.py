"""What the merge math needs from an array library, so that each method is written once
(:mod:`merge.linear`, :mod:`merge.slerp`, :mod:`merge.task_arithmetic`) and runs on numpy arrays
(the CPU engine that never imports torch) and on torch tensors (CPU or CUDA).

The methods use the array API standard (https://data-apis.org/array-api/): numpy's own namespace
(numpy >= 2 implements it), torch's through ``array-api-compat``; plus the few operations of
:class:`Arith`:

* Values of the compute dtype. Torch computes on tensors of that dtype; every elementwise operation
  is computed in float32 and rounded to the nearest even 16-bit value. numpy has no bfloat16 and is
  slow on float16, so the numpy engine holds such values in float32 arrays and rounds explicitly.
  The methods call :meth:`Arith.round` wherever torch's arithmetic in the compute dtype rounds
  (for torch a cast that does nothing there), so both write the same bits.
* The masks of TIES' sign election and DARE's drop: the same values, spelled per library in the
  fastest form (torch multiplies by 0/1 in the compute dtype, several times faster on CPU than
  boolean masks; numpy is fastest with boolean masks and sign bits).

:class:`Group` is one output tensor as a method sees it: its inputs chunk by chunk (``values``) and
where each finished chunk goes (``emit``). Chunks are independent (:mod:`merge.chunks`), so the
result does not depend on the device or on how many threads ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from merge.chunks import PMap, chunks, serial_map
from merge.npmath import fused_multiply_add, random_keep, round_to

__all__ = ["Arith", "Array", "Group", "NumpyArith", "TorchArith", "accumulate", "apply_method", "arith_of", "emit_chunks", "emit_result", "vote_sum", "whole_group"]

#: An array of the engine's library (numpy ndarray or torch Tensor).
Array = Any

_SIGN_BIT, _FLOAT_ONE = np.uint32(0x80000000), np.uint32(0x3F800000)


class Arith(Protocol):
    """The engine's side of the math: the array namespace, and the operations that differ between
    libraries (see the module notes)."""

    #: the array API namespace of the values
    xp: Any
    #: the dtype of sums and interpolations: float64 for float64 values, else float32
    wide: Any
    #: the compute dtype (a torch dtype, or the safetensors name of the values numpy holds)
    dtype: Any

    def round(self, x: Array) -> Array:
        """``x`` (computed from values, or in :attr:`wide`) as values of the compute dtype, rounded
        to nearest even."""
        ...

    def widen(self, x: Array, copy: bool = False) -> Array:
        """Values as :attr:`wide` (exact)."""
        ...

    def scalars(self, values: Sequence[float], wide: bool = False) -> Array:
        """Python floats as a 1-D array of the compute dtype (rounded as torch stores them: to
        float32 first, then to the 16-bit grid), or of :attr:`wide` with ``wide``."""
        ...

    def add_product(self, acc: Array, x: Array, c: Array) -> Array:
        """``acc + x * c`` (``acc`` of :attr:`wide`, ``x`` values, ``c`` a one-element array of
        :attr:`wide`) rounded once to :attr:`wide`: a fused multiply-add, as torch's ``addcmul_``
        computes it. May update ``acc`` in place."""
        ...

    def ranks(self, order: Array) -> Array:
        """The inverse of the permutations ``order`` along axis 1 (as ``argsort`` gives them): where
        each entry goes when sorted, i.e. ``argsort(order, axis=1)``, by one scatter instead of a
        second sort."""
        ...

    def elect(self, total: Array) -> Array:
        """+1 where ``total >= +0``, -1 where it is negative or -0, in the compute dtype."""
        ...

    def agree(self, delta: Array, elected: Array) -> Array:
        """A mask that multiplies values: 1 where ``delta * elected > 0``, else 0."""
        ...

    def divisor(self, masks: Sequence[Array], weights: Array | None) -> Array:
        """The per-entry sum of the ``weights`` (each 1 when None) of the masks that are set,
        rounded to the compute dtype, with 1 where that sum is 0."""
        ...

    def keep(self, seed: int, j: int, n: int, density: float) -> Array:
        """Chunk ``j``'s DARE keep mask (:func:`merge.npmath.random_keep`) as a mask that
        multiplies values."""
        ...


def accumulate(a: Arith, parts: Sequence[Array]) -> Array:
    """The sum of ``parts`` (values of the compute dtype) rounded once to the compute dtype: two
    parts in one addition (computed wide and rounded, as torch adds two 16-bit tensors), more
    accumulated in :attr:`Arith.wide` — what ``torch.stack(parts).sum(0)`` gives, without the stack."""
    if len(parts) == 2:
        return a.round(parts[0] + parts[1])
    acc = a.widen(parts[0], copy=True)
    for part in parts[1:]:
        acc += a.widen(part)
    return a.round(acc)


def vote_sum(a: Arith, parts: Sequence[Array]) -> Array:
    """The sum of ``parts`` with its sign exact: two parts in one addition (rounding keeps the sign,
    and a value too small for the dtype becomes a zero of the same sign), more accumulated in
    :attr:`Arith.wide` and not rounded."""
    if len(parts) < 3:
        return parts[0] + parts[1] if len(parts) == 2 else parts[0]
    total = a.widen(parts[0], copy=True)
    for part in parts[1:]:
        total += a.widen(part)
    return total


def _numpy_namespace() -> Any:
    """numpy itself from 2.0 on (its main namespace implements the array API standard), else
    array-api-compat's wrapper; not the wrapper always: it imports numpy.testing and f2py, which
    would cost the numpy engine's start-up more than the merge of a small model."""
    if hasattr(np, "astype"):
        return np
    import array_api_compat.numpy as xp

    return xp


class NumpyArith:
    """numpy arrays of float32 holding values of ``dtype`` (``BF16``, ``F16`` or ``F32``)."""

    def __init__(self, dtype: str) -> None:
        self.xp = _numpy_namespace()
        self.dtype = dtype
        self.wide = np.float32

    def round(self, x: Array) -> Array:
        return round_to(x, self.dtype)

    def widen(self, x: Array, copy: bool = False) -> Array:
        return x.copy() if copy else x

    def scalars(self, values: Sequence[float], wide: bool = False) -> Array:
        x = np.array(values, dtype=np.float32)
        return x if wide else round_to(x, self.dtype)

    def add_product(self, acc: Array, x: Array, c: Array) -> Array:
        return fused_multiply_add(acc, x, c[0])

    def ranks(self, order: Array) -> Array:
        positions = np.arange(order.shape[1], dtype=order.dtype).reshape((1, -1) + (1,) * (order.ndim - 2))
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, positions, axis=1)
        return ranks

    def elect(self, total: Array) -> Array:
        # copysign(1, total) in two integer passes over the sign bits
        elected = total.view(np.uint32) & _SIGN_BIT
        elected |= _FLOAT_ONE
        return elected.view(np.float32)

    def agree(self, delta: Array, elected: Array) -> Array:
        return delta * elected > 0

    def divisor(self, masks: Sequence[Array], weights: Array | None) -> Array:
        if weights is None:
            # counts are small integers: uint16 is cheaper than float32 and exact in the division
            count = np.add(masks[0], masks[1], dtype=np.uint16) if len(masks) > 1 else masks[0].astype(np.uint16)
            for m in masks[2:]:
                count += m
            return np.maximum(count, np.uint16(1))
        total = accumulate(self, [m * weights[k] for k, m in enumerate(masks)])
        return np.where(total == 0, np.float32(1), total)

    def keep(self, seed: int, j: int, n: int, density: float) -> Array:
        return random_keep(seed, j, n, density)


class TorchArith:
    """torch tensors of ``dtype`` on ``device``: torch's arithmetic rounds by itself."""

    def __init__(self, dtype: Any, device: Any, threads: int | None = None) -> None:
        import array_api_compat.torch as xp
        import torch

        self.xp = xp
        self.dtype = dtype
        self.device = device
        self.wide = torch.float64 if dtype == torch.float64 else torch.float32
        #: torch's intra-op threads for whole-tensor reductions (:meth:`reducing`); None: as they are
        self.threads = threads

    @contextmanager
    def reducing(self) -> Iterator[None]:
        """torch's intra-op threads at :attr:`threads` inside the block (restored after): for
        reductions that must round as mergekit's do with as many threads, in a pass whose chunk
        workers otherwise run torch on one thread each. Call it between chunk maps, never inside
        one (the setting is process-wide)."""
        import torch

        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def round(self, x: Array) -> Array:
        return x.to(self.dtype)

    def widen(self, x: Array, copy: bool = False) -> Array:
        return x.to(self.wide, copy=copy)

    def scalars(self, values: Sequence[float], wide: bool = False) -> Array:
        import torch

        return torch.tensor([float(v) for v in values], dtype=self.wide if wide else self.dtype, device=self.device)

    def add_product(self, acc: Array, x: Array, c: Array) -> Array:
        return acc.addcmul_(x, c)

    def ranks(self, order: Array) -> Array:
        import torch

        positions = torch.arange(order.shape[1], dtype=order.dtype, device=order.device).reshape((1, -1) + (1,) * (order.ndim - 2))
        return torch.empty_like(order).scatter_(1, order, positions.expand_as(order))

    def elect(self, total: Array) -> Array:
        import torch

        return torch.copysign(torch.ones_like(total), total).to(self.dtype)

    def agree(self, delta: Array, elected: Array) -> Array:
        # arithmetic, not a comparison: bool tensors run several times slower on CPU
        return (delta * elected).relu().sign()

    def divisor(self, masks: Sequence[Array], weights: Array | None) -> Array:
        total = accumulate(self, masks if weights is None else [m * weights[k] for k, m in enumerate(masks)])
        # zeros -> 1 in arithmetic: total + (1 - sign(|total|)) adds exactly 0 elsewhere
        return total + (1 - total.abs().sign())

    def keep(self, seed: int, j: int, n: int, density: float) -> Array:
        import torch

        return torch.from_numpy(random_keep(seed, j, n, density).view(np.uint8)).to(device=self.device, dtype=self.dtype)


def arith_of(x: Array) -> Arith:
    """The :class:`Arith` of whole arrays like ``x`` computed in their own dtype: torch tensors of
    any floating dtype, numpy float32 arrays."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32:
            raise TypeError(f"numpy merge math takes float32 arrays, got {x.dtype}")
        return NumpyArith("F32")
    if not x.is_floating_point():
        raise TypeError("merging needs floating-point tensors")
    return TorchArith(x.dtype, x.device)


@dataclass(frozen=True)
class Group:
    """The inputs of one output tensor as a method sees them: ``count`` inputs of ``numel``
    elements (``shape``), chunk ``part`` of input ``i`` as values of the compute dtype
    (``values(i, part)``), where each finished chunk goes (``emit(part, x)``, which rounds ``x`` to
    the output), which input is the base, the shared parameters and each input's own, (for random
    methods) one seed per input, and the map that runs the chunks (several threads, or one)."""

    arith: Arith
    numel: int
    shape: tuple[int, ...]
    count: int
    values: Callable[[int, slice], Array]
    emit: Callable[[slice, Array], None]
    base: int | None
    shared: dict[str, Any]
    per_input: Sequence[dict[str, Any]]
    seeds: Sequence[int] = field(default_factory=tuple)
    pmap: PMap = serial_map
    #: takes a whole result in the dtype the method computed it (see :func:`emit_result`); None
    #: where the engine cannot keep it
    result: Callable[[Array], None] | None = None

    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.base]

    def whole(self, i: int) -> Array:
        """Input ``i`` whole, in its shape, as values of the compute dtype."""
        return self.arith.xp.reshape(self.values(i, slice(0, self.numel)), self.shape)


def apply_method(method: Any, g: Group, name: str) -> None:
    """Run ``method`` (a :class:`merge.methods.Method`) on ``g``, the output tensor ``name``: a
    problem its values show only while merging (a WeightsmithError from the math) names the
    tensor."""
    from weightsmith.errors import WeightsmithError

    try:
        method.apply(g)
    except WeightsmithError as exc:
        raise WeightsmithError(exc.path, f"tensor {name}: {exc.problem}") from None


def emit_result(g: Group, x: Array) -> None:
    """A method's whole result (``g.shape``), written in the dtype the method computed it in when
    the engine keeps it — mergekit writes a method's result as it is when the config gives no
    ``out_dtype``, and some methods compute in float32 from 16-bit inputs — else rounded to the
    output like any chunk."""
    if g.result is not None:
        g.result(x)
    else:
        g.emit(slice(0, g.numel), g.arith.xp.reshape(x, (-1,)))


def emit_chunks(g: Group, chunk: Callable[[int, slice], Array]) -> None:
    """Compute chunk ``j`` (elements ``part``) of the output for every ``j``, and emit it."""
    parts = chunks(g.numel)
    g.pmap(lambda j: g.emit(parts[j], chunk(j, parts[j])), range(len(parts)))


def whole_group(
    arrays: Sequence[Array],
    base: int | None = None,
    shared: dict[str, Any] | None = None,
    per_input: Sequence[dict[str, Any]] | None = None,
    seeds: Sequence[int] = (),
    pmap: PMap = serial_map,
) -> tuple[Group, Callable[[], Array]]:
    """A :class:`Group` over whole arrays of one dtype (torch tensors, or numpy float32), and a
    function returning the output once a method has run: the same math as the engines, for callers
    holding arrays."""
    first = arrays[0]
    a = arith_of(first)
    shape = tuple(first.shape)
    if any(tuple(x.shape) != shape for x in arrays):
        raise ValueError(f"shapes differ: {[tuple(x.shape) for x in arrays]}")
    if any(x.dtype != first.dtype for x in arrays):
        raise ValueError(f"dtypes differ: {[x.dtype for x in arrays]}")
    flats = [a.xp.reshape(x, (-1,)) for x in arrays]
    numel = flats[0].shape[0]
    out = a.xp.empty_like(flats[0])
    kept: list[Array] = []

    def emit(part: slice, x: Array) -> None:
        out[part] = x

    group = Group(
        a, numel, shape, len(arrays), lambda i, p: flats[i][p], emit, base, shared or {}, per_input or [{}] * len(arrays), seeds, pmap, kept.append
    )
    return group, lambda: kept[0] if kept else a.xp.reshape(out, shape)
