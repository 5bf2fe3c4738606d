"""GPTQ and AWQ on the exact grid of a GGUF block type, so the calibrated error compensation sees the
grid llama.cpp will run.

GPTQ (https://arxiv.org/abs/2210.17323) is the Optimal-Brain-Surgeon column sweep of
:mod:`compress.obs` with a step that rounds each column to the grid. Here the grid is a GGUF type's:
when the sweep reaches the first column of a block (32 columns for Q4_0 ... Q8_0, a 256-column
super-block for the K-quants), the block's parameters are chosen from its columns as the sweep has
updated them so far, by llama.cpp's own rules (:func:`compress.gguf.quants.block_params`: for the
K-quants the 6-bit sub-block scales and mins under float16 super-block scales, for Q4_0 the float16
block scale), optionally weighted by the input channels' mean squared activation (llama.cpp's
importance matrix); then every column of the block is rounded to the nearest point of that fixed
grid, and its rounding error is spread over the later columns. The codes and parameters are what the
GGUF file stores, so llama.cpp computes exactly the weights GPTQ measured.

AWQ (https://arxiv.org/abs/2306.00978) searches its input-channel scales with :func:`fake_quantize`,
the round trip through the type's reference quantizer, and the scaled weights are then quantized with
the scaled inputs' importance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.gguf import quants
from compress.gguf.quants import BlockParams, GGUFQuant
from compress.obs import inner_block, inverse_cholesky, obs_sweep, zero_dead_inputs

__all__ = ["GGUFGrid", "fake_quantize", "gptq_gguf", "rows_of"]


@dataclass(frozen=True)
class GGUFGrid:
    """The grid of one GGUF block type (``q4_k``...), in the place of a :class:`compress.grid.QuantGrid`."""

    gtype: str

    @property
    def block_size(self) -> int:
        return quants.gguf_type(self.gtype).block_size

    @property
    def bits_per_weight(self) -> float:
        return quants.gguf_type(self.gtype).bits_per_weight


def fake_quantize(w: Tensor, grid: GGUFGrid, importance: Tensor | None = None) -> Tensor:
    """``w`` quantized by llama.cpp's reference quantizer of the type and dequantized, in ``w``'s dtype."""
    return quants.dequantize(quants.quantize(w, grid.gtype, importance)).to(w.dtype)


def rows_of(q: GGUFQuant, start: int, stop: int) -> GGUFQuant:
    """Output rows ``start:stop`` of ``q`` (one linear of a stack quantized together)."""

    def part(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[start:stop].contiguous()

    return GGUFQuant(q.gtype, (stop - start, q.shape[1]), part(q.codes), part(q.d), part(q.m), part(q.dmin), part(q.sub_scales), part(q.sub_mins))


class _StaticStep:
    """The column step with every block's parameters fixed up front from the original weights (for
    act-order, where the sweep does not visit a block's columns together): processing position ``k``
    is original column ``perm[k]``, rounded to its block's grid."""

    def __init__(self, params: BlockParams, perm: list[int], out: int) -> None:
        self.t = quants.gguf_type(params.gtype)
        self.params = params
        self.perm = perm
        self.scale, self.offset = quants.affine(params)
        self.codes = torch.empty((out, len(perm)), dtype=torch.uint8)

    def __call__(self, block: Tensor, i: int, k: int) -> Tensor:
        col = self.perm[k]
        code = quants.encode(block[:, i : i + 1], self.params, start=col)[:, 0]
        self.codes[:, col] = code
        g = col // self.t.group_size
        return self.scale[:, g] * code.to(torch.float32) + self.offset[:, g]


