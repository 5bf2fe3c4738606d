"""Spherical linear interpolation of two weight tensors.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 —
https://doi.org/10.1145/325165.325242 (for model weights: https://en.wikipedia.org/wiki/Slerp).

Each tensor is one vector. The angle is measured between the normalized vectors; when they are
nearly colinear (or antipodal), ``|cos| > dot_threshold``, the interpolation falls back to linear,
as mergekit does.

The statistics follow mergekit 0.1.5 step by step, so that the two coefficients — and with them
every output entry — carry the same bits: in float32 (float64 for float64 inputs), over pieces of
:data:`STAT_CHUNK` elements, each piece's norm taken by torch and the pieces' norms combined by a
norm again; the dot product of the normalized pieces summed per piece, then across pieces; the
angle and the coefficients as one-element float32 tensors. A tensor is never copied whole into the
wider dtype. The reductions are torch's own, with torch's threads as mergekit runs them
(:meth:`merge.arith.TorchArith.reducing`), so this runs in the torch engine only (numpy sums in
another order). The interpolation itself is elementwise, computed chunk by chunk in parallel in
float32 and rounded to the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge.arith import Group, emit_chunks, whole_group
from merge.chunks import PMap, chunks, serial_map

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DOT_THRESHOLD", "EPS", "STAT_CHUNK", "slerp", "slerp_coefficients", "slerp_group"]

DOT_THRESHOLD = 0.9995
EPS = 1e-8
#: Elements per piece of the norm and dot-product reductions (mergekit's statistics chunk).
STAT_CHUNK = 1 << 20


def _norm(g: Group, i: int, pieces: list[slice]) -> Tensor:
    """The L2 norm of input ``i`` as a (1, 1) tensor of the wide dtype: the norm of the pieces'
    norms; a norm at most :data:`EPS` counts as 1."""
    import torch

    a = g.arith
    parts = [torch.linalg.vector_norm(g.values(i, piece).reshape(1, -1).to(a.wide), dim=1, keepdim=True) for piece in pieces]
    norm = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    return torch.where(norm > EPS, norm, 1)


def slerp_coefficients(g: Group, t: float, dot_threshold: float = DOT_THRESHOLD) -> tuple[Tensor, Tensor]:
    """The weights of the base and of the other input at ``t``, as one-element tensors of the wide
    dtype: ``sin((1-t) theta) / sin theta`` and ``sin(t theta) / sin theta`` for the angle
    ``theta`` between them, or ``1-t`` and ``t`` when ``|cos theta| > dot_threshold``."""
    import torch

    assert g.base is not None
    (other,) = g.others()
    a = g.arith
    pieces = chunks(g.numel, STAT_CHUNK)

    def dot(piece: slice) -> Tensor:
        x = g.values(g.base, piece).reshape(1, -1).to(a.wide) / norm_base
        y = g.values(other, piece).reshape(1, -1).to(a.wide) / norm_other
        return (x * y).sum(dim=1, keepdim=True)

    with a.reducing():
        norm_base, norm_other = _norm(g, g.base, pieces), _norm(g, other, pieces)
        cos = torch.stack([dot(piece) for piece in pieces]).sum(dim=0).clamp(-1, 1)
    tt = torch.tensor([t], dtype=a.wide, device=cos.device).reshape(-1, 1)
    linear = cos.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, cos))
    sin_theta = torch.sin(theta)
    coef_base = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_other = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_base.reshape(1), coef_other.reshape(1)


def slerp_group(g: Group, t: float, *, dot_threshold: float = DOT_THRESHOLD) -> None:
    """Interpolate from the base (t=0) to the other input (t=1) along the great circle."""
    assert g.base is not None
    if g.numel == 0:
        return
    (other,) = g.others()
    a, base = g.arith, g.base
    coef_base, coef_other = slerp_coefficients(g, t, dot_threshold)
    emit_chunks(g, lambda _j, p: coef_base * a.widen(g.values(base, p)) + coef_other * a.widen(g.values(other, p)))


def slerp(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = DOT_THRESHOLD, pmap: PMap = serial_map) -> Tensor:
    """:func:`slerp_group` on two whole tensors of one dtype; the result in that dtype."""
    if tuple(v0.shape) != tuple(v1.shape):
        raise ValueError(f"shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    group, result = whole_group([v0, v1], base=0, pmap=pmap)
    slerp_group(group, t, dot_threshold=dot_threshold)
    return result()
