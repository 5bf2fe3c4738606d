"""YAML recipes: input models, a list of passes, each step's output feeding the next, and a step cache.

```yaml
model: ./base                 # one model, or a list (`--model` on the command line overrides it)
eval: wiki.test.raw           # optional: perplexity of every step on this text (beside the recipe)
eval_tokens: 4096             # optional: the first N tokens of it (default 4096)
steps:
  - pass: prune
    method: wanda
    sparsity: 0.5
  - pass: quantize
    method: gptq
    bits: 4
    group_size: 64
```

A step's keys are its pass's settings (:mod:`weightsmith.passes`), validated as the CLI validates
them; unknown keys are errors that name the key, the step and the allowed keys. Runtime options
(device, threads, seed, work folder, shard size) are CLI flags, not recipe fields. The whole recipe is
validated, its input models found and every step's cache key computed before any pass runs.

A step that names its own inputs (merge) refers to them as ``previous`` (the previous step's output,
or the first input model in the first step), ``input`` (the first input model), ``input:N`` (the N-th,
from 1) or by path or hub id; an entry ``{model: inputs, ...}`` of its ``models:`` list stands for one
entry per input model with the same parameters (a model soup). Placed after a step, such a step must
use ``previous``, and every input model must be used by some step: a recipe is refused rather than
dropping earlier work or an input.

Every step's output is cached in ``<workdir>/steps/<key>/`` (workdir default
``$XDG_CACHE_HOME/weightsmith/recipes``), the key being a sha256 over the inputs' keys (for a model
folder the sha256 of its files, for a previous step its key), the pass name, its settings as canonical
JSON (calibration texts by content), the package version and the runtime options that change bytes.
A step runs into a hidden partial folder renamed to its key only when complete, so a present step
folder is a finished one (reused, reported as cached) and a killed step leaves nothing but a partial
folder that the next run removes. The last step's files are then hard-linked (or copied) to the
destination, with the resolved recipe (every default filled in, every input model named by its path
or hub id) beside them as ``recipe.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from weightsmith import __version__, provenance
from weightsmith.errors import WeightsmithError
from weightsmith.passes import REGISTRY, Inputs, Output, Report, run_pass, settings_from
from weightsmith.runtime import Runtime

log = logging.getLogger(__name__)

#: The previous step's output (the first input model in the first step).
PREVIOUS = "previous"
#: The first input model; ``input:N`` is the N-th, from 1.
INPUT = "input"
#: In a ``models:`` list entry: one entry per input model.
INPUTS = "inputs"
#: The keys a recipe file may have.
RECIPE_KEYS = ("model", "eval", "eval_tokens", "steps")
DEFAULT_EVAL_TOKENS = 4096
#: Keys whose string values are model references, wherever they appear outside ``parameters``.
REFERENCE_KEYS = ("model", "base_model")
#: A finished step's report, kept in its cache folder (hidden: never placed at the destination).
STEP_REPORT = ".step.json"
#: The resolved recipe's name inside a destination folder (beside a file: ``OUT.recipe.yaml``).
RECIPE_NAME = "recipe.yaml"
#: Files placed at the destination as hard links of the cache's; the small rest is copied, so that
#: editing a config at the destination can never change the cache.
LINKED_SUFFIXES = (".safetensors", ".gguf")

Step = tuple[str, BaseModel]


@dataclass
class Recipe:
    """A validated recipe: its steps and, optionally, its input models and evaluation text."""

    steps: list[Step]
    models: list[str] = field(default_factory=list)
    eval: Path | None = None
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    #: the file it was read from: errors name it, relative paths are also found beside it
    path: Path | None = None

    @property
    def base_dir(self) -> Path | None:
        return None if self.path is None else self.path.parent


@dataclass(frozen=True)
class InputModel:
    """An input model: how the resolved recipe names it (absolute path or hub id), and its folder."""

    spec: str
    folder: Path

    @property
    def label(self) -> str:
        return Path(self.spec).name


@dataclass
class StepResult:
    """One step of a run: its cache key and output (a folder, or the file inside its folder), the
    pass's report, and whether it came from the cache."""

    index: int
    pass_name: str
    key: str
    output: Path
    report: Report
    cached: bool


@dataclass(frozen=True)
class StepEvent:
    """What :func:`run_recipe` tells its caller about a step: ``cached`` (reused), ``running`` (the
    pass starts) or ``done`` (the pass finished after ``seconds``)."""

    index: int
    total: int
    pass_name: str
    state: str
    seconds: float = 0.0


# ---- reading and validating ---------------------------------------------------------------------


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


def find_recipe(text: str) -> Path:
    """The recipe file ``weightsmith run`` names: a YAML path, ``preset:NAME`` or a preset's name."""
    if text.startswith("preset:"):
        return preset_path(text)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yml", ".yaml") or "/" in text or os.sep in text:
        raise WeightsmithError(path, "no such recipe file")
    return preset_path(text)


def read_recipe(path: Path) -> Recipe:
    """Parse and validate a whole recipe file (top-level keys, every step's settings, the model
    references' syntax) before anything runs."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsmithError(path, f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise WeightsmithError(path, f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise WeightsmithError(path, "a recipe is a mapping with `steps` (a non-empty list of steps) and optionally `model`, `eval`, `eval_tokens`")
    unknown = sorted(set(doc) - set(RECIPE_KEYS), key=str)
    if unknown:
        raise WeightsmithError(path, f"unknown key {unknown[0]!r}; allowed keys: {', '.join(RECIPE_KEYS)}")
    if not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise WeightsmithError(path, "`steps` must be a non-empty list of steps")
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
        _check_reference_syntax(settings, f"step {i} ({name})", path)
        steps.append((name, settings))
    return Recipe(steps, _models_of(doc.get("model"), path), _eval_of(doc.get("eval"), path), _eval_tokens_of(doc.get("eval_tokens"), path), path)


def load_recipe(path: Path) -> list[Step]:
    """The validated (pass name, settings) steps of a recipe file; see :func:`read_recipe`."""
    return read_recipe(path).steps


def _models_of(value: Any, path: Path) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise WeightsmithError(path, "`model` is a checkpoint folder or hub id, or a list of them")
    return list(values)


def _eval_of(value: Any, path: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise WeightsmithError(path, "`eval` is the path of an evaluation text file or folder")
    text = Path(value).expanduser()
    return text if text.is_absolute() else path.parent / text


def _eval_tokens_of(value: Any, path: Path) -> int:
    if value is None:
        return DEFAULT_EVAL_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise WeightsmithError(path, f"`eval_tokens` must be a whole number of at least 2, got {value!r}")
    return value


def parse_reference(value: str) -> tuple[str, int | None] | None:
    """``("previous", None)``, ``("input", N)`` or ``("inputs", None)`` for a placeholder model
    reference; None for a path or hub id. ``input:N`` with N not a whole number from 1 is an error."""
    if value == PREVIOUS:
        return PREVIOUS, None
    if value == INPUTS:
        return INPUTS, None
    if value == INPUT:
        return INPUT, 1
    if value.startswith(f"{INPUT}:"):
        number = value.removeprefix(f"{INPUT}:")
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"{value!r}: write input:N with N the input model's number, from 1")
        return INPUT, int(number)
    return None


def _reference_slots(doc: Any, in_models: bool = False) -> Iterator[tuple[dict, str, bool]]:
    """Every model reference in a settings document: (the mapping holding it, its key, whether the
    mapping is an entry of a ``models:`` list). ``parameters`` are not references."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "parameters":
                continue
            if key in REFERENCE_KEYS and isinstance(value, str):
                yield doc, key, in_models
            else:
                yield from _reference_slots(value, in_models=key == "models")
    elif isinstance(doc, list):
        for value in doc:
            yield from _reference_slots(value, in_models)


def _references(settings: BaseModel) -> list[tuple[str, int | None]]:
    """The placeholder references of a step's settings (already checked)."""
    found = []
    for holder, key, _ in _reference_slots(settings.model_dump(mode="json")):
        ref = parse_reference(holder[key])
        if ref is not None:
            found.append(ref)
    return found


def _check_reference_syntax(settings: BaseModel, step: str, where: Path | None) -> None:
    """``input:N`` well formed, ``inputs`` only as the model of a ``models:`` entry."""
    for holder, key, in_models in _reference_slots(settings.model_dump(mode="json")):
        try:
            ref = parse_reference(holder[key])
        except ValueError as exc:
            raise WeightsmithError(where, f"{step}: {exc}") from None
        if ref is not None and ref[0] == INPUTS and not (in_models and key == "model"):
            raise WeightsmithError(where, f"{step}: `inputs` (every input model) can only be the model of a `models:` entry, not {key}")


def check_chain(steps: list[Step], n_models: int, where: Path | None = None) -> None:
    """Refuse a recipe that would silently drop work or cannot run, given ``n_models`` input models:
    a step that names its own inputs (merge) placed after a step must use its output as ``previous``,
    and in the first place must use the input models when there are any; a step that takes one input
    needs something before it; ``previous`` with nothing before it, and ``input:N`` beyond the input
    models, are errors; every input model must be used by some step; a step that writes a single
    file (GGUF export) can only be the last."""
    used: set[int] = set()
    for i, (name, settings) in enumerate(steps, start=1):
        spec = REGISTRY[name]
        step = f"step {i} ({name})"
        if spec.output is Output.FILE and i < len(steps):
            raise WeightsmithError(where, f"{step} writes a single file, which no later step can read; make it the last step")
        refs = _references(settings)
        for kind, number in refs:
            if kind == INPUT:
                if number > n_models:
                    given = f"only {n_models} {'was' if n_models == 1 else 'were'} given" if n_models else "none was given"
                    raise WeightsmithError(where, f"{step}: input:{number} refers to input model {number}, but {given} (--model, or the recipe's `model`)")
                used.add(number - 1)
            elif kind == INPUTS:
                if not n_models:
                    raise WeightsmithError(where, f"{step}: `inputs` stands for the input models, but none was given (--model, or the recipe's `model`)")
                used |= set(range(n_models))
        uses_previous = any(kind == PREVIOUS for kind, _ in refs)
        before = f"step {i - 1}'s output" if i > 1 else "the input model" if n_models else None
        if spec.inputs is Inputs.ONE:
            if before is None:
                raise WeightsmithError(where, f"{step} needs an input model: pass --model M or give the recipe a `model` key")
            if i == 1:
                used.add(0)
        if spec.inputs is Inputs.NAMED:
            if uses_previous and before is None:
                raise WeightsmithError(where, f"{step} refers to `previous`, but nothing comes before it")
            if i == 1 and uses_previous:
                used.add(0)
            if i > 1 and not uses_previous:
                raise WeightsmithError(
                    where, f"{step} names its own input models and would drop {before}; use it as `model: previous` in the step, or remove what comes before"
                )
            if i == 1 and n_models and not refs:
                raise WeightsmithError(
                    where, f"{step} names its own input models and would drop the input model; refer to it as `model: input` (or input:N, inputs) in the step"
                )
    unused = sorted(set(range(n_models)) - used)
    if unused:
        raise WeightsmithError(where, f"input model {unused[0] + 1} is used by no step; refer to it as input:{unused[0] + 1} in a merge step, or leave it out")


# ---- resolving: input models, references, location-dependent defaults ----------------------------


def find_model(spec: str, base_dir: Path | None = None) -> InputModel:
    """An input model: a path as written (relative to the current folder), else beside the recipe,
    else a hub id (fetched). Paths are named absolute in the resolved recipe, hub ids as they are."""
    from weightsmith.models import resolve

    path = Path(spec).expanduser()
    if not path.exists() and base_dir is not None and not path.is_absolute() and (base_dir / path).exists():
        path = base_dir / path
    if path.exists():
        absolute = Path(os.path.abspath(path))
        return InputModel(str(absolute), absolute)
    return InputModel(spec, resolve(spec))


def _text_path(value: str, base_dir: Path | None) -> str:
    """A text file or folder named in a step (calibration): as written, else beside the recipe,
    absolute when found."""
    path = Path(value).expanduser()
    if not path.exists() and base_dir is not None and not path.is_absolute() and (base_dir / path).exists():
        path = base_dir / path
    return os.path.abspath(path) if path.exists() else value


def _filled_defaults(name: str, doc: dict, settings: BaseModel, label: str | None, base_dir: Path | None) -> dict:
    """Settings whose default depends on where the recipe runs, written out so that the resolved
    recipe says what ran: the calibration text of a calibrated pass (the shared assets' unless
    given, absolute), and the GGUF export's ``general.name`` (``label``: the first input model's
    name, not the cache folder's)."""
    if "calib" in type(settings).model_fields and getattr(settings, "calibrated", False):
        if doc.get("calib") is None:
            from compress.quantize import CALIB_ASSET
            from weightsmith.paths import asset

            default = asset(CALIB_ASSET)
            if default is not None:
                doc["calib"] = os.path.abspath(default)
        else:
            doc["calib"] = _text_path(doc["calib"], base_dir)
    if name == "gguf" and doc.get("name") is None and label is not None:
        doc["name"] = label
    return doc


def recipe_inputs(recipe: Recipe, models: Sequence[str | Path] | str | Path | None = None) -> list[InputModel]:
    """The input models of a run: ``models`` (the command line's --model) when given, else the
    recipe's own; each found as :func:`find_model` finds it. The chain is checked first, so that a
    recipe that cannot run fails before any model is fetched."""
    given = [models] if isinstance(models, str | Path) else list(models or [])
    specs = [str(m) for m in given] or recipe.models
    check_chain(recipe.steps, len(specs), recipe.path)
    return [find_model(spec, recipe.base_dir) for spec in specs]


def resolve_steps(steps: list[Step], inputs: list[InputModel], where: Path | None = None) -> list[Step]:
    """The steps with every default filled in and every input reference (``input``, ``input:N``,
    ``inputs``, a path beside the recipe, and ``previous`` in the first step) replaced by the input
    model's path or hub id; ``previous`` after the first step stays (it is the chain). Checks
    :func:`check_chain` first."""
    check_chain(steps, len(inputs), where)
    base_dir = None if where is None else where.parent
    label = inputs[0].label if inputs else None
    resolved = []
    for i, (name, settings) in enumerate(steps, start=1):
        doc = settings.model_dump(mode="json", exclude_unset=True)
        if isinstance(doc.get("models"), list):
            expanded = []
            for entry in doc["models"]:
                if isinstance(entry, dict) and entry.get("model") == INPUTS:
                    expanded += [{**entry, "model": model.spec} for model in inputs]
                else:
                    expanded.append(entry)
            doc["models"] = expanded
        for holder, key, _ in list(_reference_slots(doc)):
            ref = parse_reference(holder[key])
            if ref is None:
                holder[key] = find_model(holder[key], base_dir).spec
            elif ref[0] == INPUT or (ref[0] == PREVIOUS and i == 1):
                holder[key] = inputs[(ref[1] or 1) - 1].spec
            if label is None and holder[key] != PREVIOUS:
                label = Path(holder[key]).name
        doc = _filled_defaults(name, doc, settings, label, base_dir)
        changed = settings_from(name, doc, where, context=f"step {i} ({name}): ")
        if hasattr(changed, "read_from"):
            changed.read_from(where)
        resolved.append((name, changed))
    return resolved


def with_previous(settings: BaseModel, previous: Path) -> BaseModel:
    """``settings`` with every model reference written ``previous`` replaced by ``previous``'s path."""
    doc = settings.model_dump(mode="json", exclude_unset=True)
    slots = [(holder, key) for holder, key, _ in _reference_slots(doc) if holder[key] == PREVIOUS]
    if not slots:
        return settings
    for holder, key in slots:
        holder[key] = str(previous)
    changed = type(settings).model_validate(doc)
    source = getattr(settings, "source", None)
    if source is not None:
        changed.read_from(source)
    return changed


def filled_document(settings: BaseModel) -> dict:
    """A step's settings as a recipe writes them, with every default filled in: the keys it was
    given, then each default its validation accepts as given (a few settings refuse keys that do not
    apply, e.g. structured pruning refuses ``method``), in the settings' own order."""
    from pydantic import ValidationError

    model = type(settings)
    full = settings.model_dump(mode="json")
    doc = settings.model_dump(mode="json", exclude_unset=True)
    for name in model.model_fields:
        if name in doc:
            continue
        trial = {**doc, name: full[name]}
        try:
            checked = model.model_validate(trial)
        except ValidationError:
            continue
        if checked.model_dump(mode="json") == full:
            doc = trial
    return {name: doc[name] for name in model.model_fields if name in doc}


def resolved_document(steps: list[Step], inputs: list[InputModel], eval_text: Path | None, eval_tokens: int) -> dict:
    """The resolved recipe as a YAML-ready mapping: ``model`` only where the first step reads it
    (every other input is named in the steps), the evaluation text by absolute path, each step with
    every setting."""
    doc: dict[str, Any] = {}
    if inputs and REGISTRY[steps[0][0]].inputs is Inputs.ONE:
        doc["model"] = inputs[0].spec
    if eval_text is not None:
        doc["eval"] = os.path.abspath(eval_text)
        doc["eval_tokens"] = eval_tokens
    doc["steps"] = [{"pass": name, **filled_document(settings)} for name, settings in steps]
    return doc


# ---- cache keys --------------------------------------------------------------------------------


def _canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_key(path: Path, hashes: provenance.HashCache) -> str:
    """sha256 over a file, or over a folder's non-hidden files (names and sha256, sorted; a model
    folder's top level, a text folder's every level)."""
    path = Path(path)
    if path.is_file():
        return hashes.sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return hashlib.sha256(_canonical({str(p.relative_to(path)): hashes.sha256(p) for p in files}).encode()).hexdigest()


def model_key(folder: Path, hashes: provenance.HashCache) -> str:
    """A model folder's key: the sha256 of its top-level files (weights, config, tokenizer, record)."""
    folder = Path(folder)
    if folder.is_file():
        return hashes.sha256(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return hashlib.sha256(_canonical({p.name: hashes.sha256(p) for p in files}).encode()).hexdigest()


def step_key(name: str, settings: BaseModel, input_keys: dict[str, str], previous_key: str | None, runtime: Runtime, hashes: provenance.HashCache) -> str:
    """A step's cache key: sha256 over its inputs' keys (model references and the calibration text
    replaced by their contents' keys), the pass and its settings as canonical JSON, the package
    version, and the runtime options that change bytes (seed, shard size, device)."""
    doc = settings.model_dump(mode="json")
    for holder, key, _ in _reference_slots(doc):
        holder[key] = f"step:{previous_key}" if holder[key] == PREVIOUS else f"model:{input_keys[holder[key]]}"
    if isinstance(doc.get("calib"), str) and Path(doc["calib"]).exists():
        doc["calib"] = f"text:{content_key(Path(doc['calib']), hashes)}"
    one_input = [previous_key] if REGISTRY[name].inputs is Inputs.ONE else []
    key_doc = {
        "pass": name,
        "settings": doc,
        "inputs": one_input,
        "weightsmith": __version__,
        "runtime": {"seed": runtime.seed, "max_shard_size": runtime.max_shard_size, "device": runtime.device},
    }
    return hashlib.sha256(_canonical(key_doc).encode()).hexdigest()


def step_keys(steps: list[Step], inputs: list[InputModel], runtime: Runtime, where: Path | None = None) -> list[str]:
    """Every step's key, in order (resolved steps: references are paths or hub ids, or ``previous``)."""
    hashes = provenance.HashCache()
    base_dir = None if where is None else where.parent
    keys: list[str] = []
    input_keys: dict[str, str] = {}
    previous = model_key(inputs[0].folder, hashes) if inputs else None
    for name, settings in steps:
        for holder, key, _ in _reference_slots(settings.model_dump(mode="json")):
            ref = holder[key]
            if ref != PREVIOUS and ref not in input_keys:
                input_keys[ref] = model_key(find_model(ref, base_dir).folder, hashes)
        previous = step_key(name, settings, input_keys, previous, runtime, hashes)
        keys.append(previous)
    hashes.save()
    return keys


# ---- running -----------------------------------------------------------------------------------


def default_workdir() -> Path:
    """Where step outputs are cached unless ``--workdir`` says otherwise."""
    from weightsmith.paths import cache_dir

    return cache_dir() / "recipes"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: What a run leaves in the step cache while it works: ``.partial-KEY-PID-…`` (a step being
#: written, and a pass's own temporary folder named after it) and ``.old-KEY-PID-…`` (a step being
#: replaced).
_LEFTOVER = re.compile(r"\.(?:partial|old)-[0-9a-f]{64}-(\d+)-")


def _remove(path: Path) -> None:
    """Delete a file or a folder tree (what is already gone is no error)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _work_name(kind: str, key: str) -> str:
    return f".{kind}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sweep_partials(steps_dir: Path) -> None:
    """Remove what killed runs left in the step cache (see :data:`_LEFTOVER`): entries of
    processes that no longer run."""
    for entry in steps_dir.iterdir():
        match = _LEFTOVER.search(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("removing %s, left by a run that was stopped", entry)
            _remove(entry)


def _file_name(name: str) -> str:
    """The name of a single-file pass's output inside its step folder."""
    return f"model.{name}"


def _step_output(name: str, folder: Path) -> Path:
    return folder / _file_name(name) if REGISTRY[name].output is Output.FILE else folder


def is_complete(name: str, folder: Path) -> bool:
    """Whether a step folder holds a finished step (folders only appear complete; see the module)."""
    return (folder / STEP_REPORT).is_file() and _step_output(name, folder).exists()


def _report_doc(report: Report) -> dict:
    return {
        "pass": report.pass_name,
        "bytes_written": report.bytes_written,
        "parameters": report.parameters,
        "bits_per_weight": report.bits_per_weight,
        "sparsity": report.sparsity,
        "seconds": report.seconds,
        "extra": report.extra,
        "title": report.title,
    }


def _cached_report(name: str, folder: Path) -> Report:
    doc = json.loads((folder / STEP_REPORT).read_text(encoding="utf-8"))
    return Report(
        name,
        _step_output(name, folder),
        bytes_written=doc["bytes_written"],
        parameters=doc["parameters"],
        bits_per_weight=doc["bits_per_weight"],
        sparsity=doc["sparsity"],
        seconds=doc["seconds"],
        extra=doc["extra"],
        title=doc["title"],
    )


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def _file_record(name: str, settings: BaseModel, source: Path | None, report: Report, seed: int) -> dict:
    """weightsmith.json for a single-file step (the file cannot hold it): the pass, its settings,
    its input with that input's own record as parent, the figures."""
    from weightsmith.checkpoint import Checkpoint

    record = provenance.Record(name, settings.model_dump(mode="json"), seed=seed)
    if source is not None:
        checkpoint = Checkpoint(source)
        record.add_input(checkpoint.folder, checkpoint.files, checkpoint.provenance)
    record.figures.update({k: v for k, v in report.figures().items() if k != "seconds"})  # no wall-clock time: same inputs, same bytes
    return record.finish()


def _publish(partial: Path, folder: Path) -> None:
    """Rename a finished partial folder to its key; an existing folder (``--no-cache``, or another
    run that finished the same step first) is replaced."""
    old = None
    if folder.exists():
        old = folder.parent / _work_name("old", folder.name)
        os.replace(folder, old)
    os.replace(partial, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _run_step(name: str, settings: BaseModel, source: Path | None, folder: Path, runtime: Runtime) -> Report:
    """Run one step into a partial folder beside ``folder``, renamed to it when complete."""
    spec = REGISTRY[name]
    partial = folder.parent / _work_name("partial", folder.name)
    try:
        if spec.output is Output.FILE:
            partial.mkdir()
        target = _step_output(name, partial)
        if spec.inputs is Inputs.NAMED:
            if source is not None:
                settings = with_previous(settings, source)
            report = run_pass(name, [], target, settings, runtime)
        else:
            report = run_pass(name, [source] if source is not None else [], target, settings, runtime)
        if spec.output is Output.FILE:
            _write_json(partial / provenance.RECORD_NAME, _file_record(name, settings, source, report, runtime.seed))
        _write_json(partial / STEP_REPORT, _report_doc(report))
        _publish(partial, folder)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    report.output = _step_output(name, folder)
    return report


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link for weights (copy when linking fails: another file system); a copy otherwise."""
    if src.name.endswith(LINKED_SUFFIXES):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def _replace_into(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``, replacing what is there (checked against --force before)."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.weightsmith-old-{uuid.uuid4().hex[:12]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        _remove(old)


def sidecar(dest: Path, name: str) -> Path:
    """A file written beside a single-file output: ``OUT.recipe.yaml``, ``OUT.weightsmith.json``."""
    return dest.with_name(f"{dest.name}.{name}")


def place_output(result: StepResult, dest: Path, document: dict, keys: list[str]) -> None:
    """Put the last step's cached output at ``dest`` (a temporary name beside it, renamed when
    complete) with the resolved recipe; its weightsmith.json gains the recipe and the step keys (the
    chain of every step's record is already there, each step's record holding its input's)."""
    folder = result.output if result.output.is_dir() else result.output.parent
    record = json.loads((folder / provenance.RECORD_NAME).read_text(encoding="utf-8"))
    record["recipe"] = {"document": document, "step_keys": keys}
    recipe_text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    tmp = dest.parent / f".{dest.name}.weightsmith-tmp-{uuid.uuid4().hex[:12]}"
    try:
        if result.output.is_dir():
            tmp.mkdir()
            for file in sorted(result.output.iterdir()):
                if file.is_file() and not file.name.startswith(".") and file.name != provenance.RECORD_NAME:
                    _link_or_copy(file, tmp / file.name)
            _write_json(tmp / provenance.RECORD_NAME, record)
            (tmp / RECIPE_NAME).write_text(recipe_text, encoding="utf-8")
        else:
            for name, write in ((RECIPE_NAME, lambda p: p.write_text(recipe_text, encoding="utf-8")), (provenance.RECORD_NAME, lambda p: _write_json(p, record))):
                side_tmp = tmp.with_name(f"{tmp.name}.{name}")
                write(side_tmp)
                os.replace(side_tmp, sidecar(dest, name))
            _link_or_copy(result.output, tmp)
        _replace_into(tmp, dest)
    finally:
        if tmp.exists():
            _remove(tmp)


def run_recipe(
    recipe: Recipe | list[Step],
    models: Sequence[str | Path] | str | Path | None,
    dest: str | Path,
    runtime: Runtime | None = None,
    *,
    use_cache: bool = True,
    eval_text: Path | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> list[StepResult]:
    """Run a recipe (or a list of steps) on ``models`` (default: the recipe's own) into ``dest``:
    each step from the cache when its folder is there (unless ``use_cache`` is False), else run into
    the cache; the last step's output is then placed at ``dest`` with the resolved recipe. Everything
    is validated, and every step's key computed, before the first pass runs. ``eval_text`` (default:
    the recipe's) only goes into the resolved recipe; :func:`evaluate_steps` measures it."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(list(recipe))
    runtime = runtime or Runtime()
    dest = Path(dest)
    if dest.exists() and not runtime.force:
        raise WeightsmithError(dest, "already exists; pass --force to overwrite it")
    if not dest.absolute().parent.is_dir():
        raise WeightsmithError(dest, f"parent folder {dest.absolute().parent} does not exist")
    inputs = recipe_inputs(recipe, models)
    steps = resolve_steps(recipe.steps, inputs, recipe.path)
    keys = step_keys(steps, inputs, runtime, recipe.path)
    document = resolved_document(steps, inputs, eval_text or recipe.eval, recipe.eval_tokens)
    steps_dir = (runtime.workdir or default_workdir()) / "steps"
    steps_dir.mkdir(parents=True, exist_ok=True)
    sweep_partials(steps_dir)
    step_runtime = runtime.with_(force=False)
    results: list[StepResult] = []
    source = inputs[0].folder if inputs else None
    for i, ((name, settings), key) in enumerate(zip(steps, keys), start=1):
        folder = steps_dir / key
        cached = use_cache and is_complete(name, folder)
        if on_step is not None:
            on_step(StepEvent(i, len(steps), name, "cached" if cached else "running"))
        if cached:
            log.info("step %d (%s): cached in %s", i, name, folder)
            report = _cached_report(name, folder)
        else:
            start = time.perf_counter()
            report = _run_step(name, settings, source, folder, step_runtime)
            if on_step is not None:
                on_step(StepEvent(i, len(steps), name, "done", time.perf_counter() - start))
        results.append(StepResult(i, name, key, _step_output(name, folder), report, cached))
        source = folder
    place_output(results[-1], dest, document, keys)
    return results


# ---- evaluation --------------------------------------------------------------------------------


def _eval_key(model: str, reference: str | None, text: str, max_tokens: int) -> str:
    """The key of one row's evaluation: the model's and the reference's keys, the text's content,
    the protocol's token count and the package version (the protocol's code)."""
    doc = {"model": model, "reference": reference, "text": text, "max_tokens": max_tokens, "weightsmith": __version__}
    return hashlib.sha256(_canonical(doc).encode()).hexdigest()


def evaluate_steps(
    inputs: list[Path],
    results: list[StepResult],
    text: Path,
    max_tokens: int,
    workdir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list:
    """Perplexity by the pinned protocol (the first ``max_tokens`` tokens of ``text``) of the input
    models, then of every step's output, window by window together; the first input model is the
    reference of KL and top-1 agreement. A GGUF file output is read back (dequantized, float32)
    through :func:`weightsmith.gguf_import.convert_gguf`. Each row's figures are kept in
    ``<workdir>/evals/`` under a key of the model, reference and text contents, so that a run whose
    steps are cached does not evaluate them again. Returns an evaluate.Report per row."""
    from dataclasses import asdict

    from weightsmith.evaluate import Protocol, Report as EvalReport, evaluate_many
    from weightsmith.gguf_read import is_gguf

    base = workdir or default_workdir()
    (base / "evals").mkdir(parents=True, exist_ok=True)
    hashes = provenance.HashCache()
    input_keys = [model_key(folder, hashes) for folder in inputs]
    text_key = content_key(Path(text), hashes)
    hashes.save()
    reference = inputs[0] if inputs else None
    rows = [(folder, key) for folder, key in zip(inputs, input_keys)] + [(r.output, r.key) for r in results]
    files = [base / "evals" / f"{_eval_key(key, input_keys[0] if inputs else None, text_key, max_tokens)}.json" for _, key in rows]
    reports: list = [EvalReport(**json.loads(f.read_text(encoding="utf-8"))) if f.is_file() else None for f in files]
    missing = [i for i, report in enumerate(reports) if report is None]
    if not missing:
        return reports
    with tempfile.TemporaryDirectory(prefix="weightsmith-eval-", dir=base) as work:
        import torch

        from weightsmith.gguf_import import convert_gguf

        folders = []
        for i in missing:
            output, key = rows[i]
            is_file = output.is_file() and is_gguf(output)
            folders.append(convert_gguf(output, Path(work) / key, dtype=torch.float32) if is_file else output)
        measured = evaluate_many(folders, text, Protocol(max_tokens=max_tokens), reference, progress)
    for i, report in zip(missing, measured):
        reports[i] = report
        tmp = files[i].with_name(f".{files[i].name}.{os.getpid()}.tmp")
        _write_json(tmp, asdict(report))
        os.replace(tmp, files[i])
    return reports
