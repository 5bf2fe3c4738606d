"""Reinforced Agent Merging (RAM) and its tensor-local RAM+: add to the base each task vector's
entries that only one model changed as they are, and the mean of those several models changed —
so that an update made by one agent is not diluted by the others' zeros, as plain averaging does.

"Reinforced Agent Merging", https://arxiv.org/abs/2601.13572 (mergekit's ``ram`` and
``ramplus_tl``).

An entry of a task vector ``x_i - base`` counts as changed when its magnitude exceeds ``epsilon``.
RAM+ (tensor-local) also scales each model's unique entries by ``1 + r * min(rho_i, alpha)``, where
``rho_i`` is the ratio of the model's shared to unique changed entries over the whole tensor.

Both stream chunk by chunk: the counts per entry are across models only, and RAM+'s ratios are
integer counts gathered in a first pass over the chunks, so every entry is computed from the same
values with the same torch operations, in mergekit 0.1.5's order and dtypes, as mergekit does on the
whole tensor. RAM's result is in the compute dtype; RAM+'s scale is float32, so with 16-bit inputs
its result is float32, as mergekit writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.arith import Group, emit_chunks, emit_result
from merge.chunks import chunks

__all__ = ["change_masks", "ram", "ram_group", "ramplus_scale", "ramplus_tl", "ramplus_tl_group", "shared_unique_counts"]


def change_masks(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For task vectors stacked on the first axis: where each changed an entry (``|delta| >
    epsilon``), how many changed each entry (int64), and where more than one or exactly one did."""
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return changed, counts, counts > 1, counts == 1


def _deltas(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t - base for t in tensors], dim=0)


def _combine(deltas: Tensor, changed: Tensor, counts: Tensor, overlap: Tensor, unique: Tensor, scale: Tensor | None) -> Tensor:
    """The merged task vector: unique changes (times ``scale`` per model, if any) plus shared ones
    divided by how many models changed the entry, summed over the models."""
    kept = deltas * changed
    alone = kept * unique
    if scale is not None:
        alone = alone * scale
    return (alone + kept * overlap / counts.clamp(min=1)).sum(dim=0)


def ram(base: Tensor, tensors: Sequence[Tensor], epsilon: float = 1e-5) -> Tensor:
    """RAM on whole tensors of one dtype: ``base`` plus, per entry, the changes only one model made
    and the mean of the changes several made; ``base`` itself when there are no other tensors."""
    if not tensors:
        return base
    deltas = _deltas(base.reshape(-1), [t.reshape(-1) for t in tensors])
    return base + _combine(deltas, *change_masks(deltas, epsilon), None).reshape(base.shape)


def shared_unique_counts(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Per task vector (stacked on the first axis of 2-D ``deltas``): how many of its changed
    entries other models changed too, and how many only it changed (int64)."""
    changed, _, overlap, unique = change_masks(deltas, epsilon)
    return (changed & overlap).sum(dim=1), (changed & unique).sum(dim=1)


def ramplus_scale(shared: Tensor, unique: Tensor, r: float, alpha: float, epsilon: float) -> Tensor:
    """RAM+'s factor on each model's unique changes, ``1 + r * clamp(shared / unique, 0, alpha)``
    (the ratio's denominator at least ``epsilon``), float32, as a column to broadcast over entries."""
    rho = shared / unique.clamp(min=epsilon)
    return (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)


def ramplus_tl(base: Tensor, tensors: Sequence[Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> Tensor:
    """RAM+ (tensor-local) on whole tensors of one dtype: :func:`ram` with each model's unique
    changes scaled by :func:`ramplus_scale`; float32 for 16-bit inputs."""
    if not tensors:
        return base
    deltas = _deltas(base.reshape(-1), [t.reshape(-1) for t in tensors])
    scale = ramplus_scale(*shared_unique_counts(deltas, epsilon), r, alpha, epsilon)
    return base + _combine(deltas, *change_masks(deltas, epsilon), scale).reshape(base.shape)


def ram_group(g: Group) -> None:
    """:func:`ram` of ``g``'s base and its other inputs, chunk by chunk (``epsilon`` shared)."""
    base = g.base
    assert base is not None
    others = g.others()
    epsilon = g.shared["epsilon"]

    def chunk(_j: int, part: slice) -> Tensor:
        b = g.values(base, part)
        if not others:
            return b
        deltas = _deltas(b, [g.values(i, part) for i in others])
        return b + _combine(deltas, *change_masks(deltas, epsilon), None)

    emit_chunks(g, chunk)


def ramplus_tl_group(g: Group) -> None:
    """:func:`ramplus_tl` of ``g``'s base and its other inputs (``r``, ``alpha``, ``epsilon``
    shared): a first pass over the chunks counts each model's shared and unique changes, the
    second merges chunk by chunk into the whole result, handed back in the dtype it is computed in."""
    base = g.base
    assert base is not None
    others = g.others()
    r, alpha, epsilon = g.shared["r"], g.shared["alpha"], g.shared["epsilon"]
    if not others:
        emit_chunks(g, lambda _j, part: g.values(base, part))
        return
    parts = chunks(g.numel)

    def deltas_of(part: slice) -> tuple[Tensor, Tensor]:
        b = g.values(base, part)
        return b, _deltas(b, [g.values(i, part) for i in others])

    # integer counts: their sum over the chunks is exact, whatever the order
    shared = torch.zeros(len(others), dtype=torch.int64, device=g.values(base, slice(0, 0)).device)
    unique = torch.zeros_like(shared)
    for chunk_shared, chunk_unique in g.pmap(lambda j: shared_unique_counts(deltas_of(parts[j])[1], epsilon), range(len(parts))):
        shared += chunk_shared
        unique += chunk_unique
    scale = ramplus_scale(shared, unique, r, alpha, epsilon)
    out = torch.empty(g.numel, dtype=torch.promote_types(scale.dtype, g.arith.dtype), device=scale.device)

    def merge(j: int) -> None:
        b, deltas = deltas_of(parts[j])
        out[parts[j]] = b + _combine(deltas, *change_masks(deltas, epsilon), scale)

    g.pmap(merge, range(len(parts)))
    emit_result(g, out.reshape(g.shape))
