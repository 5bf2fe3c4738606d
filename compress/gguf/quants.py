"""GGUF tensor types: our representation of a block-quantized tensor, ggml's byte layouts, and
llama.cpp's reference quantizers.

Spec: llama.cpp ``ggml/src/ggml-common.h`` (the ``block_*`` structs) and ``ggml/src/ggml-quants.c``
(``quantize_row_*_ref``, ``quantize_row_*_impl``, ``dequantize_row_*``),
https://github.com/ggml-org/llama.cpp/tree/master/ggml/src; the ``gguf`` package's ``gguf/quants.py`` is
the reference for the dequantizers and the legacy quantizers.

A :class:`GGUFQuant` holds a 2-D weight ``[rows, cols]`` (rows = output features, blocks along each
row) as unsigned integer codes plus each block's parameters. Every value is ``scale * code + offset``
for the scale and offset of its group (the sub-block with its own scale), see :func:`affine`:

==========  ===========================  ======================================================
type        code (stored unsigned)       value, in ggml's float32 order
==========  ===========================  ======================================================
Q8_0        q + 128, 0..255              ``d * (code - 128)``
Q5_0/Q4_0   0..31 / 0..15                ``d * (code - 16)`` / ``d * (code - 8)``
Q5_1/Q4_1   0..31 / 0..15                ``d * code + m``
Q6_K        0..63                        ``(d * sc) * (code - 32)``, ``sc`` int8
Q3_K        0..7 (2 low bits + hmask)    ``(d * sc) * (code - 4)``, ``sc`` in -32..31
Q5_K/Q4_K   0..31 / 0..15                ``(d * sc) * code - (dmin * mn)``, ``sc, mn`` 0..63
Q2_K        0..3                         ``(d * sc) * code - (dmin * mn)``, ``sc, mn`` 0..15
==========  ===========================  ======================================================

``scale * code + offset`` equals ggml's float32 value for every type, bit for bit but for the sign of a
zero: for the types with a min it is the same two operations; for the symmetric ones ``d * sc`` has at
most 18 significant bits and the code at most 6 (Q8_0: 11 and 8), so ``scale * code``, ``-zero * scale``
and their sum are all exact and equal the exact ``scale * (code - zero)``. Only where ``code == zero``
and the scale is negative does ggml produce -0.0 and the affine form +0.0 (equal as numbers).

The reference quantizers (:func:`quantize`) split into :func:`block_params` (each block's scales from
its weights) and :func:`encode` (weights to codes on that fixed grid), so that GPTQ can fix a block's
grid once and then round column by column. Legacy types without importance reproduce
``gguf.quants.quantize`` byte for byte; the K-quant searches live in :mod:`compress.gguf.kquants`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from torch import Tensor

from compress.gguf import kquants

if TYPE_CHECKING:
    from compress.grid import QuantizedTensor

logger = logging.getLogger(__name__)

__all__ = [
    "TYPES",
    "BlockParams",
    "GGUFQuant",
    "GGUFType",
    "affine",
    "assemble",
    "block_params",
    "concat_columns",
    "dequantize",
    "encode",
    "encode_float",
    "from_bytes",
    "from_grid",
    "gguf_type",
    "pack",
    "quantize",
    "to_bytes",
    "unpack",
]


@dataclass(frozen=True)
class GGUFType:
    """One GGUF tensor type.

    ``block_size`` values take ``type_size`` bytes; ``group_size`` values share one scale (the block for
    legacy types, a sub-block for K-quants). Codes are unsigned in ``[0, 2**code_bits - 1]``; ``zero`` is
    the fixed zero point of a symmetric type (value ``scale * (code - zero)``), ``has_min`` marks the
    types with a stored min. ``scale_range`` is the range of a K-quant's integer sub-block scales (and
    mins). ``ref_bias``: the legacy reference rounding ``trunc(v + ref_bias)`` (None: C ``roundf``, Q8_0).
    ``zero_scale_code``: the code given to a value whose group scale is 0 (what ggml writes there).
    ``uses_importance``: whether llama.cpp's quantizer for the type takes an importance matrix."""

    name: str
    gtype: Q
    block_size: int
    type_size: int
    group_size: int
    code_bits: int | None = None
    zero: int | None = None
    has_min: bool = False
    scale_range: tuple[int, int] | None = None
    ref_bias: float | None = None
    zero_scale_code: int = 0
    uses_importance: bool = True

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    @property
    def n_sub(self) -> int:
        """Groups per block."""
        return self.block_size // self.group_size

    @property
    def code_max(self) -> int:
        return (1 << self.code_bits) - 1 if self.code_bits else 0

    @property
    def is_float(self) -> bool:
        return self.code_bits is None

    @property
    def is_k(self) -> bool:
        """A K-quant: super-blocks of 256 with integer sub-block scales."""
        return self.scale_range is not None

    @property
    def scale_dtype(self) -> torch.dtype:
        """dtype of the integer sub-block scales (int8 when they can be negative)."""
        return torch.int8 if self.scale_range and self.scale_range[0] < 0 else torch.uint8


