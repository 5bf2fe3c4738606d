"""The prune pass as the registry runs it: structured pruning when ``structured`` is given,
unstructured or N:M pruning otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compress.prune.config import PruneConfig
from compress.prune.unstructured import prune_checkpoint
from compress.quantize import calibration_tokens
from weightsmith.checkpoint import Checkpoint
from weightsmith.passes import Report
from weightsmith.runtime import Runtime

__all__ = ["run", "storage_note"]


def storage_note(settings: PruneConfig) -> str:
    """What the user got, in words: which kind of sparsity and whether the file shrinks."""
    kind = f"{settings.pattern} semi-structured" if settings.pattern else "unstructured"
    if settings.format == "dense":
        return f"{kind} zeros stored as values: the file does not shrink (--format sparse stores them compressed)"
    if settings.format == "packed":
        return f"{kind} zeros inside packed {settings.bits}-bit codes: the file shrinks by the quantization only"
    return f"{kind} zeros stored compressed (compressed-tensors sparse format): the file shrinks"


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
    return Report(
        "prune",
        dest,
        bits_per_weight=quant.bits_per_weight if settings.bits is not None else None,
        sparsity=tally.sparsity,
        extra=extra,
        title=settings.describe(),
    )
