"""``weightsmith merge CONFIG OUT``: the command function; weightsmith/cli.py registers it.

It only parses options and dispatches to :func:`merge.run.merge_checkpoints`; WeightsmithError is
turned into one line and exit code 2 by the ``command`` wrapper that registers it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["merge_cmd"]


def merge_cmd(
    config: Annotated[
        Path, typer.Argument(metavar="CONFIG", help="mergekit-style YAML merge config (models or slices, merge_method, parameters, ...).")
    ],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Checkpoint folder to write.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Cut output shards at this size (e.g. 2GB, 500MB).")] = "2GB",
    device: Annotated[str, typer.Option("--device", help="Where the math runs: cpu, cuda, cuda:1, ...")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random methods (dare_linear, dare_ties).")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads computing each tensor's chunks (default: one per core, at most 8); the output does not depend on it.")] = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="Math engine: numpy (CPU, never loads torch: safetensors bf16/fp16/fp32 inputs with linear, soup, slerp, "
            "task_arithmetic, dare_linear, dare_ties), torch (every method, input and device), or auto (numpy where it applies). "
            "Both write the same tensors.",
        ),
    ] = "auto",
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Accept pickle checkpoints (.bin/.pt), loaded with torch.load(weights_only=True).")
    ] = False,
) -> None:
    """Merge models as a mergekit YAML config says: linear, soup, slerp, task_arithmetic, ties,
    dare_linear, dare_ties, breadcrumbs, model_stock, passthrough. Inputs may be checkpoint folders,
    hub ids, GGUF files or packed (compressed-tensors) checkpoints."""
    from rich.table import Table

    from merge.run import merge_checkpoints
    from weightsmith.allocator import keep_freed_memory
    from weightsmith.checkpoint import Checkpoint
    from weightsmith.cli import human_bytes, out, parse_size, progress_bar

    shard_bytes = parse_size(max_shard_size)
    keep_freed_memory()  # this process's chunk temporaries: reuse heap pages instead of re-faulting them
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("merging tensors", total=None)
        report = merge_checkpoints(
            config,
            out_dir,
            force=force,
            max_shard_size=shard_bytes,
            device=device,
            seed=seed,
            allow_pickle=allow_pickle,
            threads=threads,
            engine=engine,
            progress=lambda i, n, _name: bar.update(task, completed=i, total=n),
        )
    seconds = time.perf_counter() - start
    written = Checkpoint(out_dir)
    table = Table(title=f"{report.method} merge", show_header=False)
    table.add_row("output", str(out_dir))
    table.add_row("tensors", f"{report.tensors} ({report.merged} merged, {report.copied} copied)")
    table.add_row("parameters", f"{report.parameters:,}")
    if report.layers is not None:
        table.add_row("layers", str(report.layers))
    table.add_row("dtypes", ", ".join(report.dtypes))
    table.add_row("engine", report.engine)
    table.add_row("size", f"{human_bytes(written.file_bytes)} in {len(written.files)} file(s)")
    table.add_row("time", f"{seconds:.1f} s")
    out.print(table)
