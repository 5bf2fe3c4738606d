"""The pass registry: the one place where each pass is declared.

A pass has one name everywhere (CLI command, recipe ``pass:``, ``weightsmith.json``, the search), a
pydantic settings model (the CLI's options and a recipe step's keys both come from it), what it takes
(one checkpoint, several named in its settings, or none), what it writes (a checkpoint folder or a
single file), and ``run(inputs, dest, settings, runtime) -> Report``. The CLI, ``weightsmith run`` and
Python callers go through :func:`run_pass`, which opens the inputs, applies the runtime's
process-wide settings around the pass and fills in the figures every pass shares.

Adding a pass is a :class:`PassDef` in :data:`REGISTRY`, its settings model and its function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from weightsmith.errors import WeightsmithError
from weightsmith.runtime import Runtime

if TYPE_CHECKING:
    from weightsmith.checkpoint import Checkpoint

__all__ = ["REGISTRY", "Inputs", "Output", "PassDef", "Report", "get", "run_pass", "settings_from", "validation_message"]


class Inputs(str, Enum):
    """What a pass reads."""

    #: one checkpoint folder (or hub id): the CLI's MODEL argument, a recipe's previous output
    ONE = "one"
    #: several checkpoints, named in the pass's own settings (a merge config's models)
    NAMED = "named"
    #: nothing
    NONE = "none"


class Output(str, Enum):
    """What a pass writes."""

    FOLDER = "folder"
    FILE = "file"


@dataclass
class Report:
    """What a pass did: the figures every pass shares, plus its own in ``extra``.

    ``parameters`` counts logical weights (a packed 4-bit linear counts its rows x columns, not its
    int32 words); ``bits_per_weight`` is the storage of the quantized linears, None when the pass
    quantized nothing; ``sparsity`` is the share of zeros in the pass's target weights, None when the
    pass did not measure it."""

    pass_name: str
    output: Path
    bytes_written: int = 0
    parameters: int = 0
    bits_per_weight: float | None = None
    sparsity: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: one line saying what was done, e.g. ``ties merge`` or ``gptq W4 g64 sym (packed)``
    title: str = ""

    def figures(self) -> dict[str, Any]:
        """The shared figures and the pass's own, as plain JSON values."""
        shared = {
            "bytes_written": self.bytes_written,
            "parameters": self.parameters,
            "bits_per_weight": None if self.bits_per_weight is None else round(self.bits_per_weight, 4),
            "sparsity": None if self.sparsity is None else round(self.sparsity, 6),
            "seconds": round(self.seconds, 3),
        }
        return {**shared, **self.extra}


RunFn = Callable[[Sequence["Checkpoint"], Path, BaseModel, Runtime], Report]


@dataclass(frozen=True)
class PassDef:
    """One pass. ``run`` and ``settings`` are ``module:attribute`` strings, imported on first use, so
    that declaring every pass (and building the CLI from their settings) imports neither torch nor
    the passes' code."""

    name: str
    #: one line for ``--help`` and listings
    summary: str
    settings_ref: str
    run_ref: str
    inputs: Inputs = Inputs.ONE
    output: Output = Output.FOLDER
    #: the pass runs torch code (the runtime then sets torch's threads and checks the device)
    uses_torch: bool = True
    #: the pass streams many short-lived chunk temporaries (allocator thresholds kept around it)
    keeps_freed_memory: bool = False
    #: for passes whose settings come from a file (a mergekit config): the model of that file's
    #: keys; the remaining settings fields are options
    settings_file_ref: str | None = None
    #: the CLI command group the pass's command sits in (``export`` for ``weightsmith export gguf``)
    group: str | None = None

    @property
    def settings(self) -> type[BaseModel]:
        return _resolve(self.settings_ref)

    @property
    def run(self) -> RunFn:
        return _resolve(self.run_ref)

    @property
    def settings_file(self) -> type[BaseModel] | None:
        return _resolve(self.settings_file_ref) if self.settings_file_ref else None


def _resolve(ref: str) -> Any:
    module, _, attribute = ref.partition(":")
    return getattr(import_module(module), attribute)


