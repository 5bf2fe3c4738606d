"""The merge pass: a config and input checkpoints in, one checkpoint folder out, tensor by tensor.

Streaming: the output tensors are produced in plan order; for each, the same-named tensors of its
inputs are read (memory-mapped), merged and written through
:class:`~weightsmith.checkpoint.CheckpointWriter`. A small pipeline overlaps the three steps — the
next tensor's inputs are read while this one is merged and the previous one written — so at most
two tensors per input and two outputs are in memory. The order of work and every random draw are
fixed, so the same inputs, config and seed give a byte-identical folder.

The math runs in one of two engines with the same output: numpy (:mod:`merge.engine_numpy`: CPU,
torch never imported) where it applies, else torch (:mod:`merge.engine_torch`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from merge.chunks import thread_map
from merge.config import MergeConfig, MergeSettings, load_config
from merge.plan import Job, Plan, build_plan, open_inputs
from weightsmith.checkpoint import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.passes import Report
from weightsmith.provenance import Record
from weightsmith.runtime import Runtime, default_threads
from weightsmith.stformat import DTYPES, is_float

log = logging.getLogger(__name__)

__all__ = ["ENGINES", "Engine", "MergeReport", "merge_checkpoints", "prepare", "tensor_seed"]

#: ``auto`` takes the numpy engine whenever it applies (see :func:`merge.engine_numpy.eligible`).
ENGINES = ("auto", "numpy", "torch")

Progress = Callable[[int, int, str], None]


@dataclass
class MergeReport:
    """What the pass did; :meth:`figures` goes into weightsmith.json."""

    method: str
    output: Path
    engine: str = ""
    tensors: int = 0
    merged: int = 0
    copied: int = 0
    parameters: int = 0
    layers: int | None = None
    dtypes: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def figures(self) -> dict:
        return {
            "method": self.method,
            "engine": self.engine,
            "tensors": self.tensors,
            "merged_tensors": self.merged,
            "copied_tensors": self.copied,
            "parameters": self.parameters,
            "layers": self.layers,
            "dtypes": dict(sorted(self.dtypes.items())),
        }


def tensor_seed(seed: int, tensor: str, position: int) -> int:
    """The seed of the random draws for one input (``position``) of one output tensor: ``seed`` and
    a stable hash of the name, so it does not depend on the order or the process."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def prepare(config: str | Path | dict | MergeConfig, *, allow_pickle: bool = False, strict: bool = False) -> Plan:
    """Parse the config, open the inputs (headers only; GGUF inputs are converted once into the
    cache) and run the preflight; raises one WeightsmithError listing every problem. Parameters
    the method does not use are logged and ignored (as mergekit does), or with ``strict`` refused."""
    cfg, config_dir = load_config(config)
    inputs, index = open_inputs(cfg, config_dir, allow_pickle=allow_pickle)
    where = config.source if isinstance(config, MergeConfig) else config if isinstance(config, str | Path) else None
    return build_plan(cfg, inputs, index, Path(where) if where is not None else None, strict=strict)


class Engine(Protocol):
    """What the pipeline needs of an engine (:mod:`merge.engine_numpy`, :mod:`merge.engine_torch`):
    ``load`` reads a job's inputs (on the reader thread); ``merge`` computes the output tensor and
    returns the writer's action, the output's dtype name and its element count."""

    def load(self, job: Job) -> Any: ...

    def merge(self, job: Job, loaded: Any, writer: CheckpointWriter) -> tuple[Callable[[], None], str, int]: ...


class _Pipeline:
    """Produce every output tensor in plan order with one engine: the next tensor's inputs are read
    (in one thread) while this one is merged (here) and the previous one is written (in another)."""

    def __init__(self, plan: Plan, engine: Engine, output_st: str | None, compute_st: str | None) -> None:
        self.plan = plan
        self.engine = engine
        self.output_st = output_st
        self.compute_st = compute_st

    def copy_source(self, job: Job) -> bool:
        """True when the output is one input tensor unchanged (passthrough without scale or cast)."""
        if self.plan.method.name != "passthrough" or job.per_input[0].get("scale") is not None:
            return False
        source = job.sources[0]
        model = self.plan.inputs[source.model]
        if not model.stored_as_is(source.name):
            return False
        dtype = model.st_dtype(source.name)
        target = (self.output_st or self.compute_st or dtype) if is_float(dtype) else dtype
        return target == dtype

    def copy_action(self, job: Job, writer: CheckpointWriter) -> tuple[Callable[[], None], str, int]:
        source = job.sources[0]
        model = self.plan.inputs[source.model]
        action = partial(writer.copy_from, model.checkpoint, source.name, as_name=job.name)
        return action, DTYPES[model.st_dtype(source.name)][0], math.prod(model.shape(source.name))

    def run(self, writer: CheckpointWriter, report: MergeReport, progress: Progress | None) -> None:
        jobs = self.plan.jobs
        copies = [self.copy_source(job) for job in jobs]
        with ThreadPoolExecutor(1, "merge-read") as reader, ThreadPoolExecutor(1, "merge-write") as writing:

            def prefetch(i: int) -> Future | None:
                return reader.submit(self.engine.load, jobs[i]) if i < len(jobs) and not copies[i] else None

            upcoming = prefetch(0)
            written: Future | None = None
            for i, job in enumerate(jobs):
                current, upcoming = upcoming, prefetch(i + 1)
                if current is None:
                    action, dtype, numel = self.copy_action(job, writer)
                    report.copied += 1
                else:
                    action, dtype, numel = self.engine.merge(job, current.result(), writer)
                    report.merged += 1
                if written is not None:
                    written.result()
                written = writing.submit(action)
                report.tensors += 1
                report.parameters += numel
                report.dtypes[dtype] += numel
                if progress is not None:
                    progress(i + 1, len(jobs), job.name)
            if written is not None:
                written.result()


