"""The budget search as a pass: optuna finds the per-group settings that score best under a budget.

1. Sensitivity first: each group compressed alone to each candidate, KL measured once and stored in
   the study (it seeds the sampler and is printed as "where the bits matter").
2. Trials: a trial picks a candidate per group; :func:`weightsmith.search.space.recipe_for` turns it
   into a recipe; its output size comes from tensor headers and grids (:mod:`weightsmith.sizing`)
   before anything runs, and a trial over budget is recorded infeasible (an optuna constraint)
   without running; the others are scored by the KL proxy on cached candidates
   (:mod:`weightsmith.search.proxy`).
3. The best feasible trials are rebuilt with the real passes (sequential calibration), measured on
   disk and scored by the full evaluation; the best of them is the output.

Studies live in an optuna storage (an SQLite file in the cache by default, so a killed search resumes;
any optuna URL lets processes and machines share one study).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weightsmith.errors import WeightsmithError
from weightsmith.passes import Report, settings_from
from weightsmith.runtime import Runtime
from weightsmith.search.config import Budget, SearchSettings
from weightsmith.search.space import Candidate, Group, make_groups, recipe_for

log = logging.getLogger(__name__)

#: the trial's constraint (over budget when positive) and its user attributes
CONSTRAINT = "budget"
#: the MLP width a structured cut keeps is a multiple of this (quantization groups and GGUF blocks fit)
MLP_ALIGN = 32
SIZE, BPW, SCORED = "bytes", "bits_per_weight", "scored"
#: the trial parameters of the structure: decoder layers dropped, share of MLP channels removed
DROP, MLP = "drop_layers", "mlp_width"


@dataclass(frozen=True)
class Shape:
    """A trial's structural choice: how many decoder layers it drops and what share of the MLP
    channels it removes (none by default)."""

    drop: int = 0
    mlp: float = 0.0

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Shape:
        return cls(int(params.get(DROP, 0)), float(params.get(MLP, 0.0)))

    def key(self) -> list:
        return [self.drop, self.mlp]


def candidates_of(settings: SearchSettings) -> list[Candidate]:
    """Every candidate a group may take under the settings' space and budget kind."""
    space = settings.space
    if settings.budget_value.kind == "gguf":
        return [Candidate(m, gguf_type=t, sparsity=sp) for sp in space.sparsities() for m in space.method for t in space.gguf_types]
    return [
        Candidate(m, bits=b, group_size=g, symmetric=space.symmetric, sparsity=sp)
        for sp in space.sparsities()
        for m in space.method
        for b in space.bits
        for g in space.group_size
    ]


def model_key(folder: Path) -> str:
    """A digest of a checkpoint's weights (the sha256 of each shard, remembered by the hash cache)."""
    from weightsmith.checkpoint import Checkpoint
    from weightsmith.provenance import HashCache

    hashes = HashCache()
    digest = hashlib.sha256()
    for f in Checkpoint(folder).files:
        digest.update(hashes.sha256(f).encode())
    hashes.save()
    return digest.hexdigest()[:16]


