"""Linear merging (a weighted average of models) and uniform model soups.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 — https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.chunks import PMap, chunks, serial_map

__all__ = ["linear", "soup", "work_dtype"]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype interpolating methods compute in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True, *, pmap: PMap = serial_map) -> Tensor:
    """``sum_i weights[i] * tensors[i]``, divided by ``sum(weights)`` when ``normalize``.

    Computed in float32 (float64 for float64 inputs) chunk by chunk (mapped by ``pmap``): each
    product rounded, then added in input order (no fused multiply-add, which numpy, the other
    engine, lacks), and returned in the first tensor's dtype.
    """
    if not tensors:
        raise ValueError("linear needs at least one tensor")
    if len(weights) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merging needs floating-point tensors")
    work = work_dtype(first.dtype)
    coefficients = torch.tensor([float(w) for w in weights], dtype=work, device=first.device)
    total_weight = coefficients.sum()
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty(first.numel(), dtype=first.dtype, device=first.device)
    parts = chunks(first.numel())

    def chunk(j: int) -> None:
        part = parts[j]
        acc = torch.zeros(part.stop - part.start, dtype=work, device=first.device)
        for flat, coefficient in zip(flats, coefficients):
            acc += flat[part].to(work) * coefficient
        if normalize:
            acc.div_(total_weight)
        out[part] = acc

    pmap(chunk, range(len(parts)))
    return out.reshape(first.shape)


def soup(tensors: Sequence[Tensor], *, pmap: PMap = serial_map) -> Tensor:
    """The uniform soup: the plain average of any number of tensors."""
    return linear(tensors, [1.0] * len(tensors), normalize=True, pmap=pmap)
