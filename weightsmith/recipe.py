"""YAML recipes: a list of passes, each step's output feeding the next.

```yaml
steps:
  - pass: quantize
    method: gptq
    bits: 4
    group_size: 64
```

A step's keys are its pass's settings (:mod:`weightsmith.passes`), validated as the CLI validates
them; unknown keys are errors that name the key, the step and the allowed keys. Runtime options
(device, threads, seed, work folder, shard size) are CLI flags, not recipe fields. Intermediate outputs
go to a work folder; the last step writes the destination. A step that names its own inputs (merge)
after another step, or in a recipe given an input model, takes that output as ``model: previous``;
without such a reference the recipe is refused rather than dropping the earlier work.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from weightsmith.errors import WeightsmithError
from weightsmith.passes import REGISTRY, Inputs, Output, Report, run_pass, settings_from
from weightsmith.runtime import Runtime

log = logging.getLogger(__name__)

#: How a step that names its own inputs (merge) refers to the previous step's output, or to the
#: recipe's input model when it is the first step.
PREVIOUS = "previous"


def recipe_model(path: Path) -> str | None:
    """The input model a recipe names, if any (the CLI's MODEL argument takes precedence)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    model = doc.get("model") if isinstance(doc, dict) else None
    return str(model) if model is not None else None


def preset_path(name: str) -> Path:
    """A ready recipe shipped in ``presets/`` by name (``NAME``, ``preset:NAME`` or ``NAME.yaml``)."""
    import presets

    folder = Path(presets.__file__).parent
    stem = name.removeprefix("preset:").removesuffix(".yaml").removesuffix(".yml")
    path = folder / f"{stem}.yaml"
    if path.parent != folder or not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise WeightsmithError(None, f"no preset named {stem!r}; presets: {known}")
    return path


def load_recipe(path: Path) -> list[tuple[str, BaseModel]]:
    """Parse and validate a whole recipe file into (pass name, settings) steps before anything runs."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsmithError(path, f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise WeightsmithError(path, f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or set(doc) - {"model", "steps"} or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise WeightsmithError(path, "a recipe is a mapping with `steps` (a non-empty list of steps) and optionally `model`")
    steps = []
    for i, raw in enumerate(doc["steps"], start=1):
        if not isinstance(raw, dict) or "pass" not in raw:
            raise WeightsmithError(path, f"step {i}: each step is a mapping with a `pass` key")
        fields = dict(raw)
        name = fields.pop("pass")
        if name not in REGISTRY:
            raise WeightsmithError(path, f"step {i}: unknown pass {name!r}; passes: {', '.join(sorted(REGISTRY))}")
        settings = settings_from(name, fields, path, context=f"step {i} ({name}): ")
        read_from = getattr(settings, "read_from", None)
        if read_from is not None:  # errors name the recipe; relative model paths are found beside it
            read_from(path)
        steps.append((name, settings))
    return steps


def _with_previous(settings: BaseModel, previous: Path) -> tuple[BaseModel, int]:
    """``settings`` with every model reference written ``previous`` replaced by ``previous``'s
    path, and how many there were."""
    count = 0

    def replace(value: Any) -> Any:
        nonlocal count
        if isinstance(value, dict):
            return {k: replace(v) for k, v in value.items()}
        if isinstance(value, list):
            return [replace(v) for v in value]
        if value == PREVIOUS:
            count += 1
            return str(previous)
        return value

    values = replace(settings.model_dump(exclude_unset=True))
    if not count:
        return settings, 0
    changed = type(settings).model_validate(values)
    source = getattr(settings, "source", None)
    if source is not None:
        changed.read_from(source)
    return changed, count


def check_chain(steps: list[tuple[str, BaseModel]], has_model: bool) -> None:
    """Refuse a recipe that would silently drop work: a step that names its own inputs (merge),
    placed after a step or given an input model, must use that output as ``model: previous``; a
    step that takes one input needs something before it; ``previous`` with nothing before it is an
    error too; a step that writes a single file (GGUF export) can only be the last."""
    for i, (name, settings) in enumerate(steps, start=1):
        spec = REGISTRY[name]
        if spec.output is Output.FILE and i < len(steps):
            raise WeightsmithError(None, f"step {i} ({name}) writes a single file, which no later step can read; make it the last step")
        before = f"step {i - 1}'s output" if i > 1 else "the input model" if has_model else None
        uses = _with_previous(settings, Path("."))[1]
        if spec.inputs is Inputs.ONE and before is None:
            raise WeightsmithError(None, f"step {i} ({name}) needs an input model: pass MODEL or give the recipe a `model` key")
        if spec.inputs is Inputs.NAMED:
            if uses and before is None:
                raise WeightsmithError(None, f"step {i} ({name}) refers to `previous`, but nothing comes before it")
            if before is not None and not uses:
                raise WeightsmithError(
                    None,
                    f"step {i} ({name}) names its own input models and would drop {before}; "
                    f"use it as `model: previous` in the step, or remove what comes before",
                )


def run_recipe(
    steps: list[tuple[str, BaseModel]],
    model: Path | None,
    dest: Path,
    runtime: Runtime | None = None,
    *,
    on_step: Callable[[int, str], None] | None = None,
) -> list[Report]:
    """Run the steps in order from ``model``; the last writes ``dest``. Returns each step's report.
    Intermediate outputs live in a temporary folder inside ``runtime.workdir`` (default: the
    system's temporary folder), removed at the end."""
    runtime = runtime or Runtime()
    if dest.exists() and not runtime.force:
        raise WeightsmithError(dest, "already exists; pass --force to overwrite it")
    check_chain(steps, model is not None)
    reports = []
    if runtime.workdir is not None:
        runtime.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="weightsmith-recipe-", dir=runtime.workdir) as work:
        current = model
        for i, (name, settings) in enumerate(steps, start=1):
            if on_step is not None:
                on_step(i, name)
            last = i == len(steps)
            out = dest if last else Path(work) / f"step-{i}-{name}"
            step_runtime = runtime if last else runtime.with_(force=False)
            if REGISTRY[name].inputs is Inputs.NAMED:
                if current is not None:
                    settings = _with_previous(settings, current)[0]
                reports.append(run_pass(name, [], out, settings, step_runtime))
            else:
                reports.append(run_pass(name, [current] if current is not None else [], out, settings, step_runtime))
            current = out
        shutil.rmtree(work, ignore_errors=True)
    return reports
