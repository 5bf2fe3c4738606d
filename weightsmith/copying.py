"""The copy pass: a checkpoint tensor by tensor into a new folder, resharded, cast, or turned from
pickle into safetensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from weightsmith.passes import Report
from weightsmith.runtime import Runtime
from weightsmith.stformat import known_dtype_name

if TYPE_CHECKING:
    from weightsmith.checkpoint import Checkpoint


class CopySettings(BaseModel):
    """The copy pass's settings."""

    model_config = ConfigDict(extra="forbid")
    dtype: str | None = Field(
        None, description="Cast floating tensors to this dtype: bf16, fp16 or fp32 (default: keep each tensor's own).", json_schema_extra={"metavar": "DTYPE"}
    )

    _known_dtype = field_validator("dtype")(known_dtype_name)


def run(inputs: Sequence[Checkpoint], dest: Path, settings: CopySettings, runtime: Runtime) -> Report:
    """The copy pass as the registry runs it."""
    from weightsmith.checkpoint import copy_checkpoint
    from weightsmith.provenance import Record
    from weightsmith.stformat import parse_torch_dtype

    src = inputs[0]
    record = Record("copy", settings.model_dump(mode="json"), seed=runtime.seed)
    record.add_input(src.folder, src.files, src.provenance)
    dtype = parse_torch_dtype(settings.dtype) if settings.dtype else None
    copy_checkpoint(src, dest, dtype=dtype, force=runtime.force, max_shard_size=runtime.max_shard_size, record=record)
    return Report("copy", dest)
