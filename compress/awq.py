"""AWQ: activation-aware weight quantization, as pure functions on tensors.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", https://arxiv.org/abs/2306.00978.

Input channels that see large activations matter most. AWQ multiplies those weight columns by a
per-channel factor ``s`` before quantizing (so they get relatively finer steps) and divides the
layer input by ``s``, which is folded into whatever produces that input (a norm's weight, or the
rows of the previous linear). ``s = act_scale ** alpha`` with ``alpha`` searched on the output of
the block the weights belong to. A clipping search on the scaled weights follows.

Usage for the linears ``ws`` sharing one input ``x`` (e.g. q/k/v after a norm)::

    s = search_awq_scales(x, ws, block_fn, grid)
    ws_scaled = [scale_input_channels(w, s) for w in ws]
    norm_w, norm_b = fold_scales_into_norm(norm_w, s, norm_b)
    clips = [awq_clip_ratios(w, x / s, grid) for w in ws_scaled]
    qs = [quantize(w, grid, c) for w, c in zip(ws_scaled, clips)]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from compress.grid import QuantGrid, fake_quantize, mse_clip_search

logger = logging.getLogger(__name__)

__all__ = [
    "BlockFn",
    "activation_scale",
    "awq_clip_ratios",
    "awq_scales",
    "fold_scales_into_linear",
    "fold_scales_into_norm",
    "scale_input_channels",
    "search_awq_scales",
]

BlockFn = Callable[[Tensor, list[Tensor]], Tensor]
"""Maps (block input, the block's weights in order) to the block output."""

_MIN_SCALE = 1e-4


def activation_scale(x: Tensor) -> Tensor:
    """Mean absolute activation per input channel: float32 ``[in]`` from ``x`` ``[..., in]``."""
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"expected activations [..., in], got shape {tuple(x.shape)}")
    return x.detach().reshape(-1, x.shape[-1]).abs().to(torch.float32).mean(dim=0)


def awq_scales(act_scale: Tensor, alpha: float) -> Tensor:
    """``s = act_scale ** alpha`` (floored at 1e-4), normalized so ``max(s) * min(s) = 1``."""
    s = act_scale.to(torch.float32).pow(alpha).clamp(min=_MIN_SCALE)
    return s / torch.sqrt(s.max() * s.min())


def _check_scales(s: Tensor, n: int) -> None:
    if s.shape != (n,):
        raise ValueError(f"scales have shape {tuple(s.shape)}, expected ({n},)")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError("scales must be finite and positive")


def scale_input_channels(w: Tensor, s: Tensor) -> Tensor:
    """``w[:, j] * s[j]``: a weight ``[out, in]`` whose input will be divided by ``s``."""
    _check_scales(s, w.shape[-1])
    return (w.to(torch.float32) * s.to(device=w.device, dtype=torch.float32)).to(w.dtype)