@dataclass
class Problem:
    """What every worker knows about one search: the model, its groups and candidates, the budget, and
    how a choice becomes a recipe and a size. Cheap to build (headers only)."""

    settings: SearchSettings
    folder: Path
    groups: list[Group]
    candidates: list[Candidate]
    budget: Budget
    arch: Any
    key: str
    sizes: dict[str, tuple[int, float]] = field(default_factory=dict)
    sizer: Any = None
    #: decoder layers from the least to the most influential (measured once per study when the space
    #: drops layers)
    layer_order: list[int] = field(default_factory=list)
    _channels: dict[float, dict[int, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: SearchSettings) -> Problem:
        from weightsmith.arch import arch_for
        from weightsmith.checkpoint import Checkpoint
        from weightsmith.models import resolve

        folder = resolve(settings.resolve_path(settings.model))
        ckpt = Checkpoint(folder)
        arch = arch_for(ckpt.config, folder)
        if arch.weights_transposed:
            raise WeightsmithError(folder, "the search needs linears stored [out, in] (this architecture stores them transposed)")
        n_layers = arch.num_layers(ckpt.config)
        return cls(settings, folder, make_groups(n_layers, settings.space.depth_groups), candidates_of(settings), settings.budget_value, arch, model_key(folder))

    def calibration(self) -> dict[str, Any]:
        """The calibration settings every calibrated step of a trial's recipe takes."""
        s = self.settings
        shared: dict[str, Any] = {"samples": s.samples, "seq_len": s.seq_len}
        if s.calib is not None:
            shared["calib"] = s.resolve_path(s.calib)
        return shared

    @property
    def drop_options(self) -> list[int]:
        return sorted(set(self.settings.space.drop_layers))

    @property
    def mlp_options(self) -> list[float]:
        return sorted(set(self.settings.space.mlp_width))

    @property
    def structural(self) -> bool:
        return any(self.drop_options) or any(self.mlp_options)

    def channels(self, share: float) -> dict[int, Any]:
        """Layer -> the MLP channels it keeps when ``share`` of them go (the structured prune pass's
        own choice by weight magnitude, so the proxy and the rebuild cut the same channels)."""
        if share not in self._channels:
            from compress.prune.config import PruneConfig, StructuredSpec
            from compress.prune.structured import choose, measure, plan_pruning
            from weightsmith.checkpoint import Checkpoint

            ckpt = Checkpoint(self.folder)
            spec = StructuredSpec(mlp=share)
            plan = plan_pruning(ckpt, spec, MLP_ALIGN)
            scores = measure(ckpt, plan, PruneConfig(structured=spec, importance="magnitude", align=MLP_ALIGN), Runtime())
            self._channels[share] = dict(choose(plan, scores).channels)
        return self._channels[share]

    def dropped(self, drop: int) -> list[int]:
        """The layers a trial that drops ``drop`` of them removes: the least influential."""
        if drop and len(self.layer_order) < drop:
            raise WeightsmithError(None, "the layers' influence was not measured")
        return sorted(self.layer_order[:drop])

    def steps(self, assignment: Mapping[str, Candidate], shape: Shape = Shape()) -> list[dict[str, Any]]:
        gguf = self.settings.space.gguf_mix if self.budget.kind == "gguf" else None
        quantize = {**self.calibration(), "act_order": self.settings.act_order}
        return recipe_for(
            assignment, self.groups, self.arch, quantize, gguf, name=self.folder.name, dropped=self.dropped(shape.drop), prune=self.calibration(), mlp=shape.mlp
        )

    def validated(self, assignment: Mapping[str, Candidate], shape: Shape = Shape()) -> list[tuple[str, Any]]:
        out = []
        for i, step in enumerate(self.steps(assignment, shape), start=1):
            values = dict(step)
            name = values.pop("pass")
            out.append((name, settings_from(name, values, context=f"step {i} ({name}): ")))
        return out

    def size(self, assignment: Mapping[str, Candidate], shape: Shape = Shape()) -> tuple[int, float]:
        """(bytes of the output, bits per weight of its quantized linears), from headers and grids."""
        key = json.dumps([{g: c.name for g, c in sorted(assignment.items())}, shape.key()])
        if key not in self.sizes:
            if self.sizer is None:
                from weightsmith.sizing import Sizer

                self.sizer = Sizer(self.folder)
            est = self.sizer.estimate(self.validated(assignment, shape))
            self.sizes[key] = (int(est.bytes), float(est.bits_per_weight or 0.0))
        return self.sizes[key]

    def measure(self, size: tuple[int, float]) -> float:
        """The figure the budget limits."""
        return size[1] if self.budget.kind == "bpw" else float(size[0])

    def assignment(self, params: Mapping[str, Any]) -> dict[str, Candidate]:
        return {g.name: Candidate.parse(params[g.name]) for g in self.groups}


    def uniform(self, cand: Candidate) -> dict[str, Candidate]:
        return {g.name: cand for g in self.groups}


def cache_folder(problem: Problem, proxy_key: str) -> Path:
    from weightsmith.paths import cache_dir

    return cache_dir() / "search" / f"{problem.key}-{proxy_key}"


class Scorer:
    """The proxy of one process: the loaded original model, its reference logits, the candidate cache
    (shared on disk with every process) and the input Hessians (computed once, kept on disk)."""

    def __init__(self, problem: Problem, runtime: Runtime, progress=None) -> None:
        import torch

        from weightsmith.checkpoint import Checkpoint
        from weightsmith.data import blocks, bos_id, read_text, tokenize
        from weightsmith.models import load_model, load_tokenizer
        from weightsmith.search.proxy import CandidateCache, ProxyScorer, ProxySettings

        s = problem.settings
        self.problem = problem
        self.progress = progress
        self.settings = ProxySettings(samples=s.samples, seq_len=s.seq_len, tokens=s.proxy_tokens, act_order=s.act_order)
        calib = _calib_path(s)
        self.folder = cache_folder(problem, self.settings.key() + hashlib.sha256(str(calib).encode()).hexdigest()[:8])
        self.folder.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(problem.folder)
        ids = tokenize(tokenizer, read_text(calib))
        if ids.numel() < s.proxy_tokens + s.seq_len:
            raise WeightsmithError(calib, f"calibration text has {ids.numel()} tokens, too few for {s.proxy_tokens} proxy tokens and a calibration block")
        # the proxy scores on the text's last tokens; calibration blocks come from the rest
        proxy_tokens = ids[-s.proxy_tokens :]
        self.calib_tokens = blocks(ids[: -s.proxy_tokens], s.seq_len, s.samples, runtime.seed, where=calib, bos=bos_id(tokenizer))
        self.model = load_model(problem.folder, torch.float32)
        ckpt = Checkpoint(problem.folder)
        self.proxy = ProxyScorer(self.model, proxy_tokens, self.settings.ctx, bos_id(tokenizer), problem.arch.layers)
        self.cache = CandidateCache(self.folder, lambda m: ckpt.get(f"{m}.weight"), self._hessians, self.settings, problem.arch, progress)
        self._H: dict | None = None

    def _hessians(self) -> dict:
        from filelock import FileLock
        from safetensors.torch import load_file, save_file

        from weightsmith.search.proxy import collect_hessians
        from weightsmith.search.space import group_modules

        if self._H is not None:
            return self._H
        path = self.folder / "hessians.safetensors"
        aliases = self.folder / "hessians.json"
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                modules = [m for g in self.problem.groups for m in group_modules(g, self.problem.arch)]
                batches = list(self.calib_tokens.split(4))
                H = collect_hessians(self.model, modules, batches, self.progress)
                owners: dict[int, str] = {}
                names = {m: owners.setdefault(id(h), m) for m, h in H.items()}
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                save_file({m: H[m].contiguous() for m in set(names.values())}, str(tmp))
                aliases.write_text(json.dumps(names))
                os.replace(tmp, path)
        stored = load_file(str(path))
        self._H = {m: stored[owner] for m, owner in json.loads(aliases.read_text()).items()}
        return self._H

    def kl(self, assignment: Mapping[str, Candidate], shape: Shape = Shape()) -> float:
        dropped = set(self.problem.dropped(shape.drop))
        parts = {g.name: self.cache.get(g, assignment[g.name]) for g in self.problem.groups if not set(g.layers()) <= dropped}
        return self.proxy.score(parts, skip=sorted(dropped), channels=self._cut(shape.mlp))

    def _cut(self, share: float) -> dict[str, tuple[int, Any]] | None:
        """Module -> (dimension, kept channels) of every MLP linear a width cut of ``share`` narrows."""
        if not share:
            return None
        st, arch = self.problem.arch.structure, self.problem.arch
        cut = {}
        for layer, kept in self.problem.channels(share).items():
            cut.update({f"{arch.layer_prefix(layer)}{lin}": (0, kept) for lin in st.mlp_rows})
            cut.update({f"{arch.layer_prefix(layer)}{lin}": (1, kept) for lin in st.mlp_cols})
        return cut

    def structure_sensitivity(self) -> dict[str, float]:
        """KL to the original with only the structure changed: the ``k`` least influential layers
        dropped (``drop k``), a share of the MLP channels removed (``mlp s``)."""
        table = {f"drop {k}": self.proxy.score({}, skip=self.problem.dropped(k)) for k in self.problem.drop_options if k}
        table.update({f"mlp {w:g}": self.proxy.score({}, channels=self._cut(w)) for w in self.problem.mlp_options if w})
        return table

    def sensitivity(self) -> dict[str, dict[str, float]]:
        """The sensitivity table, measured once per model, proxy settings, groups and candidates and
        kept beside the candidate cache (a new study on the same space reuses it)."""
        from weightsmith.search.proxy import sensitivity

        names = [g.name for g in self.problem.groups] + [c.name for c in self.problem.candidates]
        path = self.folder / f"sensitivity-{hashlib.sha256(json.dumps(names).encode()).hexdigest()[:12]}.json"
        if path.exists():
            return json.loads(path.read_text())
        table = sensitivity(self.proxy, self.cache, self.problem.groups, self.problem.candidates, self.progress)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, path)
        return table


