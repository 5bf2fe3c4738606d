"""The safetensors file format, parsed strictly: files from the internet are untrusted.

Layout (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(possibly right-padded with spaces), then the data buffer; offsets are relative to the buffer and the
tensors tile it exactly.

Also the one dtype table (:data:`DTYPES`) and the one parser of the dtype names users write
(:func:`parse_dtype`), both importable without torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from weightsmith.errors import WeightsmithError

if TYPE_CHECKING:
    import numpy as np
    import torch


class DType(NamedTuple):
    """One safetensors dtype: the torch dtype attribute of the same name (also the name config.json
    uses), bytes per element, the numpy dtype its bytes are viewed as when numpy computes with it
    (``None``: numpy does not; bfloat16, which numpy lacks, as its 16 bits, see :mod:`merge.npmath`)
    and the names users write for it (CLI options, recipes, mergekit configs; floating point only)."""

    torch: str
    itemsize: int
    numpy: str | None = None
    names: tuple[str, ...] = ()


#: The one dtype table: safetensors dtype name -> :class:`DType`. Names, not torch or numpy objects,
#: so that reading headers imports neither (the numpy merge engine never loads torch).
DTYPES: dict[str, DType] = {
    "F64": DType("float64", 8, "float64", ("fp64", "float64")),
    "F32": DType("float32", 4, "float32", ("fp32", "float32")),
    "F16": DType("float16", 2, "float16", ("fp16", "float16")),
    "BF16": DType("bfloat16", 2, "uint16", ("bf16", "bfloat16")),
    "I64": DType("int64", 8),
    "I32": DType("int32", 4),
    "I16": DType("int16", 2),
    "I8": DType("int8", 1),
    "U64": DType("uint64", 8),
    "U32": DType("uint32", 4),
    "U16": DType("uint16", 2),
    "U8": DType("uint8", 1),
    "BOOL": DType("bool", 1),
    "F8_E4M3": DType("float8_e4m3fn", 1),
    "F8_E5M2": DType("float8_e5m2", 1),
}

_BY_TORCH_NAME = {dtype.torch: name for name, dtype in DTYPES.items()}
_BY_USER_NAME = {alias: name for name, dtype in DTYPES.items() for alias in dtype.names}


def parse_dtype(name: str) -> str:
    """The safetensors name of a dtype as users write it: ``bf16``, ``bfloat16`` or
    ``torch.bfloat16`` (any case) -> ``BF16``. :class:`WeightsmithError` naming the value and the
    accepted names when it is none of them."""
    key = name.strip().lower().removeprefix("torch.") if isinstance(name, str) else None
    if key not in _BY_USER_NAME:
        raise WeightsmithError(None, f"unknown dtype {name!r}; choose from {', '.join(_BY_USER_NAME)}")
    return _BY_USER_NAME[key]


def known_dtype_name(value: str | None) -> str | None:
    """``value`` unchanged when it is None or a dtype name :func:`parse_dtype` accepts, else
    ValueError naming it: a validator for settings fields that hold a dtype."""
    if value is not None:
        try:
            parse_dtype(value)
        except WeightsmithError as exc:
            raise ValueError(exc.problem) from None
    return value


def parse_torch_dtype(name: str) -> torch.dtype:
    """:func:`parse_dtype`, as a torch dtype (imports torch)."""
    return torch_dtype(parse_dtype(name))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of the safetensors dtype ``name`` (imports torch)."""
    import torch

    return getattr(torch, DTYPES[name].torch)


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; KeyError when safetensors cannot store it."""
    try:
        return _BY_TORCH_NAME[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise KeyError(dtype) from None


def is_float(name: str) -> bool:
    """Whether the safetensors dtype ``name`` is a floating-point one (F64 ... BF16, F8_*)."""
    return name.startswith(("F", "BF"))


def numpy_view(name: str) -> np.dtype:
    """The numpy dtype the bytes of a floating-point tensor are read as (KeyError for dtypes numpy
    does not compute with)."""
    import numpy as np

    view = DTYPES[name].numpy
    if view is None:
        raise KeyError(name)
    return np.dtype(view)


#: The safetensors library itself refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000
HEADER_PREFIX = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors file (absolute byte offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def parse_header(prefix: bytes, file_size: int, where: str | Path) -> Header:
    """Validate a safetensors header and return where every tensor lives.

    ``prefix`` holds at least the first 8 + N bytes of the file (or all of it when shorter);
    ``file_size`` is the file's size. Raises :class:`WeightsmithError` naming ``where`` on any problem.
    """
    if file_size < HEADER_PREFIX or len(prefix) < HEADER_PREFIX:
        raise WeightsmithError(where, f"truncated safetensors file: {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:HEADER_PREFIX])
    if n > file_size - HEADER_PREFIX:
        raise WeightsmithError(where, f"header length {n} runs past the end of the file ({file_size} bytes)")
    if n > MAX_HEADER_BYTES:
        raise WeightsmithError(where, f"header length {n} is above the 100 MB limit")
    if len(prefix) < HEADER_PREFIX + n:
        raise WeightsmithError(where, "truncated safetensors header")
    raw = prefix[HEADER_PREFIX : HEADER_PREFIX + n]
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WeightsmithError(where, f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise WeightsmithError(where, "header is not a JSON object")
    data_start = HEADER_PREFIX + n
    data_size = file_size - data_start
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightsmithError(where, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorEntry] = {}
    for name, spec in doc.items():
        tensors[name] = _parse_entry(name, spec, data_start, where)
    _check_tiling(tensors.values(), data_start, data_size, where)
    return Header(tensors=tensors, metadata=metadata, data_start=data_start)


def _parse_entry(name: str, spec: object, data_start: int, where: str | Path) -> TensorEntry:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise WeightsmithError(where, f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WeightsmithError(where, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise WeightsmithError(where, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise WeightsmithError(where, f"tensor {name!r}: data_offsets must be two ordered non-negative integers")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise WeightsmithError(
            where,
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored but shape {shape} x {dtype} needs {expected}",
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tiling(entries, data_start: int, data_size: int, where: str | Path) -> None:
    """Tensors must lie inside the buffer, must not overlap, and must cover it with no gap."""
    cursor = data_start
    previous = None
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.end > data_start + data_size:
            raise WeightsmithError(
                where, f"tensor {entry.name!r}: data offsets run past the end of the file ({data_start + data_size} bytes)"
            )
        if entry.start < cursor:
            raise WeightsmithError(where, f"tensor {entry.name!r}: data overlaps tensor {previous!r}")
        if entry.start > cursor:
            raise WeightsmithError(where, f"tensor {entry.name!r}: {entry.start - cursor} unused bytes before its data")
        cursor, previous = entry.end, entry.name
    if cursor != data_start + data_size:
        raise WeightsmithError(where, f"{data_start + data_size - cursor} bytes after the last tensor belong to no tensor")


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str], reserve: int = 0) -> bytes:
    """Encode a header (8-byte length + JSON), padded with spaces to ``reserve`` bytes of JSON when larger,
    and to a multiple of 8 so the data buffer is aligned. Entries are (name, dtype, shape, begin, end)."""
    doc: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    for name, dtype, shape, begin, end in entries:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    size = max(len(raw), reserve)
    size += (-(size + HEADER_PREFIX)) % 8
    return struct.pack("<Q", size) + raw + b" " * (size - len(raw))


def read_header(path: Path) -> Header:
    """Read and validate the header of the safetensors file at ``path``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(HEADER_PREFIX)
            if len(head) == HEADER_PREFIX:
                (n,) = struct.unpack("<Q", head)
                if n <= size - HEADER_PREFIX and n <= MAX_HEADER_BYTES:
                    head += fh.read(n)
    except OSError as exc:
        raise WeightsmithError(path, f"cannot read: {exc.strerror or exc}") from None
    return parse_header(head, size, path)
