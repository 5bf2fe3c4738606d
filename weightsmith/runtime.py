"""How a pass runs, as opposed to what it computes: device, threads, seed, work folder, shard size.

One typed object, given to every pass by the registry (:mod:`weightsmith.passes`), settable from the
CLI (``weightsmith run --device --threads --seed --workdir``) and never part of a recipe. The
process-wide settings a pass needs (torch's intra-op thread count, glibc's allocator thresholds) are
applied by :meth:`Runtime.applied` around the pass and restored after it, so that a pass called from
Python leaves the caller's process as it found it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from weightsmith.checkpoint import DEFAULT_MAX_SHARD_SIZE
from weightsmith.errors import WeightsmithError

__all__ = ["Progress", "Runtime", "check_device", "default_threads", "parse_size", "torch_threads"]

log = logging.getLogger(__name__)

#: ``progress(done, total, what)``: called by long passes after each unit of work (tensor, layer).
Progress = Callable[[int, int, str], None]

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB', '500MiB', '1048576' -> bytes."""
    import re

    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise WeightsmithError(None, f"cannot read size {text!r}; write e.g. 2GB, 500MB, 1GiB or a byte count")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def default_threads() -> int:
    """One worker per core this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


@dataclass(frozen=True)
class Runtime:
    """Where and how a pass runs. None of these change what a pass computes except ``seed`` (the
    random draws of calibration sampling and DARE) and ``device`` within floating-point rounding."""

    #: torch device of the math: ``cpu``, ``cuda``, ``cuda:1``...
    device: str = "cpu"
    #: worker threads (torch intra-op threads, merge chunk workers); None = one per core, at most 8
    threads: int | None = None
    #: seed of every random draw of the pass
    seed: int = 0
    #: where recipes keep their step cache (default: ``$XDG_CACHE_HOME/weightsmith/recipes``)
    workdir: Path | None = None
    #: output shards are cut at this many bytes
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    #: overwrite an existing destination
    force: bool = False
    #: accept pickle checkpoints (.bin/.pt), loaded with torch.load(weights_only=True)
    allow_pickle: bool = False
    #: called after each unit of work of a long pass; not part of what is computed
    progress: Progress | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise WeightsmithError(None, f"threads must be at least 1, got {self.threads}")
        if self.max_shard_size < 1:
            raise WeightsmithError(None, f"max_shard_size must be at least 1 byte, got {self.max_shard_size}")
        if not self.device or not isinstance(self.device, str):
            raise WeightsmithError(None, f"device must be a torch device name such as cpu or cuda, got {self.device!r}")

    def with_(self, **changes: object) -> Runtime:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @contextmanager
    def applied(self, *, uses_torch: bool = True, keep_freed_memory: bool = False) -> Iterator[Runtime]:
        """Apply the process-wide settings a pass needs and restore them after it: torch's
        intra-op thread count when ``threads`` is set (only when the pass uses torch: the numpy merge
        engine never imports it; unset, torch keeps its own default) and, for streaming passes that churn through many short-lived chunk temporaries,
        glibc's allocator thresholds (:func:`weightsmith.allocator.kept_freed_memory`)."""
        with ExitStack() as stack:
            if uses_torch:
                if self.device != "cpu":
                    check_device(self.device)
                if self.threads is not None:
                    stack.enter_context(torch_threads(self.threads))
            if keep_freed_memory:
                from weightsmith.allocator import kept_freed_memory

                stack.enter_context(kept_freed_memory())
            yield self


def check_device(device: str) -> None:
    """Refuse a device torch cannot use before any work starts (imports torch)."""
    import torch

    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise WeightsmithError(None, f"device {device!r} is not usable: {str(exc).splitlines()[0]}") from None


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
