"""The GGUF export pass: a checkpoint folder -> one GGUF file that llama.cpp runs with nothing else.

Written tensor by tensor with the ``gguf`` package's writer: every tensor's name, shape and type is
known from the safetensors headers before any data is read, so the header and tensor table are written
first and then each tensor is read, converted and appended; peak memory stays near one tensor.

Quantized inputs keep their values: a ``pack-quantized`` linear whose grid a GGUF type holds exactly
is written with its own integer codes and scales (:func:`kept_type`), not rounded again; its q/k rows
move with their scales under llama.cpp's rotary permutation. A linear quantized on a GGUF type's grid
(``weightsmith quantize --format gguf:TYPE``) brings its blocks in the checkpoint's extra file
(:data:`compress.quantize.GGUF_BLOCKS`); they are written as they are (rows permuted for q/k: a row's
blocks stay whole) when the file's type for that tensor is theirs. A quantized linear that the chosen
type cannot hold is dequantized and quantized again, with a warning that says so.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.gguf import mixes
from compress.gguf.config import GGUFExportConfig
from compress.gguf.metadata import hparams, llama3_rope_factors, rope_settings
from compress.gguf.names import EXPORT_ARCHS, SKIPPED, TensorRoute, gguf_arch_of, route, row_order
from compress.gguf.vocab import read_vocab
from compress.packed_input import PackedLayer, packed_layers, read_quantized
from weightsmith.errors import WeightsmithError
from weightsmith.passes import Report

if TYPE_CHECKING:
    import torch

    from compress.grid import QuantizedTensor
    from weightsmith.checkpoint import Checkpoint
    from weightsmith.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["PlannedTensor", "export_gguf", "gguf_writer", "kept_type", "plan", "run"]

_QUANTIZATION_VERSION = 2


@dataclass
class PlannedTensor:
    """One tensor of the file: where it comes from, where it goes, its type."""

    source: str
    route: TensorRoute
    shape: tuple[int, ...]
    gtype: str
    packed: PackedLayer | None = None
    #: the packed codes (or the GGUF blocks) are written as they are (no new rounding)
    keep_codes: bool = False
    #: the GGUF type of this tensor's blocks in the checkpoint's extra file, if it has some
    blocks: str | None = None
    #: generated values (Llama 3's rotary factors) instead of a checkpoint tensor
    values: list[float] | None = None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.gtype, self.shape)


def _nbytes(gtype: str, shape: Sequence[int]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[gtype.upper()]]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return rows * (int(shape[-1]) // block) * size


def kept_type(grid: Any, shape: Sequence[int], g_idx: bool = False) -> str | None:
    """The GGUF type that holds a packed linear's grid exactly, or None: 4-bit symmetric -> q4_0,
    4-bit asymmetric -> q4_1, 8-bit symmetric -> q8_0, for groups of a multiple of 32 columns (a
    larger group repeats its scale over its blocks; per-channel repeats it over the row). Whether each
    scale (and Q4_1's ``-scale * zero``) is a float16 value is checked when the tensor is written."""
    width = int(shape[-1])
    group = width if grid.group_size == -1 else grid.group_size
    if g_idx or width % 32 or group % 32:
        return None
    return {(4, True): "q4_0", (4, False): "q4_1", (8, True): "q8_0"}.get((grid.bits, grid.symmetric))


def plan(src: Checkpoint, settings: GGUFExportConfig, blocks: dict[str, str] | None = None) -> tuple[str, list[PlannedTensor]]:
    """The GGUF architecture and every tensor of the file with its type, from headers only. ``blocks``:
    tensor name -> GGUF type of the blocks the checkpoint brings (default: read from its extra file;
    the size estimate passes those of a checkpoint not written yet)."""
    config = src.config
    found = gguf_arch_of(config.get("model_type"))
    if found is None:
        raise WeightsmithError(
            src.folder / "config.json",
            f"GGUF export does not support model_type {config.get('model_type')!r} (supported: {', '.join(sorted(EXPORT_ARCHS))})",
        )
    gguf_arch, _ = found
    packed = packed_layers(src, purpose="exported to GGUF")
    heads = {"attn_q": int(config.get("num_attention_heads") or 0), "attn_k": int(config.get("num_key_value_heads") or config.get("num_attention_heads") or 0)}
    tied = bool(config.get("tie_word_embeddings", False))
    layers = int(config.get("num_hidden_layers") or 0)
    chooser = mixes.TypeChooser(
        mixes.MIXES["f16" if settings.type == "auto" else settings.type],
        layers,
        tied,
        gqa=max(1, heads["attn_q"] // max(1, heads["attn_k"])),
        pure=settings.pure,
        overrides=mixes.parse_tensor_types(settings.tensor_type),
    )
    names = [n for n in src.names() if not _packed_part(n, packed)] + list(packed)
    blocks = gguf_blocks(src) if blocks is None else blocks
    out: list[PlannedTensor] = []
    for name in sorted(set(names), key=_natural):
        if (tied and name == "lm_head.weight") or name.endswith(SKIPPED):
            continue
        r = route(name, gguf_arch, heads)
        if r is None:
            raise WeightsmithError(src.folder, f"tensor {name!r} has no place in a llama.cpp {gguf_arch} model")
        layer = packed.get(name)
        shape = tuple(layer.shape) if layer else tuple(src.info(name).shape)
        if r.transpose:
            shape = shape[::-1]
        gtype = chooser.choose(r.gguf_name, r.leaf, r.block, shape)
        keep = False
        manual = any(p.search(r.gguf_name) for p, _ in chooser.overrides)
        if layer is not None:
            exact = kept_type(layer.grid, shape)
            if settings.type == "auto" and exact is not None and not manual:
                gtype, keep = exact, True
            else:
                keep = exact == gtype
        stored = blocks.get(name)
        if stored is not None:
            # blocks quantized with calibration data follow the mix's importance-matrix rules
            calibrated = replace(chooser, calibrated=True).choose(r.gguf_name, r.leaf, r.block, shape)
            if (settings.type == "auto" or stored == calibrated) and not manual:
                gtype = stored
            keep = gtype == stored
        out.append(PlannedTensor(name, r, shape, gtype, layer, keep, stored))
    rope = rope_settings(config, src.folder / "config.json")
    if rope.kind == "llama3":
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads["attn_q"])
        factors = llama3_rope_factors(head_dim, rope)
        out.insert(0, PlannedTensor("", TensorRoute("rope_freqs.weight", "rope_freqs", None), (len(factors),), "f32", values=factors))
    if rope.kind == "longrope":
        for leaf, factors in (("rope_factors_long", rope.long), ("rope_factors_short", rope.short)):
            out.insert(0, PlannedTensor("", TensorRoute(f"{leaf}.weight", leaf, None), (len(factors),), "f32", values=list(factors)))
    return gguf_arch, out


def gguf_blocks(src: Checkpoint) -> dict[str, str]:
    """Tensor name -> GGUF type of the blocks in the checkpoint's extra file (empty when it has none)."""
    from compress.quantize import GGUF_BLOCKS
    from weightsmith.stformat import read_header

    path = src.folder / GGUF_BLOCKS
    if not path.is_file():
        return {}
    try:
        header = read_header(path)
    except (OSError, ValueError) as exc:
        raise WeightsmithError(path, f"unreadable GGUF blocks file ({exc})") from None
    from compress.gguf.mixes import BLOCK

    meta = header.metadata or {}
    found = {}
    for name in header.tensors:
        gtype = meta.get(name)
        if gtype not in BLOCK or name not in src:
            raise WeightsmithError(path, f"blocks {name!r} name no known GGUF type or no tensor of the checkpoint")
        found[name] = gtype
    return found


def _packed_part(name: str, packed: dict[str, PackedLayer]) -> bool:
    from compress.packed_input import PACKED_PARTS

    module, _, part = name.rpartition(".")
    return part in PACKED_PARTS and f"{module}.weight" in packed


def _natural(name: str) -> tuple:
    """Layer-number order (``layers.2`` before ``layers.10``); readers look tensors up by name, so the
    order is only for people reading a tensor listing (llama.cpp's converter keeps the safetensors key
    order, blk.10 before blk.2)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _values(src: Checkpoint, t: PlannedTensor) -> torch.Tensor:
    """The float32 values of a planned tensor in llama.cpp's layout (dequantized when packed)."""
    import torch

    if t.values is not None:
        return torch.tensor(t.values, dtype=torch.float32)
    w = read_quantized(src, t.packed).dequantize() if t.packed is not None else src.get(t.source)
    w = w.to(torch.float32)
    if t.route.transpose:
        w = w.t().contiguous()
    order = row_order(t.route, w.shape[0])
    if order is not None:
        w = w[order]
    if t.route.norm_offset:
        w = w + t.route.norm_offset
    return w


def _kept(src: Checkpoint, t: PlannedTensor) -> np.ndarray | None:
    """The bytes of a packed linear written with its own codes, or None when a scale is not a float16
    value (the tensor is then quantized again); the stored GGUF blocks of a linear quantized on a GGUF
    grid, or None when they no longer match the checkpoint's weight."""
    from compress.gguf.quants import from_grid, pack

    if t.blocks is not None:
        return _stored_blocks(src, t)
    q = read_quantized(src, t.packed)
    order = row_order(t.route, q.shape[0])
    if order is not None:
        q = _permuted(q, order)
    gq = from_grid(q, t.gtype)
    return None if gq is None else pack(gq)


def _stored_blocks(src: Checkpoint, t: PlannedTensor) -> np.ndarray | None:
    """The blocks of ``t`` from the extra file, rows in llama.cpp's order, after checking that they
    dequantize to the checkpoint's weight (in its dtype): a weight changed since is not trusted."""
    import torch
    from safetensors import safe_open

    from compress.gguf import quants
    from compress.quantize import GGUF_BLOCKS

    with safe_open(str(src.folder / GGUF_BLOCKS), framework="pt") as fh:
        data = fh.get_tensor(t.source)
    rows, cols = src.info(t.source).shape
    try:
        q = quants.unpack(data.numpy(), t.blocks, (rows, cols))
    except ValueError as exc:
        raise WeightsmithError(src.folder / GGUF_BLOCKS, f"blocks {t.source!r}: {exc}") from None
    dense = src.get(t.source)
    if not torch.equal(quants.dequantize(q).to(dense.dtype), dense):
        log.warning("%s: the stored GGUF blocks no longer match the weight; it is quantized again", t.source)
        return None
    data = data.numpy()
    order = row_order(t.route, rows)
    if order is not None:
        data = data[order]
    return data


def _permuted(q: QuantizedTensor, order: list[int]) -> QuantizedTensor:
    from compress.grid import QuantizedTensor

    return QuantizedTensor(q.codes[order], q.scales[order], q.zeros[order], q.grid, q.shape, q.g_idx)


def _encode(w: torch.Tensor, gtype: str) -> np.ndarray:
    """Float32 values -> the bytes of ``gtype`` (llama.cpp's reference rounding for block types)."""
    from compress.gguf.quants import encode_float

    return encode_float(w, gtype)


def export_gguf(src: Checkpoint, dest: Path, settings: GGUFExportConfig, *, force: bool = False, progress: Any = None) -> Report:
    """Write ``src`` as the GGUF file ``dest`` (a temporary file renamed into place when complete)."""
    start = time.perf_counter()
    dest = Path(dest)
    if dest.exists() and not force:
        raise WeightsmithError(dest, "already exists; pass --force to overwrite it")
    if dest.is_dir():
        raise WeightsmithError(dest, "is a folder; GGUF export writes one file")
    gguf_arch, tensors = plan(src, settings)
    vocab = read_vocab(src.folder, src.config)
    metadata = hparams(gguf_arch, src.config, src.folder / "config.json")

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    requantized: list[str] = []
    try:
        writer = gguf_writer(tmp, gguf_arch, settings, settings.name or src.folder.name, [*metadata, *vocab.items()], tensors)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            data = _kept(src, t) if t.keep_codes else None
            if data is None:
                t.keep_codes = False
                if t.packed is not None or t.blocks is not None:
                    requantized.append(t.source)
                data = _encode(_values(src, t), t.gtype)
            data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
            if data.nbytes != t.nbytes:
                raise RuntimeError(f"{t.route.gguf_name}: {data.nbytes} bytes encoded, {t.nbytes} planned")
            writer.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, len(tensors), t.route.gguf_name)
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if requantized:
        log.warning(
            "%d packed linears were dequantized and rounded again (their grid does not fit the chosen GGUF type, or a scale is not a float16 value): %s%s",
            len(requantized), ", ".join(requantized[:3]), " ..." if len(requantized) > 3 else "",
        )
    return _report(dest, tensors, requantized, time.perf_counter() - start)


