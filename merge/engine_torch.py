"""The torch engine of the merge pass: every method, every input kind (GGUF, packed, pickle) and
any device torch offers. Tensors are read through :class:`merge.sources.MergeInput`, cast to the
compute dtype, merged by the method's math on tensors (:class:`merge.arith.TorchArith`) and handed
to the writer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor

from merge.chunks import PMap, serial_map, thread_map
from merge.arith import Group, TorchArith, apply_method
from merge.plan import Job, Plan
from weightsmith.checkpoint import CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.stformat import DTYPES, st_dtype

__all__ = ["TorchEngine", "chunk_workers", "intra_op_threads"]


@contextmanager
def intra_op_threads(threads: int) -> Iterator[PMap]:
    """torch's intra-op threads at ``threads`` during the pass (restored afterwards), and chunks
    run one after the other: for methods whose whole-tensor reductions are torch's own
    (``Method.torch_threads``), which then round as mergekit's do with as many threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield serial_map
    finally:
        torch.set_num_threads(before)


@contextmanager
def chunk_workers(threads: int) -> Iterator[PMap]:
    """:func:`merge.chunks.thread_map` with torch's own intra-op threads at one during the pass
    (restored afterwards): chunks are cache-sized, where OpenMP teams mostly wait on each other,
    while whole chunks in parallel keep every core busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with thread_map(threads) as pmap:
            yield pmap
    finally:
        torch.set_num_threads(before)


class TorchEngine:
    """``load`` reads a job's input tensors (on the reader thread); ``merge`` computes the output
    and returns the writer action, the output's dtype name and its element count."""

    def __init__(self, plan: Plan, device: str, seeds: Callable[[Job], list[int]], pmap: PMap, threads: int | None = None) -> None:
        self.plan = plan
        self.threads = threads
        self.device = torch.device(device)
        self.seeds = seeds
        self.pmap = pmap
        self.compute_dtype = plan.config.compute_dtype
        self.output_dtype = plan.config.output_dtype

    def load(self, job: Job) -> list[Tensor]:
        return [self.plan.inputs[source.model].get(source.name).to(self.device) for source in job.sources]

    def merge(self, job: Job, tensors: list[Tensor], writer: CheckpointWriter) -> tuple[Callable[[], None], str, int]:
        result = self._merge(job, tensors)
        return partial(writer.add, job.name, result), DTYPES[st_dtype(result.dtype)][0], result.numel()

    def _merge(self, job: Job, tensors: list[Tensor]) -> Tensor:
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
        flats = [t.to(dtype).reshape(-1) for t in tensors]
        numel = flats[0].numel()
        out = torch.empty(numel, dtype=dtype, device=self.device)
        kept: list[Tensor] = []

        def emit(part: slice, x: Tensor) -> None:
            out[part] = x

        group = Group(
            TorchArith(dtype, self.device, self.threads),
            numel,
            tuple(tensors[0].shape),
            len(flats),
            lambda i, part: flats[i][part],
            emit,
            job.base,
            job.shared,
            job.per_input,
            self.seeds(job),
            self.pmap,
            kept.append,
        )
        apply_method(self.plan.method, group, job.name)
        result = kept[0] if kept else out.reshape(tensors[0].shape)
        if self.output_dtype is not None:
            result = result.to(self.output_dtype)
        return result.to("cpu").contiguous()
