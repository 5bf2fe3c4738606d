"""The Optimal-Brain-Surgeon column sweep that GPTQ and SparseGPT share, as pure functions.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", https://arxiv.org/abs/2210.17323 (Algorithm 1), and
Frantar, Alistarh, "SparseGPT", https://arxiv.org/abs/2301.00774 (Algorithm 1).

For a linear layer with inputs ``X`` the objective ``||X W^T - X W_hat^T||^2`` has the Hessian
``H = 2 X^T X`` in every row of ``W``. The sweep fixes the columns of ``W`` one at a time; each
column's change ``w - q`` is divided by the diagonal of ``U`` (the upper Cholesky factor of
``H^-1``) and subtracted, through ``U``'s row, from the columns not yet fixed, which is the OBS update
restricted to the columns that are still free. The two papers differ only in what a column becomes:
GPTQ rounds it to a grid, SparseGPT sets a chosen part of it to zero, and doing both gives joint
sparse + quantized weights. That choice is the ``step`` argument of :func:`obs_sweep`.

Updates are applied lazily in blocks of ``block_size`` columns: inside a block column by column,
then to the rest of the matrix with one matrix product per block.

SparseGPT at 50% on a weight ``w`` with the Hessian ``H`` of its inputs::

    W, H = zero_dead_inputs(w.float(), H)
    U = inverse_cholesky(H, damp=0.01, max_damp=1.0)
    pruned, losses = obs_sweep(W, U, prune_step(torch.diagonal(U), 0.5))

GPTQ is :func:`compress.gptq.gptq_quantize` (the same sweep with a grid step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["INNER", "ColumnStep", "inner_block", "inverse_cholesky", "joint_step", "obs_sweep", "prune_step", "zero_dead_inputs"]

ColumnStep = Callable[[Tensor, int, int], Tensor]
"""``step(block, i, k) -> column``: what column ``k`` of the sweep (``i`` inside the current block)
becomes. ``block`` is the float32 working copy ``[out, width]`` of the current block's columns,
already updated by every earlier column; a step reads it (e.g. a group's range, or the scores of a
block's prune mask) and must not modify it. Returns the new float32 column ``[out]``."""


def zero_dead_inputs(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """``W`` and ``H`` with every dead input (zero Hessian diagonal: the channel never fired) given
    ``H[j, j] = 1`` and weight column 0, so the Hessian can be factorized and the column comes out 0.
    Returns the inputs themselves when no input is dead, new tensors otherwise."""
    dead = torch.diagonal(H) == 0
    if not bool(dead.any()):
        return W, H
    W, H = W.clone(), H.clone()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def inverse_cholesky(H: Tensor, damp: float, max_damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    When the factorization fails, damp is multiplied by 10 (a warning is logged) until it would
    exceed ``max_damp``, then ``ValueError``.
    """
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    current = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + (current * mean_diag) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U
        if current * 10 > max_damp * (1 + 1e-9):
            raise ValueError(
                f"the Hessian is not positive definite even with damp={current:g} "
                f"(max_damp={max_damp:g}); check the calibration inputs"
            )
        logger.warning("OBS sweep: Cholesky failed with damp=%g; retrying with damp=%g", current, current * 10)
        current *= 10


#: Columns swept one by one inside a block before the block's remaining columns get their update in
#: one matrix product (see :func:`obs_sweep`'s ``inner``).
INNER = 16


def inner_block(*spans: int) -> int:
    """The ``inner`` block :func:`obs_sweep` may use with steps that read spans of these widths
    (group sizes, N:M windows) at their starts: :data:`INNER` when every span either fills whole inner
    blocks or fits inside one, else 1."""
    return INNER if all(s > 0 and (s % INNER == 0 or INNER % s == 0) for s in spans) else 1


def obs_sweep(
    W: Tensor, U: Tensor, step: ColumnStep, *, block_size: int = 128, mask: Tensor | None = None, inner: int = 1
) -> tuple[Tensor, Tensor]:
    """Fix the columns of ``W`` ``[out, in]`` left to right with ``step``, compensating each change
    on the columns not yet fixed through ``U`` (:func:`inverse_cholesky` of the Hessian, both in the
    processing order).

    ``mask`` (bool ``[out, in]``, True = pruned) keeps pruned weights at zero: a masked weight takes
    the compensation of earlier columns like any other until its column is reached, is then set to
    exactly 0 before ``step`` sees it, and its value is compensated on the later columns in turn
    (the order SparseGPT uses). Every masked weight of the result is exactly 0.

    ``inner``: inside a block, columns are swept one by one in groups of ``inner``; each column's
    update goes to the rest of its group at once (a rank-1 update), and the group's updates reach the
    block's later columns in one matrix product when the group is done. The same algebra in another
    order (the result differs by float rounding), with far less memory traffic than a rank-1 update of
    the whole block per column. A step that reads a span of the block where the span starts (a
    quantization group, an N:M window) then sees it fully updated only when each span starts a group or
    lies inside one (:func:`inner_block` gives a safe value); ``inner=1`` is the plain sweep.

    Returns the swept weights (float32 ``[out, in]``, the columns the steps returned) and the OBS
    loss per row, float64 ``[out]``: ``sum_j (w_j - q_j)^2 / (2 U_jj^2)``, the paper's per-column
    error. ``W``, ``U`` and ``mask`` are not modified.
    """
    if W.ndim != 2:
        raise ValueError(f"expected a weight [out, in], got shape {tuple(W.shape)}")
    out, inp = W.shape
    if U.shape != (inp, inp):
        raise ValueError(f"U has shape {tuple(U.shape)}, expected {(inp, inp)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(W.shape)}")
    W = W.to(torch.float32).clone()
    losses = torch.zeros(out, dtype=torch.float64, device=W.device)
    diag = torch.diagonal(U).tolist()
    if inner < 1:
        raise ValueError(f"inner must be positive, got {inner}")
    for i1 in range(0, inp, block_size):
        i2 = min(i1 + block_size, inp)
        width = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j1 in range(0, width, inner):
            j2 = min(j1 + inner, width)
            for i in range(j1, j2):
                k = i1 + i
                col = W1[:, i]
                if mask is not None:
                    col = col.clone()
                    W1[:, i].masked_fill_(mask[:, k], 0.0)
                q = step(W1, i, k)
                if mask is not None:
                    q = q.masked_fill(mask[:, k], 0.0)
                err = Err1[:, i]
                torch.sub(col, q, out=err)
                W[:, k] = q
                err.div_(diag[k])
                stop = j2 if j2 - j1 > 1 else width
                if i + 1 < stop:
                    W1[:, i + 1 : stop].addr_(err, U1[i, i + 1 : stop], alpha=-1.0)
            if j2 - j1 > 1 and j2 < width:
                W1[:, j2:].addmm_(Err1[:, j1:j2], U1[j1:j2, j2:], alpha=-1.0)
        losses += Err1.to(torch.float64).square().sum(dim=1) / 2
        if i2 < inp:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return W, losses


def prune_step(d: Tensor, sparsity: float = 0.0, *, n_m: tuple[int, int] | None = None) -> ColumnStep:
    """SparseGPT's step: zero the weights with the smallest OBS saliency ``w^2 / U_jj^2``.

    ``d`` is ``diag(U)`` in the processing order. Unstructured (``sparsity``): at the start of each
    block, every row's least salient weights of the block are chosen, as many as make each row's
    count so far ``round(sparsity * columns so far)``, so every row ends with exactly
    ``round(sparsity * in)`` zeros. ``n_m = (n, m)``: every ``m`` consecutive
    columns, each row's ``n`` least salient of them (N:M sparsity; the block size and the width must
    be multiples of ``m``). Saliency is measured on the block as updated when the choice is made.
    The mask chosen for a row and block is fixed; the column is returned with those weights zeroed.
    """
    if n_m is None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if n_m is not None and not 0 < n_m[0] < n_m[1]:
        raise ValueError(f"n_m must be (n, m) with 0 < n < m, got {n_m}")
    d2 = d.to(torch.float32).square()
    chosen: list[Tensor] = []

    def step(block: Tensor, i: int, k: int) -> Tensor:
        span = block.shape[1] if n_m is None else n_m[1]
        if i % span == 0:
            if n_m is not None and block.shape[1] % span:
                raise ValueError(f"N:M sparsity needs blocks of a multiple of {span} columns, got {block.shape[1]}")
            part = block[:, i : i + span]
            # a share: the rounded count of columns [0, k + span) minus that of [0, k), so each row
            # prunes exactly round(sparsity * in) weights in all, however the blocks split the width
            n = n_m[0] if n_m is not None else math.floor(sparsity * (k + span) + 0.5) - math.floor(sparsity * k + 0.5)
            saliency = part.square() / d2[k : k + span]
            mask = torch.zeros_like(part, dtype=torch.bool)
            if n > 0:
                mask.scatter_(1, torch.topk(saliency, n, dim=1, largest=False).indices, True)
            chosen[:] = [mask]
        return block[:, i].masked_fill(chosen[0][:, i % span], 0.0)

    return step


def joint_step(prune: ColumnStep, then: ColumnStep) -> ColumnStep:
    """``prune`` then ``then`` on the pruned column (joint sparse + quantized weights: SparseGPT's
    section 3.5). ``then`` sees the block with this column pruned; the block is restored after. A
    grid step keeps pruned zeros at 0 when 0 is on its grid (true for every :class:`QuantGrid`)."""

    def step(block: Tensor, i: int, k: int) -> Tensor:
        original = block[:, i].clone()
        block[:, i] = prune(block, i, k)
        try:
            return then(block, i, k)
        finally:
            block[:, i] = original

    return step