_ROWS = (
    GGUFType("f32", Q.F32, 1, 4, 1),
    GGUFType("f16", Q.F16, 1, 2, 1),
    GGUFType("bf16", Q.BF16, 1, 2, 1),
    GGUFType("q8_0", Q.Q8_0, 32, 34, 32, 8, zero=128, zero_scale_code=128, uses_importance=False),
    GGUFType("q5_0", Q.Q5_0, 32, 22, 32, 5, zero=16, ref_bias=16.5, zero_scale_code=16),
    GGUFType("q5_1", Q.Q5_1, 32, 24, 32, 5, has_min=True, ref_bias=0.5),
    GGUFType("q4_0", Q.Q4_0, 32, 18, 32, 4, zero=8, ref_bias=8.5, zero_scale_code=8),
    GGUFType("q4_1", Q.Q4_1, 32, 20, 32, 4, has_min=True, ref_bias=0.5),
    GGUFType("q6_k", Q.Q6_K, 256, 210, 16, 6, zero=32, scale_range=(-128, 127)),
    GGUFType("q5_k", Q.Q5_K, 256, 176, 32, 5, has_min=True, scale_range=(0, 63)),
    GGUFType("q4_k", Q.Q4_K, 256, 144, 32, 4, has_min=True, scale_range=(0, 63)),
    GGUFType("q3_k", Q.Q3_K, 256, 110, 16, 3, zero=4, scale_range=(-32, 31)),
    GGUFType("q2_k", Q.Q2_K, 256, 84, 16, 2, has_min=True, scale_range=(0, 15)),
)
#: every supported type by name ("q4_k")
TYPES: dict[str, GGUFType] = {t.name: t for t in _ROWS}
_BY_GTYPE: dict[Q, GGUFType] = {t.gtype: t for t in _ROWS}

_K_SEARCH: dict[Q, Callable[[Tensor, Tensor | None], kquants.SuperBlock]] = {
    Q.Q2_K: kquants.q2_k, Q.Q3_K: kquants.q3_k, Q.Q4_K: kquants.q4_k, Q.Q5_K: kquants.q5_k, Q.Q6_K: kquants.q6_k,
}
#: values per chunk of rows in the K-quant searches (bounds the temporaries; the work is elementwise)
_CHUNK = 1 << 18


def gguf_type(t: str | Q | GGUFType) -> GGUFType:
    """The table row of a type given by name (``"q4_k"``, any case), ``GGMLQuantizationType`` or row."""
    if isinstance(t, GGUFType):
        return t
    if isinstance(t, Q):
        row = _BY_GTYPE.get(t)
    else:
        row = TYPES.get(str(t).strip().lower())
    if row is None:
        raise ValueError(f"unsupported GGUF type {t!r}; supported: {', '.join(TYPES)}")
    return row


def _block_type(t: str | Q | GGUFType) -> GGUFType:
    row = gguf_type(t)
    if row.is_float:
        raise ValueError(f"{row.name} is a float type, not a block type; use to_bytes / from_bytes")
    return row


def _check_cols(shape: Sequence[int], t: GGUFType) -> None:
    if len(shape) != 2:
        raise ValueError(f"a {t.name} tensor must be 2-D [rows, cols], got shape {tuple(shape)}")
    if shape[1] % t.block_size or shape[1] == 0:
        raise ValueError(
            f"shape {tuple(shape)} cannot be stored as {t.name}: cols ({shape[1]}) must be a positive multiple of its block size {t.block_size}"
        )


def _check_params(t: GGUFType, rows: int, n_blocks: int, fields: dict[str, Tensor | None]) -> None:
    """Which block parameters type ``t`` has, their dtypes, shapes and integer ranges."""
    per_block = (rows, n_blocks)
    expect: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"d": (torch.float16, per_block)}
    if t.has_min:
        expect["dmin" if t.is_k else "m"] = (torch.float16, per_block)
    if t.is_k:
        expect["sub_scales"] = (t.scale_dtype, (rows, n_blocks, t.n_sub))
        if t.has_min:
            expect["sub_mins"] = (torch.uint8, (rows, n_blocks, t.n_sub))
    for name, value in fields.items():
        if name not in expect:
            if value is not None:
                raise ValueError(f"{t.name} has no {name}")
            continue
        dtype, shape = expect[name]
        if value is None:
            raise ValueError(f"{t.name} needs {name}")
        if value.dtype != dtype or tuple(value.shape) != shape:
            raise ValueError(f"{t.name} {name} must be {dtype} {shape}, got {value.dtype} {tuple(value.shape)}")
        if name.startswith("sub_") and value.numel():
            lo, hi = t.scale_range if name == "sub_scales" else (0, t.scale_range[1])
            if int(value.min()) < lo or int(value.max()) > hi:
                raise ValueError(f"{t.name} {name} must lie in [{lo}, {hi}]")


