"""weightsmith's GGUF files vs llama.cpp's own quantizer on SmolLM2-135M, measured by llama.cpp itself.

Run:  .venv/bin/python bench/gguf_bench.py [--rows NAME|GROUP ...] [--samples 128] [--source ours|llamacpp] [--quick]
      .venv/bin/python bench/gguf_bench.py --list       (the row names and groups)
      .venv/bin/python bench/gguf_bench.py --table      (the tables of the saved results)
Needs bench/setup-llamacpp.sh (llama.cpp's tools and Python bindings in .peers/ and .venv-peers).
(Not named bench/gguf.py: a script's folder comes first on sys.path, so that name would shadow the
gguf package in every bench script run as ``python bench/X.py``.)

Rows (groups ``f16``, ``q4_0``, ``q4_k_m``, ``q3_k_m``; or ``ours`` / ``llama.cpp``; or row names):

* ``ours f16``: ``weightsmith export gguf MODEL OUT --type f16``. The source of every llama-quantize
  row and the reference of KL and top-1 (``--source llamacpp``: llama.cpp's own conversion,
  ``llama.cpp f16``, takes both places, for runs without our exporter).
* ``llama.cpp f16``: llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` on the same folder.
* ``llama.cpp Q4_0`` / ``Q4_K_M`` / ``Q3_K_M``: ``llama-quantize`` from the source f16, without and
  with an importance matrix (``llama-imatrix -c 512 --chunks N`` on the calibration text, computed
  once per run; its time is added to each imatrix row's).
* ``ours Q4_0 gptq`` / ``ours Q4_0 awq``: ``weightsmith quantize --bits 4 --group-size 32
  --symmetric --format packed`` then ``weightsmith export gguf Q OUT --type q4_0`` (the codes kept).
* ``ours Q4_0 gptq gguf-grid`` (``--format gguf:q4_0``: GPTQ on Q4_0's own grid, float16 block
  scales), ``ours Q4_K_M gptq`` (``--format gguf:q4_k_m``, llama-quantize's mix per tensor) and
  ``ours Q3_K_M gptq`` (``--format gguf:q3_k_m``), and ``... act-order`` rows of the Q4_0 and
  Q4_K_M ones (GPTQ with ``--act-order``), each exported with ``--type`` of the same name:
  a CLI that refuses the option (a usage error) skips the row with its reason.

Calibration: the first ``--samples`` blocks of 512 tokens of wikitext2-test-calib.raw (our
tokenizer), written out as text (cut at a token boundary a few tokens past the last block) and
given to both tools: ``llama-imatrix --chunks N`` reads its first N chunks, ``weightsmith quantize
--samples N`` draws all N blocks of it (the same blocks, in another order). The run checks that
llama.cpp's tokenizer gives the same ids on that text.

Measured for every file: size; bits per weight = file bytes x 8 / the parameters of the embedding and
the decoder linears (the 2-D tensors; norms excluded); perplexity, KL to the reference and top-1
agreement from llama.cpp's own logits (bench/llamacpp_score.py in .venv-peers: the pinned protocol,
WikiText-2 test, first 20,480 tokens, 512-token windows, token ids from our tokenizer); prefill and
decode tokens/s from ``llama-bench -p 512 -n 128 -t 2 -o json``, run ``--speed-reps`` times per file
in interleaved rounds (every file once per round), the best round counting and the spread across
rounds giving the noise. Making each file is a whole process under /usr/bin/time -v (wall, peak RSS);
the tools alternate.

Goals (the issue): our Q4_0 (GPTQ) perplexity <= llama.cpp Q4_0 with imatrix; our Q4_K_M mix
perplexity <= llama.cpp Q4_K_M with imatrix at no larger file; llama.cpp's tokens/s on our files
equal to those on its own file of the same type, within noise (ratio >= 1 - max(5%, the spread of
either file)).

Results: bench/out/gguf.json (every run merged in, as bench/prune.py does) and a markdown table,
printed and written to bench/results/gguf-<date>.md. ``--quick``: 8 calibration blocks, 2,048
evaluated tokens, one speed round (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PEERS_BIN, ROOT, VENV_BIN, goal_word as _check, measure, or_dash as _fmt, ratio as _ratio  # noqa: E402
from bench.make_gguf_oracle import convert_command  # noqa: E402

LLAMA_BIN = ROOT / ".peers" / "llama.cpp" / "build" / "bin"
SCORER = ROOT / "bench" / "llamacpp_score.py"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GROUPS = ("f16", "q4_0", "q4_k_m", "q3_k_m")
THREADS = 2
WINDOW = 512
#: calibration text runs this many tokens past the last block, so a re-tokenization that merges
#: differently at the cut cannot drop the last block
CALIB_SLACK = 16
#: the least relative difference in tokens/s called noise
MIN_NOISE = 0.05


@dataclass(frozen=True)
class Row:
    """One GGUF file. ``make``: export (ours, from the model), convert (llama.cpp's converter),
    llama-quantize (from the source f16) or quantize (ours: weightsmith quantize, then export);
    ``gguf_type``: the export type or llama-quantize's type name; ``peer``: the llama.cpp row this
    one is compared with; ``later``: a feature the CLI may not have yet (a refusal skips the row)."""

    name: str
    group: str
    tool: str  # weightsmith | llama.cpp
    make: str  # export | convert | llama-quantize | quantize
    gguf_type: str
    imatrix: bool = False
    quantize: tuple[str, ...] = ()
    peer: str | None = None
    later: bool = False


Q4_GRID = ("--bits", "4", "--group-size", "32", "--symmetric")


def rows() -> list[Row]:
    """Every row, in run order: the sources, then per type llama.cpp's files beside ours."""
    return [
        Row("ours f16", "f16", "weightsmith", "export", "f16", peer="llama.cpp f16"),
        Row("llama.cpp f16", "f16", "llama.cpp", "convert", "f16"),
        Row("llama.cpp Q4_0", "q4_0", "llama.cpp", "llama-quantize", "Q4_0"),
        Row("ours Q4_0 gptq", "q4_0", "weightsmith", "quantize", "q4_0", quantize=("--method", "gptq", *Q4_GRID, "--format", "packed"),
            peer="llama.cpp Q4_0 imatrix"),
        Row("llama.cpp Q4_0 imatrix", "q4_0", "llama.cpp", "llama-quantize", "Q4_0", imatrix=True),
        Row("ours Q4_0 gptq gguf-grid", "q4_0", "weightsmith", "quantize", "q4_0", quantize=("--method", "gptq", "--format", "gguf:q4_0"),
            peer="llama.cpp Q4_0 imatrix", later=True),
        Row("ours Q4_0 gptq gguf-grid act-order", "q4_0", "weightsmith", "quantize", "q4_0",
            quantize=("--method", "gptq", "--act-order", "--format", "gguf:q4_0"), peer="llama.cpp Q4_0 imatrix", later=True),
        Row("ours Q4_0 awq", "q4_0", "weightsmith", "quantize", "q4_0", quantize=("--method", "awq", *Q4_GRID, "--format", "packed"),
            peer="llama.cpp Q4_0 imatrix"),
        Row("llama.cpp Q4_K_M", "q4_k_m", "llama.cpp", "llama-quantize", "Q4_K_M"),
        Row("ours Q4_K_M gptq", "q4_k_m", "weightsmith", "quantize", "q4_k_m", quantize=("--method", "gptq", "--format", "gguf:q4_k_m"),
            peer="llama.cpp Q4_K_M imatrix", later=True),
        Row("ours Q4_K_M gptq act-order", "q4_k_m", "weightsmith", "quantize", "q4_k_m",
            quantize=("--method", "gptq", "--act-order", "--format", "gguf:q4_k_m"), peer="llama.cpp Q4_K_M imatrix", later=True),
        Row("llama.cpp Q4_K_M imatrix", "q4_k_m", "llama.cpp", "llama-quantize", "Q4_K_M", imatrix=True),
        Row("llama.cpp Q3_K_M", "q3_k_m", "llama.cpp", "llama-quantize", "Q3_K_M"),
        Row("ours Q3_K_M gptq", "q3_k_m", "weightsmith", "quantize", "q3_k_m", quantize=("--method", "gptq", "--format", "gguf:q3_k_m"),
            peer="llama.cpp Q3_K_M imatrix", later=True),
        Row("llama.cpp Q3_K_M imatrix", "q3_k_m", "llama.cpp", "llama-quantize", "Q3_K_M", imatrix=True),
    ]


#: the rows with a goal on perplexity against their peer -> whether the file must also be no larger
QUALITY_GOALS = {
    "ours Q4_0 gptq": False, "ours Q4_0 gptq gguf-grid": False, "ours Q4_0 gptq gguf-grid act-order": False,
    "ours Q4_K_M gptq": True, "ours Q4_K_M gptq act-order": True,
}


def choose(patterns: list[str] | None, source: str) -> list[Row]:
    """The rows asked for, in run order, the source f16 first whatever was asked."""
    known = rows()
    chosen = known if not patterns else []
    for pattern in patterns or []:
        hits = [r for r in known if pattern in (r.name, r.group, r.tool, r.tool.replace("weightsmith", "ours"))]
        if not hits:
            raise SystemExit(f"no row or group named {pattern!r}; see --list")
        chosen += [r for r in hits if r not in chosen]
    src = next(r for r in known if r.name == source_row(source))
    return [src] + [r for r in known if r in chosen and r is not src]


def source_row(source: str) -> str:
    return "ours f16" if source == "ours" else "llama.cpp f16"


def refusal(error: str) -> str | None:
    """The CLI's reason when it refused the command line (a usage error, exit 2), else None."""
    if "(exit 2)" not in error:
        return None
    lines = [line.strip(" │╭╮╰╯─\t") for line in error.splitlines()[1:]]  # after measure's "CMD failed (exit 2):"
    reasons = [line for line in lines if line and not line.startswith(("Usage:", "Try ", "Error"))]
    return " ".join(reasons[-2:])[:300] or "usage error"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


# ---- inputs ------------------------------------------------------------------------------------
def calibration_text(model: Path, text: Path, samples: int, out: Path) -> tuple[Path, list[int]]:
    """The text of the first ``samples`` blocks of 512 tokens of ``text`` (our tokenizer) plus a few
    tokens, cut where a token ends; and the token ids of those blocks."""
    from weightsmith.data import read_text, tokenize
    from weightsmith.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    full = read_text(text)
    ids = tokenize(tokenizer, full).tolist()
    need = samples * WINDOW
    if len(ids) < need + CALIB_SLACK:
        raise SystemExit(f"{text} gives {len(ids)} tokens, fewer than {samples} blocks of {WINDOW}")
    cut = need + CALIB_SLACK
    prefix = tokenizer.decode(ids[:cut])
    while not full.startswith(prefix):  # a character split between two tokens: end one token earlier
        cut -= 1
        prefix = tokenizer.decode(ids[:cut])
    again = tokenize(tokenizer, prefix).tolist()
    if again[:need] != ids[:need] or len(again) // WINDOW != samples:
        raise SystemExit(f"the calibration text cut at {len(prefix)} characters does not re-tokenize to the same {samples} blocks")
    path = out / f"calib-{samples}.txt"
    path.write_text(prefix, encoding="utf-8")
    return path, ids[:need]


def eval_windows(model: Path, text: Path, max_tokens: int, out: Path) -> Path:
    """The pinned protocol's windows as int32 [n, 512] (.npy), BOS in front when the tokenizer adds one."""
    import numpy as np

    from weightsmith.data import blocks, bos_id, read_text, tokenize
    from weightsmith.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    windows = blocks(tokenize(tokenizer, read_text(text), max_tokens), WINDOW, bos=bos_id(tokenizer))
    path = out / f"windows-{max_tokens}.npy"
    np.save(path, windows.numpy().astype(np.int32))
    return path


def llama_cpp_tokens(gguf_file: Path, text: Path) -> list[int]:
    """llama.cpp's token ids of a text file (llama-tokenize, no BOS added by us)."""
    run = measure([LLAMA_BIN / "llama-tokenize", "-m", gguf_file, "-f", text, "--ids", "--no-bos", "--log-disable"])
    return json.loads(run.stdout.strip().splitlines()[-1])


def tokenizer_agreement(gguf_file: Path, calib: Path, ours: list[int]) -> str:
    """Whether llama.cpp's tokenizer gives our ids on the calibration blocks, in words."""
    try:
        theirs = llama_cpp_tokens(gguf_file, calib)[: len(ours)]
    except (RuntimeError, ValueError) as exc:
        return f"llama-tokenize failed, tokenizers not compared: {str(exc).strip().splitlines()[-1][:200]}"
    if theirs == ours:
        return f"llama.cpp's tokenizer ({gguf_file.name}) gives our {len(ours)} calibration token ids exactly"
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    return f"llama.cpp's tokenizer ({gguf_file.name}) differs from ours on the calibration text from token {first} of {len(ours)}"


# ---- making the files --------------------------------------------------------------------------
def make_imatrix(source: Path, calib: Path, samples: int, work: Path) -> tuple[Path, dict]:
    out = work / "imatrix.gguf"
    run = measure([LLAMA_BIN / "llama-imatrix", "-m", source, "-f", calib, "-c", WINDOW, "-b", WINDOW, "--chunks", samples,
                   "--no-ppl", "-t", THREADS, "-o", out])
    return out, {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb}


def make_row(row: Row, model: Path, source: Path | None, imatrix: tuple[Path, dict] | None, calib: Path, samples: int, work: Path) -> tuple[Path, dict]:
    """Write the row's GGUF file; wall time and peak RSS of the processes that made it."""
    dest = work / f"{slug(row.name)}.gguf"
    ws = str(VENV_BIN / "weightsmith")
    if row.make == "export":
        run = measure([ws, "export", "gguf", model, dest, "--type", row.gguf_type, "--force"], env=OFFLINE)
        return dest, {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "command": f"export gguf --type {row.gguf_type}"}
    if row.make == "convert":
        cmd, env = convert_command(model, dest, row.gguf_type)
        run = measure(cmd, env=env)
        return dest, {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "command": f"convert_hf_to_gguf.py --outtype {row.gguf_type}"}
    if row.make == "llama-quantize":
        assert source is not None
        extra: list = []
        wall, rss = 0.0, 0.0
        if row.imatrix:
            assert imatrix is not None
            extra = ["--imatrix", imatrix[0]]
            wall, rss = imatrix[1]["wall_s"], imatrix[1]["peak_rss_mb"]
        run = measure([LLAMA_BIN / "llama-quantize", *extra, source, dest, row.gguf_type, THREADS])
        command = f"llama-quantize {row.gguf_type}" + (f" --imatrix (llama-imatrix --chunks {samples})" if row.imatrix else "")
        return dest, {"wall_s": wall + run.wall_s, "peak_rss_mb": max(rss, run.peak_rss_mb), "command": command}
    packed = work / f"{slug(row.name)}-packed"
    calib_args = ["--calib", calib, "--samples", samples, "--seq-len", WINDOW]
    first = measure([ws, "quantize", model, packed, *row.quantize, *calib_args, "--force"], env=OFFLINE)
    then = measure([ws, "export", "gguf", packed, dest, "--type", row.gguf_type, "--force"], env=OFFLINE)
    shutil.rmtree(packed, ignore_errors=True)
    return dest, {"wall_s": first.wall_s + then.wall_s, "peak_rss_mb": max(first.peak_rss_mb, then.peak_rss_mb),
                  "command": f"quantize {' '.join(row.quantize)}; export gguf --type {row.gguf_type}"}


# ---- measuring ---------------------------------------------------------------------------------
def file_figures(path: Path) -> dict:
    """Size, the ggml types of the 2-D tensors, and their parameter count (embedding + linears)."""
    import gguf

    reader = gguf.GGUFReader(path)
    matrices = [t for t in reader.tensors if len(t.shape) >= 2]
    types = Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in matrices)
    return {"size_bytes": path.stat().st_size, "params_2d": int(sum(int(t.n_elements) for t in matrices)),
            "types": ", ".join(f"{name} x{count}" for name, count in types.most_common())}


