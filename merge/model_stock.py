"""Model Stock: interpolate between the base and the average of the fine-tunes, by a ratio that the
angle between their task vectors gives.

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 —
https://arxiv.org/abs/2403.19522
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["model_stock", "stock_ratio"]


def stock_ratio(cos_theta: Tensor, count: int) -> Tensor:
    """``t = k cos / (1 + (k - 1) cos)`` for ``k`` fine-tunes; 0 (keep the base) where the
    denominator vanishes."""
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), count * cos_theta / safe)


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """``t * mean(tensors) + (1 - t) * base`` with ``t`` from the mean pairwise cosine of the task
    vectors ``tensors[i] - base`` (over the whole tensor, or per row with ``filter_wise``).

    Needs at least two fine-tuned tensors. Computed in the inputs' dtype.
    """
    if len(tensors) < 2:
        raise ValueError("model stock needs at least two fine-tuned models besides the base")
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [t.reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    t = stock_ratio(cos_theta, len(ws))
    average = sum(ws) / len(ws)
    return (t * average + (1 - t) * w0).reshape(shape)
