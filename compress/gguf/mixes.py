"""Which GGUF type each tensor gets: llama.cpp's file types ("mixes") and ``--tensor-type`` overrides.

``--type`` names a llama.cpp file type (``llama_ftype``): a base block type plus llama.cpp's rules
that give some tensors more bits (``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp``,
the rules of ``llama-quantize``), written here as data (:data:`MIXES`) for dense (non-expert)
models:

* the output projection (or, with tied embeddings, the token embedding, which is then the output)
  gets Q6_K, or Q8_0 when its width is not a multiple of the base type's block, or stays Q8_0 in a
  Q8_0 file;
* ``attn_v`` (and a fused ``attn_qkv``), ``ffn_down`` and ``attn_output`` get more bits in the K
  mixes, in some layers (``use_more_bits``: the first and last eighth and every third layer between);
* a tensor whose row width is not a multiple of its type's block falls back as llama.cpp does
  (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when even that does not fit).

A bare K type names llama.cpp's default mix of it (``q4_k`` = ``q4_k_m``, ``q5_k`` = ``q5_k_m``,
``q3_k`` = ``q3_k_m``), as ``llama-quantize`` reads them. ``--pure`` skips the rules (every weight
gets the base type, as ``llama-quantize --pure``); ``--tensor-type PATTERN=TYPE`` (a regex searched
in the GGUF tensor name, first match wins, as llama-quantize's option) overrides both. One-dimensional
tensors (norms, biases) stay F32, as llama.cpp keeps them.

With calibration data (``calibrated``: llama-quantize given an importance matrix, or our GPTQ/AWQ on
the type's grid) Q4_0 and Q5_0 files give ``ffn_down`` of the first eighth of the layers Q4_1 / Q5_1,
as llama-quantize does with ``--imatrix``. Left out on purpose: the rules for mixture-of-experts,
Falcon and 70B models, and the IQ types.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["BLOCK", "FLOAT_TYPES", "MIXES", "Mix", "TypeChooser", "fallback", "parse_tensor_types", "use_more_bits"]

#: values per block of each GGUF type we write
BLOCK: dict[str, int] = {
    "f32": 1, "f16": 1, "bf16": 1,
    "q8_0": 32, "q5_0": 32, "q5_1": 32, "q4_0": 32, "q4_1": 32,
    "q6_k": 256, "q5_k": 256, "q4_k": 256, "q3_k": 256, "q2_k": 256,
}
FLOAT_TYPES = ("f32", "f16", "bf16")

#: llama.cpp's fallback for a row width its type's block does not divide
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third
    layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Mix:
    """A llama.cpp file type: its ``general.file_type`` number, base type, and per-class rules.

    ``attn_v``, ``ffn_down``: ``(layer, layers, query heads per key/value head) -> type`` or None
    (base type); ``attn_output``: a type or None."""

    ftype: int
    base: str
    attn_v: object = None
    ffn_down: object = None
    attn_output: str | None = None
    #: applies the output-tensor rule (quantized mixes)
    quantized: bool = True
    #: ``ffn_down`` of the first eighth of the layers with calibration data
    calibrated_ffn_down: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)


def _more(more: str, base: str):
    return lambda i, n, g: more if use_more_bits(i, n) else base


MIXES: dict[str, Mix] = {
    "f32": Mix(0, "f32", quantized=False),
    "f16": Mix(1, "f16", quantized=False),
    "bf16": Mix(32, "bf16", quantized=False),
    "q4_0": Mix(2, "q4_0", calibrated_ffn_down="q4_1"),
    "q4_1": Mix(3, "q4_1"),
    "q8_0": Mix(7, "q8_0"),
    "q5_0": Mix(8, "q5_0", calibrated_ffn_down="q5_1"),
    "q5_1": Mix(9, "q5_1"),
    "q2_k": Mix(10, "q2_k", attn_v=lambda i, n, g: "q4_k" if g >= 4 else "q3_k", ffn_down=lambda i, n, g: "q3_k", attn_output="q3_k"),
    "q3_k_s": Mix(11, "q3_k"),
    "q3_k_m": Mix(
        12, "q3_k",
        attn_v=lambda i, n, g: "q5_k" if i < 2 else "q4_k",
        ffn_down=lambda i, n, g: "q5_k" if i < n // 16 else "q4_k",
        attn_output="q4_k",
        aliases=("q3_k",),
    ),
    "q3_k_l": Mix(13, "q3_k", attn_v=lambda i, n, g: "q5_k", ffn_down=lambda i, n, g: "q5_k", attn_output="q5_k"),
    "q4_k_s": Mix(14, "q4_k", attn_v=lambda i, n, g: "q5_k" if i < 4 else None, ffn_down=lambda i, n, g: "q5_k" if i < n // 8 else None),
    "q4_k_m": Mix(15, "q4_k", attn_v=_more("q6_k", "q4_k"), ffn_down=_more("q6_k", "q4_k"), aliases=("q4_k",)),
    "q5_k_s": Mix(16, "q5_k"),
    "q5_k_m": Mix(17, "q5_k", attn_v=_more("q6_k", "q5_k"), ffn_down=_more("q6_k", "q5_k"), aliases=("q5_k",)),
    "q6_k": Mix(18, "q6_k"),
}
_ALIASES = {alias: name for name, mix in MIXES.items() for alias in mix.aliases}


def mix_named(name: str) -> tuple[str, Mix]:
    """``(canonical name, mix)`` for a ``--type`` value (case-insensitive); ValueError listing the names."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in MIXES:
        raise ValueError(f"unknown GGUF type {name!r}; types: {', '.join(sorted([*MIXES, *_ALIASES]))}")
    return key, MIXES[key]


