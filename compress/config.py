"""The settings of the quantize pass (shared by the CLI, recipes and the budget search)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.targets import DEFAULT_IGNORE, Selection, matches

if TYPE_CHECKING:
    from compress.grid import QuantGrid

Method = Literal["rtn", "gptq", "awq", "awq_gptq"]
#: Methods that search and fold AWQ scales first, and methods whose quantizer is GPTQ: ``awq_gptq``
#: is both (AWQ's scaling, then GPTQ on the scaled weights with Hessians of the scaled inputs).
SCALED = ("awq", "awq_gptq")
GPTQ_QUANTIZER = ("gptq", "awq_gptq")
#: Methods that need calibration data: every one that scales or runs GPTQ.
CALIBRATED = tuple(dict.fromkeys(GPTQ_QUANTIZER + SCALED))


BITS = (2, 3, 4, 8)


def check_bits(v: int | None) -> int | None:
    if v is not None and v not in BITS:
        raise ValueError("bits must be 2, 3, 4 or 8")
    return v


def check_group_size(v: int | None) -> int | None:
    if v is not None and v != -1 and v < 1:
        raise ValueError("group_size must be a positive number of columns, or -1 for one scale per output channel")
    return v


def parse_override(text: str, keys: tuple[str, ...] = ("method", "bits", "group_size", "symmetric", "gguf_type")) -> dict[str, Any]:
    """``'PATTERN:key=value,...'`` or ``'PATTERN:skip'`` -> the fields of an override (values still as
    text; the model validates them). The pattern ends at the last ``:`` followed by ``skip`` or
    ``key=``, so a regular expression or a value (an N:M pattern) may itself hold colons."""
    body = text.removeprefix("re:")
    split = None
    for i in range(len(body) - 1, -1, -1):
        if body[i] == ":" and re.match(r"(skip(,|$)|[A-Za-z_]+=)", body[i + 1 :]):
            split = len(text) - len(body) + i
            break
    if split is None or split == len(text) - len(body):
        raise ValueError(f"override {text!r}: write PATTERN:key=value,... (keys: {', '.join(keys)}) or PATTERN:skip")
    pattern, settings = text[:split], text[split + 1 :]
    fields: dict[str, Any] = {"match": pattern}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if key == "skip" and not eq:
            fields["skip"] = True
            continue
        if not eq:
            raise ValueError(f"override {text!r}: {item!r} is not key=value")
        fields[key] = value
    return fields


class Override(BaseModel):
    """Settings for the modules matching ``match`` (a name, a ``.suffix`` or ``re:<regex>``); unset
    fields keep the pass's values. Written as a mapping in a recipe or as the text
    ``PATTERN:key=value,...`` / ``PATTERN:skip`` (both places accept both)."""

    model_config = ConfigDict(extra="forbid")
    match: str
    method: Method | None = None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    #: with ``format: gguf:TYPE``: this module's GGUF block type instead of the mix's
    gguf_type: str | None = None
    skip: bool = False

    _bits = field_validator("bits")(check_bits)
    _group_size = field_validator("group_size")(check_group_size)

    @field_validator("gguf_type")
    @classmethod
    def _block_type(cls, value: str | None) -> str | None:
        from compress.gguf.mixes import BLOCK, FLOAT_TYPES

        if value is None:
            return None
        value = value.strip().lower()
        if value not in BLOCK or value in FLOAT_TYPES:
            raise ValueError(f"gguf_type must be a GGUF block type ({', '.join(t for t in BLOCK if t not in FLOAT_TYPES)}), got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return parse_override(value) if isinstance(value, str) else value


#: The modules a compression pass leaves alone, shared by quantize and prune.
IgnorePatterns = Annotated[
    list[str],
    Field(default_factory=lambda: list(DEFAULT_IGNORE), description="Modules to leave alone (name, .suffix or re:regex).", json_schema_extra={"metavar": "NAME"}),
]

# Calibration settings shared by every calibrated pass (quantize, prune): the same option, default and
# validation wherever they appear.
CalibPath = Annotated[
    str | None,
    Field(description="Calibration text file or folder (default: the WikiText-2 calibration split of the assets).", json_schema_extra={"metavar": "PATH"}),
]
CalibSamples = Annotated[int, Field(ge=1, description="Calibration blocks.")]
CalibSeqLen = Annotated[int, Field(ge=2, description="Tokens per calibration block.")]
#: four blocks per forward keep the matmuls large and the freed activations small
CalibBatch = Annotated[int, Field(ge=1, description="Calibration blocks per layer forward.")]
CalibDtype = Annotated[
    Literal["auto", "fp32", "bf16", "fp16"],
    Field(description="dtype of the calibration forwards: auto (float32, the fast one on CPUs without AMX), fp32, bf16 or fp16."),
]


@dataclass(frozen=True)
class LinearSettings:
    """What one linear gets."""

    method: Method
    grid: QuantGrid


class QuantizeConfig(BaseModel):
    """The quantize pass's settings (CLI options and recipe keys)."""

    model_config = ConfigDict(extra="forbid")
    method: Method = Field("gptq", description="rtn (data-free), gptq, awq, or awq_gptq (AWQ scaling, then GPTQ on the scaled weights).")
    bits: int = Field(4, description="Bits per weight: 2, 3, 4 or 8.")
    group_size: int = Field(
        128,
        description="Columns per scale; -1 = one scale per output channel. A size that does not divide the width gives a shorter last group.",
    )
    symmetric: bool = Field(
        True,
        description="Symmetric grid, or asymmetric with integer zero points.",
        json_schema_extra={"flags": ["--symmetric/--asymmetric", "--sym/--asym"]},
    )
    act_order: bool = Field(False, description="GPTQ: process columns by decreasing Hessian diagonal (static groups).")
    damp: float = Field(0.01, gt=0, le=1, allow_inf_nan=False, description="GPTQ dampening, a fraction of the mean Hessian diagonal (at most 1).")
    block_size: int = Field(128, ge=1, description="GPTQ: columns updated together before the error is carried to the rest.")
    keep_zeros: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="GPTQ: keep the weights that are exactly 0 at 0 (a pruned model keeps its zeros and N:M pattern; the error "
        "goes to the other weights). auto: when at least 10% of a linear's weights are 0. RTN and AWQ always keep them (0 is on every grid).",
    )
    clip: bool = Field(
        False,
        description="Clipping search per group: GPTQ picks each group's range by the layer-output error on the calibration Hessian, "
        "RTN by the squared weight error (AWQ always searches, by the activation-weighted error).",
    )
    awq_grid: int = Field(20, ge=1, description="AWQ: candidate scale exponents tried per group of linears.")
    awq_samples: int = Field(8, ge=1, description="AWQ: calibration blocks used in the scale search (each candidate reruns the block on them).")
    targets: list[str] | None = Field(
        None,
        description="Modules to quantize (name, .suffix or re:regex). Default: the decoder-layer linears.",
        json_schema_extra={"flags": ["--target"], "metavar": "NAME"},
    )
    ignore: IgnorePatterns
    overrides: list[Override] = Field(
        default_factory=list,
        description="Per-module settings, e.g. 'down_proj:bits=8', 're:.*\\.0\\..*:skip' or, with --format gguf:TYPE, "
        "'down_proj:gguf_type=q6_k'; the first match wins.",
        json_schema_extra={"flags": ["--override"], "metavar": "PATTERN:KEY=VALUE,..."},
    )
    format: str = Field(
        "dense",
        description="dense (dequantized, original dtype), packed (compressed-tensors pack-quantized), or gguf:TYPE (codes on the grid of a "
        "llama.cpp type or mix such as gguf:q4_k_m, per tensor as llama-quantize chooses; bits and group size then come from the type; "
        "the folder holds the dense weights and the GGUF blocks that `weightsmith export gguf` writes as they are).",
        json_schema_extra={"metavar": "dense|packed|gguf:TYPE"},
    )
    calib: CalibPath = None
    samples: CalibSamples = 128
    seq_len: CalibSeqLen = 512
    batch_size: CalibBatch = 4
    calib_dtype: CalibDtype = "auto"

    _bits = field_validator("bits")(check_bits)
    _group_size = field_validator("group_size")(check_group_size)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value in ("dense", "packed"):
            return value
        kind, colon, gtype = value.partition(":")
        if kind != "gguf" or not colon:
            raise ValueError(f"format must be dense, packed or gguf:TYPE, got {value!r}")
        from compress.gguf.mixes import mix_named

        name, mix = mix_named(gtype)
        if not mix.quantized:
            raise ValueError(f"gguf:{name} is a float type; quantize to a block type (gguf:q4_0, gguf:q4_k_m, ...) or export it directly")
        return f"gguf:{name}"

    @model_validator(mode="after")
    def _gguf_overrides(self) -> QuantizeConfig:
        if self.gguf_mix is None and any(o.gguf_type for o in self.overrides):
            raise ValueError("a gguf_type override needs --format gguf:TYPE")
        return self

    def gguf_type_for(self, module: str) -> str | None:
        """The GGUF block type the first matching override gives ``module``, or None."""
        for override in self.overrides:
            if matches(override.match, module):
                return None if override.skip else override.gguf_type
        return None

    @property
    def gguf_mix(self) -> str | None:
        """The llama.cpp type or mix whose grids the codes are chosen on (``format: gguf:TYPE``), or None."""
        return self.format.partition(":")[2] if self.format.startswith("gguf:") else None

    @property
    def selection(self) -> Selection:
        return Selection(tuple(self.targets) if self.targets is not None else None, tuple(self.ignore))

    def settings_for(self, module: str) -> LinearSettings | None:
        """The method and grid for ``module``, or None when an override skips it."""
        values = {"method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        for override in self.overrides:
            if matches(override.match, module):
                if override.skip:
                    return None
                values.update({k: v for k, v in override.model_dump(exclude={"match", "skip", "gguf_type"}).items() if v is not None})
                break
        from compress.grid import QuantGrid

        grid = QuantGrid(bits=values["bits"], symmetric=values["symmetric"], group_size=values["group_size"])
        return LinearSettings(method=values["method"], grid=grid)

    @property
    def calibrated(self) -> bool:
        """Whether any linear needs calibration data (GPTQ or AWQ)."""
        return self.method in CALIBRATED or any(o.method in CALIBRATED for o in self.overrides if not o.skip)
