"""Linear merging (a weighted average of models) and uniform model soups.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 — https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from collections.abc import Sequence

from merge.arith import Array, Group, emit_chunks, whole_group
from merge.chunks import PMap, serial_map

__all__ = ["linear", "linear_group", "soup", "soup_group"]


def linear_group(g: Group, weights: Sequence[float], normalize: bool) -> None:
    """``sum_i weights[i] * x_i``, divided by ``sum(weights)`` when ``normalize``, for every chunk
    of ``g``: accumulated from zero in input order in float32 (float64 for float64), each term
    added by a fused multiply-add (one rounding per input, as mergekit's ``addcmul_``), rounded to
    the output once at the end."""
    a = g.arith
    xp = a.xp
    if len(weights) != g.count:
        raise ValueError(f"{g.count} inputs but {len(weights)} weights")
    coefficients = a.scalars(weights, wide=True)
    total = xp.sum(coefficients)

    def chunk(_j: int, part: slice) -> Array:
        acc = None
        for i in range(g.count):
            x = g.values(i, part)
            if acc is None:
                acc = xp.zeros_like(x, dtype=a.wide)
            acc = a.add_product(acc, x, coefficients[i : i + 1])
        if normalize:
            acc /= total
        return acc

    emit_chunks(g, chunk)


def soup_group(g: Group) -> None:
    """The uniform soup: the plain average of the inputs."""
    linear_group(g, [1.0] * g.count, True)


def linear(arrays: Sequence[Array], weights: Sequence[float], normalize: bool = True, *, pmap: PMap = serial_map) -> Array:
    """:func:`linear_group` on whole arrays of one dtype; the result in that dtype."""
    if not arrays:
        raise ValueError("linear needs at least one tensor")
    group, result = whole_group(arrays, pmap=pmap)
    linear_group(group, weights, normalize)
    return result()


def soup(arrays: Sequence[Array], *, pmap: PMap = serial_map) -> Array:
    """The uniform soup of whole arrays."""
    return linear(arrays, [1.0] * len(arrays), normalize=True, pmap=pmap)
