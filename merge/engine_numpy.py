"""The numpy engine of the merge pass: CPU only, no torch imported at all (importing torch alone
takes longer than a whole linear merge of a 135M model), for the common case — safetensors
checkpoint folders of bfloat16 / float16 / float32 tensors merged by a method whose math runs on
numpy (``Method.numpy``: linear, soup, task_arithmetic, dare_linear, dare_ties). The math is
the torch engine's own functions on numpy arrays (:class:`merge.arith.NumpyArith`), so the output
is bit-for-bit the torch engine's (tests compare them); :func:`eligible` says when it applies.

Inputs are memory-mapped arrays (:meth:`weightsmith.checkpoint.Checkpoint.array`); each chunk of
an input is widened to float32 (and rounded to the compute dtype when that is narrower than the
input's); each finished chunk is rounded into the output array, which is written as raw bytes.
bfloat16, which numpy lacks, is read and written as its 16 bits (:mod:`merge.npmath`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from merge.arith import Group, NumpyArith, apply_method
from merge.chunks import PMap
from merge.npmath import FLOATS, narrow, promote, round_to, widen
from merge.plan import Job, Plan
from weightsmith.checkpoint import CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.stformat import DTYPES, numpy_view

__all__ = ["NumpyEngine", "eligible"]


def eligible(plan: Plan, device: str) -> str | None:
    """None when the numpy engine can run ``plan`` on ``device``; else why not (for the log)."""
    if device != "cpu":
        return f"device {device}"
    if not plan.method.numpy:
        return f"no numpy version of {plan.method.name}"
    for dtype in (plan.config.compute_st_dtype, plan.config.output_st_dtype):
        if dtype is not None and dtype not in FLOATS:
            return f"dtype {dtype}"
    for model in plan.inputs:
        if model.packed:
            return f"{model.reference} is a packed quantized checkpoint"
        if any(f.suffix != ".safetensors" for f in model.checkpoint.files):
            return f"{model.reference} is not stored as safetensors"
    for job in plan.jobs:
        for source in job.sources:
            dtype = plan.inputs[source.model].st_dtype(source.name)
            if dtype not in FLOATS:
                return f"tensor {source.name} is {dtype}"
    return None


class NumpyEngine:
    """The numpy counterpart of :class:`merge.engine_torch.TorchEngine`: ``load`` maps a job's input arrays,
    ``merge`` computes the output and returns the writer action, its dtype name and its size."""

    def __init__(self, plan: Plan, seeds: Callable[[Job], list[int]], pmap: PMap) -> None:
        self.plan = plan
        self.seeds = seeds
        self.pmap = pmap

    def load(self, job: Job) -> list[tuple[np.ndarray, str]]:
        loaded = []
        for source in job.sources:
            model = self.plan.inputs[source.model]
            loaded.append((model.checkpoint.array(source.name), model.st_dtype(source.name)))
        return loaded

    def merge(self, job: Job, arrays: list[tuple[np.ndarray, str]], writer: CheckpointWriter) -> tuple[Callable[[], None], str, int]:
        shape = self.plan.inputs[job.sources[0].model].shape(job.sources[0].name)
        numel = len(arrays[0][0])
        if any(len(a) != numel for a, _ in arrays):
            raise WeightsmithError(None, f"tensor {job.name}: inputs differ in size")
        compute = self.plan.config.compute_st_dtype or promote([dtype for _, dtype in arrays])
        output = self.plan.config.output_st_dtype or compute
        out = np.empty(numel, dtype=numpy_view(output))

        def values(i: int, part: slice) -> np.ndarray:
            raw, dtype = arrays[i]
            x = widen(raw[part], dtype)
            return x if dtype == compute or compute == "F32" else round_to(x, compute)

        def emit(part: slice, x: np.ndarray) -> None:
            if compute not in (output, "F32"):
                x = round_to(x, compute)
            out[part] = narrow(x, output)

        group = Group(NumpyArith(compute), numel, tuple(shape), len(arrays), values, emit, job.base, job.shared, job.per_input, self.seeds(job), self.pmap)
        apply_method(self.plan.method, group, job.name)
        return partial(writer.add_array, job.name, output, tuple(shape), out), DTYPES[output][0], numel