#: Every pass, by name.
REGISTRY: dict[str, PassDef] = {
    p.name: p
    for p in (
        PassDef(
            "quantize",
            "Quantize the linears with RTN, GPTQ or AWQ; write them dense or packed.",
            "compress.config:QuantizeConfig",
            "compress.quantize:run",
        ),
        PassDef(
            "prune",
            "Prune: magnitude, Wanda or SparseGPT zeros (a share or N:M, optionally joint with quantization), "
            "or structured removal of MLP channels, key/value head groups and layers.",
            "compress.prune.config:PruneConfig",
            "compress.prune.run:run",
        ),
        PassDef(
            "merge",
            "Merge models as a mergekit YAML config says: every mergekit 0.1.5 method (linear, slerp, nuslerp, multislerp, "
            "karcher, task_arithmetic, ties, dare, della, breadcrumbs, sce, ram, model_stock, arcee_fusion, nearswap, passthrough).",
            "merge.config:MergeSettings",
            "merge.run:run",
            inputs=Inputs.NAMED,
            uses_torch=False,
            keeps_freed_memory=True,
            settings_file_ref="merge.config:MergeConfig",
        ),
        PassDef(
            "gguf",
            "Export a checkpoint as one GGUF file for llama.cpp (f16, q8_0 ... q2_k and llama-quantize's mixes); "
            "packed 4/8-bit linears keep their own codes.",
            "compress.gguf.config:GGUFExportConfig",
            "compress.gguf.export:run",
            output=Output.FILE,
            group="export",
        ),
        PassDef(
            "search",
            "Budget search: optuna picks per-group bits, group size, method (or GGUF type) for the best model under "
            "a size budget (60MB, 3.5bpw or gguf:80MB), on one machine or many sharing a study.",
            "weightsmith.search.config:SearchSettings",
            "weightsmith.search.run:run",
            inputs=Inputs.NAMED,
            settings_file_ref="weightsmith.search.config:SearchSpec",
        ),
        PassDef(
            "copy",
            "Copy a checkpoint tensor by tensor: reshard, cast, or turn pickle into safetensors.",
            "weightsmith.copying:CopySettings",
            "weightsmith.copying:run",
        ),
    )
}


def get(name: str) -> PassDef:
    """The pass called ``name``, or an error listing the passes."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsmithError(None, f"unknown pass {name!r}; passes: {', '.join(sorted(REGISTRY))}") from None


def validation_message(exc: ValidationError) -> str:
    """The first problem of a settings validation error, as ``field: message``."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def settings_from(name: str, values: dict[str, Any], where: str | Path | None = None, context: str = "") -> BaseModel:
    """Validate ``values`` into pass ``name``'s settings; the CLI and recipes both come here, so the
    same value gets the same error. Unknown keys name the key and the allowed ones. A settings model
    may describe its own errors (``describe_error(exc) -> str``, e.g. merge's mergekit keys)."""
    model = get(name).settings
    describe = getattr(model, "describe_error", None)
    if describe is None:
        unknown = sorted(set(values) - set(model.model_fields))
        if unknown:
            allowed = ", ".join(sorted(model.model_fields))
            raise WeightsmithError(where, f"{context}unknown key {unknown[0]!r}; allowed keys: {allowed}")
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise WeightsmithError(where, f"{context}{(describe or validation_message)(exc)}") from None


def open_input(spec: str | Path | Checkpoint, allow_pickle: bool = False) -> Checkpoint:
    """A checkpoint from a folder, a hub id or an open checkpoint."""
    from weightsmith.checkpoint import Checkpoint
    from weightsmith.models import resolve

    if isinstance(spec, Checkpoint):
        return spec
    return Checkpoint(resolve(spec), allow_pickle=allow_pickle)


def run_pass(
    name: str,
    inputs: Sequence[str | Path | Checkpoint],
    dest: str | Path,
    settings: BaseModel | dict[str, Any] | None = None,
    runtime: Runtime | None = None,
) -> Report:
    """Run pass ``name`` on ``inputs`` into ``dest`` with ``settings`` (a settings model or a dict of
    its fields; None for the defaults) under ``runtime``'s process-wide settings."""
    spec = get(name)
    runtime = runtime or Runtime()
    if not isinstance(settings, BaseModel):
        settings = settings_from(name, dict(settings or {}))
    dest = Path(dest)
    if spec.inputs is Inputs.ONE and len(inputs) != 1:
        raise WeightsmithError(None, f"{name} takes one input model, got {len(inputs)}")
    if spec.inputs is not Inputs.ONE and inputs:
        raise WeightsmithError(None, f"{name} names its own inputs in its settings; it takes no input model")
    if dest.exists() and not runtime.force:
        raise WeightsmithError(dest, "already exists; pass --force to overwrite it")
    start = time.perf_counter()
    opened = [open_input(spec_in, runtime.allow_pickle) for spec_in in inputs]
    with runtime.applied(uses_torch=spec.uses_torch, keep_freed_memory=spec.keeps_freed_memory):
        report = spec.run(opened, dest, settings, runtime)
    report.seconds = time.perf_counter() - start
    if spec.output is Output.FOLDER:
        if not (report.bytes_written and report.parameters):  # a pass may say (a search's GGUF folder)
            from weightsmith.checkpoint import Checkpoint

            written = Checkpoint(dest)
            report.bytes_written = report.bytes_written or written.file_bytes
            report.parameters = report.parameters or written.num_parameters
    elif not report.bytes_written:
        report.bytes_written = dest.stat().st_size
    return report
