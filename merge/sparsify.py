"""Sparsifying task vectors (deltas from a base model) before they are merged, chunk by chunk.

* ``random`` keeps each entry with probability ``density`` (DARE, https://arxiv.org/abs/2311.03099):
  each chunk draws 16-bit uniform integers on the CPU from its own stream, seeded by the tensor's
  seed and the chunk's index, and keeps the entries below ``round(density * 2**16)``
  (:func:`merge.npmath.random_keep`) — the same mask on every device, in both engines and whatever
  the number of threads (the keep probability is ``density`` to within 2**-17).
* ``magnitude`` keeps the ``density`` share of entries with the largest magnitude (TIES,
  https://arxiv.org/abs/2306.01708).
* ``outliers`` first drops the ``gamma`` share of largest-magnitude entries, then the smallest
  ones, keeping ``density`` of them (Model Breadcrumbs, https://arxiv.org/abs/2312.06795).
* ``della`` keeps each entry at random with a probability that rises with its magnitude's rank in
  its row, from ``density - epsilon`` (the smallest) to ``density + epsilon`` (the largest),
  evenly over the ranks (DELLA's MagPrune, https://arxiv.org/abs/2406.11617, as mergekit 0.1.5
  defines the ranks and the rows: the lines along axis 1, a 1-D tensor being one). The draws are
  DARE's 16-bit stream, one per chunk of whole rows (:func:`della_chunk_size`), each compared with
  its rank's threshold ``round(p * 2**16)``; ties in magnitude rank by position.

``magnitude`` and ``outliers`` use the exact top-k of :mod:`weightsmith.topk` (torch tensors
only): ties at the cut keep the lower flat index.

Rescaling (``rescale=True``, see :mod:`merge.task_arithmetic`) multiplies the kept entries so that
the task vector's L1 norm is unchanged, as mergekit does (the DARE paper divides by ``density``
instead, which preserves the L1 norm on average over draws; matching it on every draw does so too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

import merge.chunks
from merge.arith import Arith, Array
from merge.chunks import PMap
from merge.flags import Sparsification, della_problem
from merge.npmath import DRAW_LEVELS

if TYPE_CHECKING:
    from weightsmith.topk import Chunked

__all__ = ["Sparsifier", "della_chunk_size", "della_lines", "della_sparsifier", "della_thresholds", "ranked_sparsifier", "random_sparsifier"]

#: Sparsifies chunk ``j`` of a task vector: ``sparsifier(j, delta)``.
Sparsifier = Callable[[int, Array], Array]


def random_sparsifier(a: Arith, seed: int, density: float) -> Sparsifier:
    """DARE's drop: each entry kept with probability ``density`` (exact: a product by 0 or 1)."""
    return lambda j, delta: delta * a.keep(seed, j, delta.shape[0], density)


def ranked_sparsifier(method: Sparsification, deltas: Chunked, total: int, dtype: Any, density: float, gamma: float, pmap: PMap) -> Sparsifier:
    """The ``magnitude`` or ``outliers`` sparsifier of the task vector whose chunks are ``deltas``
    (``total`` torch entries of ``dtype``), planned by reading its chunks once per radix digit."""
    from weightsmith.topk import Chunked, Selector, key_bits, magnitude_keys, select

    bits = key_bits(dtype)
    keys = Chunked(deltas.count, lambda j: magnitude_keys(deltas.get(j)))
    if method is Sparsification.magnitude:
        k = 0 if density <= 0 or total == 0 else max(1, int(density * total))
        return Selector(select(keys, total, k, bits, largest=True, pmap=pmap), dtype).keep_largest
    if method is not Sparsification.outliers:
        raise ValueError(f"{method} is not a ranked sparsification")
    target = int(density * total)
    bottom = max(0, total - target - int(gamma * total))
    upto = Selector(select(keys, total, bottom + target, bits, largest=False, pmap=pmap), dtype)
    below = Selector(select(keys, total, bottom, bits, largest=False, pmap=pmap), dtype)

    def drop(j: int, delta: Array) -> Array:
        k = magnitude_keys(delta)
        return delta * (upto.mask(j, k) & ~below.mask(j, k))

    return drop


def della_lines(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(length, stride)`` of the rows DELLA ranks in a tensor of ``shape``: the lines along axis 1
    (``shape[1]`` entries, ``stride`` apart, ``stride`` being the product of the later axes), or the
    whole tensor as one row when it has fewer than two axes."""
    if len(shape) < 2:
        return math.prod(shape), 1
    return shape[1], math.prod(shape[2:])


def della_chunk_size(shape: tuple[int, ...]) -> int:
    """Elements per chunk when DELLA sparsifies a tensor of ``shape``: as many whole blocks of rows
    (one index of axis 0: ``length * stride`` consecutive entries) as fit in
    :data:`merge.chunks.CHUNK`, at least one, so that no row is cut."""
    length, stride = della_lines(shape)
    block = max(1, length * stride)
    return block * max(1, merge.chunks.CHUNK // block)


def della_thresholds(length: int, density: float, epsilon: float) -> np.ndarray:
    """The keep threshold on 16-bit draws for each magnitude rank ``0..length-1`` of a row (int32):
    ``round(p * 2**16)`` with ``p`` from ``density - epsilon`` up to ``density + epsilon`` in even
    steps; ``density`` for a row of one entry (mergekit's 0/0 there has no value)."""
    if length == 1:
        return np.array([round(density * DRAW_LEVELS)], dtype=np.int32)
    p = (density - epsilon) + np.arange(length, dtype=np.float64) / (length - 1) * (2 * epsilon)
    return np.rint(p * DRAW_LEVELS).astype(np.int32)


def _draws(seed: int, j: int, n: int) -> np.ndarray:
    """Chunk ``j``'s ``n`` 16-bit uniform draws: the stream :func:`merge.npmath.random_keep` draws
    DARE's masks from (PCG64 seeded by ``[seed, j]``, four draws per raw output)."""
    return np.random.default_rng([seed, j]).bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]


def della_sparsifier(a: Arith, seed: int, density: float, epsilon: float, shape: tuple[int, ...]) -> Sparsifier:
    """DELLA's MagPrune (https://arxiv.org/abs/2406.11617) of a task vector of ``shape``, cut into
    chunks of :func:`della_chunk_size`: entry ``i`` kept when its draw is below the threshold of its
    magnitude's rank in its row (stable sort: equal magnitudes rank by position). Nothing is kept
    for ``density <= 0``; raises ValueError for ``density +/- epsilon`` outside (0, 1)."""
    problem = della_problem(density, epsilon)
    if problem is not None:
        raise ValueError(problem)
    if density <= 0:
        return lambda _j, delta: delta * 0
    xp = a.xp
    length, stride = della_lines(shape)
    table = della_thresholds(length, density, epsilon)
    #: the thresholds on each device a chunk came from
    tables: dict[str, Array] = {}

    def drop(j: int, delta: Array) -> Array:
        n = delta.shape[0]
        device = delta.device
        if str(device) not in tables:
            tables[str(device)] = xp.asarray(table, device=device)
        magnitudes = xp.reshape(xp.abs(delta), (n // (length * stride), length, stride))
        order = xp.argsort(magnitudes, axis=1, stable=True)
        ranks = xp.reshape(a.ranks(order), (-1,))
        draws = xp.asarray(_draws(seed, j, n).astype(np.int32), device=device)
        keep = draws < xp.take(tables[str(device)], ranks, axis=0)
        return delta * xp.astype(keep, delta.dtype)

    return drop
