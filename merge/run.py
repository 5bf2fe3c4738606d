"""The merge pass: a config and input checkpoints in, one checkpoint folder out, tensor by tensor.

Streaming: the output tensors are produced in plan order; for each, the same-named tensors of its
inputs are read (memory-mapped), merged and written through
:class:`~weightsmith.checkpoint.CheckpointWriter`. A small pipeline overlaps the three steps — the
next tensor's inputs are read while this one is merged and the previous one written — so at most
two tensors per input and two outputs are in memory. The order of work and every random draw are
fixed, so the same inputs, config and seed give a byte-identical folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from merge.chunks import PMap, serial_map
from merge.config import MergeConfig, load_config
from merge.methods import Group
from merge.plan import Job, Plan, build_plan, open_inputs
from weightsmith.checkpoint import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.provenance import Record

log = logging.getLogger(__name__)

__all__ = ["MergeReport", "merge_checkpoints", "prepare", "tensor_seed"]

Progress = Callable[[int, int, str], None]


@dataclass
class MergeReport:
    """What the pass did; :meth:`figures` goes into weightsmith.json."""

    method: str
    output: Path
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


def prepare(config: str | Path | dict | MergeConfig, *, allow_pickle: bool = False) -> Plan:
    """Parse the config, open the inputs (headers only; GGUF inputs are converted once into the
    cache) and run the preflight; raises one WeightsmithError listing every problem."""
    cfg, config_dir = load_config(config)
    inputs, index = open_inputs(cfg, config_dir, allow_pickle=allow_pickle)
    where = config if isinstance(config, str | Path) else None
    return build_plan(cfg, inputs, index, Path(where) if where is not None else None)


class _Executor:
    def __init__(self, plan: Plan, device: str, seed: int, pmap: PMap) -> None:
        self.plan = plan
        self.device = torch.device(device)
        self.seed = seed
        self.pmap = pmap
        self.compute_dtype = plan.config.compute_dtype
        self.output_dtype = plan.config.output_dtype

    def copy_source(self, job: Job) -> bool:
        """True when the output is one input tensor unchanged (passthrough without scale or cast)."""
        if self.plan.method.name != "passthrough" or job.per_input[0].get("scale") is not None:
            return False
        source = job.sources[0]
        model = self.plan.inputs[source.model]
        dtype = model.dtype(source.name)
        if not model.stored_as_is(source.name):
            return False
        target = (self.output_dtype or self.compute_dtype or dtype) if dtype.is_floating_point else dtype
        return target == dtype

    def load(self, job: Job) -> list[Tensor]:
        tensors = []
        for source in job.sources:
            tensor = self.plan.inputs[source.model].get(source.name)
            tensors.append(tensor.to(self.device))
        return tensors

    def merge(self, job: Job, tensors: list[Tensor]) -> Tensor:
        if not all(t.is_floating_point() for t in tensors):
            first = tensors[0]
            if any(t.dtype != first.dtype or not torch.equal(t, first) for t in tensors[1:]):
                raise WeightsmithError(None, f"non-floating tensor {job.name} differs between inputs; merge cannot average it")
            return first.to("cpu").clone()
        dtype = self.compute_dtype
        if dtype is None:
            dtype = tensors[0].dtype
            for t in tensors[1:]:
                dtype = torch.promote_types(dtype, t.dtype)
        tensors = [t.to(dtype) for t in tensors]
        seeds = [tensor_seed(self.seed, job.name, i) for i in range(len(tensors))] if self.plan.method.random else []
        group = Group(tensors, job.base, job.shared, job.per_input, seeds, self.pmap)
        result = self.plan.method.apply(group)
        if self.output_dtype is not None:
            result = result.to(self.output_dtype)
        return result.to("cpu").contiguous()

    def copy_action(self, job: Job, writer: CheckpointWriter) -> tuple[Callable[[], None], torch.dtype, int]:
        source = job.sources[0]
        model = self.plan.inputs[source.model]
        action = partial(writer.copy_from, model.checkpoint, source.name, as_name=job.name)
        return action, model.dtype(source.name), math.prod(model.shape(source.name))

    def run(self, writer: CheckpointWriter, report: MergeReport, progress: Progress | None) -> None:
        """Produce every output tensor in plan order: the next tensor's inputs are read (in one
        thread) while this one is merged (here) and the previous one is written (in another)."""
        jobs = self.plan.jobs
        copies = [self.copy_source(job) for job in jobs]
        with ThreadPoolExecutor(1, "merge-read") as reader, ThreadPoolExecutor(1, "merge-write") as writing:

            def prefetch(i: int) -> Future | None:
                return reader.submit(self.load, jobs[i]) if i < len(jobs) and not copies[i] else None

            upcoming = prefetch(0)
            written: Future | None = None
            for i, job in enumerate(jobs):
                current, upcoming = upcoming, prefetch(i + 1)
                if current is None:
                    action, dtype, numel = self.copy_action(job, writer)
                    report.copied += 1
                else:
                    result = self.merge(job, current.result())
                    action, dtype, numel = partial(writer.add, job.name, result), result.dtype, result.numel()
                    report.merged += 1
                if written is not None:
                    written.result()
                written = writing.submit(action)
                report.tensors += 1
                report.parameters += numel
                report.dtypes[str(dtype).removeprefix("torch.")] += numel
                if progress is not None:
                    progress(i + 1, len(jobs), job.name)
            if written is not None:
                written.result()


def _check_device(device: str) -> None:
    """Refuse a device torch cannot use before any work starts."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise WeightsmithError(None, f"device {device!r} is not usable: {str(exc).splitlines()[0]}") from None


