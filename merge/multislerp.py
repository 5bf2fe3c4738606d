"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere, optionally of
their task vectors around a base.

mergekit's definition: https://goddard.blog/posts/multislerp-wow-what-a-cool-idea

Each input (a whole tensor as one vector) is scaled to unit length; the unit vectors are mapped to
the tangent space at their normalized weighted mean, averaged there with the weights, mapped back
to the sphere by the exponential map, and scaled by the weighted mean of the inputs' norms. The
weighted mean of the unit vectors must not vanish: two inputs then fall back to their weighted sum,
more are refused. Everything is computed in the inputs' dtype with the same torch operations in the
same order as mergekit 0.1.5, so the bits agree with as many torch threads: torch splits sums of
32,768 entries or more between its threads, so for larger tensors the bits depend on the thread
count, mergekit's as ours (the merge pass runs this method with ``--threads`` torch threads,
``Method.torch_threads``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["EPS", "ZeroMeanError", "multislerp"]

#: added to norms before dividing by them; a weighted mean shorter than this counts as zero
EPS = 1e-8


class ZeroMeanError(ValueError):
    """The weighted mean of three or more unit inputs is zero: there is no tangent space to
    average in."""


def multislerp(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None, *, normalize_weights: bool = True, eps: float = EPS
) -> Tensor:
    """The Multi-SLERP of ``tensors`` (one shape and dtype) with ``weights``, which are divided by
    their sum when ``normalize_weights``; of ``tensor - base`` added back to ``base`` when a base
    is given. One tensor is returned as it is. Raises :class:`ZeroMeanError` when the weighted mean
    of three or more unit inputs is zero (e.g. ``a`` and ``-a`` with equal weights)."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked -= base
    shape = stacked.shape[1:]
    rows = stacked.view(stacked.shape[0], -1)
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    column = w.view(-1, 1)
    norms = torch.norm(rows, dim=-1, keepdim=True)
    units = rows / (norms + eps)

    mean = (units * column).sum(0)
    mean_length = torch.norm(mean)
    if mean_length < eps:
        if len(tensors) != 2:
            raise ZeroMeanError(
                "the weighted mean of the inputs' directions is zero (antipodal inputs whose weights balance out, "
                "e.g. a and -a with equal weights); use different weights"
            )
        # two inputs: their weighted sum
        merged = (stacked[0] * w[0] + stacked[1] * w[1]).view(shape)
        return merged if base is None else merged + base
    mean = mean / mean_length

    # log map at the mean (tangent components), average, exp map back onto the sphere
    along = (units * mean).sum(-1, keepdim=True)
    tangents = units - along * mean
    tangent = (tangents * column).sum(0)
    angle = torch.norm(tangent) + eps
    on_sphere = mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)

    merged = (on_sphere * (norms.squeeze(-1) * w).sum()).view(shape)
    return merged if base is None else merged + base