def gguf_writer(path: Path, gguf_arch: str, settings: GGUFExportConfig, name: str, kv: Sequence[tuple[str, str, Any]], tensors: Sequence[PlannedTensor]) -> Any:
    """A ``gguf.GGUFWriter`` for ``path`` holding the file's metadata (``general.name`` ``name``, the
    file type, then ``kv``: the architecture's hyperparameters and the vocabulary) and its tensor table,
    nothing written yet: the export writes through it, the size estimate measures its header."""
    import gguf

    writer = gguf.GGUFWriter(path, gguf_arch)
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(mixes.MIXES[_file_type(settings, tensors)].ftype)
    writer.add_quantization_version(_QUANTIZATION_VERSION)
    for key, kind, value in kv:
        _add(writer, key, kind, value)
    for t in tensors:
        writer.add_tensor_info(t.route.gguf_name, _byte_shape(t), np.dtype(np.uint8), t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.gtype.upper()])
    return writer


def _file_type(settings: GGUFExportConfig, tensors: Sequence[PlannedTensor]) -> str:
    """The file type recorded in ``general.file_type``: the asked one, or for ``auto`` the most common
    type of the 2-D tensors."""
    if settings.type != "auto":
        return settings.type
    counts = Counter(t.gtype for t in tensors if len(t.shape) == 2)
    common = counts.most_common(1)[0][0] if counts else "f16"
    return common if common in mixes.MIXES else "f16"