def _calib_path(settings: SearchSettings) -> Path:
    from compress.quantize import CALIB_ASSET
    from weightsmith.paths import asset, assets_dir

    if settings.calib is not None:
        return Path(settings.resolve_path(settings.calib))
    path = asset(CALIB_ASSET)
    if path is None:
        raise WeightsmithError(assets_dir() / CALIB_ASSET, "default calibration text not found; give the spec a `calib` text")
    return path


def additive_kl(sens: Mapping[str, Mapping[str, float]], assignment: Mapping[str, Candidate], shape: Shape = Shape(), struct: Mapping[str, float] | None = None) -> float:
    """The KL a trial would have if the groups' sensitivities (and its structure's) added up (the
    value recorded for a trial that was not run because it is over budget)."""
    extra = (struct or {}).get(f"drop {shape.drop}", 0.0) + (struct or {}).get(f"mlp {shape.mlp:g}", 0.0)
    return float(sum(sens[g][c.name] for g, c in assignment.items())) + extra


def greedy_seed(problem: Problem, sens: Mapping[str, Mapping[str, float]]) -> dict[str, Candidate] | None:
    """A starting trial: every group at its smallest candidate, then the upgrade with the best KL
    reduction per unit of budget, again and again while it fits (sizes are additive over groups, so
    each group's cost is measured once against the all-smallest model). None when even the smallest
    model is over budget."""
    def cost(assignment: Mapping[str, Candidate]) -> float:
        return problem.measure(problem.size(assignment))

    smallest = min(problem.candidates, key=lambda c: cost(problem.uniform(c)))
    base = problem.uniform(smallest)
    base_cost = cost(base)
    if base_cost > problem.budget.limit:
        return None
    delta = {(g.name, c.name): cost({**base, g.name: c}) - base_cost for g in problem.groups for c in problem.candidates}
    current, spent = dict(base), base_cost
    while True:
        best, best_gain = None, 0.0
        for g in problem.groups:
            now = current[g.name]
            for c in problem.candidates:
                extra = delta[g.name, c.name] - delta[g.name, now.name]
                drop = sens[g.name][now.name] - sens[g.name][c.name]
                if drop <= 0 or spent + extra > problem.budget.limit:
                    continue
                gain = drop / max(extra, 1e-9)
                if gain > best_gain:
                    best, best_gain = (g.name, c, extra), gain
        if best is None:
            break
        current[best[0]] = best[1]
        spent += best[2]
    while cost(current) > problem.budget.limit:  # headers may differ from the additive sum by a few bytes
        g = max(current, key=lambda name: delta[name, current[name].name] - delta[name, smallest.name])
        current[g] = smallest
    return current