@dataclass(frozen=True, eq=False)
class BlockParams:
    """The parameters of consecutive blocks of ``rows`` rows, without their codes (see :class:`GGUFQuant`
    for the fields). ``round_inv_scale`` / ``round_min`` (float32 ``[rows, n_blocks]``) are set only by
    the legacy reference quantizer: ggml's ``quantize_row_q*_ref`` rounds with the reciprocal of the
    float32 scale and the float32 min before their float16 rounding, and :func:`encode` uses them so
    that :func:`quantize` reproduces ``gguf.quants.quantize``. Without them codes are the nearest points
    of the stored grid, as in ggml's last K-quant pass."""

    gtype: Q
    d: Tensor
    m: Tensor | None = None
    dmin: Tensor | None = None
    sub_scales: Tensor | None = None
    sub_mins: Tensor | None = None
    round_inv_scale: Tensor | None = None
    round_min: Tensor | None = None

    def __post_init__(self) -> None:
        t = _block_type(self.gtype)
        object.__setattr__(self, "gtype", t.gtype)
        if self.d.ndim != 2:
            raise ValueError(f"d must be [rows, n_blocks], got shape {tuple(self.d.shape)}")
        rows, n_blocks = self.d.shape
        _check_params(t, rows, n_blocks, {"d": self.d, "m": self.m, "dmin": self.dmin, "sub_scales": self.sub_scales, "sub_mins": self.sub_mins})
        if self.round_inv_scale is not None:
            if t.is_k or self.round_inv_scale.dtype != torch.float32 or tuple(self.round_inv_scale.shape) != (rows, n_blocks):
                raise ValueError(f"round_inv_scale must be float32 {(rows, n_blocks)} and only for legacy types")
            if t.has_min != (self.round_min is not None):
                raise ValueError(f"{t.name} reference rounding {'needs' if t.has_min else 'has no'} round_min")
        elif self.round_min is not None:
            raise ValueError("round_min needs round_inv_scale")
        if self.round_min is not None and (self.round_min.dtype != torch.float32 or tuple(self.round_min.shape) != (rows, n_blocks)):
            raise ValueError(f"round_min must be float32 {(rows, n_blocks)}")

    @property
    def rows(self) -> int:
        return int(self.d.shape[0])

    @property
    def cols(self) -> int:
        return int(self.d.shape[1]) * gguf_type(self.gtype).block_size

    def stored(self) -> BlockParams:
        """The same grid without the reference rounding: :func:`encode` then picks the nearest stored
        grid point (what a column sweep such as GPTQ wants on a legacy type)."""
        return BlockParams(self.gtype, self.d, self.m, self.dmin, self.sub_scales, self.sub_mins)


@dataclass(frozen=True, eq=False)
class GGUFQuant:
    """A 2-D weight ``[rows, cols]`` stored as GGUF block type ``gtype``.

    Fields:
        codes: uint8 ``[rows, cols]``, the unsigned stored code of every value (table in the module doc).
        d: float16 ``[rows, n_blocks]``: the block scale (legacy) or super-block scale (K-quants).
        m: float16 ``[rows, n_blocks]``, Q4_1 / Q5_1 only: the block min, added.
        dmin: float16 ``[rows, n_blocks]``, Q2_K / Q4_K / Q5_K only: the scale of the sub-block mins.
        sub_scales: K-quants only, ``[rows, n_blocks, n_sub]`` integer sub-block scales: int8 for Q6_K
            (-128..127) and Q3_K (the effective -32..31, stored as +32), uint8 otherwise.
        sub_mins: Q2_K / Q4_K / Q5_K only, uint8 ``[rows, n_blocks, n_sub]``.
    """

    gtype: Q
    shape: tuple[int, int]
    codes: Tensor
    d: Tensor
    m: Tensor | None = None
    dmin: Tensor | None = None
    sub_scales: Tensor | None = None
    sub_mins: Tensor | None = None

    def __post_init__(self) -> None:
        t = _block_type(self.gtype)
        object.__setattr__(self, "gtype", t.gtype)
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        _check_cols(shape, t)
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != shape:
            raise ValueError(f"codes must be uint8 {shape}, got {self.codes.dtype} {tuple(self.codes.shape)}")
        if self.codes.numel() and int(self.codes.max()) > t.code_max:
            raise ValueError(f"{t.name} codes must lie in [0, {t.code_max}]")
        n_blocks = shape[1] // t.block_size
        _check_params(t, shape[0], n_blocks, {"d": self.d, "m": self.m, "dmin": self.dmin, "sub_scales": self.sub_scales, "sub_mins": self.sub_mins})

    @property
    def params(self) -> BlockParams:
        """The block parameters without the codes (:func:`encode` with them picks the nearest stored
        grid point)."""
        return BlockParams(self.gtype, self.d, self.m, self.dmin, self.sub_scales, self.sub_mins)


def assemble(params: BlockParams, codes: Tensor) -> GGUFQuant:
    """The tensor with these parameters and codes (uint8 ``[rows, cols]``)."""
    return GGUFQuant(params.gtype, (params.rows, params.cols), codes, params.d, params.m, params.dmin, params.sub_scales, params.sub_mins)


