"""SCE: select, calculate, erase — merging task vectors by their variance across models and
their energy.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 — https://arxiv.org/abs/2408.07990
(section 3.3), as mergekit 0.1.5 defines it:

1. **Select**: with ``select_topk < 1``, keep only the entries whose task vectors vary the most
   across the models: the ``int(count_nonzero(var) * select_topk)`` largest of the per-entry
   variance (population variance over the models), the others zeroed in every task vector.
2. **Calculate**: one weight per model, the mean square of its (selected) task vector, normalized
   to sum to 1 (equal weights when that sum is below 1e-6).
3. **Erase**: per entry, drop the task vectors whose sign disagrees with the sign of their sum
   (TIES' election, zero entries never agree); the rest are averaged with the model weights.

Deterministic, and computed with torch's own operations in mergekit's order and dtypes (the
compute dtype throughout; the top-k is ``torch.topk``'s choice, ties included), so it writes
mergekit's bits. Whole tensors: the variance ranking and the weights need every entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["agreement", "sce", "sce_weights", "selection_mask"]

#: Below this, the models' summed mean squares count as zero: equal weights instead.
WEIGHT_SUM_EPS = 1e-6
#: The floor of the per-entry weight total the merged task vector is divided by (it is 0 where
#: every task vector was erased, and so is the merged one there).
DIVISOR_FLOOR = 1e-6


def selection_mask(task_vectors: Tensor, share: float, dtype: torch.dtype) -> Tensor:
    """1 (in ``dtype``) on the ``int(nonzero * share)`` entries of largest variance over the models
    (axis 0 of the stacked ``task_vectors``), where ``nonzero`` counts the entries that vary at all;
    all ones for ``share >= 1``, all zeros for ``share <= 0``."""
    shape = task_vectors.shape[1:]
    if share >= 1:
        return torch.ones(shape, dtype=dtype, device=task_vectors.device)
    if share <= 0:
        return torch.zeros(shape, dtype=dtype, device=task_vectors.device)
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    # a 0-dim integer tensor times a float: the count in float32, as mergekit computes it
    k = int(torch.count_nonzero(variance) * share)
    mask = torch.zeros_like(variance, dtype=dtype)
    if k == 0:
        return mask
    chosen = torch.topk(variance.abs().view(-1), k=k, largest=True).indices
    mask.view(-1)[chosen] = 1
    return mask


def agreement(task_vectors: Tensor, dtype: torch.dtype) -> Tensor:
    """Per model and entry, whether the task vector's sign (in ``dtype``) is the elected one: + where
    the models' sum (rounded to the compute dtype) is >= 0, else -."""
    signs = task_vectors.sign().to(dtype)
    elected = (task_vectors.sum(dim=0) >= 0).to(dtype) * 2 - 1
    return signs == elected


def sce_weights(task_vectors: Tensor) -> Tensor:
    """One weight per model: the mean square of its task vector over the sum of them all (its
    float value), or ``1 / count`` each when that sum is below :data:`WEIGHT_SUM_EPS`."""
    count = task_vectors.shape[0]
    energy = task_vectors.square().reshape(count, -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < WEIGHT_SUM_EPS:
        return torch.ones_like(energy) / count
    return energy / total


def sce(base: Tensor, tensors: Sequence[Tensor], *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    """The SCE merge of the fine-tuned ``tensors`` over ``base`` (all of one dtype and shape); the
    base itself when there are none. ``int8_mask`` holds the masks as int8 instead of the compute
    dtype (less memory, same values)."""
    if not tensors:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    task_vectors = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        task_vectors = task_vectors * selection_mask(task_vectors, select_topk, mask_dtype).unsqueeze(0)
    agree = agreement(task_vectors, mask_dtype)
    weights = sce_weights(task_vectors).reshape((len(tensors),) + (1,) * (task_vectors.dim() - 1))
    kept = weights * agree
    merged = (task_vectors * kept).sum(dim=0)
    return base + merged / torch.sum(kept, dim=0).clamp(min=DIVISOR_FLOOR)