def _job_seeds(plan: Plan, seed: int, job: Job) -> list[int]:
    """One seed per input of ``job`` for the random methods (none for the others)."""
    return [tensor_seed(seed, job.name, i) for i in range(len(job.sources))] if plan.method.random else []


def _choose_engine(plan: Plan, device: str, engine: str) -> str:
    from merge.engine_numpy import eligible

    if engine == "torch":
        return "torch"
    reason = eligible(plan, device)
    if reason is None:
        return "numpy"
    if engine == "numpy":
        raise WeightsmithError(None, f"the numpy engine cannot run this merge: {reason}; use --engine torch or auto")
    log.info("merging with the torch engine: %s", reason)
    return "torch"


def merge_checkpoints(
    config: str | Path | dict | MergeConfig,
    dest: str | Path,
    *,
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    device: str = "cpu",
    progress: Progress | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
    threads: int | None = None,
    engine: str = "auto",
    strict: bool = False,
) -> MergeReport:
    """Merge the models ``config`` names (a mergekit YAML path, its parsed dict, or a
    :class:`MergeConfig`) into the checkpoint folder ``dest``.

    The preflight (headers and configs only) runs first and raises one WeightsmithError listing
    every problem; the output appears at ``dest`` only when complete. ``seed`` drives the random
    methods (dare_linear, dare_ties); ``device`` is where the math runs (e.g. ``cuda``);
    ``threads`` is how many threads compute the chunks of each tensor (default: one per core, see
    :func:`default_threads`); the output does not depend on it, except where the math is torch's
    whole-tensor reductions (the ``Method.torch_threads`` methods and slerp's statistics: their
    last bits follow torch's thread count, as mergekit's do). ``engine`` picks the math:
    ``numpy`` (CPU, no torch loaded; safetensors inputs and the methods marked ``numpy``),
    ``torch`` (everything), or ``auto`` (numpy where it applies); both write the same tensors.
    Parameters the method does not use are ignored with a warning naming each, or with
    ``strict`` refused by the preflight.
    """
    start = time.perf_counter()
    dest = Path(dest)
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise WeightsmithError(None, f"threads must be at least 1, got {threads}")
    if engine not in ENGINES:
        raise WeightsmithError(None, f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    if device != "cpu" or engine == "torch":
        from weightsmith.runtime import check_device

        check_device(device)
    if dest.exists() and not force:
        raise WeightsmithError(dest, "already exists; pass --force to overwrite it")
    plan = prepare(config, allow_pickle=allow_pickle, strict=strict)
    chosen = _choose_engine(plan, device, engine)
    report = MergeReport(plan.method.name, dest, engine=chosen, layers=plan.layers)
    record = Record("merge", plan.config.model_dump(mode="json", exclude_none=True), seed=seed)
    for model in plan.inputs:
        record.add_input(model.origin, model.origin_files, model.checkpoint.provenance if model.origin == model.folder else None)
    seeds = partial(_job_seeds, plan, seed)
    with ExitStack() as stack:
        writer = stack.enter_context(
            CheckpointWriter(dest, force=force, max_shard_size=max_shard_size, source=plan.donor.folder, config=plan.out_config, record=record)
        )
        if chosen == "numpy":
            from merge import engine_numpy

            pmap = stack.enter_context(thread_map(threads))
            math_engine: Engine = engine_numpy.NumpyEngine(plan, seeds, pmap)
        else:
            from merge import engine_torch

            workers = engine_torch.intra_op_threads if plan.method.torch_threads else engine_torch.chunk_workers
            pmap = stack.enter_context(workers(threads))
            math_engine = engine_torch.TorchEngine(plan, device, seeds, pmap, threads)
        _Pipeline(plan, math_engine, plan.config.output_st_dtype, plan.config.compute_st_dtype).run(writer, report, progress)
        record.figures.update(report.figures())
    report.seconds = time.perf_counter() - start
    log.info("merged %d tensors (%d copied) with %s into %s in %.1f s", report.tensors, report.copied, report.method, dest, report.seconds)
    return report


def run(inputs: Sequence[Any], dest: Path, settings: MergeSettings, runtime: Runtime) -> Report:
    """The merge pass as the registry runs it (:mod:`weightsmith.passes`): the inputs are the
    models the settings name."""
    done = merge_checkpoints(
        settings,
        dest,
        force=runtime.force,
        max_shard_size=runtime.max_shard_size,
        device=runtime.device,
        progress=runtime.progress,
        seed=runtime.seed,
        allow_pickle=runtime.allow_pickle,
        threads=runtime.threads,
        engine=settings.engine,
        strict=settings.strict,
    )
    extra = {k: v for k, v in done.figures().items() if k != "parameters"}
    return Report("merge", dest, parameters=done.parameters, extra=extra, title=f"{done.method} merge")