def fallback(gtype: str, width: int) -> str:
    """The type llama.cpp writes a row of ``width`` values in when ``gtype``'s block does not divide it."""
    if width % BLOCK[gtype] == 0:
        return gtype
    alt = _FALLBACK.get(gtype, gtype)
    return alt if width % BLOCK[alt] == 0 else "f16"


def parse_tensor_types(values: Sequence[str]) -> list[tuple[re.Pattern[str], str]]:
    """``PATTERN=TYPE`` overrides as compiled regexes and block types; ValueError for a bad one."""
    out = []
    for value in values:
        pattern, eq, gtype = value.rpartition("=")
        if not eq or not pattern:
            raise ValueError(f"--tensor-type {value!r}: expected PATTERN=TYPE")
        gtype = gtype.strip().lower()
        if gtype not in BLOCK:
            raise ValueError(f"--tensor-type {value!r}: unknown type {gtype!r}; types: {', '.join(BLOCK)}")
        try:
            out.append((re.compile(pattern), gtype))
        except re.error as exc:
            raise ValueError(f"--tensor-type {value!r}: bad regular expression ({exc})") from None
    return out


@dataclass
class TypeChooser:
    """The type of each tensor of one export: ``choose(gguf_name, leaf, block, shape)``."""

    mix: Mix
    layers: int
    tied: bool
    #: query heads per key/value head
    gqa: int = 1
    pure: bool = False
    #: the weights are quantized with calibration data (llama-quantize's --imatrix rules)
    calibrated: bool = False
    overrides: list[tuple[re.Pattern[str], str]] = field(default_factory=list)

    def choose(self, gguf_name: str, leaf: str, block: int | None, shape: Sequence[int]) -> str:
        if len(shape) < 2 or not gguf_name.endswith(".weight"):
            return "f32" if len(shape) < 2 else ("f16" if self.mix.quantized else self.mix.base)
        gtype = self.mix.base
        width = int(shape[-1])
        if not self.mix.quantized:
            return gtype
        manual = next((t for p, t in self.overrides if p.search(gguf_name)), None)
        if manual is not None:
            gtype = manual
        elif not self.pure:
            gtype = self._rule(leaf, block, width)
        return fallback(gtype, width)

    def _rule(self, leaf: str, block: int | None, width: int) -> str:
        mix, base = self.mix, self.mix.base
        if leaf == "output" or (self.tied and leaf == "token_embd"):
            if width % BLOCK[base]:
                return "q8_0"
            return base if base == "q8_0" else "q6_k"
        i, n = (block or 0), self.layers
        if leaf == "ffn_down" and self.calibrated and mix.calibrated_ffn_down and i < n // 8:
            return mix.calibrated_ffn_down
        rule = {"attn_v": mix.attn_v, "attn_qkv": mix.attn_v, "ffn_down": mix.ffn_down}.get(leaf)
        if rule is not None:
            return rule(i, n, self.gqa) or base
        if leaf == "attn_output" and mix.attn_output:
            return mix.attn_output
        return base
