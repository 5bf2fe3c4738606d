"""Merge math in numpy, for the CPU engine that never imports torch (:mod:`merge.engine_numpy`).

The functions mirror the torch ones operation for operation, so both engines write the same bits:
values travel as float32 arrays (float32 is exact for bfloat16 and float16), and wherever torch's
arithmetic in a 16-bit dtype rounds (every elementwise operation: computed in float32, rounded to
the nearest even 16-bit value), :func:`round_to` rounds. bfloat16, which numpy lacks, is read and
written as its 16 bits (uint16). Arrays in, arrays out; chunking and threads are the caller's.

Algorithms (papers): linear / soups, https://arxiv.org/abs/2203.05482; SLERP,
https://doi.org/10.1145/325165.325242; task arithmetic, https://arxiv.org/abs/2212.04089; TIES' sign
election, https://arxiv.org/abs/2306.01708; DARE, https://arxiv.org/abs/2311.03099.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np

__all__ = [
    "FLOATS",
    "accumulate",
    "bf16_bits",
    "cosine",
    "linear_chunk",
    "lerp_chunk",
    "narrow",
    "pack",
    "promote",
    "random_keep",
    "round_scalar",
    "round_to",
    "sign_agreement",
    "slerp_coefficients",
    "widen",
]

#: The safetensors dtypes this engine computes in.
FLOATS = ("BF16", "F16", "F32")
F32 = np.float32
#: Entries per draw-density step of DARE's random mask: the keep threshold on 16-bit draws.
DRAW_LEVELS = 1 << 16
_ONE, _SIXTEEN, _HALF_MINUS_ONE, _HIGH_HALF, _QUIET_NAN = (np.uint32(v) for v in (1, 16, 0x7FFF, 0xFFFF0000, 0x7FC00000))
_SIGN_BIT, _FLOAT_ONE = np.uint32(0x80000000), np.uint32(0x3F800000)


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


def pack(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values already on ``dtype``'s grid as stored values (exact: no rounding), the
    inverse of :func:`widen`."""
    if dtype == "BF16":
        if sys.byteorder == "little":
            return x.view(np.uint16)[1::2].copy()
        return (x.view(np.uint32) >> _SIXTEEN).astype(np.uint16)
    if dtype == "F16":
        return x.astype(np.float16)
    return x.copy()


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


def round_scalar(value: float, dtype: str) -> np.float32:
    """A Python float as torch stores it in a 0-dim tensor of ``dtype``: to float32 first, then to
    the 16-bit grid."""
    return F32(round_to(np.array([value], dtype=F32), dtype)[0])


def narrow(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values (on ``dtype``'s grid or not) as stored ``dtype`` values, rounded to nearest even."""
    if dtype == "BF16":
        return bf16_bits(x)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    return x.astype(F32, copy=False)


def linear_chunk(values: Sequence[np.ndarray], coefficients: Sequence[np.float32], total: np.float32 | None) -> np.ndarray:
    """``sum_i coefficients[i] * values[i]`` accumulated from zero in input order (float32),
    divided by ``total`` unless it is None — :func:`merge.linear.linear` on one chunk."""
    acc = np.zeros(len(values[0]), dtype=F32)
    for value, coefficient in zip(values, coefficients):
        acc += value * coefficient
    if total is not None:
        acc /= total
    return acc


def cosine(aa: float, bb: float, ab: float, eps: float) -> float:
    """The cosine of the angle between two vectors from their dot products ``a.a``, ``b.b`` and
    ``a.b``; a norm at most ``eps`` counts as 1, as mergekit's SLERP does."""
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    return ab / ((norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0))


def slerp_coefficients(t: float, cos: float, dot_threshold: float) -> tuple[float, float]:
    """The weights of ``v0`` and ``v1`` at ``t`` for vectors at the angle whose cosine is ``cos``:
    ``sin((1-t) theta) / sin theta`` and ``sin(t theta) / sin theta``, or ``1-t`` and ``t`` when
    ``|cos| > dot_threshold`` (nearly colinear). Python floats, so both engines get the same ones."""
    cos = min(max(cos, -1.0), 1.0)
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def lerp_chunk(a: np.ndarray, b: np.ndarray, coef_a: np.float32, coef_b: np.float32) -> np.ndarray:
    return coef_a * a + coef_b * b


def accumulate(parts: Sequence[np.ndarray], dtype: str) -> np.ndarray:
    """The sum of ``parts`` as :func:`merge.task_arithmetic._accumulate` computes it: two parts in
    one rounded addition, more accumulated in float32 and rounded once."""
    acc = parts[0] + parts[1] if len(parts) > 1 else parts[0].copy()
    for part in parts[2:]:
        acc += part
    return round_to(acc, dtype)


def sign_agreement(deltas: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per delta, True where its sign equals the sign elected by the deltas' sum (+ where the sum is
    >= 0, a -0 sum electing -), else False — zero deltas never agree. The sum is not rounded to the
    16-bit dtype as torch's is: rounding keeps the sign (a value too small for it becomes a zero of
    the same sign), and only the sign is used."""
    total = deltas[0] + deltas[1] if len(deltas) > 1 else deltas[0]
    for d in deltas[2:]:
        total = total + d
    elected = total.view(np.uint32) & _SIGN_BIT  # copysign(1, total) in two integer passes
    elected |= _FLOAT_ONE
    elected = elected.view(F32)
    return [d * elected > 0 for d in deltas]


def random_keep(seed: int, j: int, n: int, density: float) -> np.ndarray:
    """Chunk ``j``'s DARE keep mask (bool), the one both engines use: ``n`` 16-bit uniform draws from
    the chunk's own PCG64 stream (seeded by ``[seed, j]``; four draws per raw 64-bit output, low
    half first: on a little-endian machine the very draws of ``Generator.integers(0, 2**16,
    dtype=uint16)``, about 8x faster), each kept when below ``round(density * 2**16)``."""
    raw = np.random.default_rng([seed, j]).bit_generator.random_raw((n + 3) // 4)
    return raw.view(np.uint16)[:n] < round(density * DRAW_LEVELS)
