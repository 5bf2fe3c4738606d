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

The ranked ones use the exact top-k of :mod:`weightsmith.topk` (torch tensors only): ties at the
cut keep the lower flat index.

Rescaling (``rescale=True``, see :mod:`merge.task_arithmetic`) multiplies the kept entries so that
the task vector's L1 norm is unchanged, as mergekit does (the DARE paper divides by ``density``
instead, which preserves the L1 norm on average over draws; matching it on every draw does so too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from merge.arith import Arith, Array
from merge.chunks import PMap
from merge.flags import Sparsification

if TYPE_CHECKING:
    from weightsmith.topk import Chunked

__all__ = ["Sparsifier", "ranked_sparsifier", "random_sparsifier"]

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
