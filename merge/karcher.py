"""Karcher mean: the weighted Fréchet mean of the inputs' directions on the unit hypersphere,
scaled by the weighted mean of their norms.

Definition: https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean (the Riemannian centre of mass);
for model merging as mergekit does it: https://arxiv.org/abs/2603.04972

Each input is one vector. The mean direction starts at the normalized weighted average of the unit
vectors and moves by Riemannian gradient steps: the weighted average of the log maps of the unit
vectors (tangent vectors of length the angle) is followed along the great circle, until the step is
shorter than ``tol`` or ``max_iter`` steps are done. Inputs whose norm is at most ``tol`` take no
part in the direction. Norms and the step length are float32 (float64 for float64 inputs);
everything else runs in the inputs' dtype, with the same torch operations in the same order as
mergekit 0.1.5, so the bits agree with as many torch threads: torch splits large sums and float32
dot products between its threads, so for large tensors the bits depend on the thread count,
mergekit's as ours (the merge pass runs this method with ``--threads`` torch threads,
``Method.torch_threads``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["karcher_mean"]


def _length(x: Tensor, wide: torch.dtype) -> Tensor:
    """The Euclidean norm of ``x`` as a 0-dim tensor of ``wide``."""
    return torch.linalg.vector_norm(x.to(wide))


def _start(units: Sequence[Tensor], shares: Sequence[float], tol: float, wide: torch.dtype) -> Tensor:
    """The first guess of the mean direction: the normalized weighted sum of the unit vectors, or
    the first of them when that sum is shorter than ``tol``."""
    total = torch.zeros_like(units[0])
    for share, unit in zip(shares, units):
        total += share * unit
    length = _length(total, wide)
    return units[0].clone() if length.item() < tol else (total / length).to(total.dtype)


def _descent_step(mean: Tensor, units: Sequence[Tensor], shares: Sequence[float], tol: float) -> Tensor:
    """The weighted average of the log maps of ``units`` at ``mean``: each unit vector's component
    orthogonal to the mean, scaled to the length of the angle between them (units within ``tol``
    of the mean add nothing)."""
    step = torch.zeros_like(mean)
    for share, unit in zip(shares, units):
        cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
        angle = torch.arccos(cos)
        if angle.item() < tol:
            continue
        step += share * (angle / torch.sin(angle)) * (unit - cos * mean)
    return step


def karcher_mean(tensors: Sequence[Tensor], weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The weighted Karcher mean of ``tensors`` (one shape and dtype): the mean direction of the
    inputs longer than ``tol`` (their weights renormalized), scaled by ``sum(weight * norm)`` over
    all inputs. One tensor is returned as it is; zero when every input is shorter than ``tol``."""
    if len(tensors) == 1:
        return tensors[0]
    wide = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [_length(x, wide) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    kept = [i for i, n in enumerate(norms) if n.item() > tol]
    if not kept:
        # zeros shaped like the inputs (non-finite entries stay non-finite)
        return sum(x * 0 for x in tensors)
    kept_weights = [weights[i] for i in kept]
    kept_total = sum(kept_weights)
    shares = [w / kept_total for w in kept_weights]
    directions = [units[i] for i in kept]

    mean = _start(directions, shares, tol, wide)
    for _ in range(max_iter):
        step = _descent_step(mean, directions, shares, tol)
        step_length = _length(step, wide)
        if step_length.item() < tol:
            break
        # exp map: follow the great circle from the mean along the step
        mean = (torch.cos(step_length) * mean + torch.sin(step_length) * (step / step_length)).to(mean.dtype)
        length = _length(mean, wide)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(w * n for w, n in zip(weights, norms))
    return scale * mean
