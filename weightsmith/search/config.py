"""The settings of the budget search: the spec file's keys (model, texts, space) and the options of
``weightsmith search SPEC.yaml OUT`` (budget, trials, storage, study, jobs), in one model so that a
recipe step ``pass: search`` takes the same keys."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from weightsmith.errors import WeightsmithError

DEFAULT_GGUF_TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]


@dataclass(frozen=True)
class Budget:
    """What must fit: ``kind`` bytes (the checkpoint's safetensors), bpw (bits per weight of the
    quantized linears) or gguf (the GGUF file's bytes), and the limit."""

    kind: Literal["bytes", "bpw", "gguf"]
    limit: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``60MB`` | ``3.5bpw`` | ``gguf:80MB``."""
        from weightsmith.runtime import parse_size

        text = text.strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*bpw", text, flags=re.IGNORECASE)
        if m:
            return cls("bpw", float(m[1]))
        kind = "bytes"
        if text.lower().startswith("gguf:"):
            kind, text = "gguf", text[5:]
        try:
            return cls(kind, float(parse_size(text)))
        except WeightsmithError:
            raise ValueError(f"budget {text!r}: write a size (60MB), bits per weight (3.5bpw) or a GGUF file size (gguf:80MB)") from None

    def describe(self) -> str:
        if self.kind == "bpw":
            return f"{self.limit:g} bits per weight"
        what = "GGUF file" if self.kind == "gguf" else "checkpoint"
        size = f"{self.limit / 1e6:.2f} MB" if self.limit >= 1e5 else f"{self.limit:.0f} bytes"
        return f"{what} of at most {size}"


class Space(BaseModel):
    """What each group may take. Groups: the attention and the MLP linears of ``depth_groups``
    contiguous bands of decoder layers."""

    model_config = ConfigDict(extra="forbid")
    depth_groups: int = Field(4, ge=1, description="Bands of consecutive layers; each band has an attention and an MLP group.")
    bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 8], description="Bit widths a group may take.")
    group_size: list[int] = Field(default_factory=lambda: [64, 128], description="Columns per scale a group may take.")
    method: list[Literal["rtn", "gptq", "awq"]] = Field(
        default_factory=lambda: ["gptq"],
        description="Methods a group may take (at equal size GPTQ usually beats the others; each one added multiplies the candidates).",
    )
    symmetric: bool = Field(True, description="Symmetric grids (the packed format then loads compressed everywhere).")
    sparsity: list[float | str] = Field(
        default_factory=lambda: [0.0],
        description="Wanda pruning a group may take before it is quantized: 0 (none), a share (0.5) or an N:M pattern ('2:4'). "
        "Zeros stored in packed or GGUF weights do not shrink the file: a size budget gains nothing from them; "
        "they are for runtimes with sparse kernels.",
    )
    drop_layers: list[int] = Field(
        default_factory=lambda: [0],
        description="Numbers of decoder layers a trial may drop (the least influential ones, removed by structured pruning before quantizing).",
    )
    mlp_width: list[float] = Field(
        default_factory=lambda: [0.0],
        description="Shares of every layer's MLP channels a trial may remove (by weight magnitude, the new width a multiple of 32), e.g. [0, 0.25].",
    )
    gguf_types: list[str] = Field(default_factory=lambda: list(DEFAULT_GGUF_TYPES), description="GGUF block types a group may take (GGUF budgets).")
    gguf_mix: str = Field("q4_k_m", description="GGUF budgets: llama-quantize's mix for the tensors outside the groups (embeddings, output).")

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: list[int]) -> list[int]:
        from compress.config import BITS

        bad = [b for b in value if b not in BITS]
        if bad or not value:
            raise ValueError(f"bits must be a non-empty list of {', '.join(map(str, BITS))}, got {value}")
        return sorted(set(value))

    @field_validator("sparsity", mode="before")
    @classmethod
    def _shares_as_floats(cls, value: Any) -> Any:
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value] if isinstance(value, list) else value

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, value: list[float | str]) -> list[float | str]:
        from compress.prune.config import parse_nm

        if not value:
            raise ValueError("sparsity must list at least one choice (0 for none)")
        for v in value:
            if isinstance(v, str):
                parse_nm(v)
            elif not 0.0 <= v < 1.0:
                raise ValueError(f"sparsity shares lie in [0, 1), got {v}")
        return value

    def sparsities(self) -> list[str | None]:
        """The sparsity choices as candidates hold them (None: dense)."""
        return [None if v == 0 else (v if isinstance(v, str) else f"{v:g}") for v in self.sparsity]

    @field_validator("drop_layers")
    @classmethod
    def _drops(cls, value: list[int]) -> list[int]:
        if not value or any(k < 0 for k in value):
            raise ValueError(f"drop_layers must be a non-empty list of counts >= 0, got {value}")
        return sorted(set(value))

    @field_validator("mlp_width")
    @classmethod
    def _widths(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 <= w < 1.0 for w in value):
            raise ValueError(f"mlp_width must be a non-empty list of shares in [0, 1), got {value}")
        return sorted(set(value))

    @field_validator("gguf_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        from compress.gguf.mixes import BLOCK, FLOAT_TYPES

        bad = [t for t in value if t not in BLOCK or t in FLOAT_TYPES]
        if bad or not value:
            raise ValueError(f"gguf_types must be GGUF block types, got {bad or value}")
        return value


class SearchSpec(BaseModel):
    """The keys of a search spec file."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Checkpoint folder or hub id to compress.")
    eval: str | None = Field(None, description="Evaluation text of the final scoring (default: WikiText-2 test from the assets).")
    eval_tokens: int = Field(20480, ge=2, description="Tokens of the evaluation text the final scoring reads (the pinned protocol's 20480).")
    calib: str | None = Field(None, description="Calibration text (default: the WikiText-2 calibration split of the assets).")
    samples: int = Field(64, ge=1, description="Calibration blocks (candidates and rebuilds).")
    seq_len: int = Field(512, ge=2, description="Tokens per calibration block.")
    act_order: bool = Field(False, description="GPTQ with act-order (static groups), in the candidates and the rebuilds.")
    proxy_tokens: int = Field(2048, ge=2, description="Tokens of the KL proxy that scores each trial: the calibration text's last ones, kept out of the calibration blocks.")
    space: Space = Field(default_factory=Space)
    front: int = Field(3, ge=1, description="Best trials rebuilt with sequential calibration and scored by the full evaluation.")
    baselines: list[str] = Field(default_factory=list, description="Uniform candidates (e.g. gptq-w4g64) rebuilt and scored for comparison.")
    peers: list[dict[str, Any]] = Field(default_factory=list, description="Figures of other tools to mark on the plot: {name, bytes, perplexity}.")


