"""Settings of the GGUF export pass (the CLI's ``weightsmith export gguf`` options and a recipe step's keys)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["GGUFExportConfig"]


class GGUFExportConfig(BaseModel):
    """How a checkpoint becomes one GGUF file."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(
        "auto",
        description=(
            "GGUF file type: f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1, q2_k, q3_k_s, q3_k_m (q3_k), q3_k_l, "
            "q4_k_s, q4_k_m (q4_k), q5_k_s, q5_k_m (q5_k), q6_k, with llama-quantize's per-tensor rules. "
            "auto: packed linears keep their codes in the GGUF type that holds their grid (4-bit symmetric -> q4_0, "
            "4-bit asymmetric -> q4_1, 8-bit symmetric -> q8_0), everything else f16."
        ),
        json_schema_extra={"metavar": "TYPE"},
    )
    tensor_type: list[str] = Field(
        default_factory=list,
        description="Per-tensor type override PATTERN=TYPE (a regex searched in the GGUF tensor name, e.g. 'attn_v=q8_0'); repeatable, first match wins.",
        json_schema_extra={"metavar": "PATTERN=TYPE"},
    )
    pure: bool = Field(False, description="Give every weight the base type (no llama-quantize mix rules), as llama-quantize --pure.")
    name: str | None = Field(None, description="general.name in the file (default: the checkpoint folder's name).")

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        from compress.gguf.mixes import mix_named

        if value.strip().lower() == "auto":
            return "auto"
        return mix_named(value)[0]

    @field_validator("tensor_type")
    @classmethod
    def _overrides(cls, values: list[str]) -> list[str]:
        from compress.gguf.mixes import parse_tensor_types

        parse_tensor_types(values)
        return values
