"""llama.cpp's parameter searches for the GGUF block types, vectorised over blocks in torch.

Spec: llama.cpp ``ggml/src/ggml-quants.c`` (https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-quants.c),
the helpers ``make_qx_quants``, ``make_q3_quants``, ``make_qkx2_quants``, ``make_qkx3_quants`` and
``make_qp_quants`` and the K-quant row quantizers that use them (``quantize_row_q{2..6}_K_ref`` without
an importance matrix, ``quantize_row_q{2..6}_K_impl`` with one), plus the importance variants of the
legacy types (``quantize_row_q4_0_impl`` ...).

Every function takes float32 values with any leading batch dimensions and searches the last one (the
16 or 32 values of one sub-block, or the 8 / 16 sub-block scales of one super-block); a Python loop runs
only over the small fixed candidate grid of a search or the few values of a coordinate-descent pass,
never over blocks. Arithmetic follows the C code's float32 expressions and order (``(w*x)*l``, division
where the C divides, ``nearest_int`` as round-half-to-even), but the sums are torch reductions rather
than the C's left-to-right loops, so a near tie between two candidates can go the other way: results
equal llama.cpp's almost everywhere, not bit for bit.

Only the parameters are chosen here (float32 super-block scales before their float16 rounding and the
integer sub-block scales). The final codes come from :func:`compress.gguf.quants.encode`, which
rounds against the stored float16 grid exactly as the last loop of each llama.cpp quantizer does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GROUP_MAX_EPS",
    "SuperBlock",
    "legacy_weighted",
    "make_q3_quants",
    "make_qkx_quants",
    "make_qp_quants",
    "make_qx_quants",
    "q2_k",
    "q3_k",
    "q4_k",
    "q5_k",
    "q6_k",
    "signed_absmax",
]

#: below this absolute maximum a group counts as all zero (ggml's ``GROUP_MAX_EPS``)
GROUP_MAX_EPS = 1e-15

QK_K = 256


class SuperBlock(NamedTuple):
    """The parameters of K-quant super-blocks, ``[...]`` one per super-block.

    ``d`` / ``dmin`` are float32 before their float16 rounding; ``scales`` / ``mins`` are the integer
    sub-block multipliers ``[..., n_sub]`` (int8 for the signed Q3_K / Q6_K scales, the effective value
    ``stored - 32`` for Q3_K; uint8 otherwise). ``dmin`` / ``mins`` are None for types without a min."""

    d: Tensor
    scales: Tensor
    dmin: Tensor | None = None
    mins: Tensor | None = None


def _f32(*terms: float) -> float:
    """``a + b + ...`` evaluated left to right in float32 (a C float expression of constants)."""
    acc = np.float32(terms[0])
    for t in terms[1:]:
        acc = np.float32(acc + np.float32(t))
    return float(acc)


def _cdiv(c: float, t: Tensor) -> Tensor:
    """``c / t`` as one correctly rounded float32 division (``c / t`` in torch multiplies by ``1/t``)."""
    return torch.full_like(t, c) / t


def signed_absmax(x: Tensor) -> Tensor:
    """The signed value of largest magnitude along the last dimension (the first one on ties), keepdim."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def make_qx_quants(x: Tensor, nmax: int, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric scale search of ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``.

    The scale ``-nmax / max`` (``max`` the signed value of largest magnitude) and 18 nearby ones
    ``-(nmax + 0.1 i) / max``; each candidate's codes get the weighted least-squares scale
    ``sum(w x l) / sum(w l^2)`` and the candidate with the largest ``sum(w x l)^2 / sum(w l^2)`` (least
    weighted error) wins. ``weights`` default to ``x^2`` as in ggml. Returns ``(scale [...], codes
    [..., n])`` with codes ``l + nmax`` in ``[0, 2 nmax - 1]`` (all 0 with scale 0 for an all-zero group).
    """
    xmax = signed_absmax(x)
    zero = xmax.abs().squeeze(-1) < GROUP_MAX_EPS
    xmax = torch.where(xmax.abs() < GROUP_MAX_EPS, torch.ones_like(xmax), xmax)
    w = x * x if weights is None else weights
    wx = w * x

    def trial(iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        l = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        return l, (wx * l).sum(-1), (w * l * l).sum(-1)

    best_l, sumlx, suml2 = trial(_cdiv(-nmax, xmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        l, sumlx, suml2 = trial(_cdiv(-_f32(nmax, np.float32(0.1) * np.float32(i)), xmax))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_l = torch.where(better.unsqueeze(-1), l, best_l)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    codes = torch.where(zero.unsqueeze(-1), torch.zeros_like(best_l), best_l + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes


def _coordinate_descent(x: Tensor, w: Tensor, L: Tensor, lo: float | None, hi: float, passes: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """The refinement loop shared by ``make_q3_quants`` and ``make_qp_quants``: value by value, try the
    code that is optimal for the least-squares scale of the other values and keep it when it raises
    ``sum(w x l)^2 / sum(w l^2)``. Sequential within a group (each accepted change alters the sums the
    next value sees), vectorised across groups; a group with no change in a pass would repeat the same
    decisions, so running all groups until none changes equals ggml's per-group early exit.
    ``lo`` None: no lower clamp (``make_qp_quants``). Returns ``(L, sumlx, suml2)``."""
    L = L.clone()
    wx = w * x
    sumlx = (wx * L).sum(-1)
    suml2 = (w * L * L).sum(-1)
    for _ in range(passes):
        changed = False
        for i in range(x.shape[-1]):
            xi, wi, wxi, li = x[..., i], w[..., i], wx[..., i], L[..., i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = torch.round(xi * sl2 / slx).clamp_(min=lo, max=hi)
            nslx = slx + wxi * new_l
            nsl2 = sl2 + wi * new_l * new_l
            ok = (slx > 0) & (new_l != li) & (nsl2 > 0) & (nslx * nslx * suml2 > sumlx * sumlx * nsl2)
            if lo is None:
                ok &= sl2 > 0
            if bool(ok.any()):
                changed = True
                L[..., i] = torch.where(ok, new_l, li)
                sumlx = torch.where(ok, nslx, sumlx)
                suml2 = torch.where(ok, nsl2, suml2)
        if not changed:
            break
    return L, sumlx, suml2


def make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric scale of ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` (Q3_K without importance).

    Codes from ``-nmax / max`` refined by coordinate descent with weights ``x^2``; the scale is the
    weighted least-squares one of the final codes. Returns ``(scale [...], codes [..., n])`` with codes
    ``l + nmax`` in ``[0, 2 nmax - 1]`` (all 0 with scale 0 for an all-zero group)."""
    xmax = signed_absmax(x)
    zero = xmax.abs().squeeze(-1) < GROUP_MAX_EPS
    xmax = torch.where(xmax.abs() < GROUP_MAX_EPS, torch.ones_like(xmax), xmax)
    L = torch.round(_cdiv(-nmax, xmax) * x).clamp_(-nmax, nmax - 1)
    L, sumlx, suml2 = _coordinate_descent(x, x * x, L, -nmax, nmax - 1)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes


