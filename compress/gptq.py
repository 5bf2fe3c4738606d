"""GPTQ: quantization that compensates each column's rounding error on the columns not yet rounded.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", https://arxiv.org/abs/2210.17323.

The layer objective is ``||X W^T - X W_hat^T||^2`` with the Hessian ``H = 2 X^T X`` (one for all rows
of ``W``). GPTQ is the Optimal-Brain-Surgeon column sweep of :mod:`compress.obs` with a step that
rounds each column to the grid: the rounding error is spread over the later columns through the
inverse Hessian, so those columns absorb it before they are rounded in turn. Rounding to nearest
instead ignores which input channels carry signal, which is what makes it lose on layers whose inputs
have large, correlated channels. The group scales and zero points are chosen as the sweep reaches
each group (from the weights as already updated) or up front (per-channel grids, static act-order
groups), and :func:`hessian_clip_search` can shrink each group's range first by the same layer-output
error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from compress.grid import (
    QuantGrid,
    QuantizedTensor,
    clip_candidates,
    compute_scale_zero,
    group_min_max,
)
from compress.obs import ColumnStep, inner_block, inverse_cholesky, joint_step, obs_sweep, zero_dead_inputs
from weightsmith.calibkit import accumulate_hessian

logger = logging.getLogger(__name__)

__all__ = ["accumulate_hessian", "gptq_quantize", "hessian_clip_search"]


def hessian_clip_search(w: Tensor, H: Tensor, grid: QuantGrid, *, grid_points: int = 20, max_shrink: float = 0.5) -> Tensor:
    """Per-group clip ratios for GPTQ, chosen by the layer-output error on the calibration inputs.

    Tries ``grid_points`` ratios evenly spaced from 1 down to ``1 - max_shrink`` (both included),
    rounds ``w`` to the nearest point of each shrunk grid, and keeps per group the ratio whose
    error ``e`` gives the smallest ``e_g H_gg e_g^T`` (``H_gg``: the Hessian's block of the
    group's columns; for one scale per output channel this is the exact output error
    ``||X e^T||^2`` of round-to-nearest). Ratio 1 is tried first and only replaced by a strictly
    smaller error. This is the proxy of the AWQ paper's clipping search
    (https://arxiv.org/abs/2306.00978, section 3.3) with the full input covariance GPTQ already
    holds, where the squared weight error (:func:`compress.grid.mse_clip_search`) ignores which
    input channels carry signal (README's quantization table compares the two).

    ``H`` is ``[in, in]`` (any positive multiple of ``X^T X``); returns float32 ``[out, n_groups]``
    for :func:`gptq_quantize`'s ``clip``.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a weight [out, in], got shape {tuple(w.shape)}")
    out, inp = w.shape
    if H.shape != (inp, inp):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(inp, inp)}")
    n_groups = grid.n_groups(inp)
    gidx = grid.group_index(inp, device=w.device)
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    wf = w.to(work)
    if n_groups == 1:
        blocks = H.to(device=w.device, dtype=work)
    else:  # the block diagonal of H: an error in one group is weighed with that group's columns only
        blocks = H.to(device=w.device, dtype=work) * (gidx[:, None] == gidx[None, :])
    best_err = torch.full((out, n_groups), math.inf, dtype=work, device=w.device)
    best_ratio = torch.ones((out, n_groups), dtype=torch.float32, device=w.device)
    for r, w_hat in clip_candidates(w, grid, grid_points=grid_points, max_shrink=max_shrink):
        e = wf - w_hat
        per_column = (e @ blocks).mul_(e)
        err = per_column.sum(1, keepdim=True) if n_groups == 1 else torch.zeros_like(best_err).index_add_(1, gidx, per_column)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio


def _effective_block_size(block_size: int, group_size: int) -> int:
    """A block size that is a multiple of the group size, so no group straddles two blocks."""
    return group_size * max(1, block_size // group_size)


def _group_columns(scales: Tensor, zeros: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Each group's scales and zero points as contiguous float32 columns ``[out]``."""
    s32 = scales.to(torch.float32).t().contiguous()
    z32 = zeros.to(torch.float32).t().contiguous()
    return list(zip(s32.unbind(0), z32.unbind(0)))


def _round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` (float32) rounded to ``dtype`` and back: the dequantized weight exactly as it is stored
    ((code - zero) * scale is exact in float32 for 8-bit codes, then rounded once to the scale dtype)."""
    return x if dtype == torch.float32 else x.to(dtype).to(torch.float32)


class _GridStep:
    """GPTQ's column step for :func:`compress.obs.obs_sweep`: round the column to its group's grid
    and record the codes. A group whose scale is not precomputed gets it when the sweep reaches its
    first column, from the group's columns of the working block as updated so far (as the reference
    implementation does); with a mask, pruned weights do not count in that range."""

    def __init__(
        self,
        grid: QuantGrid,
        scales: Tensor,
        zeros: Tensor,
        proc_group: Tensor,
        *,
        precomputed: bool,
        ratio: Tensor | None,
        mask: Tensor | None,
    ) -> None:
        out, inp = scales.shape[0], proc_group.shape[0]
        self.grid = grid
        self.scales, self.zeros = scales, zeros
        self.ratio, self.mask = ratio, mask
        self.precomputed = precomputed
        self.gs = grid.effective_group_size(inp)
        self.codes = torch.empty((out, inp), dtype=torch.uint8, device=scales.device)
        # Per-group scale and zero columns in float32, indexed by processing position (a Python
        # list, so the sweep does no tensor indexing or device sync per column).
        self.group_of = proc_group.tolist()
        self.cols: list[tuple[Tensor, Tensor]] = _group_columns(scales, zeros) if precomputed else []

    def _set_group(self, g: int, cols: Tensor, k: int) -> None:
        if self.mask is not None:
            cols = cols.masked_fill(self.mask[:, k : k + cols.shape[1]], 0.0)
        lo, hi = cols.amin(dim=1, keepdim=True), cols.amax(dim=1, keepdim=True)
        if self.ratio is not None:
            lo, hi = lo * self.ratio[:, g : g + 1], hi * self.ratio[:, g : g + 1]
        s, z = compute_scale_zero(lo, hi, self.grid, self.scales.dtype)
        self.scales[:, g : g + 1], self.zeros[:, g : g + 1] = s, z
        self.cols.append(_group_columns(self.scales[:, g : g + 1], self.zeros[:, g : g + 1])[0])

    def __call__(self, block: Tensor, i: int, k: int) -> Tensor:
        if not self.precomputed and k % self.gs == 0:
            self._set_group(k // self.gs, block[:, i : min(i + self.gs, block.shape[1])], k)
        s_col, z_col = self.cols[self.group_of[k]]
        q = torch.round(block[:, i] / s_col).add_(z_col).clamp_(0, self.grid.maxq)
        self.codes[:, k] = q
        return _round_to(q.sub_(z_col).mul_(s_col), self.scales.dtype)


def gptq_quantize(
    w: Tensor,
    hessian: Tensor,
    grid: QuantGrid,
    *,
    damp: float = 0.01,
    max_damp: float = 1.0,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    clip: Tensor | None = None,
    mask: Tensor | None = None,
    prune: Callable[[Tensor], ColumnStep] | None = None,
    prune_spans: tuple[int, ...] = (),
) -> tuple[QuantizedTensor, float]:
    """Quantize ``w`` ``[out, in]`` with GPTQ given the input Hessian ``[in, in]``.

    * Dampening: ``damp * mean(diag H)`` is added to the diagonal; when the Cholesky factorization
      fails, damp is multiplied by 10 (a warning is logged) until it would exceed ``max_damp``,
      then ``ValueError``.
    * Dead inputs (zero Hessian diagonal: the input channel never fired) get ``H[j, j] = 1`` and
      weight column 0, so they quantize to exactly 0.
    * Groups: contiguous groups of ``group_size`` columns (a shorter last group when it does not
      divide ``in``). Without act-order a group's scale and zero point are computed when the sweep
      reaches its first column, from the weights as already updated by the earlier columns' errors;
      a per-channel grid takes its scales from the original weights. ``clip`` (``[out, n_groups]``,
      from :func:`hessian_clip_search` or :func:`compress.grid.mse_clip_search`) shrinks each
      group's range.
    * ``act_order``: columns are processed by descending Hessian diagonal, so the channels that
      carry most signal are rounded while the most columns remain to absorb their error. With
      ``static_groups`` (default) every group's scale and zero point are computed up front from the
      original weights in the original column order, so column ``j`` stays in group
      ``j // group_size`` and the result needs no ``g_idx``. Without static groups, groups are
      formed in processing order and the result carries a ``g_idx`` (``clip`` is then refused, its
      groups would not match).
    * ``mask`` (bool ``[out, in]``, True = pruned): those weights come out exactly 0 and the error
      of zeroing them is compensated like a rounding error (:func:`compress.obs.obs_sweep`).
    * ``prune``: joint sparse + quantized GPTQ. Given ``diag(U)`` in processing order it returns a
      prune step (e.g. ``lambda d: compress.obs.prune_step(d, 0.5)``); each column is pruned, then
      rounded. ``prune_spans``: the widths of the spans that step reads where they start (the ``m``
      of N:M), so the sweep can group its columns safely (:func:`compress.obs.inner_block`).

    The factorization and the sweep run in float32 on ``w``'s device (a float64 Hessian is cast);
    ``w`` and ``hessian`` are not modified.

    Returns the quantized tensor (scales in ``w.dtype``) and the GPTQ loss
    ``sum (w - w_hat)**2 / (2 [H^-1]_jj^2)`` (the paper's per-column error, summed).
    """
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(
            f"expected a floating-point weight [out, in], got {w.dtype} {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight contains NaN or infinite values")
    out, inp = w.shape
    if hessian.shape != (inp, inp):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(inp, inp)}")
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    if not max_damp >= damp:
        raise ValueError(f"max_damp ({max_damp}) must be at least damp ({damp})")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the Hessian contains NaN or infinite values")
    if mask is not None and (mask.shape != w.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(w.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    n_groups = grid.n_groups(inp)
    gs = grid.effective_group_size(inp)
    dynamic_groups = act_order and not static_groups
    if clip is not None:
        if dynamic_groups:
            raise ValueError("clip needs contiguous groups: use static_groups with act_order")
        if clip.shape != (out, n_groups):
            raise ValueError(f"clip has shape {tuple(clip.shape)}, expected {(out, n_groups)}")
        if bool(((clip <= 0) | (clip > 1)).any()):
            raise ValueError("clip ratios must lie in (0, 1]")

    device = w.device
    W, H = zero_dead_inputs(w.detach().to(torch.float32), hessian.detach().to(device=device, dtype=torch.float32))
    ratio = None if clip is None else clip.to(device=device, dtype=torch.float32)
    if mask is not None:
        mask = mask.to(device)

    scales = torch.empty((out, n_groups), dtype=w.dtype, device=device)
    zeros = torch.empty((out, n_groups), dtype=torch.uint8, device=device)
    col_group = grid.group_index(inp, device=device)

    # Per-channel grids and static act-order groups take their parameters from the original weights.
    precomputed = grid.group_size == -1 or (act_order and static_groups)
    if precomputed:
        lo, hi = group_min_max(W if mask is None else W.masked_fill(mask, 0.0), col_group, n_groups)
        if ratio is not None:
            lo, hi = lo * ratio, hi * ratio
        scales, zeros = compute_scale_zero(lo, hi, grid, w.dtype)

    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
    else:
        perm = torch.arange(inp, device=device)
    # group of the column at each processing position
    proc_group = col_group[perm] if precomputed else torch.arange(inp, device=device) // gs

    U = inverse_cholesky(H, damp, max_damp)
    del H

    rounding = _GridStep(grid, scales, zeros, proc_group, precomputed=precomputed, ratio=ratio, mask=mask)
    step: ColumnStep = rounding if prune is None else joint_step(prune(torch.diagonal(U)), rounding)
    bs = block_size if precomputed else _effective_block_size(block_size, gs)
    inner = inner_block(*(() if precomputed else (gs,)), *(prune_spans if prune is not None else ()))
    _, losses = obs_sweep(W, U, step, block_size=bs, mask=mask, inner=inner)

    inverse = torch.argsort(perm)
    codes = rounding.codes[:, inverse].contiguous()
    g_idx = None
    if dynamic_groups and n_groups > 1:
        g_idx = proc_group[inverse].contiguous()
    loss = float(losses.sum())
    if not math.isfinite(loss):
        raise ValueError("GPTQ produced a non-finite loss; check the weight and the Hessian")
    result = QuantizedTensor(
        codes=codes, scales=scales, zeros=zeros, grid=grid, shape=(out, inp), g_idx=g_idx
    )
    return result, loss
