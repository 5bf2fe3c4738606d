"""Merging task vectors — the differences between fine-tuned models and their common base.

One function, :func:`merge_deltas`, does every method of the family; the named functions below
only choose its flags:

================  ==================  =================  =========  =======
method            sparsification      sign consensus     normalize  rescale
================  ==================  =================  =========  =======
task_arithmetic   none                none               no         no
ties              magnitude           sum                yes        no
dare_linear       random              none               no         yes
dare_ties         random              sum                no         yes
breadcrumbs       outliers            none               no         no
breadcrumbs_ties  outliers            sum                no         no
================  ==================  =================  =========  =======

Papers: task arithmetic, Ilharco et al. 2023, https://arxiv.org/abs/2212.04089; TIES-Merging,
Yadav et al. 2023, https://arxiv.org/abs/2306.01708; DARE, Yu et al. 2024,
https://arxiv.org/abs/2311.03099; Model Breadcrumbs, Davari & Belilovsky 2024,
https://arxiv.org/abs/2312.06795.

The arithmetic runs in the dtype of the tensors it is given (the pass casts them to the config's
``dtype`` first) and follows mergekit 0.1.5's order of operations, so outputs agree with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.chunks import PMap, chunks, serial_map
from merge.flags import Consensus, Sparsification
from merge.sparsify import Chunked, plan_sparsify

__all__ = [
    "Consensus",
    "breadcrumbs",
    "dare_linear",
    "dare_ties",
    "merge_deltas",
    "sign_agreement",
    "task_arithmetic",
    "ties",
]


def _accumulate(parts: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The sum of ``parts`` accumulated in float32 (float64 for float64) and rounded once to
    ``dtype`` — what ``torch.stack(parts).sum(0)`` gives, without the stack. Two parts in ``dtype``
    are added directly: torch computes a bf16/fp16 addition in float32 and rounds once, the same
    thing in one operation instead of four."""
    if len(parts) == 2 and parts[0].dtype == parts[1].dtype == dtype:
        return parts[0] + parts[1]
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    acc = parts[0].to(wide, copy=True)
    for part in parts[1:]:
        acc += part.to(wide)
    return acc.to(dtype)


def sign_agreement(deltas: Sequence[Tensor], method: Consensus = Consensus.sum) -> list[Tensor]:
    """Per delta, 1 where its sign equals the elected sign of the entry, else 0 (in its dtype).

    ``deltas`` are the (weighted) task vectors of the models. The elected sign is + where the vote
    (the deltas' sum, or the sum of their signs) is >= 0, else -; zero deltas never agree. Written
    with arithmetic, ``sign(relu(delta * elected))``: on CPUs, bool tensors and ``torch.where``
    run several times slower than a multiplication in bf16.
    """
    dtype = deltas[0].dtype
    votes = deltas if method is Consensus.sum else [d.sign() for d in deltas]
    vote = _accumulate(votes, dtype)
    # A vote of -0 means every delta is zero there, so the side it elects does not matter.
    elected = torch.copysign(torch.ones_like(vote), vote)
    return [torch.sign(torch.relu(d * elected)) for d in deltas]


def _nonzero_divisor(divisor: Tensor) -> Tensor:
    """``divisor`` with its zeros replaced by 1, in arithmetic: ``divisor + (1 - sign(|divisor|))``
    adds exactly 0 elsewhere."""
    return divisor + (1 - torch.sign(divisor.abs()))