def score_files(files: dict[str, Path], reference: Path, windows: Path) -> dict[str, dict]:
    """Perplexity, KL to ``reference`` and top-1 of every file, in one llamacpp_score.py process."""
    names = list(files)
    run = measure([PEERS_BIN / "python", SCORER, *[files[n] for n in names], "--windows", windows, "--ref", reference, "--threads", THREADS])
    lines = [json.loads(line) for line in run.stdout.strip().splitlines() if line.startswith("{")]
    print(json.dumps({"score_s_all_rows": run.wall_s, "rows": len(names)}), flush=True)
    return {n: {"perplexity": r["perplexity"], "kl": r["kl"], "top1": r["top1"], "eval_tokens": r["tokens"]} for n, r in zip(names, lines)}


def bench_once(path: Path) -> dict[str, float]:
    """One llama-bench run (one repetition after its warm-up): prefill of 512 and decode of 128 tokens/s."""
    run = measure([LLAMA_BIN / "llama-bench", "-m", path, "-p", WINDOW, "-n", 128, "-t", THREADS, "-r", 1, "-o", "json"])
    out = {}
    for test in json.loads(run.stdout):
        key = "prefill_tok_s" if test["n_prompt"] and not test["n_gen"] else "decode_tok_s"
        out[key] = float(test["avg_ts"])
    return out