def open_study(settings: SearchSettings, problem: Problem, seed: int, create: bool = False):
    """The optuna study of this search, on its storage (created when ``create``)."""
    import optuna

    storage = storage_of(settings)
    name = settings.study_name(problem.key)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, max(2, settings.trials // 4)))
    if create:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


def storage_of(settings: SearchSettings):
    """The settings' optuna storage: the URL given, or an SQLite file in the cache. RDB storages get a
    heartbeat, so a trial whose process was killed is marked failed when the study is next opened."""
    import optuna

    from weightsmith.paths import cache_dir

    url = settings.storage
    if url is None:
        folder = cache_dir() / "search"
        folder.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{folder / 'studies.db'}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    import warnings

    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=30, grace_period=120)


def objective(problem: Problem, scorer: Scorer | None, sens: Mapping[str, Mapping[str, float]], worker: int = 0, struct: Mapping[str, float] | None = None):
    """The trial function: choose, size, and score only what fits."""

    def run_trial(trial) -> float:
        trial.set_user_attr("worker", worker)
        names = [c.name for c in problem.candidates]
        assignment = {g.name: Candidate.parse(trial.suggest_categorical(g.name, names)) for g in problem.groups}
        drop = int(trial.suggest_categorical(DROP, problem.drop_options)) if len(problem.drop_options) > 1 else 0
        mlp = float(trial.suggest_categorical(MLP, problem.mlp_options)) if len(problem.mlp_options) > 1 else 0.0
        shape = Shape(drop, mlp)
        size = problem.size(assignment, shape)
        over = problem.measure(size) - problem.budget.limit
        trial.set_user_attr(SIZE, size[0])
        trial.set_user_attr(BPW, size[1])
        trial.set_constraint(CONSTRAINT, over)
        if over > 0 or scorer is None:
            trial.set_user_attr(SCORED, False)
            return additive_kl(sens, assignment, shape, struct)
        start = time.perf_counter()
        value = scorer.kl(assignment, shape)
        trial.set_user_attr(SCORED, True)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
        return value

    return run_trial


