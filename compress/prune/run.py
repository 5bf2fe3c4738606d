"""The prune pass as the registry runs it: structured pruning when ``structured`` is given,
unstructured or N:M pruning otherwise."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from compress.prune.config import PruneConfig
from compress.prune.unstructured import prune_checkpoint
from compress.quantize import calibration_tokens
from weightsmith.checkpoint import Checkpoint
from weightsmith.passes import Report
from weightsmith.runtime import Runtime

__all__ = ["run", "storage_note"]

log = logging.getLogger(__name__)


def storage_note(settings: PruneConfig) -> str:
    """What the user got, in words: which kind of sparsity and whether the file shrinks."""
    kind = f"{settings.pattern} semi-structured" if settings.pattern else "unstructured"
    if settings.format == "dense":
        return f"{kind} zeros stored as values: the file does not shrink (--format sparse stores them compressed)"
    if settings.format == "packed":
        return f"{kind} zeros inside packed {settings.bits}-bit codes: the file shrinks by the quantization only"
    return (
        f"{kind} zeros stored compressed: the file shrinks. The compressed-tensors sparse formats are read by "
        "compressed-tensors <= 0.14 (transformers <= 5.3) only; newer releases load such a file with the pruned linears missing"
    )


def run(inputs: Sequence[Checkpoint], dest: Path, settings: PruneConfig, runtime: Runtime) -> Report:
    """Prune ``inputs[0]`` into ``dest``."""
    if settings.structured is not None:
        from compress.prune.structured import run as structured_run

        return structured_run(inputs, dest, settings, runtime)
    src = inputs[0]
    tokens = calibration_tokens(src, settings, runtime.seed) if settings.calibrated else None
    tally, quant = prune_checkpoint(
        src,
        dest,
        settings,
        calib_tokens=tokens,
        force=runtime.force,
        max_shard_size=runtime.max_shard_size,
        progress=runtime.progress,
        seed=runtime.seed,
        device=runtime.device,
    )
    extra = {k: v for k, v in tally.figures().items() if k != "sparsity"}
    extra["storage"] = storage_note(settings)
    if settings.format == "sparse":
        log.warning("format=sparse: %s", storage_note(settings).split(". ", 1)[1])
    return Report(
        "prune",
        dest,
        bits_per_weight=quant.bits_per_weight if settings.bits is not None else None,
        sparsity=tally.sparsity,
        parameters=src.num_parameters if settings.format == "sparse" else 0,
        extra=extra,
        title=settings.describe(),
    )