def _byte_shape(t: PlannedTensor) -> tuple[int, ...]:
    """The shape the gguf writer takes for raw bytes: rows x bytes per row (numpy order)."""
    rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
    per_row = t.nbytes // rows
    return (*t.shape[:-1], per_row) if len(t.shape) > 1 else (per_row,)


def _add(writer: Any, key: str, kind: str, value: Any) -> None:
    import gguf

    if kind == "u32":
        writer.add_uint32(key, int(value))
    elif kind == "f32":
        writer.add_float32(key, float(value))
    elif kind == "bool":
        writer.add_bool(key, bool(value))
    elif kind == "str":
        writer.add_string(key, str(value))
    elif kind == "str[]":
        writer.add_array(key, list(value))
    elif kind == "i32[]":
        writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    elif kind == "bool[]":
        writer.add_key_value(key, [bool(v) for v in value], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    elif kind == "f32[]":
        writer.add_key_value(key, [float(v) for v in value], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    else:
        raise ValueError(f"unknown metadata kind {kind!r} for {key}")


def _report(dest: Path, tensors: list[PlannedTensor], requantized: list[str], seconds: float) -> Report:
    params = sum(math.prod(t.shape) for t in tensors)
    quantized = [t for t in tensors if t.gtype not in mixes.FLOAT_TYPES]
    q_params = sum(math.prod(t.shape) for t in quantized)
    bpw = (8 * sum(t.nbytes for t in quantized) / q_params) if q_params else None
    classes: dict[str, Counter] = {}
    for t in tensors:
        classes.setdefault(t.route.leaf, Counter())[t.gtype] += 1
    types = {leaf: ", ".join(f"{g} x{n}" if n > 1 else g for g, n in sorted(c.items())) for leaf, c in classes.items()}
    kept = sum(1 for t in tensors if t.keep_codes)
    extra: dict[str, Any] = {
        "bits_per_weight_all": round(8 * dest.stat().st_size / params, 4),
        "tensors": len(tensors),
        "kept_codes": kept,
        "requantized": len(requantized),
        **{f"type {leaf}": v for leaf, v in types.items()},
    }
    title = "GGUF export" + (f" ({kept} linears with their own codes)" if kept else "")
    return Report("gguf", dest, bytes_written=dest.stat().st_size, parameters=params, bits_per_weight=bpw, seconds=seconds, extra=extra, title=title)


def run(inputs: Sequence[Checkpoint], dest: Path, settings: GGUFExportConfig, runtime: Runtime) -> Report:
    """The export pass as the registry runs it (:mod:`weightsmith.passes`)."""
    return export_gguf(inputs[0], dest, settings, force=runtime.force, progress=runtime.progress)
