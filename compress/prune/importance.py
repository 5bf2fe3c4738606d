"""The math of structured pruning: how much an MLP channel, a key/value head group or a decoder layer
matters, how many of them a request keeps, and which ones. Tensors in, tensors out.

Widths and heads follow Minitron (Muralidharan et al., "Compact Language Models via Pruning and
Knowledge Distillation", https://arxiv.org/abs/2407.14679): rank the channels and heads of each layer
by importance and keep the most important ones, the same number in every layer. Layers follow
ShortGPT (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
https://arxiv.org/abs/2403.03853): drop the layers whose output is closest to their input.

Importance is the size of what a channel or group adds to the layer's output, so that a channel the
next linear ignores (a zero column) ranks as low as one that never fires:

* by **activation** (calibration data), the root mean square over calibration tokens of the
  channel's (group's) contribution to the output of the linear that reads it (down_proj, o_proj);
  for an MLP channel that is ``||a_c|| * ||W[:, c]|| / sqrt(n)`` with ``a_c`` the channel's activation
  (down_proj's input column) over all ``n`` tokens: Minitron's activation criterion, aggregated as an
  L2 norm over every token of every sample, weighted by the column it feeds;
* by **magnitude** (no data), the product of the weight norms on the channel's path, a bound on that
  contribution: an MLP channel's rows of gate and up (or fc1, bias entries included) and its
  down column; a key/value group's value rows (with bias) and its query heads' output columns (the
  queries and keys only decide how values are mixed, with weights that sum to one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "block_influence",
    "channel_contribution",
    "group_contribution",
    "group_magnitude",
    "group_rows",
    "keep_most",
    "kept_groups",
    "kept_width",
    "least_influential",
    "mlp_magnitude",
]

#: slack for shares such as 0.3 whose products with a width land a hair below an integer
_EPS = 1e-9


def kept_width(width: int, share: float, align: int) -> int:
    """MLP channels kept when ``share`` of ``width`` is removed: the largest multiple of ``align`` not
    above ``(1 - share) * width`` (so at least ``share`` is removed). 0 means nothing is left."""
    return math.floor((1.0 - share) * width / align + _EPS) * align


def kept_groups(groups: int, share: float) -> int:
    """Key/value groups kept when ``share`` of ``groups`` is removed: ``floor((1 - share) * groups)``
    (at least ``share`` removed). 0 means nothing is left."""
    return math.floor((1.0 - share) * groups + _EPS)


def keep_most(importance: Tensor, keep: int) -> Tensor:
    """The indices (ascending, int64) of the ``keep`` largest entries of ``importance`` ``[n]``; among
    equal values the lower index is kept."""
    if not 0 < keep <= importance.numel():
        raise ValueError(f"cannot keep {keep} of {importance.numel()}")
    order = torch.argsort(importance.to(torch.float64), descending=True, stable=True)
    return order[:keep].sort().values


def least_influential(influence: Tensor, count: int) -> list[int]:
    """The ``count`` layers (ascending indices) with the smallest block influence; among equal
    values the lower index is dropped."""
    if not 0 < count < influence.numel():
        raise ValueError(f"cannot drop {count} of {influence.numel()} layers")
    order = torch.argsort(influence.to(torch.float64), stable=True)
    return sorted(order[:count].tolist())


def group_rows(groups: Tensor, width: int) -> Tensor:
    """The row (or column) indices of whole blocks of ``width`` consecutive rows: block ``j`` holds
    rows ``j * width .. (j + 1) * width - 1``. ``groups`` ascending gives ascending rows."""
    return (groups.to(torch.int64)[:, None] * width + torch.arange(width, dtype=torch.int64)).reshape(-1)


def _row_norms(w: Tensor) -> Tensor:
    return w.to(torch.float64).square().sum(dim=1).sqrt()


def mlp_magnitude(rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tensor:
    """Magnitude importance of each MLP channel, float64 ``[channels]``: the product over ``rows``
    (each ``[channels, in]``, a bias appended as a last column) of the channel's row norm, times the
    norm of its column across ``cols`` (each ``[out, channels]``, stacked). With SwiGLU,
    ``|silu(g.x) * (u.x)| <= ||g|| ||u|| ||x||^2``, so the channel's output is at most this times
    ``||x||^2``."""
    score = torch.cat([c.to(torch.float64) for c in cols]).square().sum(dim=0).sqrt()
    for w in rows:
        score = score * _row_norms(w)
    return score


def channel_contribution(square_sum: Tensor, tokens: int, weight: Tensor) -> Tensor:
    """Activation importance of each input channel of ``weight`` ``[out, channels]``, float64
    ``[channels]``: the root mean square over the ``tokens`` calibration tokens of the channel's
    contribution ``W[:, c] * a_c`` to the linear's output, ``sqrt(sum_t a_tc^2 / n) * ||W[:, c]||``,
    from ``square_sum[c] = sum_t a_tc^2``."""
    if tokens <= 0:
        raise ValueError("no calibration tokens were seen")
    rms = (square_sum.to(torch.float64) / tokens).sqrt()
    return rms * weight.to(torch.float64).square().sum(dim=0).sqrt()


def group_magnitude(value: Tensor, out: Tensor, groups: int) -> Tensor:
    """Magnitude importance of each key/value group, float64 ``[groups]``: the Frobenius norm of the
    group's value rows (``value`` ``[groups * head_dim, in]``, a bias appended as a last column) times
    that of its query heads' columns of the output linear (``out`` ``[hidden, groups * g *
    head_dim]``)."""
    v = value.to(torch.float64).reshape(groups, -1).square().sum(dim=1)
    o = out.to(torch.float64).reshape(out.shape[0], groups, -1).square().sum(dim=(0, 2))
    return (v * o).sqrt()


def group_contribution(hessian: Tensor, out: Tensor, groups: int) -> Tensor:
    """Activation importance of each key/value group, float64 ``[groups]``: the root mean square over
    calibration tokens of the group's contribution ``O_g x_g`` to the output linear's output, exactly,
    from ``hessian = 2/n sum_t x_t x_t^T`` of that linear's input ``[in, in]`` (``x_g``: the columns of
    the group's query heads, ``O_g``: the matching columns of ``out`` ``[hidden, in]``):
    ``sqrt(trace(O_g H_gg O_g^T) / 2)``."""
    width = out.shape[1] // groups
    o = out.to(torch.float64)
    h = hessian.to(torch.float64)
    scores = []
    for j in range(groups):
        cols = slice(j * width, (j + 1) * width)
        og = o[:, cols]
        scores.append(((og @ h[cols, cols]) * og).sum() / 2)
    return torch.stack(scores).clamp_min(0).sqrt()


def block_influence(inputs: Tensor, outputs: Tensor) -> tuple[float, int]:
    """ShortGPT's block influence summed over the tokens of one batch: ``sum_t 1 - cos(x_t, y_t)`` of
    a layer's input and output hidden states ``[..., hidden]``, and the token count (divide the sums
    over all batches by the counts over all batches for the mean)."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    y = outputs.reshape(-1, outputs.shape[-1]).to(torch.float32)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    return float((1.0 - cos.to(torch.float64)).sum()), x.shape[0]