def measure_speed(files: dict[str, Path], reps: int) -> dict[str, dict]:
    """tokens/s of every file, ``reps`` interleaved rounds; the best round counts, the spread across
    rounds ((max - min) / max) is the noise."""
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in files}
    for rep in range(reps):
        for name, path in files.items():
            samples[name].append(bench_once(path))
        print(json.dumps({"speed_round": rep + 1, "of": reps}), flush=True)
    out = {}
    for name, runs in samples.items():
        entry = {}
        for key in ("prefill_tok_s", "decode_tok_s"):
            values = [r[key] for r in runs]
            entry[key] = max(values)
            entry[key.replace("tok_s", "noise")] = (max(values) - min(values)) / max(values)
            entry[key.replace("tok_s", "median")] = statistics.median(values)
        out[name] = entry
    return out


# ---- tables ------------------------------------------------------------------------------------
def speed_goal(r: dict, p: dict, key: str) -> bool | None:
    """tokens/s on our file within noise of llama.cpp's own file of the same type (or faster)."""
    mine, theirs = r.get("speed", {}), p.get("speed", {})
    ratio = _ratio(mine.get(f"{key}_tok_s"), theirs.get(f"{key}_tok_s"))
    if ratio is None:
        return None
    tol = max(MIN_NOISE, mine.get(f"{key}_noise", 0.0), theirs.get(f"{key}_noise", 0.0))
    return ratio >= 1 - tol


