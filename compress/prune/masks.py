"""Which weights unstructured and N:M pruning remove, as pure functions: scores in, a bool mask out
(True = pruned). The score is ``|W|`` for magnitude pruning and ``|W| * ||X_j||_2`` for Wanda;
SparseGPT chooses its mask inside the column sweep (:func:`compress.obs.prune_step`).

* Magnitude (Han et al., https://arxiv.org/abs/1506.02626): the smallest ``|W|`` of the whole
  linear (``layer``), or below one threshold shared by every target linear (``global``).
* Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  https://arxiv.org/abs/2306.11695): ``|W_ij| * ||X_j||_2``, compared within each output row, so
  every row ends equally sparse.
* N:M (Mishra et al., https://arxiv.org/abs/2104.08378): in every ``m`` consecutive weights of a row
  along the input dimension, the ``m - n`` of lowest score.

Ties go to the lower index (a stable order), so the same scores always give the same mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from compress.prune.config import NM, PruneTarget
from weightsmith.topk import keep_smallest

__all__ = ["count_for", "layer_mask", "mask_for", "nm_mask", "row_mask", "wanda_scores"]


def count_for(sparsity: float, n: int) -> int:
    """How many of ``n`` weights a share ``sparsity`` prunes: ``n * sparsity`` rounded half up."""
    return math.floor(sparsity * n + 0.5)


def wanda_scores(w: Tensor, norms: Tensor) -> Tensor:
    """Wanda's importance ``|W_ij| * ||X_j||_2`` (float32 ``[out, in]``) from the weight ``[out, in]``
    and the input-column norms ``[in]`` over the calibration tokens."""
    if w.ndim != 2 or norms.shape != (w.shape[1],):
        raise ValueError(f"expected a weight [out, in] and norms [in], got {tuple(w.shape)} and {tuple(norms.shape)}")
    return w.to(torch.float32).abs() * norms.to(torch.float32).reshape(1, -1)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """The ``round(sparsity * in)`` lowest scores of every row of ``scores`` ``[out, in]``."""
    k = count_for(sparsity, scores.shape[1])
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        order = torch.argsort(scores, dim=1, stable=True)
        mask.scatter_(1, order[:, :k], True)
    return mask


def nm_mask(scores: Tensor, nm: NM) -> Tensor:
    """The ``m - n`` lowest scores of every window of ``m`` consecutive columns of each row. The width
    must be a multiple of ``m``."""
    out, inp = scores.shape
    if inp % nm.m:
        raise ValueError(f"{nm} sparsity needs an input width that is a multiple of {nm.m}, got {inp}")
    windows = scores.reshape(out, inp // nm.m, nm.m)
    order = torch.argsort(windows, dim=2, stable=True)
    mask = torch.zeros(windows.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, order[:, :, : nm.pruned], True)
    return mask.reshape(out, inp)


def layer_mask(scores: Tensor, sparsity: float) -> Tensor:
    """The ``round(sparsity * numel)`` lowest of all ``scores`` (non-negative) of the tensor."""
    return keep_smallest(scores, count_for(sparsity, scores.numel()))


def mask_for(scores: Tensor, target: PruneTarget, *, per_row: bool) -> Tensor:
    """The mask ``target`` asks for: N:M windows, else a share per row (``per_row``, Wanda) or of the
    whole tensor (magnitude)."""
    if target.nm is not None:
        return nm_mask(scores, target.nm)
    return row_mask(scores, target.sparsity) if per_row else layer_mask(scores, target.sparsity)
