"""Arcee Fusion: take the fine-tuned model's change only at the entries where it matters — where the
change is large and its row's output distribution moved — and keep the base everywhere else.

Arcee AI's method (https://arcee.ai; mergekit's ``arcee_fusion``). Per entry, the importance is
``|other - base|`` times the KL divergence ``KL(softmax(other) || softmax(base))`` of the entry's row
(the last axis); the entries whose importance reaches ``median + 1.5 * IQR`` of all importances take
the fine-tuned value.

The quantiles are read from the sorted importances, as mergekit 0.1.5 does. Up to
:data:`QUANTILE_SAMPLE` entries they are exact and the result has mergekit's bits; for larger tensors
mergekit sorts a sample of that many entries drawn with replacement from torch's global random
generator, while we draw it from a generator seeded per tensor (:func:`merge.run.tensor_seed`), so
the same config and seed give the same output whatever ran before — the threshold is then an estimate
like mergekit's, from a different sample.

Row-wise softmax and a threshold over the whole tensor: the method needs each tensor whole. Its mask
is float32, so with 16-bit inputs the result is float32, as mergekit writes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from merge.arith import Group, emit_result

__all__ = ["KL_EPS", "QUANTILE_SAMPLE", "arcee_fusion", "arcee_fusion_group", "fusion_importance", "fusion_threshold"]

#: Above this many entries the quantiles come from a random sample of this many.
QUANTILE_SAMPLE = 1_000_000
#: Added to both softmax distributions so the KL divergence stays finite.
KL_EPS = 1e-8
#: The quantiles the threshold is made of: first quartile, median, third quartile.
_QUARTILES = (0.25, 0.5, 0.75)


def fusion_importance(base: Tensor, other: Tensor) -> Tensor:
    """``|other - base|`` times the KL divergence of ``softmax(other)`` from ``softmax(base)`` along
    the last axis (one value per row, broadcast over it), in the inputs' dtype."""
    p = F.softmax(other, dim=-1) + KL_EPS
    q = F.softmax(base, dim=-1) + KL_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * divergence


def fusion_threshold(importance: Tensor, seed: int | None = None) -> Tensor:
    """``median + 1.5 * (q3 - q1)`` of ``importance`` (a 0-d tensor of its dtype), each quantile the
    sorted value at ``floor(q * (n - 1))``; from a sample of :data:`QUANTILE_SAMPLE` entries drawn
    with ``seed`` when there are more."""
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        if seed is None:
            raise ValueError(f"arcee_fusion needs a seed to sample the quantiles of a tensor of more than {QUANTILE_SAMPLE} entries")
        generator = torch.Generator(device=flat.device).manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    # float32 positions truncated to integers, as mergekit indexes them
    positions = (torch.tensor(_QUARTILES, device=flat.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[positions]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: Tensor, other: Tensor, seed: int | None = None) -> Tensor:
    """``base + (other - base) * mask``, the mask 1 (float32) where :func:`fusion_importance` reaches
    :func:`fusion_threshold`, else 0; float32 for 16-bit inputs."""
    importance = fusion_importance(base, other)
    mask = (importance >= fusion_threshold(importance, seed)).float()
    return base + (other - base) * mask


def arcee_fusion_group(g: Group) -> None:
    """:func:`arcee_fusion` of ``g``'s base and its one other input, whole, the sample (if any)
    drawn with the other input's seed; the result handed back in the dtype it is computed in."""
    assert g.base is not None
    (other,) = g.others()
    emit_result(g, arcee_fusion(g.whole(g.base), g.whole(other), g.seeds[other] if g.seeds else None))
