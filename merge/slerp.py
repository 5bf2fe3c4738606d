"""Spherical linear interpolation of two weight tensors.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 —
https://doi.org/10.1145/325165.325242 (for model weights: https://en.wikipedia.org/wiki/Slerp).

Each tensor is one vector. The angle is measured between the normalized vectors; when they are
nearly colinear (or antipodal), ``|cos| > dot_threshold``, the interpolation falls back to linear,
as mergekit does. The norms and the dot product are float64 sums over fixed chunks (a bf16 tensor
is never copied whole into a wider dtype), and the angle and the two coefficients are computed in
Python floats and rounded to float32: neither the library's summation order within a chunk nor its
math functions show in the result. The interpolation itself runs in float32 (float64 for float64
inputs).
"""

from __future__ import annotations

import math

from merge.arith import Array, Group, emit_chunks, whole_group
from merge.chunks import PMap, chunks, serial_map

__all__ = ["DOT_THRESHOLD", "EPS", "cosine", "slerp", "slerp_coefficients", "slerp_group"]

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def cosine(aa: float, bb: float, ab: float, eps: float) -> float:
    """The cosine of the angle between two vectors from their dot products ``a.a``, ``b.b`` and
    ``a.b``; a norm at most ``eps`` counts as 1, as mergekit's SLERP does."""
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    return ab / ((norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0))


def slerp_coefficients(t: float, cos: float, dot_threshold: float) -> tuple[float, float]:
    """The weights of ``v0`` and ``v1`` at ``t`` for vectors at the angle whose cosine is ``cos``:
    ``sin((1-t) theta) / sin theta`` and ``sin(t theta) / sin theta``, or ``1-t`` and ``t`` when
    ``|cos| > dot_threshold`` (nearly colinear)."""
    cos = min(max(cos, -1.0), 1.0)
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _dots(g: Group, i: int, k: int, parts: list[slice]) -> tuple[float, float, float]:
    """``x_i . x_i``, ``x_k . x_k`` and ``x_i . x_k`` in float64: per-chunk sums added in chunk order."""
    xp = g.arith.xp

    def piece(j: int) -> tuple[float, float, float]:
        a = xp.astype(g.values(i, parts[j]), xp.float64)
        b = xp.astype(g.values(k, parts[j]), xp.float64)
        # multiply and sum, not a BLAS dot: BLAS would start its own threads beside the chunk workers
        return float(xp.sum(a * a)), float(xp.sum(b * b)), float(xp.sum(a * b))

    aa = bb = ab = 0.0
    for x, y, z in g.pmap(piece, range(len(parts))):
        aa, bb, ab = aa + x, bb + y, ab + z
    return aa, bb, ab


def slerp_group(g: Group, t: float, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> None:
    """Interpolate from the base (t=0) to the other input (t=1) along the great circle."""
    assert g.base is not None
    (other,) = g.others()
    if g.numel == 0:
        return
    a, base = g.arith, g.base
    cos = cosine(*_dots(g, base, other, chunks(g.numel)), eps)
    coefficients = a.scalars(slerp_coefficients(t, cos, dot_threshold), wide=True)
    coef_a, coef_b = coefficients[0], coefficients[1]
    emit_chunks(g, lambda _j, p: coef_a * a.widen(g.values(base, p)) + coef_b * a.widen(g.values(other, p)))


def slerp(t: float, v0: Array, v1: Array, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS, pmap: PMap = serial_map) -> Array:
    """:func:`slerp_group` on two whole arrays of one dtype; the result in that dtype."""
    if tuple(v0.shape) != tuple(v1.shape):
        raise ValueError(f"shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    group, result = whole_group([v0, v1], base=0, pmap=pmap)
    slerp_group(group, t, dot_threshold=dot_threshold, eps=eps)
    return result()
