"""YAML recipes: a list of passes, each step's output feeding the next.

```yaml
steps:
  - pass: quantize
    method: gptq
    bits: 4
    group_size: 64
```

Unknown keys are errors that name the key, the step and the allowed keys. Runtime options (device,
shard size, seed, work folder) are CLI flags, not recipe fields. Intermediate outputs go to a work
folder; the last step writes the destination.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassSpec:
    """One pass a recipe can name: its settings model and how to run it."""

    settings: type[BaseModel]
    run: Callable[[Checkpoint | None, Path, BaseModel, dict], dict]
    #: False for passes that name their own inputs (merge): they ignore the previous step's output.
    needs_input: bool = True


def _run_quantize(src: Checkpoint, dest: Path, settings: BaseModel, runtime: dict) -> dict:
    from compress.quantize import calibration_tokens, quantize_checkpoint

    tokens = calibration_tokens(src, settings) if settings.calibrated else None
    report = quantize_checkpoint(src, dest, settings, calib_tokens=tokens, **runtime)
    return report.figures()


def _run_merge(src: Checkpoint | None, dest: Path, settings: BaseModel, runtime: dict) -> dict:
    from merge.run import merge_checkpoints

    return merge_checkpoints(settings, dest, **runtime).figures()


def passes() -> dict[str, PassSpec]:
    """The pass registry: name in a recipe -> settings model and runner."""
    from compress.config import QuantizeConfig
    from merge.config import MergeConfig

    return {"quantize": PassSpec(QuantizeConfig, _run_quantize), "merge": PassSpec(MergeConfig, _run_merge, needs_input=False)}


def recipe_model(path: Path) -> str | None:
    """The input model a recipe names, if any (the CLI's MODEL argument takes precedence)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    model = doc.get("model") if isinstance(doc, dict) else None
    return str(model) if model is not None else None


def preset_path(name: str) -> Path:
    """A ready recipe shipped in ``presets/`` by name (with or without .yml)."""
    import presets

    folder = Path(presets.__file__).parent
    path = folder / (name if name.endswith((".yml", ".yaml")) else f"{name}.yml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yml")))
        raise WeightsmithError(None, f"no preset named {name!r}; presets: {known}")
    return path


def load_recipe(path: Path) -> list[tuple[str, BaseModel]]:
    """Parse and validate a recipe file into (pass name, settings) steps."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsmithError(path, f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise WeightsmithError(path, f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or set(doc) - {"model", "steps"} or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise WeightsmithError(path, "a recipe is a mapping with `steps` (a non-empty list of steps) and optionally `model`")
    registry = passes()
    steps = []
    for i, raw in enumerate(doc["steps"], start=1):
        if not isinstance(raw, dict) or "pass" not in raw:
            raise WeightsmithError(path, f"step {i}: each step is a mapping with a `pass` key")
        fields = dict(raw)
        name = fields.pop("pass")
        if name not in registry:
            raise WeightsmithError(path, f"step {i}: unknown pass {name!r}; passes: {', '.join(sorted(registry))}")
        model = registry[name].settings
        unknown = sorted(set(fields) - set(model.model_fields))
        if unknown:
            allowed = ", ".join(sorted(model.model_fields))
            raise WeightsmithError(path, f"step {i} ({name}): unknown key {unknown[0]!r}; allowed keys: {allowed}")
        try:
            steps.append((name, model(**fields)))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise WeightsmithError(path, f"step {i} ({name}): {where}: {first['msg']}") from None
    return steps


def run_recipe(
    steps: list[tuple[str, BaseModel]],
    model: Path | None,
    dest: Path,
    *,
    force: bool = False,
    work_dir: Path | None = None,
    on_step: Callable[[int, str], None] | None = None,
    runtime: dict | None = None,
) -> list[dict]:
    """Run the steps in order from ``model``; the last writes ``dest``. Returns each step's figures."""
    if dest.exists() and not force:
        raise WeightsmithError(dest, "already exists; pass --force to overwrite it")
    registry = passes()
    if model is None and registry[steps[0][0]].needs_input:
        raise WeightsmithError(None, f"the first step ({steps[0][0]}) needs an input model: pass MODEL or give the recipe a `model` key")
    figures = []
    with tempfile.TemporaryDirectory(prefix="weightsmith-recipe-", dir=work_dir) as work:
        current = Checkpoint(model) if model is not None else None
        for i, (name, settings) in enumerate(steps, start=1):
            if on_step is not None:
                on_step(i, name)
            last = i == len(steps)
            out = dest if last else Path(work) / f"step-{i}-{name}"
            figures.append(registry[name].run(current, out, settings, {"force": force if last else False, **(runtime or {})}))
            if not last:
                current = Checkpoint(out)
        shutil.rmtree(work, ignore_errors=True)
    return figures
