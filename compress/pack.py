"""The compressed-tensors ``pack-quantized`` layout, written and read without compressed-tensors.

Layout of one quantized linear ``{prefix}`` (as compressed-tensors 0.20 writes and reads it,
``PackedQuantizationCompressor`` and ``pack_to_int32`` / ``unpack_from_int32``):

* ``{prefix}.weight_packed``: int32 ``[out, ceil(in * bits / 32)]``. Each row is one little-endian
  bit stream: element ``j`` occupies bits ``j*bits .. j*bits + bits - 1`` of the row, and int32
  word ``k`` holds stream bits ``32k .. 32k + 31`` (bit 0 = least significant). For 2, 4 and 8 bits
  (16, 8, 4 values per word) no value crosses a word; for 3 bits 32 values fill exactly 3 words and
  some values straddle two words. The stored value is the unsigned code: compressed-tensors'
  signed value ``q`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` plus ``2**(bits-1)``, which is exactly
  our :class:`~compress.grid.QuantizedTensor` code. Words are signed int32 (two's complement).
  Padding bits at the end of a row are 0.
* ``{prefix}.weight_scale``: ``[out, n_groups]`` (``[out, 1]`` for per-channel), model dtype.
* ``{prefix}.weight_zero_point`` (asymmetric grids only): the zero points packed the same way but
  along the *output* dimension (``packed_dim=0``): int32 ``[ceil(out * bits / 32), n_groups]``;
  the packed value is our unsigned zero point (compressed-tensors' int8 zero point plus
  ``2**(bits-1)``). Symmetric checkpoints carry no zero point (the library drops it; vLLM refuses
  it) and decode as ``q * scale``.
* ``{prefix}.weight_shape``: int64 ``[2]`` = ``(out, in)``.
* ``{prefix}.weight_g_idx``: int32 ``[in]``, only for a :class:`QuantizedTensor` with a
  non-trivial ``g_idx`` (act-order without static groups). compressed-tensors 0.20 has no
  ``g_idx`` anymore: it removed ``actorder="group"`` and refuses it when parsing the config.
  Static-group act-order (``actorder="weight"``) needs no ``g_idx``.

Version caveat for 3 bits: compressed-tensors before the dense-packing change (PR #732) packed
``32 // bits`` values per word with the spare high bits unused (10 values per word for 3 bits).
For 2, 4 and 8 bits both layouts are the same; 3-bit checkpoints written here decode only with
the dense layout (0.20).

Ragged last group: compressed-tensors sizes the scale as ``ceil(in / group_size)`` columns (with a
warning) when it builds the model, but its group dequantization refuses a width that the group
size does not divide (``ValueError: tensor column shape must be divisble by the given
group_size``), so such a layer cannot be decoded by the library (vLLM's kernels need it too).
:func:`to_compressed_tensors` therefore refuses it unless ``allow_ragged=True``;
:func:`ragged_group_reason` says why, for a pass that wants to keep such layers dense, list them
in ``ignore`` and record them through ``quantization_config(metadata=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from compress.grid import QuantGrid, QuantizedTensor

__all__ = [
    "COMPRESSED_TENSORS_VERSION",
    "METADATA_KEY",
    "from_compressed_tensors",
    "pack_codes",
    "packed_width",
    "quantization_config",
    "ragged_group_reason",
    "to_compressed_tensors",
    "unpack_codes",
]

COMPRESSED_TENSORS_VERSION = "0.20.0"
"""The compressed-tensors release whose layout this module writes (recorded in the config)."""

METADATA_KEY = "weightsmith"
"""Key of our own entry in ``quantization_config`` (compressed-tensors ignores unknown keys)."""

_MASK32 = (1 << 32) - 1
_ACTORDER = (None, "weight", "group")


def packed_width(n_values: int, bits: int) -> int:
    """Number of int32 words holding ``n_values`` values of ``bits`` bits: ``ceil(n*bits/32)``."""
    return math.ceil(n_values * bits / 32)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def _slots(bits: int) -> list[tuple[int, int, int]]:
    """For the 32 values of one chunk (``bits`` words): (value index, word, bit offset)."""
    return [(e, (e * bits) // 32, (e * bits) % 32) for e in range(32)]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes ``[rows, n]`` (values in ``[0, 2**bits)``) into int32 ``[rows, words]``.

    Dense little-endian packing along the last dimension, ``words = ceil(n * bits / 32)``; see the
    module docstring.
    """
    _check_bits(bits)
    if codes.ndim != 2:
        raise ValueError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    values = codes.to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    rows, n = values.shape
    chunks = math.ceil(n / 32)
    values = torch.nn.functional.pad(values, (0, chunks * 32 - n)).view(rows, chunks, 32)
    words = torch.zeros((rows, chunks, bits), dtype=torch.int64, device=codes.device)
    for e, word, offset in _slots(bits):
        v = values[:, :, e]
        words[:, :, word] |= (v << offset) & _MASK32
        if offset + bits > 32:
            words[:, :, word + 1] |= v >> (32 - offset)
    words = words.view(rows, chunks * bits)[:, : packed_width(n, bits)]
    signed = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return signed.to(torch.int32).contiguous()