@contextmanager
def _chunk_workers(threads: int) -> Iterator[PMap]:
    """A :data:`PMap` running chunks in ``threads`` threads (torch ops release the GIL), with torch's
    own intra-op threads at one during the pass (restored afterwards): chunks are cache-sized, where
    OpenMP teams mostly wait on each other, while whole chunks in parallel keep every core busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1:
            yield serial_map
        else:
            with ThreadPoolExecutor(threads, "merge-math") as pool:
                yield lambda fn, indices: list(pool.map(fn, indices)) if len(indices) > 1 else [fn(i) for i in indices]
    finally:
        torch.set_num_threads(before)


def default_threads() -> int:
    """One chunk worker per core this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


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
) -> MergeReport:
    """Merge the models ``config`` names (a mergekit YAML path, its parsed dict, or a
    :class:`MergeConfig`) into the checkpoint folder ``dest``.

    The preflight (headers and configs only) runs first and raises one WeightsmithError listing
    every problem; the output appears at ``dest`` only when complete. ``seed`` drives the random
    methods (dare_linear, dare_ties); ``device`` is where the math runs (e.g. ``cuda``);
    ``threads`` is how many threads compute the chunks of each tensor (default: one per core, see
    :func:`default_threads`); the output does not depend on it.
    """
    start = time.perf_counter()
    dest = Path(dest)
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise WeightsmithError(None, f"threads must be at least 1, got {threads}")
    _check_device(device)
    if dest.exists() and not force:
        raise WeightsmithError(dest, "already exists; pass --force to overwrite it")
    plan = prepare(config, allow_pickle=allow_pickle)
    report = MergeReport(plan.method.name, dest, layers=plan.layers)
    record = Record("merge", plan.config.model_dump(mode="json", exclude_none=True), seed=seed)
    for model in plan.inputs:
        record.add_input(model.origin, model.origin_files, model.checkpoint.provenance if model.origin == model.folder else None)
    with (
        CheckpointWriter(
            dest, force=force, max_shard_size=max_shard_size, source=plan.donor.folder, config=plan.out_config, record=record
        ) as writer,
        _chunk_workers(threads) as pmap,
    ):
        _Executor(plan, device, seed, pmap).run(writer, report, progress)
        record.figures.update(report.figures())
    report.seconds = time.perf_counter() - start
    log.info("merged %d tensors (%d copied) with %s into %s in %.1f s", report.tensors, report.copied, report.method, dest, report.seconds)
    return report