class _BlockStep:
    """The sweep's column step on a GGUF grid: a block's parameters at its first column, then each
    column rounded to the nearest point of that block's grid."""

    def __init__(self, grid: GGUFGrid, out: int, inp: int, importance: Tensor | None, row_sq_mean: Tensor) -> None:
        self.t = quants.gguf_type(grid.gtype)
        self.importance = importance
        self.row_sq_mean = row_sq_mean
        self.codes = torch.empty((out, inp), dtype=torch.uint8)
        self.params: list[BlockParams] = []
        self.scale = self.offset = torch.empty(0)

    def __call__(self, block: Tensor, i: int, k: int) -> Tensor:
        bs, gs = self.t.block_size, self.t.group_size
        if k % bs == 0:
            imp = None if self.importance is None else self.importance[k : k + bs]
            p = quants.block_params(block[:, i : i + bs], self.t, imp, row_sq_mean=self.row_sq_mean)
            # the reference quantizer's own rounding constants are for plain RTN; GPTQ rounds each
            # column to the nearest point of the stored grid
            p = p.stored()
            self.params.append(p)
            self.scale, self.offset = quants.affine(p)
        j = k % bs
        code = quants.encode(block[:, i : i + 1], self.params[-1], start=j)
        self.codes[:, k] = code[:, 0]
        g = j // gs
        return self.scale[:, g] * code[:, 0].to(torch.float32) + self.offset[:, g]


def _finite(losses: Tensor) -> float:
    """The summed OBS loss, or ValueError when it is not finite."""
    loss = float(losses.sum())
    if not math.isfinite(loss):
        raise ValueError("GPTQ produced a non-finite loss; check the weight and the Hessian")
    return loss


def gptq_gguf(
    w: Tensor,
    hessian: Tensor,
    grid: GGUFGrid,
    *,
    damp: float = 0.01,
    max_damp: float = 1.0,
    block_size: int = 128,
    importance: Tensor | None = None,
    act_order: bool = False,
) -> tuple[GGUFQuant, float]:
    """GPTQ of ``w`` ``[out, in]`` (``in`` a multiple of the type's block) on ``grid``, given the input
    Hessian ``[in, in]``; ``importance`` ``[in]`` weights the block parameter search (llama.cpp's
    importance-matrix variant; ``diag(H)`` is the natural choice). Columns are swept in order, each
    block's parameters chosen from the weights as updated when the sweep reaches it; with
    ``act_order`` every block's parameters are chosen up front from the original weights (GPTQ's
    static groups) and the columns are swept by decreasing Hessian diagonal, so the channels that
    carry most signal are rounded while the most columns remain to absorb their error. Returns the
    quantized tensor and the GPTQ loss (:func:`compress.gptq.gptq_quantize` has the same contract for
    our integer grids)."""
    t = quants.gguf_type(grid.gtype)
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight [out, in], got {w.dtype} {tuple(w.shape)}")
    out, inp = w.shape
    if inp % t.block_size:
        raise ValueError(f"{t.name} needs a width that is a multiple of {t.block_size}, got {inp}")
    if hessian.shape != (inp, inp):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(inp, inp)}")
    W, H = zero_dead_inputs(w.detach().to(torch.float32), hessian.detach().to(dtype=torch.float32))
    row_sq_mean = (W * W).mean(dim=1)
    imp = None if importance is None else importance.to(torch.float32)
    if act_order:
        static = quants.block_params(W, t, imp).stored()
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        U = inverse_cholesky(H, damp, max_damp)
        del H
        step_static = _StaticStep(static, perm.tolist(), out)
        _, losses = obs_sweep(W, U, step_static, block_size=block_size, inner=inner_block())
        return quants.assemble(static, step_static.codes), _finite(losses)
    U = inverse_cholesky(H, damp, max_damp)
    del H
    step = _BlockStep(grid, out, inp, imp, row_sq_mean)
    bs = t.block_size * max(1, block_size // t.block_size)
    _, losses = obs_sweep(W, U, step, block_size=bs, inner=inner_block(t.block_size))
    loss = _finite(losses)
    blocks = [quants.assemble(p, step.codes[:, i * t.block_size : (i + 1) * t.block_size]) for i, p in enumerate(step.params)]
    return quants.concat_columns(blocks), loss
