"""The settings of the quantize pass (shared by the CLI, recipes and the budget search)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.grid import QuantGrid
from compress.targets import DEFAULT_IGNORE, Selection, matches

Method = Literal["rtn", "gptq", "awq", "awq_gptq"]
#: Methods that search and fold AWQ scales first, and methods whose quantizer is GPTQ: ``awq_gptq``
#: is both (AWQ's scaling, then GPTQ on the scaled weights with Hessians of the scaled inputs).
SCALED = ("awq", "awq_gptq")
GPTQ_QUANTIZER = ("gptq", "awq_gptq")
#: Methods that need calibration data: every one that scales or runs GPTQ.
CALIBRATED = tuple(dict.fromkeys(GPTQ_QUANTIZER + SCALED))


class Override(BaseModel):
    """Settings for the modules matching ``match`` (a name, a ``.suffix`` or ``re:<regex>``); unset
    fields keep the pass's values."""

    model_config = ConfigDict(extra="forbid")
    match: str
    method: Method | None = None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    skip: bool = False


@dataclass(frozen=True)
class LinearSettings:
    """What one linear gets."""

    method: Method
    grid: QuantGrid


class QuantizeConfig(BaseModel):
    """Everything the quantize pass needs besides its input and output folders."""

    model_config = ConfigDict(extra="forbid")
    method: Method = "gptq"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = False
    damp: float = Field(0.01, gt=0)
    block_size: int = Field(128, ge=1)
    clip: bool = False
    awq_grid: int = Field(20, ge=1)
    awq_samples: int = Field(8, ge=1)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    overrides: list[Override] = Field(default_factory=list)
    format: Literal["dense", "packed"] = "dense"
    calib: str | None = None
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=2)
    #: calibration blocks per layer forward: 4 x 512 tokens keeps matmuls large, and the freed
    #: activations small enough that the allocator's slack stays low (measured on SmolLM2 GPTQ with
    #: 64 blocks: peak RSS 1043 MiB with 8 per batch, 864 MiB with 4, the same time)
    batch_size: int = Field(4, ge=1)
    calib_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (2, 3, 4, 8):
            raise ValueError("bits must be 2, 3, 4 or 8")
        return v

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
                values.update({k: v for k, v in override.model_dump(exclude={"match", "skip"}).items() if v is not None})
                break
        grid = QuantGrid(bits=values["bits"], symmetric=values["symmetric"], group_size=values["group_size"])
        return LinearSettings(method=values["method"], grid=grid)

    @property
    def calibrated(self) -> bool:
        """Whether any linear needs calibration data (GPTQ or AWQ)."""
        return self.method in CALIBRATED or any(o.method in CALIBRATED for o in self.overrides if not o.skip)
