"""Passthrough: copy tensors unchanged (optionally scaled), and stack layer slices of several models
into a deeper or shallower one ("frankenmerges", as in SOLAR's depth up-scaling).

Kim et al., "SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective Depth
Up-Scaling", 2023 — https://arxiv.org/abs/2312.15166

The functions here are pure: which source layer each output layer comes from, and the rewritten
config.json; the pass renames the per-layer tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["PER_LAYER_CONFIG_KEYS", "passthrough", "stack_layers", "stacked_config"]

#: config.json entries that hold one value per decoder layer; reordered with the layers.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")


def passthrough(tensor: Tensor, scale: float | None = None) -> Tensor:
    """The tensor itself, or multiplied by ``scale``."""
    return tensor if scale is None else tensor * scale


def stack_layers(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Output layer ``j`` -> ``(slice index, source layer)``, for slices taking source layers
    ``[start, end)`` one after the other."""
    stacked = []
    for index, (start, end) in enumerate(ranges):
        if end < start:
            raise ValueError(f"layer range [{start}, {end}) is reversed")
        stacked.extend((index, layer) for layer in range(start, end))
    return stacked


def stacked_config(config: dict, num_layers_key: str, sources: Sequence[tuple[dict, int]]) -> dict:
    """``config`` with the layer count set to ``len(sources)`` and the per-layer entries
    (:data:`PER_LAYER_CONFIG_KEYS`) taken from each output layer's source: ``sources[j]`` is the
    (source config, source layer) of output layer ``j``. A per-layer entry that some source lacks
    is dropped (transformers then fills in its default)."""
    out = copy.deepcopy(config)
    out[num_layers_key] = len(sources)
    for key in PER_LAYER_CONFIG_KEYS:
        if key not in config:
            continue
        if all(isinstance(src.get(key), list) and layer < len(src[key]) for src, layer in sources):
            out[key] = [src[key][layer] for src, layer in sources]
        else:
            del out[key]
    return out
