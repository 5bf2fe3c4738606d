"""The settings of the prune pass (shared by the CLI, recipes and the budget search).

Two kinds of pruning, one pass:

* **unstructured / semi-structured** (``method`` with ``sparsity`` or ``pattern``): weights set to
  zero inside the linears; shapes do not change, so the file only shrinks when it is written in a
  sparse format (``format: sparse``);
* **structured** (``structured: mlp=0.25,heads=0.25,layers=4``): MLP channels, key/value head groups
  and decoder layers removed; config.json is rewritten and the model is really smaller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.config import CalibBatch, CalibDtype, CalibPath, CalibSamples, CalibSeqLen, IgnorePatterns, check_bits, check_group_size, parse_override
from compress.targets import Selection, matches

__all__ = ["NM", "PruneConfig", "PruneOverride", "PruneTarget", "StructuredSpec", "parse_nm", "parse_structured"]

Method = Literal["magnitude", "wanda", "sparsegpt"]
#: Methods that run the model on calibration data.
CALIBRATED = ("wanda", "sparsegpt")
OVERRIDE_KEYS = ("sparsity", "pattern")


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: at most ``n`` non-zeros in every ``m`` consecutive weights of a
    row (along the input dimension). 2:4 is the pattern sparse tensor cores run."""

    n: int
    m: int

    @property
    def pruned(self) -> int:
        """Weights set to zero in every window."""
        return self.m - self.n

    @property
    def sparsity(self) -> float:
        return self.pruned / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_nm(text: str) -> NM:
    """``'2:4'`` -> :class:`NM`; 0 < N < M <= 64."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if match is None:
        raise ValueError(f"pattern {text!r}: write N:M, e.g. 2:4 (at most N non-zeros in every M weights)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m <= 64:
        raise ValueError(f"pattern {text!r}: N:M needs 0 < N < M <= 64")
    return NM(n, m)


def _check_pattern(value: str | None) -> str | None:
    if value is not None:
        parse_nm(value)
    return value


def _check_sparsity(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError("sparsity must lie in [0, 1)")
    return value


class PruneOverride(BaseModel):
    """Pruning for the modules matching ``match`` (a name, a ``.suffix`` or ``re:<regex>``): another
    ``sparsity`` or ``pattern``, or ``skip``. Written as a mapping in a recipe or as the text
    ``PATTERN:sparsity=0.3`` / ``PATTERN:pattern=4:8`` / ``PATTERN:skip``."""

    model_config = ConfigDict(extra="forbid")
    match: str
    sparsity: float | None = None
    pattern: str | None = None
    skip: bool = False

    _sparsity = field_validator("sparsity")(_check_sparsity)
    _pattern = field_validator("pattern")(_check_pattern)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return parse_override(value, OVERRIDE_KEYS) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_kind(self) -> PruneOverride:
        if self.sparsity is not None and self.pattern is not None:
            raise ValueError(f"override {self.match!r}: give sparsity or pattern, not both")
        return self


@dataclass(frozen=True)
class PruneTarget:
    """What one linear gets: a share of zeros, or an N:M pattern."""

    sparsity: float
    nm: NM | None = None

    @property
    def share(self) -> float:
        """The share of the weights set to zero."""
        return self.nm.sparsity if self.nm is not None else self.sparsity

    def __str__(self) -> str:
        return str(self.nm) if self.nm is not None else f"{self.sparsity:g}"


class StructuredSpec(BaseModel):
    """What structured pruning removes: a share of the MLP channels (``intermediate_size``), a share
    of the key/value head groups (each with its query heads), and decoder layers: a count (the least
    influential ones) or a list of indices."""

    model_config = ConfigDict(extra="forbid")
    mlp: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    heads: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    layers: int | list[int] = 0

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 0:
            raise ValueError("layers must be a count >= 0 or a list of layer indices")
        if isinstance(value, list):
            if any(i < 0 for i in value):
                raise ValueError("layer indices must be >= 0")
            if len(set(value)) != len(value):
                raise ValueError("layer indices must not repeat")
        return value

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return parse_structured(value) if isinstance(value, str) else value

    @property
    def empty(self) -> bool:
        return self.mlp == 0 and self.heads == 0 and self.layers in (0, [])

    def __str__(self) -> str:
        parts = []
        if self.mlp:
            parts.append(f"mlp={self.mlp:g}")
        if self.heads:
            parts.append(f"heads={self.heads:g}")
        if self.layers not in (0, []):
            parts.append(f"layers={self.layers if isinstance(self.layers, int) else '[' + ','.join(map(str, self.layers)) + ']'}")
        return ",".join(parts)


def parse_structured(text: str) -> dict[str, Any]:
    """``'mlp=0.25,heads=0.25,layers=4'`` or ``'layers=[3,5,7]'`` -> the fields of a
    :class:`StructuredSpec` (values still as text where the model validates them)."""
    fields: dict[str, Any] = {}
    for item in re.split(r",(?![^\[]*\])", text.strip()):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in ("mlp", "heads", "layers"):
            raise ValueError(f"structured {text!r}: write mlp=SHARE,heads=SHARE,layers=COUNT or layers=[i,j,...] ({item!r} is not one of them)")
        if key == "layers" and value.startswith("["):
            if not value.endswith("]"):
                raise ValueError(f"structured {text!r}: layers=[i,j,...] is missing its ]")
            fields[key] = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        else:
            fields[key] = value
    return fields


class PruneConfig(BaseModel):
    """The prune pass's settings (CLI options and recipe keys)."""

    model_config = ConfigDict(extra="forbid")
    method: Method = Field(
        "wanda",
        description="Unstructured pruning: magnitude (|W|, data-free), wanda (|W| x input norm, per output row) or "
        "sparsegpt (Hessian reconstruction of the remaining weights).",
    )
    sparsity: float = Field(0.5, allow_inf_nan=False, description="Share of each target linear's weights set to zero, in [0, 1).")
    pattern: str | None = Field(
        None, description="N:M semi-structured sparsity instead of a share: at most N non-zeros in every M weights of a row (2:4, 4:8).", json_schema_extra={"metavar": "N:M"}
    )
    scope: Literal["layer", "global"] = Field(
        "layer",
        description="magnitude: each linear at the sparsity (layer), or one magnitude threshold across all target linears (global).",
    )
    targets: list[str] | None = Field(
        None,
        description="Modules to prune (name, .suffix or re:regex). Default: the decoder-layer linears.",
        json_schema_extra={"flags": ["--target"], "metavar": "NAME"},
    )
    ignore: IgnorePatterns
    overrides: list[PruneOverride] = Field(
        default_factory=list,
        description="Per-module pruning, e.g. 'down_proj:sparsity=0.3', 'q_proj:pattern=4:8' or 're:.*\\.0\\..*:skip'; the first match wins.",
        json_schema_extra={"flags": ["--override"], "metavar": "PATTERN:KEY=VALUE,..."},
    )
    bits: int | None = Field(
        None, description="sparsegpt: also quantize the kept weights to this many bits (2, 3, 4 or 8) in the same sweep (joint sparse + quantized)."
    )
    group_size: int = Field(128, description="With --bits: columns per scale; -1 = one scale per output channel.")
    symmetric: bool = Field(
        True, description="With --bits: symmetric grid, or asymmetric with integer zero points.", json_schema_extra={"flags": ["--symmetric/--asymmetric", "--sym/--asym"]}
    )
    format: Literal["dense", "sparse", "packed"] = Field(
        "dense",
        description="dense (zeros stored as values: no smaller file; loads everywhere), packed (with --bits: compressed-tensors "
        "pack-quantized, loads in transformers and vLLM), or sparse (compressed-tensors sparse-bitmask, sparse-24-bitmask for 2:4, "
        "marlin-24 for 2:4 with --bits: the file shrinks, but only compressed-tensors <= 0.14 reads these layouts).",
    )
    damp: float = Field(0.01, gt=0, le=1, allow_inf_nan=False, description="sparsegpt dampening, a fraction of the mean Hessian diagonal (at most 1).")
    block_size: int = Field(128, ge=1, description="sparsegpt: columns pruned together (the mask of a row is chosen per block).")
    structured: StructuredSpec | None = Field(
        None,
        description="Structured pruning instead: remove a share of MLP channels, of key/value head groups, and decoder layers "
        "(a count or a list), e.g. 'mlp=0.25,heads=0.25,layers=4' or 'layers=[3,5]'.",
        json_schema_extra={"metavar": "mlp=SHARE,heads=SHARE,layers=N"},
    )
    importance: Literal["magnitude", "activation"] = Field(
        "activation",
        description="Structured: rank channels and heads by weight magnitude (data-free) or by their activations on the calibration text (Minitron).",
    )
    align: int = Field(32, ge=1, description="Structured: the new MLP width is a multiple of this (quantization groups and GGUF blocks still fit).")
    calib: CalibPath = None
    samples: CalibSamples = 128
    seq_len: CalibSeqLen = 512
    batch_size: CalibBatch = 4
    calib_dtype: CalibDtype = "auto"

    _sparsity = field_validator("sparsity")(_check_sparsity)
    _pattern = field_validator("pattern")(_check_pattern)

    _bits = field_validator("bits")(check_bits)
    _group_size = field_validator("group_size")(check_group_size)

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        given = self.model_fields_set
        if self.structured is not None:
            clash = sorted(given & {"method", "sparsity", "pattern", "scope", "overrides", "bits", "format"})
            if clash:
                raise ValueError(f"structured pruning removes whole channels, heads and layers; {clash[0]} is for unstructured pruning")
            if self.structured.empty:
                raise ValueError("structured: nothing to remove; give mlp=SHARE, heads=SHARE or layers=N")
            return self
        if self.pattern is not None and "sparsity" in given:
            raise ValueError("give sparsity or pattern, not both")
        if "scope" in given and self.scope == "global" and self.method != "magnitude":
            raise ValueError(f"scope=global ranks raw magnitudes across linears; {self.method} compares weights within each row")
        if self.scope == "global" and (self.pattern is not None or self.overrides):
            raise ValueError("scope=global sets one threshold for all target linears; it takes neither a pattern nor overrides")
        if self.bits is not None and self.method != "sparsegpt":
            raise ValueError(f"bits: only sparsegpt prunes and quantizes in one sweep; run quantize after {self.method} (it keeps the zeros)")
        if self.format == "packed" and self.bits is None:
            raise ValueError("format=packed stores quantized codes; give --bits (sparsegpt), or use dense or sparse")
        if ("importance" in given or "align" in given) and self.structured is None:
            raise ValueError("importance and align are for structured pruning (--structured)")
        return self

    @property
    def calibrated(self) -> bool:
        """Whether the pass runs the model on calibration text."""
        if self.structured is not None:
            return self.importance == "activation" or isinstance(self.structured.layers, int) and self.structured.layers > 0
        return self.method in CALIBRATED

    @property
    def selection(self) -> Selection:
        return Selection(tuple(self.targets) if self.targets is not None else None, tuple(self.ignore))

    def target_for(self, module: str) -> PruneTarget | None:
        """The pruning of ``module``, or None when an override skips it."""
        sparsity, pattern = self.sparsity, self.pattern
        for override in self.overrides:
            if matches(override.match, module):
                if override.skip:
                    return None
                if override.sparsity is not None:
                    sparsity, pattern = override.sparsity, None
                if override.pattern is not None:
                    pattern = override.pattern
                break
        return PruneTarget(sparsity=sparsity, nm=parse_nm(pattern) if pattern is not None else None)

    def describe(self) -> str:
        """One line: what was asked for."""
        if self.structured is not None:
            return f"structured {self.structured} (importance: {self.importance})"
        what = f"{self.pattern}" if self.pattern else f"{self.sparsity:.0%}"
        quant = f" + W{self.bits} g{self.group_size} {'sym' if self.symmetric else 'asym'}" if self.bits else ""
        return f"{self.method} {what}{quant} ({self.format})"