class SearchSettings(SearchSpec):
    """The spec's keys and the command's options."""

    budget: str = Field(description="What must fit: 60MB (checkpoint), 3.5bpw (bits per weight of the quantized linears) or gguf:80MB (GGUF file).")
    trials: int = Field(40, ge=1, description="Trials in the study (a resumed study counts the ones it has).")
    storage: str | None = Field(
        None, description="optuna storage URL (sqlite:///study.db, postgresql+psycopg://...); default: an SQLite file in the cache, so a killed search resumes."
    )
    study: str | None = Field(None, description="Study name (default: derived from the model, spec and budget, so the same command resumes it).")
    jobs: int = Field(1, ge=1, description="Worker processes on this machine sharing the study.")

    _source: Path | None = None

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: str) -> str:
        Budget.parse(value)
        return value

    @model_validator(mode="after")
    def _baselines(self) -> SearchSettings:
        from weightsmith.search.space import Candidate

        for name in self.baselines:
            try:
                Candidate.parse(name)
            except ValueError as exc:
                raise ValueError(f"baselines: {exc}") from None
        return self

    @property
    def budget_value(self) -> Budget:
        return Budget.parse(self.budget)

    @classmethod
    def read_file(cls, path: Path) -> dict[str, Any]:
        """The mapping a spec file holds, or a one-line error naming the file."""
        from weightsmith.checkpoint import read_yaml_mapping

        return read_yaml_mapping(path, "a search spec is a YAML mapping (model, space, ...)")

    def read_from(self, path: Path | None) -> SearchSettings:
        """These settings, with relative paths found beside the spec file ``path``."""
        self._source = path
        return self

    def resolve_path(self, value: str | None) -> str | None:
        """A path the spec names, relative to the spec file when it does not exist as given."""
        if value is None or self._source is None or Path(value).is_absolute() or Path(value).exists():
            return value
        beside = self._source.parent / value
        return str(beside) if beside.exists() else value

    def study_name(self, model_key: str) -> str:
        """The study this search adds to: ``study``, else one derived from what decides the trials."""
        if self.study:
            return self.study
        keys = self.model_dump(mode="json", exclude={"trials", "storage", "study", "jobs", "front", "baselines", "peers", "eval", "eval_tokens"})
        keys["model"] = model_key
        digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]
        return f"weightsmith-{Path(self.model).name}-{self.budget.replace(':', '-')}-{digest}"