def concat_columns(parts: Sequence[GGUFQuant]) -> GGUFQuant:
    """Tensors of one type and row count side by side (e.g. the blocks a column sweep produced)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    if any(p.gtype != first.gtype or p.shape[0] != first.shape[0] for p in parts):
        raise ValueError("parts must share type and row count")

    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values, 1)

    cols = sum(p.shape[1] for p in parts)
    return GGUFQuant(first.gtype, (first.shape[0], cols), cat("codes"), cat("d"), cat("m"), cat("dmin"), cat("sub_scales"), cat("sub_mins"))


def _group_terms(p: GGUFQuant | BlockParams) -> tuple[Tensor, Tensor | None]:
    """float32 ``[rows, n_groups]``: each group's scale and its min term (Q4_1/Q5_1 ``m``, added;
    K-quant ``dmin * mn``, subtracted; None for symmetric types), computed as ggml does."""
    t = gguf_type(p.gtype)
    d = p.d.float()
    rows = d.shape[0]
    if not t.is_k:
        return d, None if p.m is None else p.m.float()
    dl = (d.unsqueeze(-1) * p.sub_scales.float()).reshape(rows, -1)
    if p.sub_mins is None:
        return dl, None
    return dl, (p.dmin.float().unsqueeze(-1) * p.sub_mins.float()).reshape(rows, -1)


def affine(p: GGUFQuant | BlockParams) -> tuple[Tensor, Tensor]:
    """float32 ``(scale, offset)`` ``[rows, n_groups]`` with every value ``scale * code + offset``: equal to
    what :func:`dequantize` and ggml compute for every type, bit for bit except ggml's -0.0 where a
    negative scale meets the zero code (see the module doc)."""
    t = gguf_type(p.gtype)
    dl, mterm = _group_terms(p)
    if t.zero is not None:
        return dl, dl * float(-t.zero)
    return dl, (-mterm if t.is_k else mterm)


def dequantize(q: GGUFQuant) -> Tensor:
    """float32 ``[rows, cols]``, in ggml's operation order (equal to ``gguf.quants.dequantize`` of
    :func:`pack` bit for bit)."""
    t = gguf_type(q.gtype)
    rows, cols = q.shape
    dl, mterm = _group_terms(q)
    dl = dl.unsqueeze(-1)
    c = q.codes.float().view(rows, cols // t.group_size, t.group_size)
    if t.zero is not None:
        y = dl * (c - t.zero)
    elif t.is_k:
        y = dl * c - mterm.unsqueeze(-1)
    else:
        y = dl * c + mterm.unsqueeze(-1)
    return y.view(rows, cols)


def _round_away(v: Tensor) -> Tensor:
    """C ``roundf`` (half away from zero) exactly, as ``gguf.quants.np_roundf``: ``floor(|v| + 0.5)``
    is wrong just below one half, so the fraction is doubled instead."""
    a = v.abs()
    f = torch.floor(a)
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def encode(w: Tensor, params: BlockParams, start: int = 0) -> Tensor:
    """uint8 codes ``[rows, k]`` of the columns ``start .. start + k`` of the blocks ``params`` describe.

    Rounds as ggml's last pass does: K-quants ``nearest_int(x / (d sc))`` (symmetric) or
    ``nearest_int((x + dmin mn) / (d sc))``, clamped (ggml's ``quantize_row_q*_K_ref``); legacy types
    with ``round_inv_scale`` use the reference formulas of ``quantize_row_q*_ref`` / ``gguf.quants``
    (``trunc(x / d + 8.5)``, ``trunc((x - min) / d + 0.5)``, ``roundf(x / d)`` with the float32 ``1/d``);
    otherwise the nearest code of the stored grid. A value in a group with scale 0 gets
    ``zero_scale_code``."""
    t = gguf_type(params.gtype)
    if w.ndim != 2 or w.shape[0] != params.rows:
        raise ValueError(f"w must be [{params.rows}, k], got {tuple(w.shape)}")
    if start < 0 or start + w.shape[1] > params.cols:
        raise ValueError(f"columns {start}..{start + w.shape[1]} lie outside the {params.cols} the parameters cover")
    rows, k = w.shape
    w = w.float()
    if params.round_inv_scale is not None:
        pick = _per_column(start, k, t.block_size)
        inv = pick(params.round_inv_scale)
        v = (_grouped(w, start, t.block_size) - pick(params.round_min)) * inv if t.has_min else _grouped(w, start, t.block_size) * inv
        codes = _round_away(v) + t.zero if t.ref_bias is None else torch.trunc(v + t.ref_bias)
        return codes.clamp_(0, t.code_max).to(torch.uint8).reshape(rows, k)
    pick = _per_column(start, k, t.group_size)
    dl, mterm = _group_terms(params)
    dl = pick(dl)
    x = _grouped(w, start, t.group_size)
    if t.zero is not None:
        codes = torch.round(x / dl).clamp_(-t.zero, t.code_max - t.zero) + t.zero
    elif t.is_k:
        codes = torch.round((x + pick(mterm)) / dl).clamp_(0, t.code_max)
    else:
        codes = torch.round((x - pick(mterm)) / dl).clamp_(0, t.code_max)
    codes = torch.where(dl == 0, torch.full_like(codes, float(t.zero_scale_code)), codes)
    return codes.to(torch.uint8).reshape(rows, k)


def _aligned(start: int, k: int, group: int) -> bool:
    return start % group == 0 and k % group == 0


def _grouped(w: Tensor, start: int, group: int) -> Tensor:
    """``w [rows, k]`` as ``[rows, k / group, group]`` when the columns are whole groups, else as is."""
    return w.reshape(w.shape[0], -1, group) if _aligned(start, w.shape[1], group) else w


def _per_column(start: int, k: int, group: int) -> Callable[[Tensor], Tensor]:
    """Maps a per-group tensor ``[rows, n_groups]`` onto the columns ``start .. start + k``, shaped to
    broadcast against :func:`_grouped` (``[rows, k / group, 1]``) or gathered per column (``[rows, k]``)."""
    if _aligned(start, k, group):
        g0 = start // group
        return lambda p: p[:, g0 : g0 + k // group].unsqueeze(-1)
    g = torch.arange(start, start + k) // group
    return lambda p: p[:, g]


def _check_weight(w: Tensor, t: GGUFType) -> Tensor:
    _check_cols(tuple(w.shape), t)
    if not w.is_floating_point():
        raise ValueError(f"weights must be floating point, got {w.dtype}")
    w = w.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite")
    return w


def _check_importance(importance: Tensor, cols: int) -> Tensor:
    importance = importance.detach().to(torch.float32)
    if tuple(importance.shape) != (cols,):
        raise ValueError(f"importance must be [{cols}] (one weight per column), got {tuple(importance.shape)}")
    if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
        raise ValueError("importance must be finite and non-negative")
    return importance


def block_params(w: Tensor, gtype: str | Q | GGUFType, importance: Tensor | None = None, *, row_sq_mean: Tensor | None = None) -> BlockParams:
    """The parameters llama.cpp's quantizer chooses for the blocks of ``w [rows, cols]`` (``cols`` a
    multiple of the block size), without the codes (:func:`encode` makes those).

    Without ``importance``: ``quantize_row_<type>_ref`` (legacy: the block's signed absmax / -8, -16 or
    absmax / 127, or (max - min) / 15, 31; K-quants: :mod:`compress.gguf.kquants`). With
    ``importance [cols]`` (per-column weights, llama.cpp's imatrix): ``quantize_row_<type>_impl``; the
    legacy types weigh by ``importance * sqrt(sigma2 + x^2)`` with ``sigma2`` the row's mean square,
    which ``row_sq_mean [rows]`` supplies when ``w`` is only part of the row. Q8_0 ignores importance,
    as llama.cpp does. Deviation: ggml's legacy ``_impl`` keeps the search's codes, rounded on the
    float32 scale; here codes are rounded on the stored float16 grid (never farther from the weights)."""
    t = _block_type(gtype)
    w = _check_weight(w, t)
    if importance is not None:
        importance = _check_importance(importance, w.shape[1])
    if t.is_k:
        return _k_params(w, t, importance)
    if importance is None or not t.uses_importance:
        return _legacy_ref_params(w, t)
    rows, cols = w.shape
    sigma2 = (w * w).sum(-1) / cols if row_sq_mean is None else row_sq_mean.to(torch.float32).reshape(rows)
    x = w.view(rows, -1, t.block_size)
    nmax = t.code_max if t.has_min else t.zero
    d, m = kquants.legacy_weighted(x, importance.view(-1, t.block_size), sigma2[:, None, None], nmax, t.has_min)
    return BlockParams(t.gtype, d.half(), m=None if m is None else m.half())


def _legacy_ref_params(w: Tensor, t: GGUFType) -> BlockParams:
    """``quantize_row_q{4,5}_{0,1}_ref`` / ``q8_0_ref`` block scales in ``gguf.quants``' float32 order."""
    x = w.view(w.shape[0], -1, t.block_size)
    vmin = None
    if t.has_min:
        vmin = x.amin(-1)
        d = (x.amax(-1) - vmin) / float(t.code_max)
    elif t.ref_bias is None:
        d = x.abs().amax(-1) / float(t.zero - 1)
    else:
        d = kquants.signed_absmax(x).squeeze(-1) / float(-t.zero)
    inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    return BlockParams(t.gtype, d.half(), m=None if vmin is None else vmin.half(), round_inv_scale=inv, round_min=vmin)


def _k_params(w: Tensor, t: GGUFType, importance: Tensor | None) -> BlockParams:
    """K-quant super-block parameters, searched a chunk of rows at a time."""
    rows, cols = w.shape
    n_super = cols // t.block_size
    qw = None if importance is None else importance.view(n_super, t.block_size)
    step = max(1, _CHUNK // cols)
    parts = []
    for r0 in range(0, rows, step):
        x = w[r0 : r0 + step].view(-1, n_super, t.block_size)
        parts.append(_K_SEARCH[t.gtype](x, None if qw is None else qw.expand_as(x)))
    d = torch.cat([p.d for p in parts]).half()
    scales = torch.cat([p.scales for p in parts])
    if not t.has_min:
        return BlockParams(t.gtype, d, sub_scales=scales)
    dmin = torch.cat([p.dmin for p in parts]).half()
    return BlockParams(t.gtype, d, dmin=dmin, sub_scales=scales, sub_mins=torch.cat([p.mins for p in parts]))


def quantize(w: Tensor, gtype: str | Q | GGUFType, importance: Tensor | None = None) -> GGUFQuant:
    """llama.cpp's quantizer for ``gtype`` (RTN with its scale searches): ``encode(w, block_params(w))``.
    ``importance [cols]`` selects the imatrix variant (see :func:`block_params`)."""
    t = _block_type(gtype)
    start = time.perf_counter()
    params = block_params(w, t, importance)
    q = assemble(params, encode(w, params))
    logger.debug("quantized %s to %s in %.2fs", tuple(w.shape), t.name, time.perf_counter() - start)
    return q


# ----------------------------------------------------------------------------------------------- bytes


def _half_bytes(h: Tensor) -> Tensor:
    """float16 ``[R, nb]`` -> its little-endian bytes ``[R, nb, 2]``."""
    return h.contiguous().view(torch.uint8).view(*h.shape, 2)


def _half_from(b: Tensor) -> Tensor:
    """uint8 ``[R, nb, 2]`` -> float16 ``[R, nb]`` (bits kept as they are)."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _interleave(c: Tensor, chunks: int, per_byte: int, width: int) -> Tensor:
    """ggml's bit planes: uint8 values ``[..., chunks * per_byte * 32]`` (each below ``2**width``) ->
    bytes ``[..., chunks * 32]``, byte ``32 k + l`` holding value ``(k * per_byte + s) * 32 + l`` at bit
    ``width * s``."""
    v = c.reshape(*c.shape[:-1], chunks, per_byte, 32)
    out = v[..., 0, :].clone()
    for s in range(1, per_byte):
        out |= v[..., s, :] << (width * s)
    return out.reshape(*c.shape[:-1], chunks * 32)


def _deinterleave(b: Tensor, chunks: int, per_byte: int, width: int) -> Tensor:
    """Inverse of :func:`_interleave`."""
    v = b.reshape(*b.shape[:-1], chunks, 1, 32)
    shift = (width * torch.arange(per_byte, dtype=torch.uint8)).view(per_byte, 1)
    return ((v >> shift) & ((1 << width) - 1)).reshape(*b.shape[:-1], chunks * per_byte * 32)


def _lsb_bits(bits: Tensor) -> Tensor:
    """uint8 ``[..., 8 n]`` bits -> ``[..., n]`` bytes, bit ``e`` of the little-endian word at byte ``e // 8``."""
    v = bits.reshape(*bits.shape[:-1], -1, 8)
    out = v[..., 0].clone()
    for b in range(1, 8):
        out |= v[..., b] << b
    return out


def _lsb_unbits(b: Tensor) -> Tensor:
    return ((b.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(*b.shape[:-1], -1)


def _pack_legacy(q: GGUFQuant, t: GGUFType, c: Tensor) -> list[Tensor]:
    """``block_q8_0`` {d, qs[32]}, ``block_q4_0`` {d, qs[16]}, ``block_q4_1`` {d, m, qs}, ``block_q5_0``
    {d, qh[4], qs}, ``block_q5_1`` {d, m, qh, qs}; nibbles hold values ``j`` (low) and ``j + 16`` (high)."""
    parts = [_half_bytes(q.d)]
    if t.has_min:
        parts.append(_half_bytes(q.m))
    if t.code_bits == 8:
        return [*parts, c ^ 0x80]
    if t.code_bits == 5:
        parts.append(_lsb_bits(c >> 4))
    return [*parts, (c[..., :16] & 15) | ((c[..., 16:] & 15) << 4)]


def _unpack_legacy(b: Tensor, t: GGUFType) -> dict[str, Tensor]:
    out = {"d": _half_from(b[..., 0:2])}
    at = 2
    if t.has_min:
        out["m"] = _half_from(b[..., 2:4])
        at = 4
    if t.code_bits == 8:
        out["codes"] = b[..., at:] ^ 0x80
        return out
    high = 0
    if t.code_bits == 5:
        high = _lsb_unbits(b[..., at : at + 4]) << 4
        at += 4
    qs = b[..., at : at + 16]
    out["codes"] = torch.cat([qs & 15, qs >> 4], -1) | high
    return out


def _pack_q2_k(q: GGUFQuant, t: GGUFType, c: Tensor) -> list[Tensor]:
    """``block_q2_K`` {scales[16] (scale | min << 4), qs[64] (2-bit planes), d, dmin}."""
    return [q.sub_scales | (q.sub_mins << 4), _interleave(c, 2, 4, 2), _half_bytes(q.d), _half_bytes(q.dmin)]


def _unpack_q2_k(b: Tensor, t: GGUFType) -> dict[str, Tensor]:
    sc = b[..., :16]
    return {"sub_scales": sc & 15, "sub_mins": sc >> 4, "codes": _deinterleave(b[..., 16:80], 2, 4, 2), "d": _half_from(b[..., 80:82]), "dmin": _half_from(b[..., 82:84])}


def _pack_q3_k(q: GGUFQuant, t: GGUFType, c: Tensor) -> list[Tensor]:
    """``block_q3_K`` {hmask[32] (bit 2 of the codes), qs[64] (low 2 bits), scales[12] (16 6-bit
    ``sc + 32``: low nibbles in bytes 0-7, high 2 bits in bytes 8-11), d}."""
    ls = (q.sub_scales.to(torch.int16) + 32).to(torch.uint8)
    low = (ls[..., :8] & 15) | ((ls[..., 8:] & 15) << 4)
    hi = ((ls >> 4) & 3).reshape(*ls.shape[:-1], 4, 4)  # [..., g, k]: scale 4 g + k
    high = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    return [_interleave((c >> 2) & 1, 1, 8, 1), _interleave(c & 3, 2, 4, 2), low, high, _half_bytes(q.d)]


def _unpack_q3_k(b: Tensor, t: GGUFType) -> dict[str, Tensor]:
    codes = _deinterleave(b[..., 32:96], 2, 4, 2) | (_deinterleave(b[..., :32], 1, 8, 1) << 2)
    low = b[..., 96:104]
    high = (b[..., 104:108].unsqueeze(-2) >> (2 * torch.arange(4, dtype=torch.uint8)).view(4, 1)) & 3
    ls = torch.cat([low & 15, low >> 4], -1) | (high.reshape(*low.shape[:-1], 16) << 4)
    return {"codes": codes, "sub_scales": (ls.to(torch.int16) - 32).to(torch.int8), "d": _half_from(b[..., 108:110])}


def _pack_k4_scales(sc: Tensor, mn: Tensor) -> Tensor:
    """The 12 bytes of eight 6-bit scales and mins (ggml's ``get_scale_min_k4`` layout)."""
    return torch.cat(
        [sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6), (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], -1
    )


def _unpack_k4_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    lo, mid, hi = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], -1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], -1)
    return sc, mn


def _pack_q45_k(q: GGUFQuant, t: GGUFType, c: Tensor) -> list[Tensor]:
    """``block_q4_K`` {d, dmin, scales[12], qs[128]} and ``block_q5_K`` {d, dmin, scales[12], qh[32], qs[128]}:
    each 32 bytes of ``qs`` hold 64 values as low / high nibbles; ``qh`` bit ``s`` of byte ``l`` is bit 4
    of value ``32 s + l``."""
    parts = [_half_bytes(q.d), _half_bytes(q.dmin), _pack_k4_scales(q.sub_scales, q.sub_mins)]
    if t.code_bits == 5:
        parts.append(_interleave(c >> 4, 1, 8, 1))
    return [*parts, _interleave(c & 15, 4, 2, 4)]


def _unpack_q45_k(b: Tensor, t: GGUFType) -> dict[str, Tensor]:
    sc, mn = _unpack_k4_scales(b[..., 4:16])
    codes = _deinterleave(b[..., -128:], 4, 2, 4)
    if t.code_bits == 5:
        codes = codes | (_deinterleave(b[..., 16:48], 1, 8, 1) << 4)
    return {"d": _half_from(b[..., 0:2]), "dmin": _half_from(b[..., 2:4]), "sub_scales": sc, "sub_mins": mn, "codes": codes}


def _pack_q6_k(q: GGUFQuant, t: GGUFType, c: Tensor) -> list[Tensor]:
    """``block_q6_K`` {ql[128], qh[64], scales[16] int8, d}: per half of 128 values, ``ql`` bytes ``l`` and
    ``32 + l`` hold values ``l, 64 + l`` and ``32 + l, 96 + l`` as nibbles; ``qh`` their top 2 bits."""
    lo = (c & 15).reshape(*c.shape[:-1], 2, 2, 2, 32)
    ql = (lo[..., 0, :, :] | (lo[..., 1, :, :] << 4)).reshape(*c.shape[:-1], 128)
    return [ql, _interleave(c >> 4, 2, 4, 2), q.sub_scales.view(torch.uint8), _half_bytes(q.d)]


def _unpack_q6_k(b: Tensor, t: GGUFType) -> dict[str, Tensor]:
    ql = b[..., :128].reshape(*b.shape[:-1], 2, 1, 2, 32)
    low = torch.cat([ql & 15, ql >> 4], -3).reshape(*b.shape[:-1], 256)
    codes = low | (_deinterleave(b[..., 128:192], 2, 4, 2) << 4)
    return {"codes": codes, "sub_scales": b[..., 192:208].contiguous().view(torch.int8), "d": _half_from(b[..., 208:210])}


_LAYOUT: dict[Q, tuple[Callable[[GGUFQuant, GGUFType, Tensor], list[Tensor]], Callable[[Tensor, GGUFType], dict[str, Tensor]]]] = {
    **{g: (_pack_legacy, _unpack_legacy) for g in (Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1)},
    Q.Q2_K: (_pack_q2_k, _unpack_q2_k),
    Q.Q3_K: (_pack_q3_k, _unpack_q3_k),
    Q.Q4_K: (_pack_q45_k, _unpack_q45_k),
    Q.Q5_K: (_pack_q45_k, _unpack_q45_k),
    Q.Q6_K: (_pack_q6_k, _unpack_q6_k),
}


def pack(q: GGUFQuant) -> np.ndarray:
    """uint8 ``[rows, n_blocks * type_size]``: the tensor's bytes in ggml's layout, what a GGUF file
    holds for it (little-endian)."""
    t = gguf_type(q.gtype)
    rows, cols = q.shape
    c = q.codes.reshape(rows, cols // t.block_size, t.block_size)
    blocks = torch.cat(_LAYOUT[t.gtype][0](q, t, c), -1)
    return blocks.reshape(rows, -1).numpy()


def unpack(data: np.ndarray, gtype: str | Q | GGUFType, shape: Sequence[int]) -> GGUFQuant:
    """The :class:`GGUFQuant` whose :func:`pack` is ``data`` (any array of the right number of bytes);
    every byte string is valid, and ``pack(unpack(b)) == b``."""
    t = _block_type(gtype)
    _check_cols(tuple(shape), t)
    rows, cols = int(shape[0]), int(shape[1])
    n_blocks = cols // t.block_size
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != rows * n_blocks * t.type_size:
        raise ValueError(f"{t.name} {tuple(shape)} takes {rows * n_blocks * t.type_size} bytes, got {raw.size}")
    b = torch.from_numpy(raw.copy()).view(rows, n_blocks, t.type_size)
    fields = _LAYOUT[t.gtype][1](b, t)
    codes = fields.pop("codes").reshape(rows, cols).contiguous()
    return GGUFQuant(t.gtype, (rows, cols), codes, **{k: v.contiguous() for k, v in fields.items()})


# ------------------------------------------------------------------------------------- float types


def _bf16_bits(w: Tensor) -> Tensor:
    """int16 bfloat16 bits of ``w`` rounded as ggml's ``ggml_compute_fp32_to_bf16``: round to nearest
    even, NaN kept (sign and top mantissa bits) and made quiet. torch's own cast drops NaN signs."""
    u = w.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    bits = torch.where(nan, (u >> 16) | 64, rounded) & 0xFFFF
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)


def _numpy_f16(w: Tensor) -> np.ndarray:
    """numpy's float16 cast (what llama.cpp's converter uses); magnitudes past 65504 become inf."""
    with np.errstate(over="ignore"):
        return w.to(torch.float32).contiguous().numpy().astype(np.float16)


_FLOAT_ENCODE: dict[Q, Callable[[Tensor], Tensor]] = {
    Q.F32: lambda w: w.to(torch.float32).contiguous(),
    Q.F16: lambda w: torch.from_numpy(_numpy_f16(w)),
    Q.BF16: _bf16_bits,
}
_FLOAT_DECODE: dict[Q, Callable[[Tensor], Tensor]] = {
    Q.F32: lambda b: b.view(torch.float32),
    Q.F16: lambda b: b.view(torch.float16).to(torch.float32),
    Q.BF16: lambda b: (b.view(torch.int16).to(torch.int32) << 16).view(torch.float32),
}


def to_bytes(w: Tensor, gtype: str | Q | GGUFType) -> np.ndarray:
    """uint8 ``[*lead, last * type_size]``: ``w`` as F32, F16 (numpy's cast, as llama.cpp's converter:
    round to nearest even, NaN payload kept) or BF16 (ggml's rounding, NaN kept)."""
    t = gguf_type(gtype)
    if not t.is_float:
        raise ValueError(f"{t.name} is a block type; use pack(quantize(w, ...)) or encode_float")
    if w.ndim == 0:
        raise ValueError("a scalar has no GGUF layout; pass at least 1-D")
    out = _FLOAT_ENCODE[t.gtype](w.detach()).contiguous().view(torch.uint8)
    return out.reshape(*w.shape[:-1], w.shape[-1] * t.type_size).numpy()


def from_bytes(data: np.ndarray, gtype: str | Q | GGUFType, shape: Sequence[int]) -> Tensor:
    """float32 ``shape`` from the bytes of a float-type tensor (inverse of :func:`to_bytes`)."""
    t = gguf_type(gtype)
    if not t.is_float:
        raise ValueError(f"{t.name} is a block type; use dequantize(unpack(...))")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    n = int(np.prod(shape))
    if raw.size != n * t.type_size:
        raise ValueError(f"{t.name} {tuple(shape)} takes {n * t.type_size} bytes, got {raw.size}")
    return _FLOAT_DECODE[t.gtype](torch.from_numpy(raw.copy())).reshape(*shape)


def encode_float(w: Tensor, gtype: str | Q | GGUFType, importance: Tensor | None = None) -> np.ndarray:
    """The bytes of float weights ``w`` (any shape, blocks along the last dimension) as ``gtype``:
    :func:`to_bytes` for float types, ``pack(quantize(...))`` row by row for block types. Returns uint8
    ``[*lead, bytes_per_row]``."""
    t = gguf_type(gtype)
    if t.is_float:
        return to_bytes(w, t)
    if w.ndim == 0:
        raise ValueError("a scalar has no GGUF layout; pass at least 1-D")
    rows = w.reshape(-1, w.shape[-1])
    data = pack(quantize(rows, t, importance))
    return data.reshape(*w.shape[:-1], data.shape[-1])


def from_grid(q: QuantizedTensor, gtype: str | Q | GGUFType) -> GGUFQuant | None:
    """Our grid-quantized tensor as ``gtype`` with its own codes, no re-rounding, or None when the grid
    cannot be written there exactly: only Q8_0 (8-bit symmetric), Q4_0 (4-bit symmetric) and Q4_1
    (4-bit asymmetric) match our grids, every 32-column block must lie inside one group, and the scales
    (and Q4_1's ``-zero * scale``) must be float16 values. Then llama.cpp's ``d * (q - zero)`` /
    ``d * q + m`` equals ``(code - zero) * scale`` exactly."""
    t = gguf_type(gtype)
    if t.is_float or t.is_k or t.code_bits != q.grid.bits or (t.zero is not None) != q.grid.symmetric:
        return None
    rows, cols = q.shape
    if cols % t.block_size:
        return None
    groups = q.column_groups().view(-1, t.block_size)
    if not bool((groups == groups[:, :1]).all()):
        return None
    g = groups[:, 0]
    scale = q.scales[:, g].to(torch.float64)
    d = scale.to(torch.float16)
    if not bool(torch.isfinite(scale).all()) or not bool((d.to(torch.float64) == scale).all()):
        return None
    if t.zero is not None:
        return GGUFQuant(t.gtype, (rows, cols), q.codes.contiguous(), d)
    m = -q.zeros[:, g].to(torch.float64) * scale
    m16 = m.to(torch.float16)
    if not bool((m16.to(torch.float64) == m).all()):
        return None
    return GGUFQuant(t.gtype, (rows, cols), q.codes.contiguous(), d, m=m16)
