"""Spherical linear interpolation of two weight tensors.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 —
https://doi.org/10.1145/325165.325242 (for model weights: https://en.wikipedia.org/wiki/Slerp).

Each tensor is one vector. The angle is measured between the normalized vectors; when they are
nearly colinear (or antipodal), ``|cos| > dot_threshold``, the interpolation falls back to linear,
as mergekit does. The reductions run over fixed chunks of :data:`CHUNK` elements in float32
(float64 for float64 inputs), so a bf16 tensor is never copied whole into float32 and the result
is bit-for-bit what mergekit 0.1.5 computes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from merge.chunks import CHUNK, PMap, chunks, serial_map
from merge.linear import work_dtype

__all__ = ["CHUNK", "DOT_THRESHOLD", "slerp"]

DOT_THRESHOLD = 0.9995


def _norm(flat: Tensor, parts: list[slice], work: torch.dtype, pmap: PMap) -> Tensor:
    """Euclidean norm as the norm of per-chunk norms."""
    pieces = pmap(lambda j: torch.linalg.vector_norm(flat[parts[j]].to(work)), range(len(parts)))
    return torch.linalg.vector_norm(torch.stack(list(pieces)))


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
    tt = torch.tensor(float(t), dtype=work, device=v0.device)
    if a.numel() == 0:
        return v0.clone()
    parts = chunks(a.numel())
    one = torch.ones((), dtype=work, device=v0.device)
    norm_a, norm_b = _norm(a, parts, work, pmap), _norm(b, parts, work, pmap)
    norm_a = torch.where(norm_a > eps, norm_a, one)
    norm_b = torch.where(norm_b > eps, norm_b, one)
    pieces = pmap(lambda j: ((a[parts[j]].to(work) / norm_a) * (b[parts[j]].to(work) / norm_b)).sum(), range(len(parts)))
    dot = torch.stack(list(pieces)).sum().clamp(-1, 1)
    if bool(dot.abs() > dot_threshold):
        coef_a, coef_b = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - tt) * theta) / sin_theta
        coef_b = torch.sin(tt * theta) / sin_theta
    out = torch.empty_like(a)

    def chunk(j: int) -> None:
        part = parts[j]
        out[part] = coef_a * a[part].to(work) + coef_b * b[part].to(work)

    pmap(chunk, range(len(parts)))
    return out.reshape(v0.shape)