def make_qkx_quants(
    x: Tensor, weights: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Scale and min search of ``make_qkx2_quants`` / ``make_qkx3_quants`` (the grid ``min + scale * l``).

    Starts from ``min(x)`` (raised to 0 when positive) and ``(max - min) / nmax``; each of the
    ``nstep + 1`` candidates ``iscale = (rmin + rdelta * i + nmax) / (max - min)`` rounds the values,
    fits scale and min by weighted least squares (min kept <= 0) and wins if its weighted error
    (absolute with ``use_mad``, squared otherwise) is lower. As in ggml the running best min is what the
    next candidate's ``max - min`` and ``x - min`` use. The two C functions differ only in how they guard
    a non-finite candidate, which this handles the ``qkx3`` way (identical for finite values).
    Returns ``(scale, the_min, codes)``: ``scale`` and ``the_min = -min >= 0`` ``[...]``, codes
    ``[..., n]`` in ``[0, nmax]``; a constant group gets scale 0 and codes 0."""
    w = weights
    xmin = x.amin(-1, keepdim=True).clamp(max=0.0)
    xmax = x.amax(-1, keepdim=True)
    flat = (xmax <= xmin).squeeze(-1)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)

    def error(scale: Tensor, vmin: Tensor, l: Tensor) -> Tensor:
        diff = scale.unsqueeze(-1) * l + vmin - x
        diff = diff.abs() if use_mad else diff * diff
        return (w * diff).sum(-1)

    span = torch.where(flat.unsqueeze(-1), torch.ones_like(xmax), xmax - xmin)
    iscale = _cdiv(nmax, span)
    scale = _cdiv(1.0, iscale).squeeze(-1)
    L = torch.round(iscale * (x - xmin)).clamp_(0, nmax)
    best = error(scale, xmin, L)
    vmin = xmin
    for i in range(nstep + 1):
        iscale = _cdiv(_f32(rmin, np.float32(rdelta) * np.float32(i), nmax), xmax - vmin)
        # ggml: v > 0 ? nearest_int(MIN(v, nmax)) : 0, with a NaN v (min fitted at max) giving 0
        l = (iscale * (x - vmin)).clamp_(0, nmax).nan_to_num_(0.0).round_()
        wl = w * l
        sum_l, sum_l2, sum_xl = wl.sum(-1), (wl * l).sum(-1), (wl * x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min.unsqueeze(-1), l)
        better = (D > 0) & (cur < best) & ~flat
        L = torch.where(better.unsqueeze(-1), l, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        vmin = torch.where(better.unsqueeze(-1), this_min.unsqueeze(-1), vmin)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat.unsqueeze(-1), torch.zeros_like(L), L)
    return scale, -vmin.squeeze(-1), L


def make_qp_quants(x: Tensor, nmax: int, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Scale of non-negative values on ``scale * l``, ``l`` in ``[0, nmax]``: ggml's ``make_qp_quants``
    (the super-block scale of the sub-block scales / mins with an importance matrix).

    ``nmax / max`` and 8 nearby ``(nmax + 0.1 i) / max`` candidates by weighted squared error, then
    coordinate descent and the least-squares scale. Returns ``(scale [...], codes [..., n])``, codes
    clamped into ``[0, nmax]`` (ggml leaves a negative code to wrap in its byte; values here are >= 0)."""
    xmax = x.amax(-1, keepdim=True).clamp(min=0.0)
    zero = (xmax < GROUP_MAX_EPS).squeeze(-1)
    xmax = torch.where(xmax < GROUP_MAX_EPS, torch.ones_like(xmax), xmax)
    w = weights

    def mse(iscale: Tensor, l: Tensor) -> Tensor:
        diff = x - _cdiv(1.0, iscale) * l
        return (w * diff * diff).sum(-1)

    iscale = _cdiv(nmax, xmax)
    best = mse(iscale, torch.round(iscale * x))
    for i in range(-4, 5):
        if i == 0:
            continue
        cand = _cdiv(_f32(np.float32(0.1) * np.float32(i), nmax), xmax)
        err = mse(cand, torch.round(cand * x).clamp_(max=nmax))
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better.unsqueeze(-1), cand, iscale)
    L = torch.round(iscale * x).clamp_(max=nmax)
    L, sumlx, suml2 = _coordinate_descent(x, w, L, None, nmax)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L).clamp_(0, nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def _sub(x: Tensor, group: int) -> Tensor:
    """``[..., 256]`` -> ``[..., 256 // group, group]``."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def _importance_weights(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """ggml's imatrix weighting ``qw * sqrt(sigma2 + x^2)``; ``sigma2`` broadcasts against ``x``."""
    return qw * torch.sqrt(sigma2 + x * x)


def _max_nonneg(v: Tensor) -> Tensor:
    """ggml's ``max`` loop started at 0 over the last dimension."""
    return v.amax(-1).clamp(min=0.0)


def _level(values: Tensor, inv: Tensor, hi: int) -> Tensor:
    """``nearest_int(inv * values)`` into ``[0, hi]`` (inv ``[...]`` broadcast over the last dim)."""
    return torch.round(inv.unsqueeze(-1) * values).clamp_(0, hi)


def q2_k(x: Tensor, qw: Tensor | None = None) -> SuperBlock:
    """Q2_K super-block parameters for ``x [..., 256]``: 16 sub-blocks of 16 with 4-bit scales and mins.

    Without ``qw``: ``quantize_row_q2_K_ref`` (``make_qkx2_quants(16, 3, weights |x|, -0.5, 0.1, 15,
    mad)`` per sub-block, then scales and mins on ``max / 15``). With ``qw [..., 256]`` (per-value
    importance): ``quantize_row_q2_K_impl`` (``make_qkx3_quants`` with ``qw sqrt(sigma2 + x^2)``, then
    ``make_qp_quants(15)`` weighted by each sub-block's weight sum)."""
    xs = _sub(x, 16)
    if qw is None:
        scales, mins, _ = make_qkx_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
        max_scale, max_min = _max_nonneg(scales), _max_nonneg(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        one = torch.ones_like(max_scale)
        sc = torch.where(has_s.unsqueeze(-1), _level(scales, _cdiv(15.0, torch.where(has_s, max_scale, one)), 15), torch.zeros_like(scales))
        mn = torch.where(has_m.unsqueeze(-1), _level(mins, _cdiv(15.0, torch.where(has_m, max_min, one)), 15), torch.zeros_like(mins))
        d = torch.where(has_s, max_scale / 15.0, torch.zeros_like(max_scale))
        dmin = torch.where(has_m, max_min / 15.0, torch.zeros_like(max_min))
        return SuperBlock(d, sc.to(torch.uint8), dmin, mn.to(torch.uint8))
    sigma2 = (x * x).sum(-1) / QK_K
    weight = _importance_weights(xs, _sub(qw, 16), sigma2[..., None, None])
    scales, mins, _ = make_qkx_quants(xs, weight, 3, -0.9, 0.05, 36, False)
    sw = weight.sum(-1)
    d, sc = make_qp_quants(scales, 15, sw)
    dmin, mn = make_qp_quants(mins, 15, sw)
    return SuperBlock(d, sc.to(torch.uint8), dmin, mn.to(torch.uint8))


def q3_k(x: Tensor, qw: Tensor | None = None) -> SuperBlock:
    """Q3_K super-block parameters for ``x [..., 256]``: 16 sub-blocks of 16, signed 6-bit scales.

    Without ``qw``: ``quantize_row_q3_K_ref`` (``make_q3_quants(16, 4)`` per sub-block, scales on
    ``-32 / max_scale``, ``d = 1 / iscale``; an all-zero super-block stores scale bytes 0, i.e. effective
    scales -32 with d 0). With ``qw``: ``quantize_row_q3_K_impl`` (``make_qx_quants(16, 4)`` weighted by
    ``qw sqrt(2 mean(x^2) + x^2)``, then ``make_qx_quants(16, 32)`` on the scales weighted by their sums).
    ``scales`` are the effective signed values in ``[-32, 31]``."""
    xs = _sub(x, 16)
    if qw is None:
        scales, _ = make_q3_quants(xs, 4)
        max_scale = signed_absmax(scales).squeeze(-1)
        nz = max_scale != 0
        iscale = _cdiv(-32.0, torch.where(nz, max_scale, torch.ones_like(max_scale)))
        sc = torch.round(iscale.unsqueeze(-1) * scales).clamp_(-32, 31)
        sc = torch.where(nz.unsqueeze(-1), sc, torch.full_like(sc, -32.0))
        d = torch.where(nz, _cdiv(1.0, iscale), torch.zeros_like(iscale))
        return SuperBlock(d, sc.to(torch.int8))
    sigma2 = 2 * (x * x).sum(-1) / QK_K
    weight = _importance_weights(xs, _sub(qw, 16), sigma2[..., None, None])
    scales, _ = make_qx_quants(xs, 4, weight)
    d, ls = make_qx_quants(scales, 32, weight.sum(-1))
    return SuperBlock(d, (ls - 32).to(torch.int8))


def _q45_k(x: Tensor, qw: Tensor | None, nmax: int, rmin: float, nstep: int) -> SuperBlock:
    """Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins (see :func:`q4_k`)."""
    xs = _sub(x, 32)
    if qw is None:
        av_x = torch.sqrt((xs * xs).sum(-1) / 32)
        scales, mins, _ = make_qkx_quants(xs, av_x.unsqueeze(-1) + xs.abs(), nmax, rmin, 0.1, nstep, False)
        max_scale, max_min = _max_nonneg(scales), _max_nonneg(mins)
        zeros = torch.zeros_like(max_scale)
        inv_scale = torch.where(max_scale > 0, _cdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), zeros)
        inv_min = torch.where(max_min > 0, _cdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), zeros)
        sc, mn = _level(scales, inv_scale, 63), _level(mins, inv_min, 63)
        return SuperBlock(max_scale / 63.0, sc.to(torch.uint8), max_min / 63.0, mn.to(torch.uint8))
    sigma2 = 2 * (x * x).sum(-1) / QK_K
    weight = _importance_weights(xs, _sub(qw, 32), sigma2[..., None, None])
    scales, mins, _ = make_qkx_quants(xs, weight, nmax, -0.9, 0.05, 36, False)
    sw = weight.sum(-1)
    d, sc = make_qp_quants(scales, 63, sw)
    dmin, mn = make_qp_quants(mins, 63, sw)
    return SuperBlock(d, sc.to(torch.uint8), dmin, mn.to(torch.uint8))


