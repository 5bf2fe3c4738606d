"""compressed-tensors' sparse storage layouts, written and read without compressed-tensors.

Three layouts of one pruned linear ``{module}`` (names as compressed-tensors 0.14.0.1, the last
release that has the compressors, writes them; 0.15 removed them, see "Who reads these" below):

* ``sparse-bitmask`` (any sparsity), ``BitmaskCompressor``: the weight is replaced by

  - ``{module}.shape``: int64 ``[2]`` = ``(out, in)``;
  - ``{module}.compressed``: the non-zero values in row-major order, 1-D, in the weight's dtype;
  - ``{module}.bitmask``: uint8 ``[out, ceil(in / 8)]``, bit ``j % 8`` (least significant first)
    of byte ``j // 8`` set when column ``j`` of the row is non-zero (``numpy.packbits`` with
    ``bitorder="little"``); padding bits are 0;
  - ``{module}.row_offsets``: int64 ``[out]``, the index in ``compressed`` of each row's first value.

  A value counts as zero when it compares equal to 0, so ``-0.0`` is dropped and comes back ``+0.0``.

* ``sparse-24-bitmask`` (2:4), ``Sparse24BitMaskCompressor``: exactly two values of every four
  consecutive weights of a row are kept, so the values form a matrix:

  - ``{module}.shape``: int64 ``[2, 1]`` = ``(out, in)`` as a column;
  - ``{module}.compressed``: ``[out, in / 2]`` in the weight's dtype, the two kept values of each
    group of four in column order;
  - ``{module}.bitmask``: uint8 ``[out, ceil(in / 8)]`` as above, marking the kept positions.

  A group with fewer than two non-zeros keeps zeros as placeholders, at the positions the library
  picks (``torch.topk`` of the magnitudes on CPU): none -> positions 2, 3; a lone non-zero at 0 ->
  0, 2; at 1 -> 1, 3; at 2 or 3 -> 2, 3. A group with more than two non-zeros is refused (the
  library would silently drop the smallest).

* ``marlin-24`` (2:4 and 4- or 8-bit symmetric codes), ``Marlin24Compressor``, the layout of the
  Marlin 2:4 sparse kernel (Frantar, Castro et al., "MARLIN: Mixed-Precision Auto-Regressive
  Parallel Inference on Large Language Models", https://arxiv.org/abs/2408.11743; 2:4 on tensor
  cores: Mishra et al., https://arxiv.org/abs/2104.08378). With ``s = code - 2**(bits-1)``:

  1. each group of four signed codes keeps two positions ``i0 < i1`` (the non-zeros, padded with
     zero placeholders as CUTLASS encodes them: :data:`_CUTLASS_PAIR`), giving values
     ``[out, in / 2]`` and one 4-bit metadata nibble ``i0 | i1 << 2`` per group;
  2. ``{module}.meta``: int16; four nibbles per int16 (16 columns), the ``[out, in / 16]`` matrix
     reordered into CUTLASS's interleaved column-major tile order (:func:`_meta_order`), and the
     buffer then read as ``[in / 32, 2 * out]``;
  3. ``{module}.weight_packed``: int32 ``[in / 32, out * bits / 2]``: the values
     transposed to ``[in / 2, out]``, shifted to unsigned (``+ 2**(bits-1)``), cut in 16x16 tiles
     laid out tile row by tile row, each run of 1024 entries permuted to the tensor-core fragment
     order (:func:`_tile_permutation`), then ``32 / bits`` entries per int32, entry ``i`` of a
     word at bits ``bits * i``;
  4. ``{module}.scale_packed``: float16 ``[n_groups, out]``: the scales transposed; for group size
     128 with ``in / 2 > 128`` every run of 64 is reordered (:data:`_SCALE_ORDER`), otherwise left
     as is.

  No ``weight_shape`` is written (the library does not write one): ``out`` is the width of
  ``scale_packed`` and ``in`` 32 times the rows of ``weight_packed``. The kernel takes float16
  activations and scales, group size 128 or one scale per output channel, and widths that are
  multiples of 128 on both sides; those are the shapes :func:`marlin24_reason` accepts.

Who reads these. compressed-tensors 0.15 (2026-04) removed all three compressors; transformers
releases that need compressed-tensors >= 0.15 (the one installed here) ignore ``sparsity_config``:
they load such a checkpoint with the pruned linears missing, i.e. randomly initialized, and only
warn. transformers 5.3 with compressed-tensors 0.14.0.1 loads ``sparse-24-bitmask``; its
``sparse-bitmask`` loading fails on any checkpoint (the library cannot compress the meta tensors
transformers builds the model with; transformers 4.57.6 fails the same way), though the library's
own decompressor reads the files. The library never had a decompressor for ``marlin-24``. vLLM dropped
``marlin-24`` in 2026-01 (vllm#32688) and the ``sparse-24-bitmask`` integration in 2026-03
(vllm#36799, "Sparse24 models are no longer supported by vLLM" from v0.19.1). The stacked layout the library also wrote (``sparse-24-bitmask`` over
``int-quantized`` / ``float-quantized`` 8-bit weights) served only W8A8 models with quantized
activations, which weightsmith does not make; for weight-only 2:4 codes ``marlin-24`` was the one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from compress.grid import QuantGrid, QuantizedTensor
from compress.pack import quantization_config as packed_quantization_config
from compress.prune.config import NM

__all__ = [
    "LEGACY_VERSION",
    "MARLIN_24",
    "SPARSE_24_BITMASK",
    "SPARSE_BITMASK",
    "SparseLinear",
    "bitmask_compress",
    "bitmask_decompress",
    "marlin24_compress",
    "marlin24_decompress",
    "marlin24_quantization_config",
    "marlin24_reason",
    "model_format",
    "pack_mask",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse_linear",
    "sparse_quantization_config",
    "sparsity_config",
    "stored_bytes",
    "unpack_mask",
]

SPARSE_BITMASK = "sparse-bitmask"
SPARSE_24_BITMASK = "sparse-24-bitmask"
MARLIN_24 = "marlin-24"
LEGACY_VERSION = "0.14.0.1"
"""The last compressed-tensors release with these compressors (recorded in the config block)."""

TWO_FOUR = NM(2, 4)

# ---- bit masks ---------------------------------------------------------------------------------


def pack_mask(mask: Tensor) -> Tensor:
    """Bool ``[rows, cols]`` -> uint8 ``[rows, ceil(cols / 8)]``; column ``j`` is bit ``j % 8`` of
    byte ``j // 8`` (least significant bit first), padding bits 0."""
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"expected a 2-D bool mask, got {mask.dtype} {tuple(mask.shape)}")
    rows, cols = mask.shape
    n_bytes = math.ceil(cols / 8)
    padded = torch.nn.functional.pad(mask.to(torch.int32), (0, n_bytes * 8 - cols))
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int32, device=mask.device)
    return (padded.view(rows, n_bytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_mask(packed: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_mask`: uint8 ``[rows, ceil(cols / 8)]`` -> bool ``[rows, cols]``."""
    if packed.ndim != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"expected a 2-D uint8 bitmask, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != math.ceil(cols / 8):
        raise ValueError(f"bitmask has {packed.shape[1]} bytes per row; {cols} columns need {math.ceil(cols / 8)}")
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :cols].bool()


def _check_weight(weight: Tensor) -> None:
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight [out, in], got {weight.dtype} {tuple(weight.shape)}")


def _shape(tensor: Tensor, name: str) -> tuple[int, int]:
    if tensor.is_floating_point() or tensor.numel() != 2:
        raise ValueError(f"{name} must hold two integers, got {tensor.dtype} {tuple(tensor.shape)}")
    out, inp = (int(v) for v in tensor.flatten().tolist())
    if out < 1 or inp < 1:
        raise ValueError(f"{name} must be positive, got {(out, inp)}")
    return out, inp


def _get(tensors: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in tensors:
        raise ValueError(f"missing tensor {name}")
    return tensors[name]


# ---- sparse-bitmask ----------------------------------------------------------------------------


def bitmask_compress(weight: Tensor) -> dict[str, Tensor]:
    """The ``sparse-bitmask`` tensors of ``weight`` ``[out, in]``: ``shape``, ``compressed``,
    ``bitmask``, ``row_offsets`` (names relative to the module; see the module docstring)."""
    _check_weight(weight)
    keep = weight != 0
    counts = keep.sum(dim=1)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": weight[keep].contiguous(),
        "bitmask": pack_mask(keep),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def bitmask_decompress(tensors: Mapping[str, Tensor]) -> Tensor:
    """The dense weight from its ``sparse-bitmask`` tensors (checked: they may be untrusted)."""
    out, inp = _shape(_get(tensors, "shape"), "shape")
    values = _get(tensors, "compressed")
    if values.ndim != 1 or not values.is_floating_point():
        raise ValueError(f"compressed must be a 1-D float tensor, got {values.dtype} {tuple(values.shape)}")
    keep = unpack_mask(_get(tensors, "bitmask"), inp)
    if keep.shape[0] != out:
        raise ValueError(f"bitmask has {keep.shape[0]} rows, shape says {out}")
    if int(keep.sum()) != values.numel():
        raise ValueError(f"bitmask marks {int(keep.sum())} values, compressed holds {values.numel()}")
    offsets = _get(tensors, "row_offsets")
    counts = keep.sum(dim=1)
    if offsets.shape != (out,) or not torch.equal(offsets.to(torch.int64), torch.cumsum(counts, 0) - counts):
        raise ValueError("row_offsets do not match the bitmask")
    dense = torch.zeros((out, inp), dtype=values.dtype)
    dense[keep] = values
    return dense


# ---- sparse-24-bitmask -------------------------------------------------------------------------


def _group_masks(weight: Tensor) -> Tensor:
    """``weight != 0`` as 4-bit numbers ``[out, in / 4]``: bit ``p`` set when position ``p`` of
    the group is non-zero."""
    nonzero = (weight != 0).view(weight.shape[0], -1, 4).to(torch.int64)
    return (nonzero << torch.arange(4, device=weight.device)).sum(-1)


def _first_violation(counts: Tensor) -> tuple[int, int]:
    row, group = (int(v) for v in torch.nonzero(counts > 2)[0])
    return row, group * 4


def _pair_table(pairs: Mapping[int, tuple[int, int]]) -> Tensor:
    """16 x 2 LongTensor: for each 4-bit non-zero mask, the two positions kept."""
    table = torch.full((16, 2), -1, dtype=torch.int64)
    for mask, pair in pairs.items():
        table[mask] = torch.tensor(pair)
    return table


def _kept_pairs(placeholders: Mapping[int, tuple[int, int]]) -> Tensor:
    """The kept pair for every mask: its two non-zeros, or the placeholder rule for fewer."""
    pairs = {}
    for mask in range(16):
        ones = [p for p in range(4) if mask >> p & 1]
        if len(ones) == 2:
            pairs[mask] = (ones[0], ones[1])
        elif len(ones) < 2:
            pairs[mask] = placeholders[mask]
    return _pair_table(pairs)


#: sparse-24-bitmask placeholders (compressed-tensors' topk on CPU): mask -> kept positions.
_TOPK_PAIR = _kept_pairs({0b0000: (2, 3), 0b0001: (0, 2), 0b0010: (1, 3), 0b0100: (2, 3), 0b1000: (2, 3)})
#: marlin-24 placeholders (CUTLASS's metadata encoding of fewer than two non-zeros).
_CUTLASS_PAIR = _kept_pairs({0b0000: (2, 3), 0b0001: (0, 2), 0b0010: (1, 2), 0b0100: (2, 3), 0b1000: (2, 3)})


def _two_four_pairs(nonzero_groups: Tensor, table: Tensor, what: str) -> Tensor:
    """LongTensor ``[out, in / 4, 2]``: the two kept positions of each group; refuses a group with
    more than two non-zeros."""
    counts = sum((nonzero_groups >> p) & 1 for p in range(4))
    if bool((counts > 2).any()):
        row, col = _first_violation(counts)
        raise ValueError(f"{what} is not 2:4 sparse: row {row}, columns {col}..{col + 3} hold more than two non-zeros")
    return table.to(nonzero_groups.device)[nonzero_groups]


def sparse24_compress(weight: Tensor) -> dict[str, Tensor]:
    """The ``sparse-24-bitmask`` tensors of a 2:4-sparse ``weight`` ``[out, in]`` (``in`` a
    multiple of 4): ``shape``, ``compressed``, ``bitmask``. A weight with more than two non-zeros
    in a group of four raises ``ValueError``."""
    _check_weight(weight)
    out, inp = weight.shape
    if inp % 4:
        raise ValueError(f"2:4 sparsity needs a width that is a multiple of 4, got {inp}")
    pairs = _two_four_pairs(_group_masks(weight), _TOPK_PAIR, "the weight")
    keep = torch.zeros((out, inp // 4, 4), dtype=torch.bool, device=weight.device)
    keep.scatter_(2, pairs, True)
    keep = keep.view(out, inp)
    return {
        "shape": torch.tensor([[out], [inp]], dtype=torch.int64),
        "compressed": weight[keep].view(out, inp // 2).contiguous(),
        "bitmask": pack_mask(keep),
    }


def sparse24_decompress(tensors: Mapping[str, Tensor]) -> Tensor:
    """The dense weight from its ``sparse-24-bitmask`` tensors (checked: they may be untrusted)."""
    out, inp = _shape(_get(tensors, "shape"), "shape")
    values = _get(tensors, "compressed")
    if inp % 4 or values.shape != (out, inp // 2) or not values.is_floating_point():
        raise ValueError(f"compressed is {values.dtype} {tuple(values.shape)}, expected a float tensor {(out, inp // 2)}")
    keep = unpack_mask(_get(tensors, "bitmask"), inp)
    if keep.shape[0] != out or not bool((keep.view(out, -1, 4).sum(-1) == 2).all()):
        raise ValueError("bitmask must mark exactly two of every four columns")
    dense = torch.zeros((out, inp), dtype=values.dtype)
    dense[keep] = values.flatten()
    return dense


# ---- marlin-24 ---------------------------------------------------------------------------------

_TILE = 16
#: Scales of a grouped layer are reordered in runs of 64: 8 runs of [0, 4, 1, 5, 2, 6, 3, 7].
_SCALE_ORDER = torch.tensor([8 * i + j for i in range(8) for j in (0, 4, 1, 5, 2, 6, 3, 7)])
#: Entries of one int32 word, in the order the kernel unpacks them.
_WORD_ORDER = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
MARLIN_GROUP = 128
#: The kernel's smallest thread tile: both widths must be multiples of it.
MARLIN_MIN_WIDTH = 128


def _tile_permutation(bits: int) -> Tensor:
    """The order of the 1024 entries of four 16x16 tiles (laid side by side, row-major 16 x 64)
    that puts the values each of the 32 threads of a warp needs for its tensor-core fragments next
    to each other (the mma.m16n8k16 operand layout), then interleaves each int32 word's entries as
    the kernel's dequantization reads them."""
    lane = torch.arange(32).view(32, 1, 1, 1)
    block = torch.arange(2).view(1, 2, 1, 1)
    quad = lane % 4
    rows = torch.stack([2 * quad, 2 * quad + 1, 2 * (quad + 4), 2 * (quad + 4) + 1], dim=2).view(32, 1, 4, 1)
    step = torch.arange(4).view(1, 1, 1, 4)
    col = lane // 4
    start = 16 * rows + 256 * (col // 2) + 8 * (col % 2) + 4 * block
    # per lane: for each step j, the 8 entries (2 blocks x 4 rows) shifted by j
    order = (start + step).permute(0, 3, 1, 2).reshape(-1)
    interleave = torch.tensor(_WORD_ORDER[bits])
    return order.view(-1, len(interleave))[:, interleave].reshape(-1)


def _meta_order(rows: int, meta_cols: int) -> Tensor:
    """Flat destination of each entry of the ``[rows, meta_cols]`` int16 metadata matrix in the
    layout CUTLASS's sparse tensor-core GEMM reads (``ColumnMajorInterleaved<2>`` after a row
    swizzle within 64-row bands and a transpose of the off-diagonal entries of each 2x2 block;
    CUTLASS ``reorder_meta``, https://github.com/NVIDIA/cutlass, tools/util/host_reorder.h)."""
    r = torch.arange(rows).view(rows, 1).expand(rows, meta_cols)
    c = torch.arange(meta_cols).view(1, meta_cols).expand(rows, meta_cols)
    dst_r = r // 64 * 64 + (r % 2) * 2 + (r % 8) // 4 + (r % 32 % 4) // 2 * 32 + (r % 64) // 8 * 4
    swap = ((dst_r % 2 == 0) & (c % 2 == 1)).long() - ((dst_r % 2 == 1) & (c % 2 == 0)).long()
    dst_r, dst_c = dst_r + swap, c - swap
    return (dst_c // 2 * rows * 2 + dst_r * 2 + dst_c % 2).reshape(-1)


def marlin24_reason(q: QuantizedTensor) -> str | None:
    """Why ``q`` cannot be written as ``marlin-24``, or None when it can."""
    out, inp = q.shape
    grid = q.grid
    if grid.bits not in _WORD_ORDER:
        return f"marlin-24 holds 4- or 8-bit codes, not {grid.bits}-bit"
    if not grid.symmetric:
        return "marlin-24 holds symmetric grids only (no zero points)"
    if grid.group_size not in (-1, MARLIN_GROUP):
        return f"marlin-24 takes group size {MARLIN_GROUP} or one scale per output channel, not {grid.group_size}"
    if out % MARLIN_MIN_WIDTH or inp % MARLIN_MIN_WIDTH:
        return f"marlin-24 needs both widths to be multiples of {MARLIN_MIN_WIDTH}, got {out} x {inp}"
    if q.g_idx is not None and not torch.equal(q.g_idx, grid.group_index(inp, device=q.g_idx.device)):
        return "marlin-24 cannot hold a column permutation (g_idx)"
    if not torch.equal(q.scales.to(torch.float16).to(q.scales.dtype), q.scales):
        return "marlin-24 stores float16 scales; these scales are not all float16 values"
    return None


def _signed(q: QuantizedTensor) -> Tensor:
    return q.codes.to(torch.int32) - q.grid.midpoint


def _grouped_scales(grid: QuantGrid, inp: int) -> bool:
    """Whether the scales are reordered: group size 128 below half the input width."""
    return grid.group_size != -1 and grid.group_size < inp // 2


def marlin24_compress(q: QuantizedTensor) -> dict[str, Tensor]:
    """The ``marlin-24`` tensors (``weight_packed``, ``scale_packed``, ``meta``) of a 2:4-sparse
    :class:`QuantizedTensor`; see the module docstring. Refuses (``ValueError``) what
    :func:`marlin24_reason` names and codes that are not 2:4 (more than two non-zero signed codes
    in a group of four)."""
    reason = marlin24_reason(q)
    if reason is not None:
        raise ValueError(reason)
    out, inp = q.shape
    bits = q.grid.bits
    signed = _signed(q)
    groups = _group_masks(signed)
    pairs = _two_four_pairs(groups, _CUTLASS_PAIR, "the quantized weight")
    kept = signed.view(out, inp // 4, 4).gather(2, pairs).view(out, inp // 2)
    nibbles = (pairs[..., 0] | pairs[..., 1] << 2).view(out, inp // 16, 4)
    words = (nibbles << torch.tensor([0, 4, 8, 12])).sum(-1)
    meta_matrix = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)
    meta = torch.empty(out * (inp // 16), dtype=torch.int16)
    meta[_meta_order(out, inp // 16)] = meta_matrix.reshape(-1)

    k, n = inp // 2, out
    unsigned = (kept.t() + q.grid.midpoint).to(torch.int64)
    tiles = unsigned.reshape(k // _TILE, _TILE, n // _TILE, _TILE).permute(0, 2, 1, 3).reshape(k // _TILE, n * _TILE)
    perm = _tile_permutation(bits)
    shuffled = tiles.reshape(-1, perm.numel())[:, perm].reshape(tiles.shape)
    per_word = 32 // bits
    entries = shuffled.view(k // _TILE, -1, per_word) << (bits * torch.arange(per_word))
    packed = entries.sum(-1)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)

    scales = q.scales.to(torch.float16).t().contiguous()
    order = _SCALE_ORDER if _grouped_scales(q.grid, inp) else torch.arange(_SCALE_ORDER.numel())
    scales = scales.reshape(-1, order.numel())[:, order].reshape(-1, n).contiguous()
    return {
        "weight_packed": packed.contiguous(),
        "scale_packed": scales,
        "meta": meta.view(inp // 32, 2 * out),
    }


def marlin24_decompress(tensors: Mapping[str, Tensor], grid: QuantGrid) -> QuantizedTensor:
    """Inverse of :func:`marlin24_compress`: the codes (2:4, with their zeros) and float16 scales."""
    if grid.bits not in _WORD_ORDER or not grid.symmetric or grid.group_size not in (-1, MARLIN_GROUP):
        raise ValueError(f"marlin-24 holds 4- or 8-bit symmetric grids with group size {MARLIN_GROUP} or -1, not {grid}")
    packed = _get(tensors, "weight_packed")
    scales = _get(tensors, "scale_packed")
    meta = _get(tensors, "meta")
    bits = grid.bits
    per_word = 32 // bits
    if packed.dtype != torch.int32 or packed.ndim != 2 or scales.dtype != torch.float16 or scales.ndim != 2:
        raise ValueError("weight_packed must be 2-D int32 and scale_packed 2-D float16")
    out, inp = scales.shape[1], packed.shape[0] * 32
    n_groups = grid.n_groups(inp)
    if packed.shape[1] != out * _TILE // per_word or scales.shape[0] != n_groups or meta.dtype != torch.int16 or meta.shape != (inp // 32, 2 * out):
        raise ValueError(f"marlin-24 tensors do not agree with a {out} x {inp} weight")
    k, n = inp // 2, out
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shuffled = ((words.unsqueeze(-1) >> (bits * torch.arange(per_word))) & ((1 << bits) - 1)).reshape(k // _TILE, n * _TILE)
    perm = _tile_permutation(bits)
    tiles = torch.empty_like(shuffled).view(-1, perm.numel())
    tiles[:, perm] = shuffled.reshape(-1, perm.numel())
    unsigned = tiles.reshape(k // _TILE, n // _TILE, _TILE, _TILE).permute(0, 2, 1, 3).reshape(k, n)
    kept = (unsigned - grid.midpoint).t().view(out, inp // 4, 2)

    words16 = meta.reshape(-1)[_meta_order(out, inp // 16)].to(torch.int64) & 0xFFFF
    nibbles = (words16.view(out, inp // 16, 1) >> torch.tensor([0, 4, 8, 12])) & 0xF
    nibbles = nibbles.view(out, inp // 4)
    pairs = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
    if bool((pairs[..., 0] >= pairs[..., 1]).any()):
        raise ValueError("meta holds an invalid 2:4 position pair")
    signed = torch.zeros((out, inp // 4, 4), dtype=torch.int64)
    signed.scatter_(2, pairs, kept)
    codes = (signed.view(out, inp) + grid.midpoint).to(torch.uint8)

    order = _SCALE_ORDER if _grouped_scales(grid, inp) else torch.arange(_SCALE_ORDER.numel())
    flat = torch.empty_like(scales).view(-1, order.numel())
    flat[:, order] = scales.reshape(-1, order.numel())
    col_scales = flat.reshape(n_groups, out).t().contiguous()
    zeros = torch.full((out, n_groups), grid.midpoint, dtype=torch.uint8)
    return QuantizedTensor(codes=codes, scales=col_scales, zeros=zeros, grid=grid, shape=(out, inp))


# ---- one linear, as the prune pass writes it ---------------------------------------------------


@dataclass(frozen=True)
class SparseLinear:
    """What one linear becomes in a sparse checkpoint: its tensors (full names) and the bytes
    saved against its dense weight (negative when the layout is larger, e.g. little sparsity)."""

    tensors: dict[str, Tensor]
    bytes_saved: int


def stored_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of tensor data."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def model_format(patterns: Iterable[NM | None], quantized: bool = False) -> str:
    """The one sparse format for a checkpoint whose pruned linears have these patterns:
    ``marlin-24`` for quantized 2:4 codes, ``sparse-24-bitmask`` when every linear is 2:4,
    ``sparse-bitmask`` otherwise (compressed-tensors has one sparsity format per checkpoint)."""
    patterns = list(patterns)
    two_four = bool(patterns) and all(p == TWO_FOUR for p in patterns)
    if quantized:
        if not two_four:
            raise ValueError("quantized sparse weights are stored as marlin-24, which needs 2:4 in every linear; use pack-quantized otherwise")
        return MARLIN_24
    return SPARSE_24_BITMASK if two_four else SPARSE_BITMASK


def sparse_linear(
    module: str,
    weight: Tensor | QuantizedTensor,
    pattern: NM | None,
    fmt: str | None = None,
) -> SparseLinear:
    """The tensors to hand to ``CheckpointWriter.add`` for the pruned linear ``module`` (its
    weight replaced; a bias is the caller's to copy) and the bytes saved against the dense weight
    (``out * in`` values in the weight's dtype, or the scales' dtype for quantized codes).

    ``fmt`` is the checkpoint's format (:func:`model_format`); None picks it from this linear
    alone: ``sparse-24-bitmask`` for a 2:4 float weight, ``sparse-bitmask`` for any other,
    ``marlin-24`` for quantized codes."""
    if isinstance(weight, QuantizedTensor):
        fmt = fmt or MARLIN_24
        if fmt != MARLIN_24:
            raise ValueError(f"{module}: quantized codes are stored as {MARLIN_24}, not {fmt}")
        if pattern != TWO_FOUR:
            raise ValueError(f"{module}: {MARLIN_24} needs the 2:4 pattern, got {pattern or 'unstructured'}")
        try:
            local = marlin24_compress(weight)
        except ValueError as exc:
            raise ValueError(f"{module}: {exc}") from None
        dense = weight.shape[0] * weight.shape[1] * weight.scales.element_size()
    else:
        fmt = fmt or (SPARSE_24_BITMASK if pattern == TWO_FOUR else SPARSE_BITMASK)
        compress = {SPARSE_BITMASK: bitmask_compress, SPARSE_24_BITMASK: sparse24_compress}.get(fmt)
        if compress is None:
            raise ValueError(f"{module}: a float weight is stored as {SPARSE_BITMASK} or {SPARSE_24_BITMASK}, not {fmt}")
        try:
            local = compress(weight)
        except ValueError as exc:
            raise ValueError(f"{module}: {exc}") from None
        dense = weight.numel() * weight.element_size()
    tensors = {f"{module}.{name}": tensor for name, tensor in local.items()}
    return SparseLinear(tensors=tensors, bytes_saved=dense - stored_bytes(local))


# ---- config.json -------------------------------------------------------------------------------


def sparsity_config(
    fmt: str,
    targets: Sequence[str],
    ignore: Sequence[str] = ("lm_head",),
    *,
    global_sparsity: float,
    structure: NM | None,
) -> dict[str, Any]:
    """The ``sparsity_config`` entry of ``quantization_config``, as compressed-tensors 0.14 dumps
    its ``SparsityCompressionConfig``. ``targets`` are module names (or classes, ``re:`` patterns);
    ``global_sparsity`` is informational (the share of zeros over the targets)."""
    if fmt not in (SPARSE_BITMASK, SPARSE_24_BITMASK, "dense"):
        raise ValueError(f"sparsity format must be {SPARSE_BITMASK}, {SPARSE_24_BITMASK} or dense, got {fmt!r}")
    if not targets:
        raise ValueError("targets must name at least one module")
    return {
        "format": fmt,
        "targets": list(targets),
        "ignore": list(ignore),
        "global_sparsity": float(global_sparsity),
        "sparsity_structure": str(structure) if structure is not None else "unstructured",
        "registry_requires_subclass": False,
    }


def sparse_quantization_config(sparsity: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's ``quantization_config`` for a pruned, unquantized checkpoint in a bitmask
    format: the block compressed-tensors 0.14 writes, which transformers' CompressedTensorsConfig
    reads (no quantization groups, only ``sparsity_config``)."""
    return {
        "quant_method": "compressed-tensors",
        "version": LEGACY_VERSION,
        "sparsity_config": dict(sparsity),
        "transform_config": {},
    }


def marlin24_quantization_config(
    grid: QuantGrid,
    targets: Sequence[str],
    ignore: Sequence[str] = ("lm_head",),
    *,
    global_sparsity: float,
) -> dict[str, Any]:
    """config.json's ``quantization_config`` for 2:4 codes in ``marlin-24``: the ``pack-quantized``
    block (:func:`compress.pack.quantization_config`) with format ``marlin-24``, plus a ``dense``
    sparsity entry declaring the 2:4 structure (the codes carry the sparsity themselves)."""
    if grid.bits not in _WORD_ORDER or not grid.symmetric or grid.group_size not in (-1, MARLIN_GROUP):
        raise ValueError(f"marlin-24 holds 4- or 8-bit symmetric grids with group size {MARLIN_GROUP} or -1, not {grid}")
    block = packed_quantization_config(grid, targets, ignore)
    block["format"] = MARLIN_24
    block["version"] = LEGACY_VERSION
    for group in block["config_groups"].values():
        group["format"] = MARLIN_24
    block["sparsity_config"] = sparsity_config("dense", targets, ignore, global_sparsity=global_sparsity, structure=TWO_FOUR)
    return block
