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
from pathlib import Path
from typing import TYPE_CHECKING

from compress.packed_input import PACKED_PARTS, PackedLayer, packed_layers, read_quantized
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

log = logging.getLogger(__name__)

__all__ = ["PACKED_PARTS", "MergeInput", "PackedLayer", "locate", "open_input"]


class MergeInput:
    """One input model: dense tensor names, shapes and dtypes from headers; tensors on demand."""

    def __init__(self, reference: str, checkpoint: Checkpoint, origin: Path, origin_files: list[Path]) -> None:
        self.reference = reference
        self.checkpoint = checkpoint
        self.origin = origin
        self.origin_files = origin_files
        self.packed = packed_layers(checkpoint)
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
        return read_quantized(self.checkpoint, layer).dequantize()


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