def finished(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def run_trials(settings: SearchSettings, runtime: Runtime, n_trials: int, worker: int, on_trial=None) -> None:
    """One worker's share of the trials (a process of ``--jobs``, or the main one)."""
    import optuna

    problem = Problem.open(settings)
    study = open_study(settings, problem, runtime.seed + worker)
    sens = study.user_attrs["sensitivity"]
    problem.layer_order = study.user_attrs.get("layer_order", [])
    scorer = Scorer(problem, runtime)
    callbacks = [on_trial] if on_trial is not None else []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective(problem, scorer, sens, worker, study.user_attrs.get("structure_sensitivity")), n_trials=n_trials, callbacks=callbacks, gc_after_trial=False)


def _worker_main(settings_json: dict, source: str | None, runtime_fields: dict, n_trials: int, worker: int) -> None:
    """Entry point of a ``--jobs`` worker process."""
    import torch

    logging.basicConfig(level=logging.INFO, format=f"worker {worker}: %(message)s")
    settings = SearchSettings.model_validate(settings_json).read_from(Path(source) if source else None)
    runtime = Runtime(**runtime_fields)
    torch.set_num_threads(runtime.threads or 1)
    run_trials(settings, runtime, n_trials, worker)


def shares(total: int, jobs: int) -> list[int]:
    """``total`` trials split over ``jobs`` workers as evenly as possible."""
    base, extra = divmod(max(total, 0), jobs)
    return [base + (1 if i < extra else 0) for i in range(jobs)]


@dataclass
class Built:
    """A rebuilt model: where, its recipe, and its measured figures."""

    label: str
    steps: list[dict[str, Any]]
    path: Path
    bytes: int
    bits_per_weight: float | None
    trial: int | None = None
    proxy_kl: float | None = None
    perplexity: float | None = None
    kl: float | None = None
    top1: float | None = None

    def within(self, budget: Budget) -> bool:
        value = self.bits_per_weight if budget.kind == "bpw" else self.bytes
        return value is not None and value <= budget.limit + 1e-9


def rebuild(problem: Problem, steps: list[dict[str, Any]], work: Path, label: str, runtime: Runtime) -> Built:
    """Run a trial's recipe with the real passes into ``work/label``."""
    from weightsmith.recipe import run_recipe

    dest = work / label
    reports = run_recipe(_validate(steps), problem.folder, dest, runtime.with_(force=True, progress=None))
    figures = [getattr(r, "report", r) for r in reports]
    quantized = next((r for r in figures if r.bits_per_weight is not None), None)
    return Built(label, steps, dest, _bytes_on_disk(dest), quantized.bits_per_weight if quantized else None)


