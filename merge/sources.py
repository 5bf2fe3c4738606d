"""Merge inputs: checkpoint folders, GGUF files and packed (compressed-tensors) checkpoints, all seen
as named dense tensors read one at a time.

* A folder is a :class:`~weightsmith.checkpoint.Checkpoint` (validated headers, memory-mapped
  reads; pickle only with ``allow_pickle``).
* A ``.gguf`` file is converted once by :func:`weightsmith.gguf_import.convert_gguf` (tensor by
  tensor from the memory-mapped file, peak memory about one tensor) into a cache folder keyed by the
  file's sha256 and the dtype, then read like a folder: the merge engines then copy, memory-map and
  chunk it like any checkpoint, and later merges of the same file skip the dequantization.
* A ``pack-quantized`` compressed-tensors checkpoint shows each quantized linear as one dense
  ``<module>.weight``, dequantized on demand with :func:`compress.pack.from_compressed_tensors`
  (its grid from config.json's ``quantization_config``). Only the 2-element ``weight_shape``
  tensors are read up front.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from merge.layout import Layout, layout_of
from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.gguf_read import is_gguf
from weightsmith.models import resolve
from weightsmith.paths import cache_dir
from weightsmith.provenance import HashCache
from weightsmith.stformat import DTYPES

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from compress.grid import QuantGrid

log = logging.getLogger(__name__)

__all__ = ["PACKED_PARTS", "MergeInput", "PackedLayer", "locate", "open_input"]

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


class _LayerTensors(Mapping[str, "Tensor"]):
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


def _grid(weights: dict, where: Path) -> QuantGrid:
    from compress.grid import QuantGrid

    if weights.get("type", "int") != "int" or weights.get("dynamic"):
        raise WeightsmithError(
            where,
            f"quantized weights of type {weights.get('type')!r} (dynamic={weights.get('dynamic')}) cannot be dequantized; "
            "only static int grids",
        )
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise WeightsmithError(where, f"quantization strategy {strategy!r} is not supported as merge input (group or channel)")
    try:
        return QuantGrid(
            int(weights["num_bits"]), bool(weights.get("symmetric", True)), int(weights["group_size"]) if strategy == "group" else -1
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsmithError(where, f"unreadable quantization config group: {exc}") from None


def _packed_layers(checkpoint: Checkpoint) -> dict[str, PackedLayer]:
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
            f"quantized checkpoint ({method!r}) cannot be a merge input; "
            "only compressed-tensors pack-quantized checkpoints are dequantized on the fly",
        )
    groups = quant.get("config_groups") or {}
    formats = {quant.get("format")} | {g.get("format") for g in groups.values() if isinstance(g, dict)}
    unknown = sorted(str(f) for f in formats if f not in _PACKED_FORMATS + _DENSE_FORMATS)
    if unknown:
        raise WeightsmithError(where, f"compressed-tensors format {', '.join(unknown)} cannot be a merge input (only pack-quantized)")
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
        grid = _grid(group["weights"], where)
        for part in ("weight_shape", "weight_scale"):
            if f"{prefix}.{part}" not in checkpoint:
                raise WeightsmithError(checkpoint.folder, f"packed layer {prefix!r} has no {part}")
        shape_t = checkpoint.get(f"{prefix}.weight_shape")
        if shape_t.is_floating_point() or shape_t.shape != (2,) or int(shape_t.min()) < 1:
            raise WeightsmithError(checkpoint.folder, f"{prefix}.weight_shape must hold two positive integers")
        dtype = checkpoint.info(f"{prefix}.weight_scale").st_dtype
        layers[f"{prefix}.weight"] = PackedLayer(prefix, grid, tuple(int(v) for v in shape_t.tolist()), dtype)
    return layers


class MergeInput:
    """One input model: dense tensor names, shapes and dtypes from headers; tensors on demand."""

    def __init__(self, reference: str, checkpoint: Checkpoint, origin: Path, origin_files: list[Path]) -> None:
        self.reference = reference
        self.checkpoint = checkpoint
        self.origin = origin
        self.origin_files = origin_files
        self.packed = _packed_layers(checkpoint)
        hidden = {f"{layer.prefix}.{part}" for layer in self.packed.values() for part in PACKED_PARTS}
        self._names: list[str] = []
        for name in checkpoint.names():
            if name.endswith(".weight_packed") and f"{name.removesuffix('.weight_packed')}.weight" in self.packed:
                self._names.append(f"{name.removesuffix('.weight_packed')}.weight")
            elif name not in hidden:
                self._names.append(name)
        self._known = set(self._names)
        self.layout: Layout = layout_of(self._names, self.config)

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    @property
    def key(self) -> str:
        """Identity of the input: two references to the same place are the same model."""
        return str(self.origin.resolve())

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._known

    def shape(self, name: str) -> tuple[int, ...]:
        layer = self.packed.get(name)
        return layer.shape if layer else self.checkpoint.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        layer = self.packed.get(name)
        return layer.dtype if layer else self.checkpoint.info(name).dtype

    def st_dtype(self, name: str) -> str:
        """The safetensors dtype name of the dense tensor ``name`` (no torch)."""
        layer = self.packed.get(name)
        return layer.st_dtype if layer else self.checkpoint.info(name).st_dtype

    def stored_as_is(self, name: str) -> bool:
        """True when the tensor's bytes on disk are the dense tensor (it can be copied raw)."""
        return name not in self.packed

    def get(self, name: str) -> Tensor:
        layer = self.packed.get(name)
        if layer is None:
            return self.checkpoint.get(name)
        from compress.pack import from_compressed_tensors

        try:
            return from_compressed_tensors(_LayerTensors(self.checkpoint, layer.prefix), layer.prefix, layer.grid).dequantize()
        except ValueError as exc:
            raise WeightsmithError(self.folder, f"packed layer {layer.prefix!r}: {exc}") from None


def locate(reference: str, config_dir: Path | None) -> Path:
    """A model reference as a path: as written (relative to the current folder), else relative to the
    config file's folder, else a hub id fetched by :func:`weightsmith.models.resolve`."""
    path = Path(reference).expanduser()
    if path.exists():
        return path
    if config_dir is not None and not path.is_absolute() and (config_dir / path).exists():
        return config_dir / path
    return resolve(reference)


def _gguf_folder(path: Path, dtype: str) -> Path:
    """The cached safetensors conversion (into safetensors dtype ``dtype``) of a GGUF file,
    converted on first use."""
    from weightsmith.gguf_import import convert_gguf
    from weightsmith.stformat import torch_dtype

    cache = HashCache()
    digest = cache.sha256(path)
    cache.save()
    folder = cache_dir() / "gguf-inputs" / f"{digest[:24]}-{DTYPES[dtype][0]}"
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        log.info("converting %s into %s", path, folder)
        convert_gguf(path, folder, dtype=torch_dtype(dtype))
    return folder


def open_input(
    reference: str, config_dir: Path | None, *, allow_pickle: bool = False, gguf_dtype: str = "F32"
) -> MergeInput:
    """Open the model ``reference`` names (headers and config only, apart from a GGUF conversion)."""
    path = locate(reference, config_dir)
    if is_gguf(path):
        return MergeInput(reference, Checkpoint(_gguf_folder(path, gguf_dtype)), path, [path])
    checkpoint = Checkpoint(path, allow_pickle=allow_pickle)
    return MergeInput(reference, checkpoint, checkpoint.folder, checkpoint.files)
