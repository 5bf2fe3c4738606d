"""GGUF files read lazily: metadata parsed once, tensors memory-mapped and dequantized one at a time.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian: the magic
``GGUF``, a uint32 version (2 or 3), uint64 tensor and key-value counts, the key-value pairs (a string
key, a uint32 value type, the value; strings are a uint64 byte length and UTF-8 bytes, arrays a uint32
element type, a uint64 count and the elements), then one entry per tensor (name, uint32 number of
dimensions, uint64 dimensions fastest-moving first, uint32 ggml type, uint64 offset into the data
section), then the data section at the next multiple of ``general.alignment`` (default 32).

The ``gguf`` package's own ``GGUFReader`` builds a numpy view for every array element while it opens
a file, which for a 262k-token vocabulary (tokens, scores, token types, merges) is a million Python
steps. This reader parses numeric arrays with one ``numpy.frombuffer`` each and a string array with
one pass over its length prefixes and one UTF-8 decode of all its bytes; it uses the ``gguf`` package
for the block layouts and the dequantization (``gguf.quants.dequantize``). Every offset is checked
against the file size, so a truncated or corrupt file is a :class:`WeightsmithError` naming it.
"""

from __future__ import annotations

import math
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith.errors import WeightsmithError

GGUF_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
#: GGUF metadata value type -> numpy dtype of its fixed-width values.
_SCALARS: dict[int, np.dtype] = {
    code: np.dtype(name)
    for code, name in {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}.items()
}
#: ggml types stored as plain values, and the numpy dtype of their elements (the rest are blocks).
_PLAIN = {0: np.float32, 1: np.float16, 28: np.float64, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64}
_U64 = struct.Struct("<Q")
#: stored bytes of a block-quantized tensor dequantized at a time
DEQUANT_CHUNK_BYTES = 4 * 1024 * 1024


class _Truncated(Exception):
    """A read past the end of the file (turned into a WeightsmithError naming the file)."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor entry: where its bytes are and how they are stored; no data read."""

    name: str
    #: ggml type code (``gguf.GGMLQuantizationType``)
    ggml_type: int
    #: shape in torch order (slowest-moving dimension first)
    shape: tuple[int, ...]
    #: absolute byte offset in the file
    start: int
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name


