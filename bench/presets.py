"""Every single-model preset on SmolLM2-135M: size, perplexity, time and peak memory, one table.

Run:  .venv/bin/python bench/presets.py [--presets NAME ...] [--max-tokens 4096] [--out bench/out/presets.json]
      .venv/bin/python bench/presets.py --table      (the markdown table of the saved results)

Each preset runs as `weightsmith run preset:NAME OUT --model SMOLLM2` in a whole process measured by
/usr/bin/time -v (wall time, peak RSS), with a fresh work folder, so no step is reused from a cache
and the time is the preset's own. The merge presets are left out: they need several models (the
merge bench measures the methods). Each output is then evaluated by the pinned protocol on the first
``--max-tokens`` tokens of WikiText-2 test (default 4,096: 8 windows of 512 tokens, fp32, CPU) with
KL and top-1 agreement against the unchanged model, whose row comes first. A GGUF output is
evaluated through its dequantized weights (weightsmith convert, float32): the weights llama.cpp
multiplies, without llama.cpp's 8-bit rounding of the activations. Size is the bytes of the weight
files (the .gguf file for GGUF outputs).

Results are saved after every preset (JSON), so an interrupted run keeps what it measured and a
later run with ``--presets`` adds to it; the markdown table goes to the same path with .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, VENV_BIN, measure  # noqa: E402

log = logging.getLogger("bench.presets")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def single_model_presets() -> list[str]:
    """The presets that take one input model (not the merges), in name order."""
    import presets

    from weightsmith.passes import REGISTRY, Inputs
    from weightsmith.recipe import load_recipe

    names = []
    for path in sorted(Path(presets.__file__).parent.glob("*.yaml"), key=lambda p: p.stem):
        if REGISTRY[load_recipe(path)[0][0]].inputs is not Inputs.NAMED:
            names.append(path.stem)
    return names


def evaluate_output(model: Path, output: Path, text: Path, max_tokens: int, work: Path) -> dict:
    """Perplexity, KL, top-1 agreement against ``model``, size and parameters of ``output`` (a
    checkpoint folder, or a GGUF file read back as float32)."""
    import torch

    from weightsmith.evaluate import Protocol, evaluate_many
    from weightsmith.gguf_import import convert_gguf

    folder = output
    if output.is_file():
        folder = convert_gguf(output, work / f"{output.stem}-f32", dtype=torch.float32)
    _, report = evaluate_many([model, folder], text, Protocol(max_tokens=max_tokens), reference_dir=model)
    return {
        "perplexity": report.perplexity,
        "kl": report.kl,
        "top1": report.top1_agreement,
        "size_bytes": output.stat().st_size if output.is_file() else report.size_bytes,
        "parameters": report.num_parameters,
        "bits_per_weight": report.bits_per_weight,
        "positions": report.positions,
        "protocol": report.protocol,
    }


def baseline(model: Path, text: Path, max_tokens: int) -> dict:
    from weightsmith.evaluate import Protocol, evaluate

    report = evaluate(model, text, Protocol(max_tokens=max_tokens))
    return {"perplexity": report.perplexity, "size_bytes": report.size_bytes, "parameters": report.num_parameters,
            "positions": report.positions, "protocol": report.protocol}


def run_preset(name: str, model: Path, text: Path, max_tokens: int, keep: Path | None) -> dict:
    """Run preset ``name`` as a whole process and evaluate its output."""
    from weightsmith.passes import REGISTRY, Output
    from weightsmith.recipe import load_recipe, preset_path

    to_file = REGISTRY[load_recipe(preset_path(name))[-1][0]].output is Output.FILE
    with tempfile.TemporaryDirectory(prefix=f"bench-preset-{name}-") as tmp:
        work = Path(tmp)
        out = (keep or work) / (f"{name}.gguf" if to_file else name)
        cmd = [VENV_BIN / "weightsmith", "run", f"preset:{name}", out, "--model", model, "--workdir", work / "steps", "--force"]
        log.info("running %s", name)
        run = measure(cmd, env=OFFLINE, cwd=ROOT)
        figures = evaluate_output(model, out, text, max_tokens, work)
    return {"preset": name, "wall_s": run.wall_s, "peak_rss_mib": run.peak_rss_mb, **figures}


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def table(results: dict) -> str:
    """The markdown table: the unchanged model first, then every preset."""
    base = results["baseline"]
    lines = [
        f"SmolLM2-135M-Instruct, WikiText-2 test, first {results['max_tokens']:,} tokens ({base['positions']:,} scored positions); "
        f"measured {results['date']} on {results['machine']}.",
        "",
        "| preset | perplexity | KL | top-1 | size | parameters | bits/weight (packed linears) | wall | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| (unchanged, bf16) | {base['perplexity']:.2f} | 0 | 100% | {_size(base['size_bytes'])} | {base['parameters'] / 1e6:.1f}M | - | - | - |",
    ]
    for name in sorted(results["presets"]):
        r = results["presets"][name]
        bpw = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
        lines.append(
            f"| {name} | {r['perplexity']:.2f} | {r['kl']:.3f} | {100 * r['top1']:.1f}% | {_size(r['size_bytes'])} | "
            f"{r['parameters'] / 1e6:.1f}M | {bpw} | {r['wall_s']:.0f} s | {r['peak_rss_mib']:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="Checkpoint folder (default: the demo model, SmolLM2-135M-Instruct).")
    parser.add_argument("--text", type=Path, default=None, help="Evaluation text (default: WikiText-2 test from the assets).")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--presets", nargs="*", default=None, help="Presets to run (default: every single-model preset).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "presets.json")
    parser.add_argument("--keep", type=Path, default=None, help="Keep the outputs in this folder.")
    parser.add_argument("--table", action="store_true", help="Print the table of the saved results and exit.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # the evaluation loads packed outputs through transformers and compressed-tensors: no bars in the log
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    from weightsmith.demo import demo_text, fetch_demo_model

    model = args.model or fetch_demo_model()
    text = args.text or demo_text()
    names = args.presets or single_model_presets()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"presets": {}}
    if results.get("max_tokens") not in (None, args.max_tokens):
        raise SystemExit(f"{args.out} holds results on {results['max_tokens']} tokens; use another --out")
    results.update(max_tokens=args.max_tokens, date=datetime.date.today().isoformat(), machine="the 2-core development machine (CPU)")
    results["baseline"] = baseline(model, text, args.max_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    for name in names:
        results["presets"][name] = run_preset(name, model, text, args.max_tokens, args.keep)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log.info("%s: perplexity %.2f, %.0f s", name, results["presets"][name]["perplexity"], results["presets"][name]["wall_s"])
    markdown = table(results)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