def _validate(steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    out = []
    for step in steps:
        values = dict(step)
        name = values.pop("pass")
        out.append((name, settings_from(name, values)))
    return out


def _bytes_on_disk(path: Path) -> int:
    """A GGUF file's size, or the sum of a checkpoint folder's safetensors files."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def score(problem: Problem, built: list[Built], work: Path) -> None:
    """Perplexity, KL to the original and top-1 agreement of every rebuilt model on the evaluation text
    (the pinned protocol, ``eval_tokens`` tokens), the original running once per window."""
    from weightsmith.demo import EVAL_ASSET
    from weightsmith.evaluate import Protocol, evaluate_many
    from weightsmith.paths import asset, assets_dir

    s = problem.settings
    text = Path(s.resolve_path(s.eval)) if s.eval else asset(EVAL_ASSET)
    if text is None:
        raise WeightsmithError(assets_dir() / EVAL_ASSET, "default evaluation text not found; give the spec an `eval` text")
    folders = [_as_folder(b.path, work) for b in built]
    reports = evaluate_many(folders, text, Protocol(max_tokens=s.eval_tokens), reference_dir=problem.folder)
    for b, r in zip(built, reports):
        b.perplexity, b.kl, b.top1 = r.perplexity, r.kl, r.top1_agreement


def _as_folder(path: Path, work: Path) -> Path:
    """A checkpoint folder for evaluation: the folder itself, or a GGUF file converted (dequantized)."""
    if path.is_dir():
        return path
    from weightsmith.gguf_import import convert_gguf

    dest = work / f"{path.stem}-dequantized"
    if not dest.exists():
        convert_gguf(path, dest, force=True)
    return dest


def pareto(trials: Sequence) -> list:
    """The feasible scored trials no other such trial beats on both size and proxy KL, smallest first."""
    scored = sorted((t for t in trials if t.user_attrs.get(SCORED)), key=lambda t: (t.user_attrs[SIZE], t.value))
    front, best = [], math.inf
    for t in scored:
        if t.value < best:
            front.append(t)
            best = t.value
    return front


def run(inputs: Sequence, dest: Path, settings: SearchSettings, runtime: Runtime) -> Report:
    """The search pass as the registry runs it."""
    from weightsmith.search.report import write_outputs

    dest = Path(dest)
    start = time.perf_counter()
    problem = Problem.open(settings)
    say = runtime.progress or (lambda done, total, what: None)
    if not problem.structural:
        smallest = min(problem.measure(problem.size(problem.uniform(c))) for c in problem.candidates)
        if smallest > problem.budget.limit:
            need = f"{smallest:.3f} bits per weight" if problem.budget.kind == "bpw" else f"{smallest / 1e6:.2f} MB"
            raise WeightsmithError(None, f"nothing in the space fits the budget ({problem.budget.describe()}): the smallest model needs {need}")
    study = open_study(settings, problem, runtime.seed, create=True)
    log.info("study %s: %d candidates per group, %d groups, budget %s", study.study_name, len(problem.candidates), len(problem.groups), problem.budget.describe())
    scorer = Scorer(problem, runtime, progress=say)
    if any(problem.drop_options) and "layer_order" not in study.user_attrs:
        study.set_user_attr("layer_order", scorer.proxy.layer_order())
    problem.layer_order = study.user_attrs.get("layer_order", [])
    if problem.structural and "structure_sensitivity" not in study.user_attrs:
        study.set_user_attr("structure_sensitivity", scorer.structure_sensitivity())
    if "sensitivity" not in study.user_attrs:
        sens = scorer.sensitivity()
        study.set_user_attr("sensitivity", sens)
    sens = study.user_attrs["sensitivity"]
    struct = study.user_attrs.get("structure_sensitivity", {})
    if not study.get_trials(deepcopy=False):
        _enqueue_seeds(study, problem, sens)
    remaining = settings.trials - len(finished(study))
    started = time.perf_counter()
    timings = {"setup_s": started - start}
    counts = {"done": 0}

    def on_trial(study_, trial) -> None:
        counts["done"] += 1
        done = len(finished(study_))
        feasible = [t for t in finished(study_) if t.user_attrs.get(SCORED)]
        best = min(feasible, key=lambda t: t.value) if feasible else None
        per = (time.perf_counter() - started) / counts["done"]
        what = f"trials {done}/{settings.trials}, {len(feasible)} feasible, best KL {best.value:.4f} (#{best.number})" if best else f"trials {done}/{settings.trials}"
        log.info("%s, %.1f s per trial", what, per)
        say(done, settings.trials, what)

    if remaining > 0:
        parts = shares(remaining, settings.jobs)
        procs = _start_workers(settings, runtime, parts[1:])
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study.optimize(objective(problem, scorer, sens, 0, struct), n_trials=parts[0], callbacks=[on_trial], gc_after_trial=False)
        finally:
            for p in procs:
                p.join()
        failed = [p.exitcode for p in procs if p.exitcode]
        if failed:
            raise WeightsmithError(None, f"{len(failed)} search worker(s) failed (exit codes {failed}); re-run the same command to continue the study")
    timings["trials_s"] = time.perf_counter() - started
    timings["trials_run"] = max(remaining, 0)
    del scorer
    trials = finished(study)
    front = pareto(trials)
    chosen = sorted(front, key=lambda t: t.value)[: settings.front]
    if not chosen:
        smallest = min(problem.measure((t.user_attrs[SIZE], t.user_attrs[BPW])) for t in trials)
        need = f"{smallest:.3f} bits per weight" if problem.budget.kind == "bpw" else f"{smallest / 1e6:.2f} MB"
        raise WeightsmithError(
            None, f"no trial fits the budget ({problem.budget.describe()}): the smallest trial needs {need}; raise the budget or add smaller settings to the space"
        )
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    work = tmp / ".work"
    work.mkdir(parents=True)
    built = []
    for i, t in enumerate(chosen, start=1):
        say(i, len(chosen) + len(settings.baselines), f"rebuilding trial {t.number} with sequential calibration")
        b = rebuild(problem, problem.steps(problem.assignment(t.params), Shape.of(t.params)), work, f"trial-{t.number}", runtime)
        b.trial, b.proxy_kl = t.number, t.value
        built.append(b)
    for name in settings.baselines:
        b = rebuild(problem, problem.steps(problem.uniform(Candidate.parse(name))), work, f"uniform-{name}", runtime)
        built.append(b)
    say(0, None, "scoring the rebuilt models (full evaluation)")
    score(problem, built, work)
    fitting = [b for b in built if b.trial is not None and b.within(problem.budget)]
    if not fitting:
        raise WeightsmithError(None, "no rebuilt trial fits the budget on disk; the size estimate disagrees with the passes")
    best = min(fitting, key=lambda b: b.perplexity)
    if best.path.is_dir():
        for f in best.path.iterdir():
            shutil.copy2(f, tmp / f.name) if f.is_file() else shutil.copytree(f, tmp / f.name)
    else:
        shutil.copy2(best.path, tmp / "model.gguf")
    timings["rebuild_s"] = time.perf_counter() - start - timings["setup_s"] - timings["trials_s"]
    write_outputs(tmp, problem, study, trials, front, built, best, sens, timings, struct)
    parameters = _parameters(best.path)
    shutil.rmtree(work)
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    os.replace(tmp, dest)
    report = Report(
        "search",
        dest,
        bits_per_weight=best.bits_per_weight,
        bytes_written=best.bytes,
        parameters=parameters,
        title=f"budget search: {problem.budget.describe()}, best trial {best.trial}",
        extra={
            "trials": len(trials),
            "feasible": sum(1 for t in trials if t.user_attrs.get(SCORED)),
            "best_trial": best.trial,
            "proxy_kl": round(best.proxy_kl or 0.0, 6),
            "perplexity": round(best.perplexity, 4),
            "kl": round(best.kl or 0.0, 6),
            "study": study.study_name,
            **{k: round(v, 1) for k, v in timings.items()},
        },
    )
    return report


def _parameters(path: Path) -> int:
    if path.is_dir():
        from weightsmith.checkpoint import Checkpoint

        return Checkpoint(path).num_parameters
    from gguf import GGUFReader

    return int(sum(int(t.n_elements) for t in GGUFReader(path).tensors))


def _enqueue_seeds(study, problem: Problem, sens: Mapping[str, Mapping[str, float]]) -> None:
    """The greedy allocation from the sensitivities and the largest uniform candidate that fits, as the
    first trials."""
    seeds = []
    greedy = greedy_seed(problem, sens)
    if greedy is not None:
        seeds.append(greedy)
    fitting = [c for c in problem.candidates if problem.measure(problem.size(problem.uniform(c))) <= problem.budget.limit]
    if fitting:
        seeds.append(problem.uniform(max(fitting, key=lambda c: problem.measure(problem.size(problem.uniform(c))))))
    seen = set()
    for a in seeds:
        params = {g: c.name for g, c in a.items()}
        key = json.dumps(params, sort_keys=True)
        if key not in seen:
            seen.add(key)
            study.enqueue_trial(params)


def _start_workers(settings: SearchSettings, runtime: Runtime, counts: Sequence[int]) -> list:
    """``--jobs`` worker processes (spawned: each loads its own proxy), one per count."""
    import multiprocessing

    if not counts:
        return []
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (runtime.threads or os.cpu_count() or 1) // (len(counts) + 1))
    fields = {"device": runtime.device, "threads": threads, "seed": runtime.seed, "workdir": runtime.workdir}
    source = None if settings._source is None else str(settings._source)
    procs = []
    for i, n in enumerate(counts, start=1):
        if n <= 0:
            continue
        p = ctx.Process(target=_worker_main, args=(settings.model_dump(mode="json"), source, fields, n, i), daemon=False)
        p.start()
        procs.append(p)
    return procs


def best_recipe(problem: Problem, built: Built) -> str:
    """The best model's recipe as YAML that ``weightsmith run`` re-runs."""
    doc = {"model": str(problem.folder), "steps": built.steps}
    return yaml.safe_dump(doc, sort_keys=False)
