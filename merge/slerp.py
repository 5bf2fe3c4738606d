"""Spherical linear interpolation of two weight tensors.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 —
https://doi.org/10.1145/325165.325242 (for model weights: https://en.wikipedia.org/wiki/Slerp).

Each tensor is one vector. The angle is measured between the normalized vectors; when they are
nearly colinear (or antipodal), ``|cos| > dot_threshold``, the interpolation falls back to linear,
as mergekit does. The norms and the dot product are float64 sums over fixed chunks of
:data:`CHUNK` elements (a bf16 tensor is never copied whole into a wider dtype), and the angle and
the two coefficients are computed in Python floats (:func:`merge.npmath.slerp_coefficients`) and
rounded to float32: no summation order or math library shows in the result, so the numpy engine
writes the same bits. The interpolation itself runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from merge.chunks import CHUNK, PMap, chunks, serial_map
from merge.linear import work_dtype
from merge.npmath import cosine, slerp_coefficients

__all__ = ["CHUNK", "DOT_THRESHOLD", "slerp"]

DOT_THRESHOLD = 0.9995


def _dot(x: Tensor, y: Tensor, parts: list[slice], pmap: PMap) -> float:
    """``sum(x * y)`` in float64: per-chunk sums added in chunk order."""
    pieces = pmap(lambda j: float((x[parts[j]].double() * y[parts[j]].double()).sum()), range(len(parts)))
    return sum(pieces, 0.0)


def slerp(
    t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8, pmap: PMap = serial_map
) -> Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1) along the great circle; result in ``v0``'s dtype."""
    if v0.shape != v1.shape:
        raise ValueError(f"shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    if not v0.is_floating_point():
        raise TypeError("SLERP needs floating-point tensors")
    work = work_dtype(v0.dtype)
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return v0.clone()
    parts = chunks(a.numel())
    cos = cosine(_dot(a, a, parts, pmap), _dot(b, b, parts, pmap), _dot(a, b, parts, pmap), eps)
    coefficients = slerp_coefficients(t, cos, dot_threshold)
    coef_a, coef_b = (torch.tensor(c, dtype=work, device=v0.device) for c in coefficients)
    out = torch.empty_like(a)

    def chunk(j: int) -> None:
        part = parts[j]
        out[part] = coef_a * a[part].to(work) + coef_b * b[part].to(work)

    pmap(chunk, range(len(parts)))
    return out.reshape(v0.shape)
