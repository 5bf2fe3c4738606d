"""16-bit floats in numpy, for the merge engine that never imports torch (:mod:`merge.engine_numpy`).

Values travel as float32 arrays (float32 is exact for bfloat16 and float16); :func:`round_to`
rounds them to a 16-bit grid wherever torch's arithmetic in that dtype rounds (every elementwise
operation: computed in float32, rounded to the nearest even 16-bit value), so the shared merge math
(:class:`merge.arith.NumpyArith`) writes torch's bits. bfloat16, which numpy lacks, is read and
written as its 16 bits (uint16). Also DARE's random keep masks, which both engines draw here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

__all__ = ["FLOATS", "bf16_bits", "fused_multiply_add", "narrow", "promote", "random_keep", "round_to", "widen"]

#: The safetensors dtypes this engine computes in.
FLOATS = ("BF16", "F16", "F32")
F32 = np.float32
#: Entries per draw-density step of DARE's random mask: the keep threshold on 16-bit draws.
DRAW_LEVELS = 1 << 16
_ONE, _SIXTEEN, _HALF_MINUS_ONE, _HIGH_HALF, _QUIET_NAN = (np.uint32(v) for v in (1, 16, 0x7FFF, 0xFFFF0000, 0x7FC00000))
#: The float64 mantissa bits below float32's, and their pattern at a float32 midpoint.
_BELOW_F32, _F32_MIDPOINT = np.int64((1 << 29) - 1), np.int64(1 << 28)


def promote(dtypes: Sequence[str]) -> str:
    """The dtype torch promotes a mix of ``FLOATS`` to: one dtype stays, bf16 with fp16 is fp32."""
    unique = set(dtypes)
    return dtypes[0] if len(unique) == 1 else "F32"


def widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values (bfloat16 as uint16 bits) as float32, exactly. May return ``raw`` itself for
    float32: callers never write into it."""
    if dtype == "BF16":
        return np.left_shift(raw, _SIXTEEN, dtype=np.uint32).view(F32)
    if dtype == "F16":
        return raw.astype(F32)
    return raw


def _bf16_rounded(x: np.ndarray) -> np.ndarray:
    """The bits of float32 ``x`` rounded to the nearest bfloat16 (ties to even), as uint32 float32
    bits (the low half zero): add 0x7FFF plus the lowest kept bit, clear the low half; in place on
    one new array. NaN becomes the quiet NaN 0x7FC0..., as torch writes it."""
    u = x.view(np.uint32)
    r = u >> 16
    r &= _ONE
    r += _HALF_MINUS_ONE
    r += u
    r &= _HIGH_HALF
    if x.size and np.isnan(x.max()):  # max propagates NaN: one fast read finds any
        r[np.isnan(x)] = _QUIET_NAN
    return r


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as uint16 bits (on a
    little-endian machine, a strided view of the rounded words' high halves: no further pass)."""
    rounded = _bf16_rounded(x)
    if sys.byteorder == "little":
        return rounded.view(np.uint16)[1::2]
    return (rounded >> _SIXTEEN).astype(np.uint16)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to the grid of ``dtype``, still as float32."""
    if dtype == "BF16":
        return _bf16_rounded(x).view(F32)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(F32)
    return x


def narrow(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values (on ``dtype``'s grid or not) as stored ``dtype`` values, rounded to nearest even."""
    if dtype == "BF16":
        return bf16_bits(x)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    return x.astype(F32, copy=False)


def fused_multiply_add(acc: np.ndarray, x: np.ndarray, c: float) -> np.ndarray:
    """``acc + x * c`` for float32 arrays ``acc`` and ``x`` and a float32 scalar ``c``, rounded once
    to float32 (a fused multiply-add, as torch's ``addcmul_`` on float32 computes it).

    The product of two float32 values is exact in float64, the sum is rounded to float64 and then
    to float32. That second rounding differs from a single one only where the float64 sum was
    inexact and landed exactly on a float32 midpoint (its 29 low mantissa bits ``1000...``); there
    the error of the sum (Knuth's TwoSum) moves it one float64 step towards the exact value, which
    is then rounded correctly (rounding to odd, Boldo & Melquiond 2008)."""
    s = np.multiply(x, np.float64(c), dtype=np.float64)
    s += acc
    at_midpoint = (s.view(np.int64) & _BELOW_F32) == _F32_MIDPOINT
    if at_midpoint.any():
        where = np.flatnonzero(at_midpoint)
        a, p, total = acc[where].astype(np.float64), x[where].astype(np.float64) * np.float64(c), s[where]
        b = total - a
        error = (a - (total - b)) + (p - b)
        s[where] = np.where(error != 0, np.nextafter(total, np.copysign(np.inf, error)), total)
    return s.astype(np.float32)


def random_keep(seed: int, j: int, n: int, density: float) -> np.ndarray:
    """Chunk ``j``'s DARE keep mask (bool), the one both engines use: ``n`` 16-bit uniform draws from
    the chunk's own PCG64 stream (seeded by ``[seed, j]``; four draws per raw 64-bit output, low
    half first: on a little-endian machine the very draws of ``Generator.integers(0, 2**16,
    dtype=uint16)``, without its per-draw bounds work), each kept when below
    ``round(density * 2**16)``."""
    raw = np.random.default_rng([seed, j]).bit_generator.random_raw((n + 3) // 4)
    return raw.view(np.uint16)[:n] < round(density * DRAW_LEVELS)