def markdown(results: dict) -> str:
    """The table of the measured rows, with the goals."""
    runs = results.get("_runs", [])
    meta = runs[-1] if runs else {}
    lines = ["SmolLM2-135M-Instruct as GGUF, measured by llama.cpp (ggml-org/llama.cpp@0c1e57098, from llama-cpp-python 0.3.36) on CPU (2 threads):"]
    lines += [f"- {r['date']}: `{r['command']}` ({r['samples']} calibration blocks, {r['eval_tokens']} evaluated tokens, {r['speed_reps']} speed rounds, "
              f"source and reference: {r['source']})" for r in runs]
    params = next((r["params_2d"] for r in results.values() if isinstance(r, dict) and r.get("params_2d")), None)
    lines += [
        "",
        f"Quality from llama.cpp's logits by the pinned protocol (WikiText-2 test, first {meta.get('eval_tokens', '?')} tokens, 512-token windows, our tokenizer's ids);"
        f" KL and top-1 against {meta.get('source', '?')}. Bits per weight: file bytes x 8 / {_fmt(params / 1e6 if params else None, '.2f', 'M')} parameters"
        " (token embedding and decoder linears: the 2-D tensors; norms not counted). Speed: llama-bench -p 512 -n 128 -t 2, best of the interleaved rounds."
        " Make: wall and peak RSS of the processes that wrote the file (imatrix rows include llama-imatrix).",
        "",
        "| run | tensor types (2-D) | size | bits/weight | perplexity | KL | top-1 | prefill tok/s | decode tok/s | make wall | make RSS | peer | ppl / peer | size / peer | prefill / peer | decode / peer | goals |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    known = {r.name: r for r in rows()}
    for row in rows():
        r = results.get(row.name)
        if not r or "size_bytes" not in r:
            continue
        p = results.get(row.peer or "", {})
        s, ps = r.get("speed", {}), p.get("speed", {})
        ppl, size = _ratio(r.get("perplexity"), p.get("perplexity")), _ratio(r["size_bytes"], p.get("size_bytes"))
        pre, dec = _ratio(s.get("prefill_tok_s"), ps.get("prefill_tok_s")), _ratio(s.get("decode_tok_s"), ps.get("decode_tok_s"))
        goals = []
        if row.name in QUALITY_GOALS and ppl is not None:
            goals.append(f"ppl {_check(ppl <= 1.0)}")
            if QUALITY_GOALS[row.name]:
                goals.append(f"size {_check(size is not None and size <= 1.0)}")
        if row.peer and pre is not None:
            goals.append(f"speed {_check(bool(speed_goal(r, p, 'prefill')) and bool(speed_goal(r, p, 'decode')))}")
        kl = r.get("kl")
        top1 = r.get("top1")
        bpw = r["size_bytes"] * 8 / r["params_2d"] if r.get("params_2d") else None
        lines.append(
            f"| {row.name} | {r.get('types', '-')} | {r['size_bytes'] / 1e6:.1f} MB | {_fmt(bpw, '.2f')} | {_fmt(r.get('perplexity'), '.3f')} "
            f"| {_fmt(kl, '.4f')} | {_fmt(None if top1 is None else 100 * top1, '.1f', '%')} "
            f"| {_fmt(s.get('prefill_tok_s'), '.0f')} (±{_fmt(100 * s['prefill_noise'] if 'prefill_noise' in s else None, '.0f', '%')}) "
            f"| {_fmt(s.get('decode_tok_s'), '.1f')} (±{_fmt(100 * s['decode_noise'] if 'decode_noise' in s else None, '.0f', '%')}) "
            f"| {_fmt(r.get('wall_s'), '.0f', ' s')} | {_fmt(r.get('peak_rss_mb'), '.0f', ' MiB')} | {row.peer or '-'} "
            f"| {_fmt(ppl, '.3f', 'x')} | {_fmt(size, '.3f', 'x')} | {_fmt(pre, '.2f', 'x')} | {_fmt(dec, '.2f', 'x')} | {', '.join(goals) or '-'} |")
    lines.append("")
    for name, r in results.items():
        if name in known and "skipped" in r:
            lines.append(f"- {name}: skipped: {r['skipped']}")
        elif name in known and "error" in r:
            lines.append(f"- {name}: failed: {r['error']}")
    notes = meta.get("notes", [])
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


# ---- the run -----------------------------------------------------------------------------------
def check_tools() -> None:
    missing = [p for p in (LLAMA_BIN / "llama-quantize", LLAMA_BIN / "llama-imatrix", LLAMA_BIN / "llama-bench", PEERS_BIN / "python") if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(map(str, missing))}: run bash bench/setup-llamacpp.sh first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the table of the saved results and stop")
    parser.add_argument("--list", action="store_true", help="print the row names and groups and stop")
    parser.add_argument("--rows", nargs="*", help="row names, groups (f16, q4_0, q4_k_m, q3_k_m) or tools (ours, llama.cpp) to run (default: all)")
    parser.add_argument("--source", choices=("ours", "llamacpp"), default="ours",
                        help="the f16 file llama-quantize starts from and the reference of KL and top-1: ours (weightsmith export) or llama.cpp's converter")
    parser.add_argument("--samples", type=int, default=128, help="calibration blocks of 512 tokens (llama-imatrix --chunks, weightsmith quantize --samples)")
    parser.add_argument("--max-tokens", type=int, default=20480, help="evaluated tokens (pinned protocol: 20480)")
    parser.add_argument("--speed-reps", type=int, default=3, help="interleaved llama-bench rounds per file (the best counts)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 blocks, 2048 evaluated tokens, one speed round")
    parser.add_argument("--keep", type=Path, help="keep the GGUF files in this folder (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gguf.json")
    parser.add_argument("--md", type=Path, default=ROOT / "bench" / "results" / f"gguf-{time.strftime('%Y-%m-%d')}.md")
    args = parser.parse_args()
    if args.list:
        for r in rows():
            print(f"{r.group:8} {r.tool:12} {r.name}")
        return
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    check_tools()
    if args.quick:
        args.samples, args.max_tokens, args.speed_reps = 8, 2048, 1
    chosen = choose(args.rows, args.source)
    from weightsmith.demo import fetch_demo_model
    from weightsmith.paths import asset

    model = fetch_demo_model()
    text, calib_source = asset("text/wikitext2-test.raw"), asset("text/wikitext2-test-calib.raw")
    if text is None or calib_source is None:
        raise SystemExit("WikiText-2 assets not found (set WEIGHTSMITH_ASSETS)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    run_meta = {"date": time.strftime("%Y-%m-%d"), "command": "python bench/gguf_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "samples": args.samples, "eval_tokens": args.max_tokens, "speed_reps": args.speed_reps, "source": source_row(args.source), "notes": []}
    results.setdefault("_runs", []).append(run_meta)
    started = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="ws-bench-gguf-", dir=model.parent))
    work.mkdir(parents=True, exist_ok=True)
    try:
        calib, calib_ids = calibration_text(model, calib_source, args.samples, work)
        windows = eval_windows(model, text, args.max_tokens, work)
        files: dict[str, Path] = {}
        imatrix = None
        for row in chosen:  # make every file first (tools alternate), then score and time them together
            print(f"== {row.name}", flush=True)
            source = files.get(chosen[0].name)
            try:
                if row.make == "llama-quantize" and source is None:
                    raise RuntimeError(f"no source f16 ({chosen[0].name} failed)")
                if row.imatrix and imatrix is None:
                    imatrix = make_imatrix(source, calib, args.samples, work)
                    run_meta["notes"].append(f"llama-imatrix --chunks {args.samples}: {imatrix[1]['wall_s']:.0f} s, {imatrix[1]['peak_rss_mb']:.0f} MiB")
                dest, figures = make_row(row, model, source, imatrix, calib, args.samples, work)
                results[row.name] = {**figures, **file_figures(dest), "samples": args.samples if row.imatrix or row.make == "quantize" else None}
                files[row.name] = dest
            except RuntimeError as exc:
                reason = refusal(str(exc)) if row.later else None
                results[row.name] = {"skipped": f"the CLI refuses it: {reason}"} if reason else {"error": str(exc).strip().splitlines()[-1][:300]}
            print(json.dumps(results[row.name]), flush=True)
            args.out.write_text(json.dumps(results, indent=2))
            if row is chosen[0] and row.name not in files:
                raise SystemExit(f"{row.name} failed: no source for llama-quantize and no reference to score against"
                                 f" (--source llamacpp runs without our exporter): {results[row.name]}")
        run_meta["notes"].append(tokenizer_agreement(files[chosen[0].name], calib, calib_ids))
        for name, figures in score_files(files, files[chosen[0].name], windows).items():
            results[name].update(figures)
        args.out.write_text(json.dumps(results, indent=2))
        for name, speed in measure_speed(files, args.speed_reps).items():
            results[name]["speed"] = speed
        args.out.write_text(json.dumps(results, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    table = markdown(results)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(table + "\n")
    print(table)
    print(f"written: {args.md}, {args.out}")


if __name__ == "__main__":
    main()