class GGUFFile:
    """A validated GGUF file: :attr:`metadata` (key -> value; numeric arrays as numpy arrays, string
    arrays as lists of str) and :attr:`tensors` (name -> :class:`GGUFTensor`, in file order).
    :meth:`dequantize` reads one tensor as float32."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsmithError(self.path, "no such file")
        size = self.path.stat().st_size
        if size < 4:
            raise WeightsmithError(self.path, "not a GGUF file (too short)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise WeightsmithError(self.path, "not a GGUF file (wrong magic bytes)")
        try:
            self.version, self.metadata, self.tensors, self.data_start = self._parse()
        except _Truncated as exc:
            raise WeightsmithError(self.path, f"truncated or corrupt GGUF file ({exc})") from None
        except (UnicodeDecodeError, ValueError, OverflowError) as exc:
            raise WeightsmithError(self.path, f"corrupt GGUF file ({exc})") from None

    # ---- parsing ------------------------------------------------------------------------------
    def _need(self, pos: int, nbytes: int, what: str) -> None:
        if nbytes < 0 or pos + nbytes > self._map.size:
            raise _Truncated(f"{what} at byte {pos} ends past the end of the file ({self._map.size} bytes)")

    def _unpack(self, fmt: struct.Struct, pos: int, what: str) -> tuple:
        self._need(pos, fmt.size, what)
        return fmt.unpack_from(self._map, pos)

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        (length,) = self._unpack(_U64, pos, what)
        self._need(pos + 8, length, what)
        return bytes(self._map[pos + 8 : pos + 8 + length]).decode("utf-8"), pos + 8 + length

    def _parse(self) -> tuple[int, dict[str, Any], dict[str, GGUFTensor], int]:
        version, n_tensors, n_kv = self._unpack(struct.Struct("<IQQ"), 4, "header")
        if version not in _VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (only {' and '.join(map(str, _VERSIONS))})")
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos, "metadata key")
            (vtype,) = self._unpack(struct.Struct("<I"), pos, f"type of {key}")
            if key in metadata:
                raise ValueError(f"metadata key {key!r} appears twice")
            metadata[key], pos = self._value(pos + 4, vtype, key)
        entry = struct.Struct("<I")
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name, pos = self._string(pos, "tensor name")
            (ndim,) = self._unpack(entry, pos, f"tensor {name}")
            if ndim > 8:
                raise ValueError(f"tensor {name!r} has {ndim} dimensions")
            dims = self._unpack(struct.Struct(f"<{ndim}Q"), pos + 4, f"tensor {name}")
            ggml_type, offset = self._unpack(struct.Struct("<IQ"), pos + 4 + 8 * ndim, f"tensor {name}")
            pos += 4 + 8 * ndim + 12
            raw.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-pos // alignment) * alignment
        tensors: dict[str, GGUFTensor] = {}
        for name, shape, ggml_type, offset in raw:
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears twice")
            nbytes = _tensor_bytes(name, ggml_type, shape)
            start = data_start + offset
            self._need(start, nbytes, f"data of tensor {name}")
            tensors[name] = GGUFTensor(name, ggml_type, shape, start, nbytes)
        return version, metadata, tensors, data_start

    def _value(self, pos: int, vtype: int, key: str) -> tuple[Any, int]:
        if vtype in _SCALARS:
            dtype = _SCALARS[vtype]
            self._need(pos, dtype.itemsize, key)
            return np.frombuffer(self._map, dtype, 1, pos)[0].item(), pos + dtype.itemsize
        if vtype == _STRING:
            return self._string(pos, key)
        if vtype != _ARRAY:
            raise ValueError(f"metadata {key!r} has unknown value type {vtype}")
        etype, count = self._unpack(struct.Struct("<IQ"), pos, key)
        pos += 12
        if etype in _SCALARS:
            dtype = _SCALARS[etype]
            self._need(pos, count * dtype.itemsize, key)
            return np.frombuffer(self._map, dtype, count, pos).astype(dtype.newbyteorder("=")), pos + count * dtype.itemsize
        if etype == _STRING:
            return self._string_array(pos, count, key)
        values = []
        for _ in range(count):  # arrays of arrays: rare and short
            value, pos = self._value(pos, etype, key)
            values.append(value)
        return values, pos

    def _string_array(self, pos: int, count: int, key: str) -> tuple[list[str], int]:
        """``count`` strings from ``pos``: one pass over the length prefixes (each string's place
        depends on the previous length), then the bytes of all strings gathered with NUL separators
        by numpy and decoded and split at once."""
        first = pos
        starts = array("q", bytes(8 * count))
        unpack = _U64.unpack_from
        end = self._map.size
        for i in range(count):
            if pos + 8 > end:
                raise _Truncated(f"string {i} of {key} at byte {pos} ends past the end of the file ({end} bytes)")
            starts[i] = pos + 8
            pos += 8 + unpack(self._map, pos)[0]
        if pos > end:
            raise _Truncated(f"string {count - 1} of {key} ends past the end of the file ({end} bytes)")
        if count == 0:
            return [], pos
        region = np.asarray(self._map[first:pos])
        begin = np.frombuffer(starts, dtype=np.int64) - first
        lengths = np.diff(np.append(begin, region.size + 8)) - 8
        # keep each string's bytes and the last byte of every length prefix after the first (the
        # separator): +1 where a kept run starts, -1 where it ends, summed
        edges = np.zeros(region.size + 1, dtype=np.int8)
        edges[begin] += 1
        edges[begin + lengths] -= 1
        edges[begin[1:] - 1] += 1
        edges[begin[1:]] -= 1
        joined = region[np.cumsum(edges[:-1], dtype=np.int8) > 0]
        del edges
        # the separator before string i sits after the bytes of strings 0..i-1 and i-1 separators
        joined[np.cumsum(lengths[:-1]) + np.arange(count - 1)] = 0
        data = joined.tobytes()
        del joined
        if data.count(0) == count - 1:
            return data.decode("utf-8").split("\x00"), pos
        # a string holds a NUL byte itself: decode them one by one
        return _decode_each(region, begin), pos

    # ---- data ---------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The stored values of ``name`` as a read-only memory-mapped array: plain types with their
        own dtype and shape, block types as bytes (rows of blocks)."""
        info = self.tensors[name]
        data = np.asarray(self._map[info.start : info.start + info.nbytes])
        plain = _PLAIN.get(info.ggml_type)
        if plain is not None:
            return data.view(plain).reshape(info.shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        return data.reshape(quant_shape_to_byte_shape(info.shape, GGMLQuantizationType(info.ggml_type)))

    def dequantize(self, name: str, chunk_bytes: int = DEQUANT_CHUNK_BYTES) -> np.ndarray:
        """Tensor ``name`` as float32 values (``gguf.quants.dequantize``), in torch order.

        Block types are dequantized ``chunk_bytes`` of stored rows at a time into one output array
        (blocks never span rows, so the values are the same): ``gguf.quants.dequantize`` of a whole
        tensor holds every row group's result and then their concatenation, twice the output."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        qtype = GGMLQuantizationType(info.ggml_type)
        raw = self.raw(name)
        try:
            if info.ggml_type in _PLAIN or raw.ndim < 2 or raw.nbytes <= chunk_bytes:
                return dequantize(raw, qtype).reshape(info.shape)
            rows = raw.reshape(-1, raw.shape[-1])
            out = np.empty((rows.shape[0], info.shape[-1]), dtype=np.float32)
            step = max(1, chunk_bytes // rows.shape[1])
            for start in range(0, rows.shape[0], step):
                out[start : start + step] = dequantize(rows[start : start + step], qtype)
        except NotImplementedError:
            raise WeightsmithError(self.path, f"tensor {name!r}: ggml type {info.type_name} cannot be dequantized") from None
        return out.reshape(info.shape)


def _decode_each(region: np.ndarray, begin: np.ndarray) -> list[str]:
    """Strings at ``begin`` offsets of ``region`` (each preceded by its 8-byte length), one by one."""
    ends = np.append(begin[1:] - 8, region.size)
    return [bytes(region[b:e]).decode("utf-8") for b, e in zip(begin.tolist(), ends.tolist())]


def _tensor_bytes(name: str, ggml_type: int, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block:
        raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the {qtype.name} block size {block}")
    return math.prod(shape) // block * type_size


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC
