"""Preflight and plan: from the config and the inputs' headers to the list of output tensors, each
with its sources and resolved parameters. Nothing here reads a tensor.

Every disagreement found (architectures, config sizes, tensor names, shapes, layer ranges, input
counts, parameters) is collected and raised as ONE :class:`WeightsmithError`, before anything is
written.

The config is normalized the way mergekit 0.1.5 does it: ``models`` becomes one slice spanning
all layers (the base appended when it is not listed); each slice yields its layers in order with
depth ``t = i / (n - 1)``; tensors outside the layers come from the first slice (input embeddings)
or the last (final norm, head) at ``t = 0``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.config import MergeConfig
from merge.layout import Layout
from merge.methods import BasePolicy, Method, method_named
from merge.params import ParamSpec, Scope, resolve
from merge.passthrough import stack_layers, stacked_config
from merge.sources import MergeInput, open_input
from weightsmith.checkpoint import config_with_dtype
from weightsmith.errors import WeightsmithError

log = logging.getLogger(__name__)

__all__ = ["AGREEING_CONFIG_KEYS", "Job", "Plan", "Source", "build_plan", "open_inputs"]

#: config.json entries every input must agree on.
AGREEING_CONFIG_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)
#: At most this many tensor-level mismatches are spelled out in the preflight error.
MAX_LISTED = 20


@dataclass(frozen=True)
class Source:
    model: int
    name: str


@dataclass(frozen=True)
class Job:
    """One output tensor: its sources (in input order), which source is the base, and the resolved
    parameters."""

    name: str
    sources: tuple[Source, ...]
    base: int | None
    shared: dict[str, Any]
    per_input: tuple[dict[str, Any], ...]


@dataclass
class Plan:
    config: MergeConfig
    method: Method
    inputs: list[MergeInput]
    jobs: list[Job]
    donor: MergeInput
    out_config: dict
    layers: int | None


@dataclass
class _Slice:
    sources: list[tuple[int, int, int, dict | None]]
    base: int | None
    parameters: dict | None


@dataclass
class _Problems:
    """Problems by kind; config-level ones are all listed, tensor-level ones up to
    :data:`MAX_LISTED` per kind (missing tensors before shape mismatches)."""

    general: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        if message not in self.general:
            self.general.append(message)

    def raise_if_any(self, where: Path | None) -> None:
        listed = list(self.general)
        for kind, items in (("missing tensors", self.missing), ("shape mismatches", self.shapes)):
            listed += items[:MAX_LISTED]
            if len(items) > MAX_LISTED:
                listed.append(f"... and {len(items) - MAX_LISTED} more {kind}")
        if not listed:
            return
        count = len(self.general) + len(self.missing) + len(self.shapes)
        raise WeightsmithError(where, f"preflight found {count} problem{'s' if count > 1 else ''}, nothing written: " + "; ".join(listed))


def _references(config: MergeConfig) -> list[str]:
    refs: list[str] = []
    for model in config.models or []:
        refs.append(model.model)
    if config.base_model:
        refs.append(config.base_model)
    for piece in config.slices or []:
        refs.extend(source.model for source in piece.sources)
        if piece.base_model:
            refs.append(piece.base_model)
    return list(dict.fromkeys(refs))


def open_inputs(config: MergeConfig, config_dir: Path | None, *, allow_pickle: bool = False) -> tuple[list[MergeInput], dict[str, int]]:
    """Open every model the config names, once each (two spellings of one path are one input);
    returns the inputs and each reference's index among them."""
    inputs: list[MergeInput] = []
    index: dict[str, int] = {}
    by_key: dict[str, int] = {}
    gguf_dtype = config.compute_st_dtype or "F32"
    for ref in _references(config):
        opened = open_input(ref, config_dir, allow_pickle=allow_pickle, gguf_dtype=gguf_dtype)
        if opened.key not in by_key:
            by_key[opened.key] = len(inputs)
            inputs.append(opened)
        index[ref] = by_key[opened.key]
    return inputs, index


def _vocabulary(folder: Path) -> Any:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    added = doc.get("added_tokens") if isinstance(doc, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    return vocab, [(t.get("id"), t.get("content")) for t in added or [] if isinstance(t, dict)]


def _count_problem(what: str, count: int, least: int, most: int | None, note: str) -> str | None:
    """What is wrong with ``count`` inputs for bounds ``[least, most]`` (None: no upper bound), or
    None."""
    if count >= least and (most is None or count <= most):
        return None
    bound = f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
    return f"{bound} {what}{'' if bound == 'exactly 1' else 's'} ({note}), got {count}"


class _Planner:
    def __init__(self, config: MergeConfig, inputs: list[MergeInput], index: dict[str, int], where: Path | None, strict: bool = False) -> None:
        self.config = config
        self.strict = strict
        self.inputs = inputs
        self.index = index
        self.where = where
        self.method = method_named(config.merge_method)
        self.problems = _Problems()
        self.missing_params: set[tuple[str, int]] = set()
        self.jobs: list[Job] = []

    def label(self, model: int) -> str:
        return self.inputs[model].reference

    def base_of(self, piece: _Slice) -> int | None:
        """The slice's base as the method sees it: none for a method that takes the base as one
        more input."""
        return piece.base if self.method.uses_base else None

    # ---- whole-model checks ---------------------------------------------------------------------
    def check_configs(self, donor: int) -> None:
        reference = self.inputs[donor]
        for key in AGREEING_CONFIG_KEYS:
            for i, other in enumerate(self.inputs):
                mine, theirs = reference.config.get(key), other.config.get(key)
                if i != donor and mine != theirs:
                    self.problems.add(f"config {key} differs: {reference.reference} has {mine!r}, {other.reference} has {theirs!r}")

    def check_tokenizers(self, base: int) -> None:
        wanted = _vocabulary(self.inputs[base].folder)
        for i, other in enumerate(self.inputs):
            if i != base and wanted is not None and (found := _vocabulary(other.folder)) is not None and found != wanted:
                self.problems.add(
                    f"tokenizer of {other.reference} differs from the base's; aligning vocabularies across tokenizers is not supported"
                )

    def check_parameter_names(self) -> None:
        """Parameters the method does not use: ignored with a warning naming each and where it is
        (mergekit runs such configs), or refused when ``strict``."""
        allowed = {p.name for p in self.method.params}
        levels: list[tuple[str, dict | None]] = [("parameters", self.config.parameters)]
        levels += [(f"models[{i}] ({m.model})", m.parameters) for i, m in enumerate(self.config.models or [])]
        for s, piece in enumerate(self.config.slices or []):
            levels.append((f"slices[{s}].parameters", piece.parameters))
            levels += [(f"slices[{s}].sources[{k}] ({src.model})", src.parameters) for k, src in enumerate(piece.sources)]
        known = ", ".join(sorted(allowed)) if allowed else "none"
        for where, level in levels:
            for name in level or {}:
                if name in allowed:
                    continue
                if self.strict:
                    self.problems.add(f"{name!r} at {where} is not a parameter of {self.method.name} (its parameters: {known})")
                else:
                    log.warning("ignoring %r at %s: not a parameter of %s (its parameters: %s)", name, where, self.method.name, known)

    def check_layers(self) -> None:
        """Stacking slices needs each input's decoder layers found where its config says."""
        for model in self.inputs:
            layout = model.layout
            if layout.declared_layers is not None and layout.declared_layers != layout.num_layers:
                self.problems.add(f"{model.reference}: config says {layout.declared_layers} layers, its tensors hold {layout.num_layers}")
            missing = [j for j, names in enumerate(layout.layers) if not names]
            if missing:
                self.problems.add(f"{model.reference}: layers {missing} have no tensors")

    # ---- slices ---------------------------------------------------------------------------------
    def slices(self) -> list[_Slice]:
        config = self.config
        base = self.index[config.base_model] if config.base_model else None
        if config.models is not None:
            sources = [(self.index[m.model], 0, self.inputs[self.index[m.model]].layout.num_layers, m.parameters) for m in config.models]
            if base is not None and all(s[0] != base for s in sources):
                sources.append((base, 0, self.inputs[base].layout.num_layers, None))
            return [_Slice(sources, base, None)]
        out = []
        for piece in config.slices or []:
            sources = [(self.index[s.model], s.layer_range[0], s.layer_range[1], s.parameters) for s in piece.sources]
            out.append(_Slice(sources, self.index[piece.base_model] if piece.base_model else base, piece.parameters))
        return out

    def check_slice(self, number: int, piece: _Slice) -> bool:
        models = [m for m, _, _, _ in piece.sources]
        where = f"slice {number}" if self.config.slices is not None else "models"
        ok = True
        if len(set(models)) != len(models):
            self.problems.add(f"{where}: the same model is listed twice")
            ok = False
        method = self.method
        if method.base is BasePolicy.required and (piece.base is None or piece.base not in models):
            self.problems.add(f"{where}: {method.name} needs a base_model among its inputs")
            ok = False
        problem = _count_problem("input model", len(models), method.min_inputs, method.max_inputs, "base included")
        has_base = method.uses_base and piece.base is not None and piece.base in models
        if problem is None and (method.min_non_base is not None or method.max_non_base is not None):
            problem = _count_problem("model", len(models) - has_base, method.min_non_base or 0, method.max_non_base, "besides the base")
        if problem is not None:
            self.problems.add(f"{where}: {method.name} takes {problem}")
            ok = False
        if len({end - start for _, start, end, _ in piece.sources}) > 1:
            spans = ", ".join(f"{self.label(m)} {end - start}" for m, start, end, _ in piece.sources)
            self.problems.add(f"{where}: the inputs have different numbers of layers ({spans})")
            ok = False
        for model, start, end, _ in piece.sources:
            have = self.inputs[model].layout.num_layers
            if end > have:
                self.problems.add(f"{where}: layer_range [{start}, {end}] is beyond the {have} layers of {self.label(model)}")
                ok = False
        return ok

    # ---- parameters -----------------------------------------------------------------------------
    def parameters(self, piece: _Slice, out_name: str, sources: Sequence[Source], t: float) -> tuple[dict, tuple[dict, ...]]:
        method, config = self.method, self.config
        shared_levels = (piece.parameters, config.parameters)
        shared = {}
        for spec in method.params:
            if spec.scope is Scope.shared:
                shared[spec.name] = self.resolve(spec, shared_levels, out_name, t, None)
        per_input = []
        for source in sources:
            own = [p for m, _, _, p in piece.sources if m == source.model]
            levels = (*own, piece.parameters, config.parameters)
            values = {}
            for spec in method.params:
                if spec.scope is Scope.input or (spec.scope is Scope.non_base and source.model != self.base_of(piece)):
                    values[spec.name] = self.resolve(spec, levels, source.name, t, source.model)
            if method.check is not None and (problem := method.check({**shared, **values})) is not None:
                self.problems.add(f"{problem} for {self.label(source.model)}")
            per_input.append(values)
        return shared, tuple(per_input)

    def resolve(self, spec: ParamSpec, levels: Sequence[dict | None], tensor: str, t: float, model: int | None) -> Any:
        try:
            return resolve(spec, levels, tensor, t)
        except LookupError:
            key = (spec.name, -1 if model is None else model)
            if key not in self.missing_params:
                self.missing_params.add(key)
                whose = f" for {self.label(model)}" if model is not None else ""
                self.problems.add(f"parameter {spec.name!r} has no value{whose} (first needed by {tensor})")
        except ValueError as exc:
            self.problems.add(f"parameter {spec.name!r}: {exc}")
        return None

    # ---- tensors --------------------------------------------------------------------------------
    def job(self, piece: _Slice, out_name: str, sources: list[Source], t: float) -> None:
        ok = True
        present = [s for s in sources if s.name in self.inputs[s.model]]
        for source in sources:
            if source not in present:
                self.problems.missing.append(f"{source.name} is missing from {self.label(source.model)}")
                ok = False
        reference = next((s for s in present if s.model == piece.base), present[0] if present else None)
        for source in present:
            assert reference is not None
            shape, expected = self.inputs[source.model].shape(source.name), self.inputs[reference.model].shape(reference.name)
            if shape != expected:
                where, there = self.label(source.model), self.label(reference.model)
                self.problems.shapes.append(f"{source.name} has shape {list(shape)} in {where} but {list(expected)} in {there}")
                ok = False
        if not ok:
            return
        shared, per_input = self.parameters(piece, out_name, sources, t)
        base = next((i for i, s in enumerate(sources) if s.model == self.base_of(piece)), None)
        self.jobs.append(Job(out_name, tuple(sources), base, shared, per_input))

    def outside_layers(self, piece: _Slice, part: str) -> None:
        models = [m for m, _, _, _ in piece.sources]
        names: list[str] = list(getattr(self.inputs[models[0]].layout, part))
        for model in models[1:]:
            for name in getattr(self.inputs[model].layout, part):
                if name not in self.inputs[models[0]]:
                    self.problems.missing.append(f"{name} is missing from {self.label(models[0])}")
        for name in names:
            self.job(piece, name, [Source(m, name) for m in models], 0.0)

    def layer(self, piece: _Slice, offset: int, out_layer: int, out_layout: Layout, t: float) -> None:
        first_model, first_start = piece.sources[0][0], piece.sources[0][1]
        first_layout = self.inputs[first_model].layout
        suffixes = list(first_layout.layers[first_start + offset])
        for model, start, _, _ in piece.sources[1:]:
            layout = self.inputs[model].layout
            for suffix in layout.layers[start + offset]:
                if suffix not in suffixes:
                    self.problems.missing.append(
                        f"{first_layout.layer_name(first_start + offset, suffix)} is missing from {self.label(first_model)}"
                    )
        for suffix in suffixes:
            sources = []
            for model, start, _, _ in piece.sources:
                sources.append(Source(model, self.inputs[model].layout.layer_name(start + offset, suffix)))
            self.job(piece, out_layout.layer_name(out_layer, suffix), sources, t)

    # ---- the whole plan -------------------------------------------------------------------------
    def build(self) -> Plan:
        config = self.config
        donor = self.index[config.donor]
        self.check_configs(donor)
        if config.tokenizer_source == "base" and config.base_model:
            self.check_tokenizers(self.index[config.base_model])
        self.check_parameter_names()
        if config.slices is not None:
            self.check_layers()
        slices = self.slices()
        valid = [self.check_slice(n, piece) for n, piece in enumerate(slices)]
        out_layout = self.inputs[donor].layout
        if not all(valid):
            self.problems.raise_if_any(self.where)
        if config.slices is not None and out_layout.prefix is None and any(end > start for s in slices for _, start, end, _ in s.sources):
            self.problems.add(f"cannot find the decoder layers of {self.label(donor)} to stack slices")
            self.problems.raise_if_any(self.where)
        self.outside_layers(slices[0], "pre")
        out_layer = 0
        for piece in slices:
            count = piece.sources[0][2] - piece.sources[0][1]
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                self.layer(piece, offset, out_layer, out_layout, t)
                out_layer += 1
        self.outside_layers(slices[-1], "post")
        self.problems.raise_if_any(self.where)
        out_config = self.output_config(donor, slices)
        return Plan(config, self.method, self.inputs, self.jobs, self.inputs[donor], out_config, out_layer if out_layout.prefix else None)

    def output_config(self, donor: int, slices: list[_Slice]) -> dict:
        config = copy.deepcopy(self.inputs[donor].config)
        config.pop("quantization_config", None)
        if self.config.slices is not None:
            key = self.inputs[donor].layout.count_key or "num_hidden_layers"
            stacked = stack_layers([(piece.sources[0][1], piece.sources[0][2]) for piece in slices])
            config = stacked_config(config, key, [(self.inputs[slices[k].sources[0][0]].config, layer) for k, layer in stacked])
        dtype = self.config.output_st_dtype or self.config.compute_st_dtype
        return config if dtype is None else config_with_dtype(config, dtype)


def build_plan(config: MergeConfig, inputs: list[MergeInput], index: dict[str, int], where: Path | None = None, *, strict: bool = False) -> Plan:
    """The output tensors and their sources; raises one WeightsmithError listing every problem.
    Parameters the method does not use are logged and ignored, or with ``strict`` refused."""
    return _Planner(config, inputs, index, where, strict).build()