def merge_deltas(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsification: Sparsification | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    rescale: bool = False,
    scale: float = 1.0,
    gammas: Sequence[float] | None = None,
    seeds: Sequence[int | None] | None = None,
    pmap: PMap = serial_map,
) -> Tensor:
    """``base + scale * combine(weights[i] * sparsify(tensors[i] - base))``.

    ``combine`` sums the weighted deltas; with ``consensus`` it sums only those agreeing with the
    elected sign. With ``normalize`` the sum is divided by the sum of the weights that took part
    (per entry under consensus). ``densities``, ``gammas`` and ``seeds`` (of the random drops) are
    per model (defaults: 1, 0, none). Computed in ``base``'s dtype, chunk by chunk (the chunks
    mapped by ``pmap``, possibly in parallel: each is computed alone), rounding wherever the
    whole-tensor computation in that dtype rounds.
    """
    n = len(tensors)
    if n == 0:
        return base
    if len(weights) != n:
        raise ValueError(f"{n} tensors but {len(weights)} weights")
    dtype = base.dtype
    densities = list(densities) if densities is not None else [1.0] * n
    gammas = list(gammas) if gammas is not None else [0.0] * n
    seeds = list(seeds) if seeds is not None else [None] * n
    flat_base = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    parts = chunks(flat_base.numel())

    def deltas_of(i: int) -> Chunked:
        return Chunked(len(parts), lambda j: flats[i][parts[j]] - flat_base[parts[j]])

    maskers = []
    for i in range(n):
        plan = None
        if sparsification is not None:
            plan = plan_sparsify(
                deltas_of(i), flat_base.numel(), dtype, densities[i], sparsification, rescale=rescale, gamma=gammas[i], seed=seeds[i], pmap=pmap
            )
        maskers.append(plan.masker() if plan is not None else None)
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=base.device)
    unit = [float(x) == 1.0 for x in w]  # a weight of exactly 1 multiplies nothing
    total_weight = _accumulate(list(w), dtype)
    if total_weight.abs() < 1e-8:
        total_weight = torch.ones_like(total_weight)
    out = torch.empty_like(flat_base)

    def merge_chunk(j: int) -> None:
        p = parts[j]
        b = flat_base[p]
        weighted = []
        for i in range(n):
            delta = flats[i][p] - b
            if maskers[i] is not None:
                delta = maskers[i](j, delta)
            weighted.append(delta if unit[i] else delta * w[i])
        if consensus is None:
            mixed = _accumulate(weighted, dtype)
            if normalize:
                mixed = mixed / total_weight
        else:
            agree = sign_agreement(weighted, consensus)
            mixed = _accumulate([d * a for d, a in zip(weighted, agree)], dtype)
            if normalize:
                mixed = mixed / _nonzero_divisor(_accumulate([a if unit[i] else a * w[i] for i, a in enumerate(agree)], dtype))
        if scale != 1:
            mixed = mixed * scale
        out[p] = b + mixed

    pmap(merge_chunk, range(len(parts)))
    return out.reshape(base.shape)


def task_arithmetic(
    base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = False, scale: float = 1.0
) -> Tensor:
    """Task arithmetic: add the weighted task vectors to the base (https://arxiv.org/abs/2212.04089)."""
    return merge_deltas(base, tensors, weights, normalize=normalize, scale=scale)


def ties(
    base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float], *, normalize: bool = True
) -> Tensor:
    """TIES: trim to the largest-magnitude ``density``, elect signs, merge the agreeing entries
    (https://arxiv.org/abs/2306.01708)."""
    return merge_deltas(
        base, tensors, weights, densities=densities, sparsification=Sparsification.magnitude, consensus=Consensus.sum, normalize=normalize
    )


def dare_linear(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seeds: Sequence[int],
    *,
    rescale: bool = True,
) -> Tensor:
    """DARE: drop task-vector entries at random, rescale, add (https://arxiv.org/abs/2311.03099)."""
    return merge_deltas(base, tensors, weights, densities=densities, sparsification=Sparsification.random, rescale=rescale, seeds=seeds)


def dare_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seeds: Sequence[int],
    *,
    rescale: bool = True,
) -> Tensor:
    """DARE's random drop followed by TIES' sign election (https://arxiv.org/abs/2311.03099)."""
    return merge_deltas(
        base,
        tensors,
        weights,
        densities=densities,
        sparsification=Sparsification.random,
        consensus=Consensus.sum,
        rescale=rescale,
        seeds=seeds,
    )


def breadcrumbs(
    base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float], gammas: Sequence[float]
) -> Tensor:
    """Model Breadcrumbs: drop the largest (``gamma``) and the smallest task-vector entries, keep
    ``density`` of them (https://arxiv.org/abs/2312.06795)."""
    return merge_deltas(base, tensors, weights, densities=densities, sparsification=Sparsification.outliers, gammas=gammas)