def unpack_codes(packed: Tensor, bits: int, n_values: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[rows, words]`` -> uint8 codes ``[rows, n_values]``.

    ``words`` must equal ``ceil(n_values * bits / 32)`` (checked: the input may be untrusted).
    """
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(
            f"expected a 2-D int32 packed tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    if n_values < 0:
        raise ValueError(f"n_values must be non-negative, got {n_values}")
    rows, n_words = packed.shape
    if n_words != packed_width(n_values, bits):
        raise ValueError(
            f"packed tensor has {n_words} int32 words per row; {n_values} values of {bits} bits "
            f"need {packed_width(n_values, bits)}"
        )
    chunks = math.ceil(n_values / 32)
    words = packed.to(torch.int64) & _MASK32
    words = torch.nn.functional.pad(words, (0, chunks * bits - n_words)).view(rows, chunks, bits)
    mask = (1 << bits) - 1
    values = torch.empty((rows, chunks, 32), dtype=torch.int64, device=packed.device)
    for e, word, offset in _slots(bits):
        v = words[:, :, word] >> offset
        if offset + bits > 32:
            v = v | (words[:, :, word + 1] << (32 - offset))
        values[:, :, e] = v & mask
    return values.view(rows, chunks * 32)[:, :n_values].to(torch.uint8).contiguous()


def ragged_group_reason(grid: QuantGrid, in_features: int) -> str | None:
    """Why compressed-tensors 0.20 cannot decode this layer, or None when it can."""
    if grid.group_size != -1 and in_features % grid.group_size != 0:
        return (
            f"in_features {in_features} is not a multiple of group_size {grid.group_size}: "
            f"compressed-tensors refuses a shorter last group when it dequantizes"
        )
    return None


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_trivial_g_idx(q: QuantizedTensor) -> bool:
    if q.g_idx is None:
        return True
    return bool(torch.equal(q.g_idx, q.grid.group_index(q.shape[1], device=q.g_idx.device)))


def to_compressed_tensors(
    q: QuantizedTensor, prefix: str, *, allow_ragged: bool = False
) -> dict[str, Tensor]:
    """The ``pack-quantized`` tensors of one linear layer, keyed ``{prefix}.weight_*``.

    Writes ``weight_packed`` (int32), ``weight_scale`` (the scales' dtype), ``weight_shape``
    (int64), ``weight_zero_point`` (int32, packed along the output dimension) for asymmetric grids,
    and ``weight_g_idx`` (int32) when ``q.g_idx`` is not the contiguous mapping. A ragged last
    group raises ``ValueError`` unless ``allow_ragged`` (the tensors are then well defined and read
    back by :func:`from_compressed_tensors`, but compressed-tensors 0.20 cannot decode them).
    """
    out, inp = q.shape
    reason = ragged_group_reason(q.grid, inp)
    if reason is not None and not allow_ragged:
        raise ValueError(f"{prefix}: {reason}")
    bits = q.grid.bits
    tensors = {
        _key(prefix, "weight_packed"): pack_codes(q.codes, bits),
        _key(prefix, "weight_scale"): q.scales.contiguous(),
        _key(prefix, "weight_shape"): torch.tensor([out, inp], dtype=torch.int64),
    }
    if not q.grid.symmetric:
        tensors[_key(prefix, "weight_zero_point")] = pack_codes(q.zeros.t(), bits).t().contiguous()
    if q.g_idx is not None and not _has_trivial_g_idx(q):
        tensors[_key(prefix, "weight_g_idx")] = q.g_idx.to(torch.int32).contiguous()
    return tensors


def _get(tensors: Mapping[str, Tensor], prefix: str, name: str) -> Tensor:
    key = _key(prefix, name)
    if key not in tensors:
        raise ValueError(f"missing tensor {key}")
    return tensors[key]


def from_compressed_tensors(
    tensors: Mapping[str, Tensor], prefix: str, grid: QuantGrid
) -> QuantizedTensor:
    """Read one layer's ``pack-quantized`` tensors back into a :class:`QuantizedTensor`.

    Every dtype and shape is checked against ``grid`` and ``weight_shape`` (the tensors may come
    from an untrusted checkpoint); problems raise ``ValueError`` naming the tensor.
    """
    shape_t = _get(tensors, prefix, "weight_shape")
    if shape_t.is_floating_point() or shape_t.shape != (2,):
        raise ValueError(f"{_key(prefix, 'weight_shape')} must hold two integers")
    out, inp = (int(v) for v in shape_t.tolist())
    if out < 1 or inp < 1:
        raise ValueError(f"{_key(prefix, 'weight_shape')} must be positive, got {(out, inp)}")
    bits = grid.bits
    packed = _get(tensors, prefix, "weight_packed")
    if packed.dtype != torch.int32 or packed.shape != (out, packed_width(inp, bits)):
        raise ValueError(
            f"{_key(prefix, 'weight_packed')} is {packed.dtype} {tuple(packed.shape)}, expected "
            f"torch.int32 {(out, packed_width(inp, bits))}"
        )
    g_idx_t = tensors.get(_key(prefix, "weight_g_idx"))
    n_groups = grid.n_groups(inp)
    scales = _get(tensors, prefix, "weight_scale")
    if not scales.is_floating_point() or scales.shape != (out, n_groups):
        raise ValueError(
            f"{_key(prefix, 'weight_scale')} is {scales.dtype} {tuple(scales.shape)}, expected a "
            f"float tensor {(out, n_groups)}"
        )
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ValueError(f"{_key(prefix, 'weight_scale')} must be finite and positive")
    codes = unpack_codes(packed, bits, inp)
    if grid.symmetric:
        zeros = torch.full((out, n_groups), grid.midpoint, dtype=torch.uint8)
    else:
        zp = _get(tensors, prefix, "weight_zero_point")
        expected = (packed_width(out, bits), n_groups)
        if zp.dtype != torch.int32 or zp.shape != expected:
            raise ValueError(
                f"{_key(prefix, 'weight_zero_point')} is {zp.dtype} {tuple(zp.shape)}, expected "
                f"torch.int32 {expected}"
            )
        zeros = unpack_codes(zp.t().contiguous(), bits, out).t().contiguous()
    g_idx = None
    if g_idx_t is not None:
        if g_idx_t.is_floating_point() or g_idx_t.shape != (inp,):
            raise ValueError(f"{_key(prefix, 'weight_g_idx')} must be an integer tensor ({inp},)")
        g_idx = g_idx_t.to(torch.long)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise ValueError(f"{_key(prefix, 'weight_g_idx')} values must lie in [0, {n_groups})")
    return QuantizedTensor(
        codes=codes, scales=scales, zeros=zeros, grid=grid, shape=(out, inp), g_idx=g_idx
    )


def quantization_config(
    grid: QuantGrid,
    targets: Sequence[str] = ("Linear",),
    ignore: Sequence[str] = ("lm_head",),
    *,
    actorder: str | None = None,
    observer: str = "minmax",
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for a ``pack-quantized`` checkpoint.

    One config group (``group_0``) applies ``grid`` to weights of the modules matching ``targets``
    (class names such as ``"Linear"``, module names, or ``"re:<regex>"``), except those in
    ``ignore``. ``actorder`` is ``None``, ``"weight"`` (GPTQ act-order with static groups, nothing
    to store) or ``"group"`` (needs ``weight_g_idx``; compressed-tensors 0.20 refuses it).
    ``observer`` is informational (``"minmax"``, ``"mse"``...). ``metadata`` is stored under
    :data:`METADATA_KEY`, which compressed-tensors and transformers ignore; use it to record what
    the library cannot express (e.g. layers kept dense because of a ragged last group).
    """
    if actorder not in _ACTORDER:
        raise ValueError(f"actorder must be one of {_ACTORDER}, got {actorder!r}")
    if not targets:
        raise ValueError("targets must name at least one module or module class")
    channel = grid.group_size == -1
    weights = {
        "num_bits": grid.bits,
        "type": "int",
        "symmetric": grid.symmetric,
        "strategy": "channel" if channel else "group",
        "group_size": None if channel else grid.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": actorder,
        "observer": observer,
        "observer_kwargs": {},
    }
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": list(targets),
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }
    if metadata:
        config[METADATA_KEY] = dict(metadata)
    return config
