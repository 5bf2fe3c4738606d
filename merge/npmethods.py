"""The merge methods of the numpy engine: one output tensor from its inputs' arrays, chunk by chunk.

Each function here is the numpy twin of a torch method (:mod:`merge.linear`, :mod:`merge.slerp`,
:mod:`merge.task_arithmetic` without magnitude or outlier trimming), with the same operations in
the same order, so both engines write the same bits (the tests compare them). A method reads chunk
``part`` of input ``i`` as float32 values on the compute dtype's grid (``group.values(i, part)``)
and hands each finished chunk to ``group.emit`` (which rounds it into the output array).

Papers: linear / soups https://arxiv.org/abs/2203.05482, SLERP https://doi.org/10.1145/325165.325242,
task arithmetic https://arxiv.org/abs/2212.04089, TIES https://arxiv.org/abs/2306.01708,
DARE https://arxiv.org/abs/2311.03099.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from merge.chunks import PMap, chunks, serial_map
from merge.flags import Consensus, Sparsification
from merge.npmath import (
    F32,
    accumulate,
    cosine,
    lerp_chunk,
    linear_chunk,
    random_keep,
    round_scalar,
    round_to,
    sign_agreement,
    slerp_coefficients,
)

__all__ = ["ArrayGroup", "NumpyMethod", "deltas_method", "linear", "slerp", "soup"]

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
L1_EPS = 1e-7


@dataclass(frozen=True)
class ArrayGroup:
    """The inputs of one output tensor for the numpy engine (the twin of :class:`merge.methods.Group`)."""

    numel: int
    dtype: str
    values: Callable[[int, slice], np.ndarray]
    emit: Callable[[slice, np.ndarray], None]
    count: int
    base: int | None
    shared: dict[str, Any]
    per_input: Sequence[dict[str, Any]]
    seeds: Sequence[int] = field(default_factory=tuple)
    pmap: PMap = serial_map

    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.base]


NumpyMethod = Callable[[ArrayGroup], None]


def _run(g: ArrayGroup, chunk: Callable[[int, slice], np.ndarray]) -> None:
    """Compute chunk ``j`` (elements ``part``) of the output for every ``j``, and emit it."""
    parts = chunks(g.numel)
    g.pmap(lambda j: g.emit(parts[j], chunk(j, parts[j])), range(len(parts)))


def _linear(g: ArrayGroup, weights: Sequence[float], normalize: bool) -> None:
    coefficients = [F32(w) for w in weights]
    total = F32(0)
    for c in coefficients:
        total = F32(total + c)
    _run(g, lambda _j, p: linear_chunk([g.values(i, p) for i in range(g.count)], coefficients, total if normalize else None))


def linear(g: ArrayGroup) -> None:
    """Weighted average (:func:`merge.linear.linear`)."""
    _linear(g, [p["weight"] for p in g.per_input], g.shared["normalize"])


def soup(g: ArrayGroup) -> None:
    """Uniform average (:func:`merge.linear.soup`)."""
    _linear(g, [1.0] * g.count, True)


def _dots(g: ArrayGroup, i: int, k: int, parts: list[slice]) -> tuple[float, float, float]:
    """``x_i . x_i``, ``x_k . x_k`` and ``x_i . x_k`` in float64, per-chunk dot products added in
    chunk order (as :mod:`merge.slerp` sums them; float64, so the order does not show)."""

    def piece(j: int) -> tuple[float, float, float]:
        a = g.values(i, parts[j]).astype(np.float64)
        b = g.values(k, parts[j]).astype(np.float64)
        # multiply and sum, not np.dot: BLAS would start its own threads beside the chunk workers
        return float((a * a).sum()), float((b * b).sum()), float((a * b).sum())

    aa = bb = ab = 0.0
    for x, y, z in g.pmap(piece, range(len(parts))):
        aa, bb, ab = aa + x, bb + y, ab + z
    return aa, bb, ab


def slerp(g: ArrayGroup) -> None:
    """Spherical interpolation from the base (t=0) to the other input (:func:`merge.slerp.slerp`)."""
    assert g.base is not None
    (other,) = g.others()
    if g.numel == 0:
        return
    base = g.base
    parts = chunks(g.numel)
    cos = cosine(*_dots(g, base, other, parts), SLERP_EPS)
    coef_a, coef_b = (F32(c) for c in slerp_coefficients(g.shared["t"], cos, SLERP_DOT_THRESHOLD))
    _run(g, lambda _j, p: lerp_chunk(g.values(base, p), g.values(other, p), coef_a, coef_b))


def _l1_factors(g: ArrayGroup, parts: list[slice], count: int, measure: Callable[[int], list[tuple[float, float]]]) -> list[np.float32 | None]:
    """DARE's rescale of ``count`` task vectors: each one's L1 norm over that of its kept entries,
    from ``measure(j)`` (both norms of chunk ``j`` of each, as float64 sums), added in chunk order and
    each rounded to the dtype, as the torch engine rounds them; None when either is below the
    threshold."""
    before, after = [0.0] * count, [0.0] * count
    for pieces in g.pmap(measure, range(len(parts))):
        for k, (b, a) in enumerate(pieces):
            before[k] += b
            after[k] += a
    eps = round_scalar(L1_EPS, g.dtype)
    factors: list[np.float32 | None] = []
    for b, a in zip(before, after):
        before_t, after_t = round_scalar(b, g.dtype), round_scalar(a, g.dtype)
        factors.append(None if before_t < eps or after_t < eps else round_scalar(float(F32(before_t / after_t)), g.dtype))
    return factors


def deltas_method(sparsification: Sparsification | None, consensus: Consensus | None) -> NumpyMethod:
    """Task arithmetic, DARE (linear or with sign election) and sign election alone: the numpy twin
    of :func:`merge.task_arithmetic.merge_deltas` for no or random sparsification."""
    if sparsification not in (None, Sparsification.random) or consensus not in (None, Consensus.sum):
        raise ValueError(f"the numpy engine has no {sparsification} sparsification / {consensus} consensus")

    def apply(g: ArrayGroup) -> None:
        base = g.base
        assert base is not None
        others = g.others()
        dtype = g.dtype
        parts = chunks(g.numel)
        weights = [round_scalar(g.per_input[i]["weight"], dtype) for i in others]
        unit = [w == 1.0 for w in weights]
        densities = [g.per_input[i]["density"] for i in others]
        dropping = [sparsification is Sparsification.random and d < 1 for d in densities]
        if any(dropping) and not g.seeds:
            raise ValueError("random sparsification needs a seed")
        #: the sparsified deltas of the L1 pass (float32: re-widening 16-bit copies cost more than the
        #: extra memory saves), taken and freed by the merge
        kept: dict[tuple[int, int], np.ndarray] = {}

        def sparsified(k: int, j: int, p: slice, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Chunk ``j`` of the ``k``-th task vector, whole and after DARE's drop."""
            delta = round_to(g.values(others[k], p) - b, dtype)
            return delta, delta * random_keep(g.seeds[others[k]], j, p.stop - p.start, densities[k])

        measured = [k for k in range(len(others)) if dropping[k]] if g.shared["rescale"] else []

        def measure(j: int) -> list[tuple[float, float]]:
            """Both L1 norms of chunk ``j`` of every measured task vector (the base read once)."""
            b = g.values(base, parts[j])
            norms = []
            for k in measured:
                delta, sparse = sparsified(k, j, parts[j], b)
                kept[(k, j)] = sparse
                norms.append((float(np.abs(delta).sum(dtype=np.float64)), float(np.abs(sparse).sum(dtype=np.float64))))
            return norms

        factors: list[np.float32 | None] = [None] * len(others)
        if measured:
            for k, factor in zip(measured, _l1_factors(g, parts, len(measured), measure)):
                factors[k] = factor
        total_weight = accumulate([np.array([w], dtype=F32) for w in weights], dtype)[0]
        if abs(total_weight) < 1e-8:
            total_weight = F32(1)
        scale = g.shared["lambda"]

        def chunk(j: int, p: slice) -> np.ndarray:
            b = g.values(base, p)
            weighted = []
            for k, i in enumerate(others):
                if dropping[k]:
                    cached = kept.pop((k, j), None)
                    delta = sparsified(k, j, p, b)[1] if cached is None else cached
                    if factors[k] is not None:
                        delta = round_to(delta * factors[k], dtype)
                else:
                    delta = round_to(g.values(i, p) - b, dtype)
                weighted.append(delta if unit[k] else round_to(delta * weights[k], dtype))
            if consensus is None:
                mixed = accumulate(weighted, dtype)
                if g.shared["normalize"]:
                    mixed = round_to(mixed / total_weight, dtype)
            else:
                agree = sign_agreement(weighted)
                mixed = accumulate([d * a for d, a in zip(weighted, agree)], dtype)
                if g.shared["normalize"]:
                    if all(unit):
                        # the divisor counts the agreeing models: small integers (uint16, cheaper than float32 and exact in the division); 0 -> 1
                        count = np.add(agree[0], agree[1], dtype=np.uint16) if len(agree) > 1 else agree[0].astype(np.uint16)
                        for a in agree[2:]:
                            count += a
                        divisor = np.maximum(count, np.uint16(1))
                    else:
                        divisor = accumulate([a * weights[k] for k, a in enumerate(agree)], dtype)
                        divisor = np.where(divisor == 0, F32(1), divisor)
                    mixed = round_to(mixed / divisor, dtype)
            if scale != 1:
                mixed = round_to(mixed * F32(scale), dtype)
            return b + mixed

        _run(g, chunk)

    return apply