def fold_scales_into_norm(
    norm_weight: Tensor, s: Tensor, norm_bias: Tensor | None = None, offset: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    """Divide a norm's effective weight (and bias) by ``s`` so its output is the scaled input ``x / s``.

    The norm computes ``normalize(x) * (offset + weight) + bias``: ``offset`` is 0 for most norms and
    1 for Gemma's RMSNorm, whose stored weight is the scale minus one; the new stored weight is then
    ``(offset + weight) / s - offset`` (:attr:`weightsmith.arch.Arch.norm_offset`).
    """
    _check_scales(s, norm_weight.shape[-1])
    sf = s.to(device=norm_weight.device, dtype=torch.float32)
    if offset:
        weight = ((norm_weight.to(torch.float32) + offset) / sf - offset).to(norm_weight.dtype)
    else:
        weight = (norm_weight.to(torch.float32) / sf).to(norm_weight.dtype)
    bias = None
    if norm_bias is not None:
        bias = (norm_bias.to(torch.float32) / sf).to(norm_bias.dtype)
    return weight, bias


def fold_scales_into_linear(
    weight: Tensor, s: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Divide the output rows (and bias) of the linear producing the input by ``s``.

    ``weight`` is ``[in, prev_in]``: its output channel ``j`` feeds input channel ``j`` of the
    scaled weights (e.g. ``v_proj`` before ``o_proj``, ``up_proj`` before ``down_proj``).
    """
    _check_scales(s, weight.shape[0])
    sf = s.to(device=weight.device, dtype=torch.float32)
    new_weight = (weight.to(torch.float32) / sf.unsqueeze(1)).to(weight.dtype)
    new_bias = None
    if bias is not None:
        new_bias = (bias.to(torch.float32) / sf).to(bias.dtype)
    return new_weight, new_bias


def _scaled_fake_quant(w: Tensor, s: Tensor, grid) -> Tensor:
    """``Q(w * s) / s`` in ``w``'s dtype: the weight the block sees when its input is unscaled. ``grid``
    is a :class:`QuantGrid` or a GGUF type's grid (:class:`compress.gguf.calibrated.GGUFGrid`, quantized
    by llama.cpp's reference quantizer)."""
    from compress.gguf.calibrated import GGUFGrid, fake_quantize as gguf_fake_quantize

    scaled = scale_input_channels(w, s)
    q = gguf_fake_quantize(scaled, grid) if isinstance(grid, GGUFGrid) else fake_quantize(scaled, grid)
    return (q.to(torch.float32) / s).to(w.dtype)


def search_awq_scales(
    x: Tensor,
    weights: Sequence[Tensor],
    block_fn: BlockFn,
    grid: QuantGrid | Sequence,
    n_grid: int = 20,
    *,
    act_scale: Tensor | None = None,
) -> Tensor:
    """Search AWQ's per-input-channel scales for weights that share the input ``x``.

    For ``alpha`` in ``0, 1/n_grid, ..., (n_grid-1)/n_grid`` the candidate ``s = awq_scales(
    act_scale, alpha)`` (``act_scale`` defaults to :func:`activation_scale` of ``x``) replaces each
    weight ``W`` by ``Q(W * s) / s`` (equivalent to feeding ``x / s`` to ``Q(W * s)``); ``block_fn``
    computes the block output and the mean squared difference to the float block output scores the
    candidate. ``alpha = 0`` is plain round-to-nearest, so the result is never worse than RTN on
    ``x``. Returns float32 ``s`` ``[in]``: apply it with :func:`scale_input_channels` and fold
    ``1 / s`` into the producer with :func:`fold_scales_into_norm` or
    :func:`fold_scales_into_linear`. ``grid`` may be one grid per weight (linears of one input on
    different GGUF types).
    """
    if not weights:
        raise ValueError("weights must hold at least one weight")
    grids = list(grid) if isinstance(grid, (list, tuple)) else [grid] * len(weights)
    if len(grids) != len(weights):
        raise ValueError(f"{len(grids)} grids for {len(weights)} weights")
    if n_grid < 1:
        raise ValueError(f"n_grid must be at least 1, got {n_grid}")
    inp = x.shape[-1]
    for w in weights:
        if w.ndim != 2 or w.shape[1] != inp:
            raise ValueError(f"weight shape {tuple(w.shape)} does not take inputs of width {inp}")
    a = activation_scale(x) if act_scale is None else act_scale.to(torch.float32)
    if a.shape != (inp,):
        raise ValueError(f"act_scale has shape {tuple(a.shape)}, expected ({inp},)")
    a = a.to(weights[0].device)
    with torch.no_grad():
        reference = block_fn(x, list(weights)).to(torch.float32)
        best_err = math.inf
        best_alpha = 0.0
        best_s = torch.ones(inp, dtype=torch.float32, device=a.device)
        for i in range(n_grid):
            alpha = i / n_grid
            s = awq_scales(a, alpha)
            candidate = [_scaled_fake_quant(w, s, g) for w, g in zip(weights, grids)]
            out = block_fn(x, candidate).to(torch.float32)
            err = float((reference - out).pow(2).mean())
            if err < best_err:
                best_err, best_alpha, best_s = err, alpha, s
    logger.debug("AWQ: alpha=%.2f, block output MSE %.4g", best_alpha, best_err)
    return best_s


def awq_clip_ratios(
    w_scaled: Tensor,
    x_scaled: Tensor,
    grid: QuantGrid,
    *,
    grid_points: int = 20,
    max_shrink: float = 0.5,
) -> Tensor:
    """AWQ's clipping search: per-group clip ratios for an already scaled weight.

    ``x_scaled`` are the inputs that weight sees (``x / s``). Each input channel's error is weighted
    by its mean squared activation, the diagonal of ``X^T X``, so the search minimizes an estimate
    of the layer output error (:func:`compress.grid.mse_clip_search`).
    """
    if x_scaled.shape[-1] != w_scaled.shape[-1]:
        raise ValueError(
            f"inputs of width {x_scaled.shape[-1]} do not match weight {tuple(w_scaled.shape)}"
        )
    rows = x_scaled.detach().reshape(-1, x_scaled.shape[-1]).to(torch.float32)
    importance = rows.pow(2).mean(dim=0).to(w_scaled.device)
    return mse_clip_search(
        w_scaled, grid, grid_points=grid_points, max_shrink=max_shrink, importance=importance
    )
