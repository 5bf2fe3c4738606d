"""Integer quantization grids and the one internal representation of a quantized weight.

Every algorithm (RTN, GPTQ, AWQ) produces a :class:`QuantizedTensor`, and every on-disk format
(fake-quant dense, compressed-tensors ``pack-quantized``, GGUF) is written from it.

Conventions, shared by all of ``compress``:

* A weight is a 2-D tensor ``[out_features, in_features]``; groups run along the input dimension.
  ``group_size=-1`` means one group per output channel (the whole row). A group size that does not
  divide ``in_features`` gives a shorter last group (``n_groups = ceil(in / group_size)``).
* Codes are unsigned integers in ``[0, 2**bits - 1]``; a weight is ``(code - zero) * scale``.
* Symmetric grids use the fixed zero point ``2**(bits-1)`` and a sign-aware scale,
  ``scale = max(-min / 2**(bits-1), max / (2**(bits-1) - 1))`` (with min <= 0 <= max): the side of the
  group with the larger magnitude lands exactly on its end of the signed range
  ``[-2**(bits-1), 2**(bits-1) - 1]``, so every code is usable and nothing clips (llama.cpp's Q4_0
  picks its scale the same way). compressed-tensors decodes any scale as ``(code - 2**(bits-1)) *
  scale``, so the packed format is unaffected; its own ``calculate_qparams`` uses ``max|w| /
  (2**(bits-1) - 0.5)``, which clips ``+max|w|`` by half a step. On SmolLM2-135M at W4 g64 the
  sign-aware scale halved nothing but the clipping: KL to the base on 4,096 WikiText-2 tokens 0.443,
  against 0.503 for ``2 max|w| / 15`` rounded up and 0.468 rounded to nearest.
* Asymmetric grids first widen the range to contain 0 (as compressed-tensors and GPTQ do, so that 0
  is exactly representable and the zero point is an in-range integer), then
  ``scale = (max - min) / (2**bits - 1)`` and ``zero = round(-min / scale)``.
* Scales are stored in the model dtype. The float scale is rounded *up* to that dtype (never down)
  and floored at the dtype's smallest normal number, so the stored range still covers the group and
  a scale is never 0; codes are always computed from the stored scale, so ``dequantize`` reproduces
  exactly what the algorithms measured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)

__all__ = [
    "SUPPORTED_BITS",
    "QuantGrid",
    "QuantizedTensor",
    "clip_candidates",
    "compute_scale_zero",
    "dequantize",
    "fake_quantize",
    "group_min_max",
    "mse_clip_search",
    "quantize",
    "quantize_codes",
]


@dataclass(frozen=True)
class QuantGrid:
    """An integer weight grid: bit width, symmetry and group size along the input dimension."""

    bits: int
    symmetric: bool
    group_size: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an int, got {self.bits!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ValueError(f"group_size must be an int, got {self.group_size!r}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(
                f"group_size must be a positive int or -1 (one group per output channel), "
                f"got {self.group_size}"
            )

    @property
    def maxq(self) -> int:
        """The largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def midpoint(self) -> int:
        """The fixed zero point of a symmetric grid, ``2**(bits-1)``."""
        return 1 << (self.bits - 1)

    def effective_group_size(self, in_features: int) -> int:
        """The number of input columns per group (``in_features`` for ``group_size=-1``)."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        """``ceil(in_features / group_size)``; 1 for per-channel grids."""
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        return math.ceil(in_features / self.effective_group_size(in_features))

    def is_ragged(self, in_features: int) -> bool:
        """True when the last group is shorter than the others."""
        return in_features % self.effective_group_size(in_features) != 0

    def group_index(self, in_features: int, device: torch.device | None = None) -> Tensor:
        """LongTensor ``[in_features]``: the group of each input column (``j // group_size``)."""
        gs = self.effective_group_size(in_features)
        return torch.arange(in_features, device=device) // gs


@dataclass
class QuantizedTensor:
    """A quantized 2-D weight: integer codes plus per-group scales and zero points.

    Fields:
        codes: ``torch.uint8`` ``[out, in]``, values in ``[0, 2**bits - 1]`` (every supported width
            fits a byte).
        scales: ``[out, n_groups]`` in the model dtype (float16 / bfloat16 / float32 / float64).
        zeros: ``torch.uint8`` ``[out, n_groups]`` integer zero points; ``2**(bits-1)`` everywhere
            for a symmetric grid.
        grid: the grid the codes live on.
        shape: ``(out, in)``.
        g_idx: optional LongTensor ``[in]``: the group of each input column. ``None`` means
            column ``j`` is in group ``j // group_size`` (the only mapping compressed-tensors 0.20
            can express).

    A weight is ``(codes - zeros[:, g]) * scales[:, g]`` for its column's group ``g``.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    grid: QuantGrid
    shape: tuple[int, int]
    g_idx: Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        out, inp = self.shape
        if self.codes.shape != (out, inp):
            raise ValueError(f"codes have shape {tuple(self.codes.shape)}, expected {self.shape}")
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be torch.uint8, got {self.codes.dtype}")
        if not self.scales.is_floating_point():
            raise ValueError(f"scales must be floating point, got {self.scales.dtype}")
        if self.zeros.dtype != torch.uint8:
            raise ValueError(f"zeros must be torch.uint8, got {self.zeros.dtype}")
        if self.g_idx is None:
            n_groups = self.grid.n_groups(inp)
        else:
            if self.g_idx.shape != (inp,) or self.g_idx.dtype != torch.long:
                raise ValueError(
                    f"g_idx must be a LongTensor of shape ({inp},), "
                    f"got {self.g_idx.dtype} {tuple(self.g_idx.shape)}"
                )
            n_groups = self.scales.shape[-1] if self.scales.ndim == 2 else -1
            if inp and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= n_groups):
                raise ValueError(f"g_idx values must lie in [0, {n_groups})")
        if self.scales.shape != (out, n_groups):
            raise ValueError(
                f"scales have shape {tuple(self.scales.shape)}, expected {(out, n_groups)}"
            )
        if self.zeros.shape != (out, n_groups):
            raise ValueError(
                f"zeros have shape {tuple(self.zeros.shape)}, expected {(out, n_groups)}"
            )
        if self.codes.numel() and int(self.codes.max()) > self.grid.maxq:
            raise ValueError(f"codes exceed {self.grid.maxq} for a {self.grid.bits}-bit grid")
        if self.zeros.numel() and int(self.zeros.max()) > self.grid.maxq:
            raise ValueError(f"zero points exceed {self.grid.maxq} for a {self.grid.bits}-bit grid")
        if self.grid.symmetric and bool((self.zeros != self.grid.midpoint).any()):
            raise ValueError(f"a symmetric grid needs every zero point at {self.grid.midpoint}")

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Output rows ``start:stop`` (a linear quantized together with others that share its input)."""
        return QuantizedTensor(
            codes=self.codes[start:stop].contiguous(),
            scales=self.scales[start:stop].contiguous(),
            zeros=self.zeros[start:stop].contiguous(),
            grid=self.grid,
            shape=(stop - start, self.shape[1]),
            g_idx=self.g_idx,
        )

    @property
    def n_groups(self) -> int:
        """The number of scale / zero-point columns."""
        return int(self.scales.shape[1])

    def column_groups(self) -> Tensor:
        """LongTensor ``[in]``: the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx
        return self.grid.group_index(self.shape[1], device=self.codes.device)

    def dequantize(self) -> Tensor:
        """The float weight ``(codes - zero) * scale``, in the scales' dtype.

        Computed the way compressed-tensors does (integer difference cast to the scale dtype, then
        one multiplication), so the two agree bit for bit.
        """
        gidx = self.column_groups()
        return _dequant(self.codes, self.scales[:, gidx], self.zeros[:, gidx])

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight in the ``pack-quantized`` layout.

        Counts the int32-packed codes (each row padded to whole int32 words), the scales in their
        dtype, the int32-packed zero points (asymmetric grids only; packed along the output
        dimension) and an int32 ``g_idx`` when present. The 2-element shape tensor is not counted.
        """
        out, inp = self.shape
        bits = self.grid.bits
        total = out * math.ceil(inp * bits / 32) * 32
        total += out * self.n_groups * torch.finfo(self.scales.dtype).bits
        if not self.grid.symmetric:
            total += math.ceil(out * bits / 32) * 32 * self.n_groups
        if self.g_idx is not None:
            total += inp * 32
        return total / (out * inp)


def _dequant(codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """Elementwise ``(codes - zeros) * scales`` in ``scales.dtype`` (broadcasting shapes)."""
    return (codes.to(scales.dtype) - zeros.to(scales.dtype)) * scales


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_weight(w: Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"expected a non-empty weight, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight contains NaN or infinite values")


def _store_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Round a float scale up to ``dtype``, never to 0: exact-zero ranges get scale 1."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = scale.to(dtype)
    too_small = stored.to(scale.dtype) < scale
    if bool(too_small.any()):
        up = torch.nextafter(stored, torch.full_like(stored, math.inf))
        stored = torch.where(too_small, up, stored)
    return stored.clamp(min=torch.finfo(dtype).tiny)


def compute_scale_zero(
    w_min: Tensor, w_max: Tensor, grid: QuantGrid, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Scales (in ``dtype``) and uint8 zero points for groups with the given min / max.

    See the module docstring for the symmetric and asymmetric conventions. The range is widened to
    contain 0; a group whose range is exactly 0 gets scale 1 (every code is then the zero point).
    """
    if w_min.shape != w_max.shape:
        raise ValueError(f"min/max shapes differ: {tuple(w_min.shape)} vs {tuple(w_max.shape)}")
    work = _work_dtype(dtype)
    lo = torch.clamp(w_min.to(work), max=0.0)
    hi = torch.clamp(w_max.to(work), min=0.0)
    if grid.symmetric:
        # Sign-aware: the side of larger magnitude lands exactly on its end code (-2**(b-1) below
        # zero, 2**(b-1) - 1 above), so the whole code range is used and nothing clips (as llama.cpp's
        # Q4_0 does). The stored scale is rounded up, so the extreme never leaves the range.
        scale = _store_scale(torch.maximum(-lo / grid.midpoint, hi / (grid.maxq - grid.midpoint)), dtype)
        zeros = torch.full(scale.shape, grid.midpoint, dtype=torch.uint8, device=scale.device)
        return scale, zeros
    scale = _store_scale((hi - lo) / grid.maxq, dtype)
    zeros = torch.clamp(torch.round(-lo / scale.to(work)), 0, grid.maxq).to(torch.uint8)
    return scale, zeros


def group_min_max(w: Tensor, group_index: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Per-row, per-group minimum and maximum of ``w`` ``[out, in]`` -> two ``[out, n_groups]``."""
    work = _work_dtype(w.dtype)
    wf = w.to(work)
    idx = group_index.to(w.device).unsqueeze(0).expand_as(wf)
    shape = (wf.shape[0], n_groups)
    w_min = torch.full(shape, math.inf, dtype=work, device=w.device)
    w_max = torch.full(shape, -math.inf, dtype=work, device=w.device)
    w_min = w_min.scatter_reduce(1, idx, wf, reduce="amin", include_self=True)
    w_max = w_max.scatter_reduce(1, idx, wf, reduce="amax", include_self=True)
    return w_min, w_max


def quantize_codes(w: Tensor, scales: Tensor, zeros: Tensor, grid: QuantGrid) -> Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as uint8 (scales/zeros broadcast to w)."""
    work = _work_dtype(scales.dtype)
    q = torch.round(w.to(work) / scales.to(work)) + zeros.to(work)
    return torch.clamp(q, 0, grid.maxq).to(torch.uint8)


def _check_clip(clip: Tensor, shape: tuple[int, int]) -> None:
    if clip.shape != shape:
        raise ValueError(f"clip has shape {tuple(clip.shape)}, expected {shape}")
    if bool(((clip <= 0) | (clip > 1) | ~torch.isfinite(clip)).any()):
        raise ValueError("clip ratios must lie in (0, 1]")


def quantize(w: Tensor, grid: QuantGrid, clip: Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest quantization of ``w`` ``[out, in]`` on ``grid``.

    ``clip`` (``[out, n_groups]``, values in (0, 1]) shrinks each group's min and max before the
    scale is computed (see :func:`mse_clip_search`); values outside the shrunk range saturate.
    Scales come out in ``w.dtype``.
    """
    _check_weight(w)
    scales, zeros, gidx = _group_params(w, grid, clip)
    codes = quantize_codes(w, scales[:, gidx], zeros[:, gidx], grid)
    return QuantizedTensor(codes=codes, scales=scales, zeros=zeros, grid=grid, shape=tuple(w.shape))


def _group_params(w: Tensor, grid: QuantGrid, clip: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group scales and zero points of ``w`` (clipped by ``clip``), and each column's group."""
    out, inp = w.shape
    n_groups = grid.n_groups(inp)
    gidx = grid.group_index(inp, device=w.device)
    w_min, w_max = group_min_max(w, gidx, n_groups)
    if clip is not None:
        _check_clip(clip, (out, n_groups))
        ratio = clip.to(device=w.device, dtype=w_min.dtype)
        w_min, w_max = w_min * ratio, w_max * ratio
    scales, zeros = compute_scale_zero(w_min, w_max, grid, w.dtype)
    return scales, zeros, gidx


def dequantize(q: QuantizedTensor) -> Tensor:
    """The float weight of ``q``, in its scales' dtype (same as ``q.dequantize()``)."""
    return q.dequantize()


def fake_quantize(w: Tensor, grid: QuantGrid, clip: Tensor | None = None) -> Tensor:
    """Quantize then dequantize ``w``; the result has ``w``'s dtype and shape. Equal to
    ``quantize(w, grid, clip).dequantize()``, without building (and validating) the codes object,
    since search loops call it many times."""
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight [out, in], got {w.dtype} {tuple(w.shape)}")
    scales, zeros, gidx = _group_params(w, grid, clip)
    grouped = _grouped(w, grid)
    if grouped is not None:
        return _grouped_fake_quant(grouped, scales, zeros, grid).reshape(w.shape).to(w.dtype)
    s_cols, z_cols = scales[:, gidx], zeros[:, gidx]
    return _dequant(quantize_codes(w, s_cols, z_cols, grid), s_cols, z_cols).to(w.dtype)


def _grouped(w: Tensor, grid: QuantGrid) -> Tensor | None:
    """``w`` as float32 ``[out, n_groups, group]`` when its groups are equal and float32 is the
    working precision (the fast path of the search loops), else None."""
    out, inp = w.shape
    if grid.is_ragged(inp) or _work_dtype(w.dtype) != torch.float32:
        return None
    return w.to(torch.float32).reshape(out, grid.n_groups(inp), -1)


def _grouped_fake_quant(wg: Tensor, scales: Tensor, zeros: Tensor, grid: QuantGrid) -> Tensor:
    """Quantize-dequantize grouped float32 weights ``[out, G, g]`` with per-group ``scales`` /
    ``zeros`` ``[out, G]``; float32 result rounded to the scales' dtype. Bit-equal to
    :func:`quantize_codes` followed by :func:`_dequant`: (code - zero) * scale is exact in float32
    for every scale dtype up to float32, so one rounding to the scale dtype matches a product
    computed in that dtype."""
    s = scales.to(torch.float32).unsqueeze(-1)
    z = zeros.to(torch.float32).unsqueeze(-1)
    q = torch.round(wg / s).add_(z).clamp_(0, grid.maxq)
    return q.sub_(z).mul_(s).to(scales.dtype).to(torch.float32)


def clip_candidates(w: Tensor, grid: QuantGrid, *, grid_points: int = 20, max_shrink: float = 0.5) -> Iterator[tuple[float, Tensor]]:
    """``(ratio, w_hat)`` for ``grid_points`` clip ratios evenly spaced from 1 down to
    ``1 - max_shrink`` (both included): ``w_hat`` is ``w`` quantized and dequantized with every
    group's min and max shrunk by the ratio, in the working precision (float32, or float64 for a
    float64 ``w``). The arguments are checked and the group ranges measured at the call, once for a
    search loop's many candidates."""
    _check_weight(w)
    if grid_points < 1:
        raise ValueError(f"grid_points must be at least 1, got {grid_points}")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink must lie in [0, 1), got {max_shrink}")
    out, inp = w.shape
    work = _work_dtype(w.dtype)
    n_groups = grid.n_groups(inp)
    gidx = grid.group_index(inp, device=w.device)
    w_min, w_max = group_min_max(w, gidx, n_groups)
    grouped = _grouped(w, grid)

    def candidates() -> Iterator[tuple[float, Tensor]]:
        for r in torch.linspace(1.0, 1.0 - max_shrink, grid_points, dtype=torch.float32).tolist():
            ratio = torch.tensor(r, dtype=torch.float32).to(work)
            scales, zeros = compute_scale_zero(w_min * ratio, w_max * ratio, grid, w.dtype)
            if grouped is not None:
                yield r, _grouped_fake_quant(grouped, scales, zeros, grid).reshape(out, inp)
            else:
                s_cols, z_cols = scales[:, gidx], zeros[:, gidx]
                yield r, _dequant(quantize_codes(w, s_cols, z_cols, grid), s_cols, z_cols).to(work)

    return candidates()


def mse_clip_search(
    w: Tensor,
    grid: QuantGrid,
    *,
    grid_points: int = 20,
    max_shrink: float = 0.5,
    importance: Tensor | None = None,
) -> Tensor:
    """Per-group clip ratios minimizing the (importance-weighted) squared quantization error.

    Tries ``grid_points`` ratios evenly spaced from 1 down to ``1 - max_shrink`` (both included),
    shrinking each group's min and max by the ratio, and keeps per group the ratio with the smallest
    ``sum_j importance[j] * (w[:, j] - w_hat[:, j])**2`` over the group's columns. Ratio 1 (no
    clipping) is tried first and only replaced by a strictly smaller error, so feeding the result to
    :func:`quantize` never increases any group's error. ``importance`` (``[in]``, non-negative) is
    the per-input-channel weight, e.g. the mean squared activation for AWQ's clipping
    (https://arxiv.org/abs/2306.00978, section 3.3; the diagonal approximation of the layer output
    error). The grid search follows the MSE range search of GPTQ / llm-compressor's MSE observer.

    Returns a float32 tensor ``[out, n_groups]`` for :func:`quantize`'s ``clip``.
    """
    candidates = clip_candidates(w, grid, grid_points=grid_points, max_shrink=max_shrink)
    out, inp = w.shape
    if importance is not None:
        if importance.shape != (inp,):
            raise ValueError(f"importance has shape {tuple(importance.shape)}, expected ({inp},)")
        if bool((importance < 0).any()) or not bool(torch.isfinite(importance).all()):
            raise ValueError("importance must be finite and non-negative")
    work = _work_dtype(w.dtype)
    weight = None if importance is None else importance.to(device=w.device, dtype=work)
    wf = w.to(work)
    n_groups = grid.n_groups(inp)
    gidx = grid.group_index(inp, device=w.device)
    grouped = _grouped(w, grid) is not None
    best_err = torch.full((out, n_groups), math.inf, dtype=work, device=w.device)
    best_ratio = torch.ones((out, n_groups), dtype=torch.float32, device=w.device)
    for r, w_hat in candidates:
        err = (wf - w_hat).pow_(2)
        if weight is not None:
            err.mul_(weight)
        if grouped:
            err_g = err.view(out, n_groups, -1).sum(-1)
        else:
            err_g = torch.zeros((out, n_groups), dtype=work, device=w.device).index_add_(1, gidx, err)
        better = err_g < best_err
        best_err = torch.where(better, err_g, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio
