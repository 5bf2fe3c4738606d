"""NuSLERP: spherical interpolation of two models by their relative weights, over whole tensors,
over rows or columns, and optionally around a base (interpolating the task vectors).

mergekit's definition: https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (NuSLERP is its
two-model case, with SLERP's ``t`` taken from the two weights: ``t = w1 / (w0 + w1)``).

The angle is measured between the normalized vectors of each slice; where they are colinear (``1 -
cos^2 <= eps^2``) the interpolation is linear. Everything is computed in the inputs' dtype with the
same torch operations in the same order as mergekit 0.1.5, so the bits agree with as many torch
threads: torch splits sums of 32,768 entries or more between its threads, so for larger slices the
bits depend on the thread count, mergekit's as ours (the merge pass runs this method with
``--threads`` torch threads, ``Method.torch_threads``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["EPS", "NORM_FLOOR", "interpolation_t", "nuslerp", "nuslerp_merge", "slerp_last_dim"]

#: colinearity threshold: slices with ``1 - cos^2 <= EPS^2`` are interpolated linearly
EPS = 1e-8
#: smallest norm a slice is divided by when normalized
NORM_FLOOR = 1e-7
#: weights summing to less than this in magnitude give the midpoint ``t = 0.5``
ZERO_SUM = 1e-6


def interpolation_t(weights: Sequence[float]) -> float:
    """``t`` from the two models' weights: the second's share of their sum, or 0.5 when the sum
    is (nearly) zero."""
    first, second = weights
    total = first + second
    return 0.5 if abs(total) < ZERO_SUM else second / total


def _unit_rows(x: Tensor) -> Tensor:
    """``x`` divided by the norm of each slice along the last dimension (at least NORM_FLOOR)."""
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def slerp_last_dim(t: float, v0: Tensor, v1: Tensor, eps: float = EPS) -> Tensor:
    """Slerp from ``v0`` (t=0) to ``v1`` (t=1) of every slice along the last dimension, linear
    where the two slices are colinear."""
    cos = torch.sum(_unit_rows(v0) * _unit_rows(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    # the colinear slices take the angle of cos = 0 so that the spherical branch stays finite
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool = False, flatten: bool = True, eps: float = EPS) -> Tensor:
    """Slerp between ``v0`` and ``v1`` at ``t``: the whole tensors as one vector each
    (``flatten``), else each slice along dimension 0 (``row_wise``) or along the last dimension."""
    shape = v0.shape
    if flatten:
        return slerp_last_dim(t, v0.reshape(-1), v1.reshape(-1), eps).reshape(shape)
    if row_wise:
        return slerp_last_dim(t, v0.transpose(0, -1), v1.transpose(0, -1), eps).transpose(0, -1).reshape(shape)
    return slerp_last_dim(t, v0, v1, eps).reshape(shape)


def nuslerp_merge(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None, *, row_wise: bool = False, flatten: bool = True
) -> Tensor:
    """NuSLERP of two models with their weights: of the tensors themselves, or with a ``base`` of
    their task vectors (``tensor - base``), added back to the base."""
    first, second = tensors
    t = interpolation_t(weights)
    if base is None:
        return nuslerp(t, first, second, row_wise=row_wise, flatten=flatten)
    return base + nuslerp(t, first - base, second - base, row_wise=row_wise, flatten=flatten)
