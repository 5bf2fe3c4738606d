"""Packed (compressed-tensors ``pack-quantized``) checkpoints read as quantized tensors: which linears
are packed, on which grid (config.json's ``quantization_config``), and each one's codes and scales on
demand (:func:`compress.pack.from_compressed_tensors`). Merge inputs dequantize them; GGUF export keeps
their codes. Only the 2-element ``weight_shape`` tensors are read up front.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from compress.grid import QuantGrid, QuantizedTensor

__all__ = ["PACKED_PARTS", "PackedLayer", "packed_layers", "read_quantized"]

#: The tensors of one packed linear ``<module>.<part>``.
PACKED_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
_PACKED_FORMATS = ("pack-quantized",)
_DENSE_FORMATS = ("dense", None)


@dataclass(frozen=True)
class PackedLayer:
    prefix: str
    grid: QuantGrid
    shape: tuple[int, ...]
    #: the safetensors dtype of the scales, which the dequantized weight takes
    st_dtype: str

    @property
    def dtype(self) -> torch.dtype:
        from weightsmith.stformat import torch_dtype

        return torch_dtype(self.st_dtype)


class LayerTensors(Mapping[str, "Tensor"]):
    """The stored tensors of one packed linear, read when asked for."""

    def __init__(self, checkpoint: Checkpoint, prefix: str) -> None:
        self.checkpoint = checkpoint
        self.keys_ = [key for key in (f"{prefix}.{part}" for part in PACKED_PARTS) if key in checkpoint]

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        return self.checkpoint.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def _target_matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or ("." not in target and target[:1].isupper())


def _grid(weights: dict, where: Path, purpose: str) -> QuantGrid:
    from compress.grid import QuantGrid

    if weights.get("type", "int") != "int" or weights.get("dynamic"):
        raise WeightsmithError(
            where,
            f"quantized weights of type {weights.get('type')!r} (dynamic={weights.get('dynamic')}) cannot be dequantized; "
            "only static int grids",
        )
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise WeightsmithError(where, f"quantization strategy {strategy!r} is not supported as {purpose} (group or channel)")
    try:
        return QuantGrid(
            int(weights["num_bits"]), bool(weights.get("symmetric", True)), int(weights["group_size"]) if strategy == "group" else -1
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsmithError(where, f"unreadable quantization config group: {exc}") from None


def packed_layers(checkpoint: Checkpoint, purpose: str = "a merge input") -> dict[str, PackedLayer]:
    """Every packed linear of ``checkpoint``, keyed by the dense name ``<module>.weight``; empty for
    an unquantized checkpoint; an error for a quantized layout we cannot read."""
    where = checkpoint.folder / "config.json"
    quant = checkpoint.config.get("quantization_config")
    if quant is None:
        return {}
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise WeightsmithError(
            where,
            f"quantized checkpoint ({method!r}) cannot be {purpose}; "
            "only compressed-tensors pack-quantized checkpoints are dequantized on the fly",
        )
    groups = quant.get("config_groups") or {}
    formats = {quant.get("format")} | {g.get("format") for g in groups.values() if isinstance(g, dict)}
    unknown = sorted(str(f) for f in formats if f not in _PACKED_FORMATS + _DENSE_FORMATS)
    if unknown:
        raise WeightsmithError(where, f"compressed-tensors format {', '.join(unknown)} cannot be {purpose} (only pack-quantized)")
    layers: dict[str, PackedLayer] = {}
    for name in checkpoint.names():
        if not name.endswith(".weight_packed"):
            continue
        prefix = name.removesuffix(".weight_packed")
        group = next(
            (g for g in groups.values() if isinstance(g, dict) and any(_target_matches(t, prefix) for t in g.get("targets") or [])), None
        )
        if group is None or not isinstance(group.get("weights"), dict):
            raise WeightsmithError(where, f"no quantization config group covers the packed layer {prefix!r}")
        grid = _grid(group["weights"], where, purpose)
        for part in ("weight_shape", "weight_scale"):
            if f"{prefix}.{part}" not in checkpoint:
                raise WeightsmithError(checkpoint.folder, f"packed layer {prefix!r} has no {part}")
        shape_t = checkpoint.get(f"{prefix}.weight_shape")
        if shape_t.is_floating_point() or shape_t.shape != (2,) or int(shape_t.min()) < 1:
            raise WeightsmithError(checkpoint.folder, f"{prefix}.weight_shape must hold two positive integers")
        dtype = checkpoint.info(f"{prefix}.weight_scale").st_dtype
        layers[f"{prefix}.weight"] = PackedLayer(prefix, grid, tuple(int(v) for v in shape_t.tolist()), dtype)
    return layers


def read_quantized(checkpoint: Checkpoint, layer: PackedLayer) -> QuantizedTensor:
    """The codes, scales and zero points of one packed linear; a one-line error for a malformed one."""
    from compress.pack import from_compressed_tensors

    try:
        return from_compressed_tensors(LayerTensors(checkpoint, layer.prefix), layer.prefix, layer.grid)
    except ValueError as exc:
        raise WeightsmithError(checkpoint.folder, f"packed layer {layer.prefix!r}: {exc}") from None