def q4_k(x: Tensor, qw: Tensor | None = None) -> SuperBlock:
    """Q4_K super-block parameters for ``x [..., 256]``.

    Without ``qw``: ``quantize_row_q4_K_ref`` (``make_qkx2_quants(32, 15, weights av_x + |x|, -1, 0.1,
    20)`` per sub-block, scales and mins on ``max / 63``). With ``qw``: ``quantize_row_q4_K_impl``
    (``make_qkx3_quants(-0.9, 0.05, 36)`` with ``qw sqrt(2 mean(x^2) + x^2)``, then ``make_qp_quants(63)``)."""
    return _q45_k(x, qw, 15, -1.0, 20)


def q5_k(x: Tensor, qw: Tensor | None = None) -> SuperBlock:
    """Q5_K super-block parameters: as :func:`q4_k` with ``nmax`` 31 and the reference search
    ``make_qkx2_quants(32, 31, ..., -0.5, 0.1, 15)`` (``quantize_row_q5_K_ref`` / ``_impl``)."""
    return _q45_k(x, qw, 31, -0.5, 15)


def q6_k(x: Tensor, qw: Tensor | None = None) -> SuperBlock:
    """Q6_K super-block parameters for ``x [..., 256]``: 16 sub-blocks of 16 with int8 scales.

    ``quantize_row_q6_K_ref`` / ``_impl``: ``make_qx_quants(16, 32)`` per sub-block (weights ``x^2``, or
    ``qw`` itself with importance, as the C does), then scales on ``-128 / max_scale`` and
    ``d = 1 / iscale``; a super-block whose scales are all below ``GROUP_MAX_EPS`` is all zero."""
    xs = _sub(x, 16)
    scales, _ = make_qx_quants(xs, 32, None if qw is None else _sub(qw, 16))
    max_scale = signed_absmax(scales).squeeze(-1)
    nz = max_scale.abs() >= GROUP_MAX_EPS
    iscale = _cdiv(-128.0, torch.where(nz, max_scale, torch.ones_like(max_scale)))
    sc = torch.round(iscale.unsqueeze(-1) * scales).clamp_(-128, 127)
    sc = torch.where(nz.unsqueeze(-1), sc, torch.zeros_like(sc))
    d = torch.where(nz, _cdiv(1.0, iscale), torch.zeros_like(iscale))
    return SuperBlock(d, sc.to(torch.int8))


def legacy_weighted(x: Tensor, qw: Tensor, sigma2: Tensor, nmax: int, has_min: bool) -> tuple[Tensor, Tensor | None]:
    """Block scale (and min) of the legacy types with an importance matrix, ``x [..., 32]``.

    ``quantize_row_q4_0_impl`` / ``q5_0_impl``: ``make_qx_quants(32, nmax)`` weighted by
    ``qw sqrt(sigma2 + x^2)`` (``sigma2`` the mean square of the whole row, broadcast against ``x``);
    ``quantize_row_q4_1_impl`` / ``q5_1_impl``: ``make_qkx3_quants(32, nmax, -0.9, 0.05, 36)`` with the
    same weights. Returns float32 ``(d [...], m [...] | None)``, ``m`` the (non-positive) block min."""
    weight = _importance_weights(x, qw, sigma2)
    if not has_min:
        d, _ = make_qx_quants(x, nmax, weight)
        return d, None
    d, the_min, _ = make_qkx_quants(x, weight, nmax, -0.9, 0.05, 36, False)
    return d, -the_min
