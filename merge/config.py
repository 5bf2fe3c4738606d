"""The merge config: mergekit's YAML, accepted as it is.

Supported keys: ``models`` (each ``{model, parameters}``) or ``slices`` (each ``{sources: [{model,
layer_range, parameters}], base_model, parameters}``), ``merge_method``, ``base_model``,
``parameters``, ``dtype``, ``out_dtype`` and ``tokenizer_source: base``. mergekit keys weightsmith
does not implement (``modules``, ``tokenizer``, ``chat_template``, ``residual_weight``, LoRA and
revision references, other tokenizer sources) are refused by name, as are unknown keys (with the
allowed ones listed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from merge.methods import METHODS
from merge.params import Setting
from weightsmith.errors import WeightsmithError
from weightsmith.stformat import known_dtype_name, parse_dtype, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["InputModel", "MergeConfig", "OutputSlice", "SliceSource", "load_config"]

#: mergekit config keys that weightsmith does not implement, with what to do instead.
UNSUPPORTED = {
    "modules": "write `models` or `slices`",
    "tokenizer": "only `tokenizer_source: base` is supported",
    "chat_template": "edit the output's tokenizer_config.json instead",
    "residual_weight": "not implemented",
    "lora": "merge the LoRA into its model first",
}

Parameters = dict[str, Setting]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _model_reference(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("a model reference must be a path or hub id (mergekit's LoRA and dict references are not supported)")
    if "+" in value and not Path(value).exists():
        raise ValueError(f"{value!r}: LoRA references (model+lora) are not supported; merge the LoRA into its model first")
    return value


def _optional_reference(value: Any) -> Any:
    return None if value is None else _model_reference(value)


class InputModel(_Strict):
    model: str
    parameters: Parameters | None = None

    _check_model = field_validator("model", mode="before")(_model_reference)


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    _check_model = field_validator("model", mode="before")(_model_reference)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] < value[0]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start <= end")
        return value


class OutputSlice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None

    _check_base = field_validator("base_model", mode="before")(_optional_reference)

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, value: list[SliceSource]) -> list[SliceSource]:
        if not value:
            raise ValueError("a slice needs at least one source")
        return value


class MergeConfig(_Strict):
    """A mergekit merge config. ``source`` (not a key) is the YAML file it came from, if any: errors
    name it, and relative model paths are also looked for beside it."""

    _source: Path | None = PrivateAttr(default=None)
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None

    _check_base = field_validator("base_model", mode="before")(_optional_reference)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown merge method {value!r} (supported: {', '.join(METHODS)})")
        return value

    _known_dtype = field_validator("dtype", "out_dtype")(known_dtype_name)

    @field_validator("tokenizer_source")
    @classmethod
    def _base_tokenizer(cls, value: str | None) -> str | None:
        if value not in (None, "base"):
            raise ValueError(f"tokenizer_source {value!r} is not supported (only `base`: the output takes the base model's tokenizer)")
        return value

    @model_validator(mode="after")
    def _one_layout(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None) or not (self.models or self.slices):
            raise ValueError("give exactly one of `models` or `slices`, not empty")
        if self.tokenizer_source == "base" and self.base_model is None:
            raise ValueError("tokenizer_source: base needs a base_model")
        return self

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def base_dir(self) -> Path | None:
        return None if self._source is None else self._source.parent

    def read_from(self, path: Path | None) -> MergeConfig:
        """This config, marked as read from the file ``path``."""
        self._source = path
        return self

    @property
    def donor(self) -> str:
        """The model whose config.json and tokenizer the output takes: the base, else the first one
        listed."""
        if self.base_model:
            return self.base_model
        if self.models:
            return self.models[0].model
        assert self.slices, "validated: models or slices"
        return self.slices[0].sources[0].model

    @property
    def compute_st_dtype(self) -> str | None:
        """``dtype`` as a safetensors dtype name, or None."""
        return None if self.dtype is None else parse_dtype(self.dtype)

    @property
    def output_st_dtype(self) -> str | None:
        """``out_dtype`` as a safetensors dtype name, or None."""
        return None if self.out_dtype is None else parse_dtype(self.out_dtype)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        st = self.compute_st_dtype
        return None if st is None else torch_dtype(st)

    @property
    def output_dtype(self) -> torch.dtype | None:
        st = self.output_st_dtype
        return None if st is None else torch_dtype(st)


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "the config"


def _model_at(loc: tuple) -> type[BaseModel]:
    """The config class that holds the key at ``loc``."""
    cls: type[BaseModel] = MergeConfig
    nested = {"models": InputModel, "slices": OutputSlice, "sources": SliceSource}
    for part in loc[:-1]:
        if isinstance(part, str) and part in nested:
            cls = nested[part]
    return cls


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            key = str(loc[-1])
            where = _where(loc[:-1])
            if key in UNSUPPORTED:
                problems.append(f"mergekit key {key!r} at {where} is not supported ({UNSUPPORTED[key]})")
            else:
                allowed = ", ".join(_model_at(loc).model_fields)
                problems.append(f"unknown key {key!r} at {where} (allowed: {allowed})")
        elif "parameters" in loc:
            problems.append(f"{_where(loc[: loc.index('parameters') + 2])}: not a scalar, a list of scalars or a list of {{filter, value}}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{_where(loc)}: {message}")
    return "; ".join(dict.fromkeys(problems))


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping a YAML merge config file holds, or a one-line error naming the file."""
    from weightsmith.checkpoint import read_yaml_mapping

    return read_yaml_mapping(path, "a merge config is a YAML mapping (merge_method, models or slices, ...)")


def load_config(source: str | Path | dict | MergeConfig) -> tuple[MergeConfig, Path | None]:
    """The validated config and the folder relative model paths may also be found in (the YAML
    file's folder), from a YAML path, a parsed dict or a config."""
    if isinstance(source, MergeConfig):
        return source, source.base_dir
    where: Path | None = None
    if isinstance(source, dict):
        doc: dict[str, Any] = source
    else:
        where = Path(source)
        doc = read_config_file(where)
    try:
        config = MergeConfig.model_validate(doc)
    except ValidationError as exc:
        raise WeightsmithError(where, _describe(exc)) from None
    return config, where.parent if where is not None else None


class MergeSettings(MergeConfig):
    """The merge pass's settings: a mergekit config (from the CONFIG file on the command line, or the
    keys of a recipe step) and how weightsmith runs it."""

    engine: Literal["auto", "numpy", "torch"] = Field(
        "auto",
        description="Math engine: numpy (CPU, never loads torch: safetensors bf16/fp16/fp32 inputs with linear, soup, "
        "task_arithmetic, dare_linear, dare_ties, della, della_linear), torch (every method, input and device), "
        "or auto (numpy where it applies). Both write the same tensors.",
    )
    strict: bool = Field(False, description="Refuse parameters the merge method does not use (default: warn and ignore them, as mergekit does).")

    @staticmethod
    def describe_error(exc: ValidationError) -> str:
        """Every problem of a config, mergekit's unsupported keys named as such."""
        return _describe(exc)
