"""weightsmith prune vs llm-compressor (oneshot) and Torch-Pruning on SmolLM2-135M, side by side in one run.

Run:  .venv/bin/python bench/prune.py [--rows NAME|GROUP ...] [--samples 128] [--quick] [--out bench/out/prune.json]
      .venv/bin/python bench/prune.py --list       (the row names and groups)
      .venv/bin/python bench/prune.py --table      (the README tables of the saved results)

Three groups of rows (``--rows sparse``, ``--rows torch-pruning``, ``--rows structured``, or row names):

* ``sparse``: unstructured (50%) and 2:4 pruning against llm-compressor's oneshot: Wanda and
  SparseGPT, and SparseGPT 2:4 followed by GPTQ W4 g64 (ours in one joint sweep, and ours as
  `weightsmith prune` then `weightsmith quantize`). Magnitude pruning is ours alone: llm-compressor's
  MagnitudePruningModifier is a training-time modifier and changes nothing in oneshot. For the 2:4
  rows the share of 4-weight windows that hold at most 2 non-zeros is counted in the saved weights.
  Tiny Shakespeare calibration rows show how each tool fares out of domain.
* ``torch-pruning``: MLP-width pruning (10/25/50% of the channels) against Torch-Pruning, the
  approach of its LLM example (dependency graph, group L2-norm importance, channels removed and the
  model saved by transformers), at exactly our kept width, so at equal parameter count. Ours with
  activation importance (the default) and with magnitude importance (data-free, like the peer's).
* ``structured``: ours only: perplexity against parameter count for MLP 10/25/50%, key/value head
  groups 25% and 2/4/8 layers removed, and the speed-up of each pruned model in transformers on CPU
  (prefill of 512 tokens, 128-token greedy decode) against the original, beside the parameter
  ratio. A PNG plot when matplotlib is installed.

Every tool run is a whole process measured by /usr/bin/time -v (wall time, peak RSS); tools
alternate. All outputs and the base are then evaluated together by one `weightsmith eval` (the
reference runs once per window): the pinned protocol (WikiText-2 test, first 20,480 tokens,
512-token windows, fp32, CPU) with KL and top-1 agreement against the unpruned model.
Calibration: ``--samples`` blocks of 512 tokens of wikitext2-test-calib.raw (in domain, disjoint
from the evaluated tokens) or of Tiny Shakespeare, the same blocks for every tool (sampled once, by
seed, and handed to the peers as token ids). ``--quick``: 8 blocks, 2,048 evaluated tokens, one
speed repeat; a smoke run, not a measurement. The full run takes hours on 2 cores (the calibrated
runs at 128 blocks, llm-compressor's above all, and the evaluation of some 30 models); the groups
can run one at a time into the same JSON file, whose tables then name every run.
Peers run from .venv-peers (bench/setup-peers.sh, ../shared/PEERS.md), with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PEERS_BIN, ROOT, VENV_BIN, goal_word as _check, measure, or_dash as _fmt, ratio as _ratio  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GROUPS = ("sparse", "torch-pruning", "structured")
#: MLP width of SmolLM2-135M and the alignment of our structured pass (its default): the peer keeps
#: exactly the width we keep
MLP_ALIGN = 32


@dataclass(frozen=True)
class Row:
    """One tool run. ``args`` are the weightsmith prune options (or the peer's settings); ``then``
    the options of a `weightsmith quantize` run on the pruned output; ``peer`` names the row this
    one is compared with."""

    name: str
    group: str  # sparse | torch-pruning | structured
    tool: str  # weightsmith | llmcompressor | torch-pruning
    calib: str  # wikitext | shakespeare | none
    args: tuple[str, ...] = ()
    then: tuple[str, ...] = ()
    peer: str | None = None
    pattern: str | None = None  # the N:M pattern whose windows are counted


def _sparse_rows() -> list[Row]:
    out = [
        Row("magnitude 50% / ws", "sparse", "weightsmith", "none", ("--method", "magnitude", "--sparsity", "0.5")),
        Row("magnitude 2:4 / ws", "sparse", "weightsmith", "none", ("--method", "magnitude", "--pattern", "2:4"), pattern="2:4"),
    ]
    settings = [("wanda", "50%", "wikitext"), ("wanda", "2:4", "wikitext"), ("sparsegpt", "50%", "wikitext"), ("sparsegpt", "2:4", "wikitext"),
                ("wanda", "50%", "shakespeare"), ("sparsegpt", "2:4", "shakespeare")]
    for method, shape, calib in settings:
        nm = "2:4" if shape == "2:4" else None
        ours = ("--method", method, *(("--pattern", "2:4") if nm else ("--sparsity", "0.5")))
        peer = f"{method} {shape} {calib} / llmc"
        out.append(Row(peer, "sparse", "llmcompressor", calib, (method, nm or "0:0", "0", "0"), pattern=nm))
        out.append(Row(f"{method} {shape} {calib} / ws", "sparse", "weightsmith", calib, ours, peer=peer, pattern=nm))
    peer = "sparsegpt 2:4 + gptq W4 g64 wikitext / llmc"
    out.append(Row(peer, "sparse", "llmcompressor", "wikitext", ("sparsegpt", "2:4", "4", "64"), pattern="2:4"))
    out.append(Row("sparsegpt 2:4 + W4 g64 joint wikitext / ws", "sparse", "weightsmith", "wikitext",
                   ("--method", "sparsegpt", "--pattern", "2:4", "--bits", "4", "--group-size", "64", "--format", "packed"), peer=peer, pattern="2:4"))
    # llm-compressor's GPTQModifier orders columns by activation (static) by default: so does ours here
    out.append(Row("sparsegpt 2:4 then gptq W4 g64 wikitext / ws", "sparse", "weightsmith", "wikitext", ("--method", "sparsegpt", "--pattern", "2:4"),
                   then=("--method", "gptq", "--bits", "4", "--group-size", "64", "--act-order", "--format", "packed"), peer=peer, pattern="2:4"))
    return out


def _width_rows() -> list[Row]:
    out = []
    for share in (0.10, 0.25, 0.50):
        pct = f"{round(100 * share)}%"
        peer = f"mlp {pct} / tp"
        out.append(Row(peer, "torch-pruning", "torch-pruning", "none", (str(share),)))
        out.append(Row(f"mlp {pct} / ws", "torch-pruning", "weightsmith", "wikitext", ("--structured", f"mlp={share}"), peer=peer))
        out.append(Row(f"mlp {pct} magnitude / ws", "torch-pruning", "weightsmith", "none", ("--structured", f"mlp={share}", "--importance", "magnitude"), peer=peer))
    return out


def _structured_rows() -> list[Row]:
    out = [Row("heads 25% / ws", "structured", "weightsmith", "wikitext", ("--structured", "heads=0.25"))]
    out += [Row(f"layers {n} / ws", "structured", "weightsmith", "wikitext", ("--structured", f"layers={n}")) for n in (2, 4, 8)]
    return out


def rows() -> list[Row]:
    """Every row the bench knows, in run order (each peer row right before ours)."""
    return _sparse_rows() + _width_rows() + _structured_rows()


#: the ws rows whose pruned models are timed in transformers (part 3): every structured output of ours
def timed(row: Row) -> bool:
    return row.tool == "weightsmith" and "--structured" in row.args and "--importance" not in row.args


LLMC_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.modifiers.quantization import GPTQModifier
from compressed_tensors.quantization import QuantizationScheme, QuantizationArgs
model_dir, out_dir, method, structure, bits, gs, calib = sys.argv[1:8]
bits, gs = int(bits), int(gs)
prune = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
recipe = [prune(sparsity=0.5, mask_structure=structure, ignore=["lm_head"])]
if bits:
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=gs)
    recipe.append(GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                               ignore=["lm_head"], dampening_frac=0.01))
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
ids = torch.load(calib)
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
# pruned only: saved dense (zeros as values, as ours); quantized: compressed, as ours (packed)
oneshot(model=model, recipe=recipe, dataset=data, num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
        output_dir=out_dir, save_compressed=bool(bits))
"""

#: Torch-Pruning's LLM example prunes Llama widths through its dependency graph with group L2-norm
#: importance and saves with transformers; here only the MLP channels are cut, in every layer to the
#: width given (the width weightsmith keeps), so both models have the same parameter count.
TP_SCRIPT = r"""
import sys, torch
import torch_pruning as tp
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, out_dir, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
tok = AutoTokenizer.from_pretrained(model_dir)
example = torch.tensor([tok.encode("Hello world.")])
# the traced output is the logits alone (the KV cache in the model output is no tensor to trace)
graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=lambda m, x: m(x, use_cache=False).logits)
importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
for layer in model.model.layers:
    gate = layer.mlp.gate_proj
    width = gate.out_features
    group = graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=list(range(width)))
    scores = importance(group)
    drop = torch.argsort(scores.float(), stable=True)[: width - keep].tolist()
    graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=drop).prune()
    assert layer.mlp.up_proj.out_features == keep and layer.mlp.down_proj.in_features == keep, "MLP not pruned as one group"
    layer.mlp.intermediate_size = keep
model.config.intermediate_size = keep
model.save_pretrained(out_dir)
tok.save_pretrained(out_dir)
"""

#: tokens/s in transformers on CPU (float32, torch's default threads): for each model the prefill
#: of one 512-token block and 128 greedy decode steps on its KV cache; every repeat runs all models
#: in turn, and the best repeat of each counts (the machine is shared: the fastest run is the one
#: least disturbed).
SPEED_SCRIPT = r"""
import sys, json, time, inspect, torch
from weightsmith.models import load_model
ids_path, reps, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
folders = sys.argv[4:]
ids = torch.load(ids_path)[:1]
models = {}
for f in folders:  # a folder named twice is loaded once and timed at both places in each repeat
    models.setdefault(f, load_model(f))
# transformers 5 renamed the KV-cache argument and output field (past_key_values -> cache)
first = next(iter(models.values()))
cache_kw = "cache" if "cache" in inspect.signature(first.forward).parameters else "past_key_values"
def step(m, x, cache):
    out = m(x, use_cache=True, **({} if cache is None else {cache_kw: cache}))
    return out.logits[:, -1].argmax(-1, keepdim=True), out[cache_kw] if cache_kw in out else out.past_key_values
best = [{"prefill_s": float("inf"), "decode_s": float("inf")} for _ in folders]
with torch.inference_mode():
    for m in models.values():
        m(ids[:, :64])
    for _ in range(reps):
        for f, b in zip(folders, best):
            m = models[f]
            t = time.perf_counter()
            nxt, cache = step(m, ids, None)
            b["prefill_s"] = min(b["prefill_s"], time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(decode):
                nxt, cache = step(m, nxt, cache)
            b["decode_s"] = min(b["decode_s"], time.perf_counter() - t)
            del cache
for f, b in zip(folders, best):
    b.update(params=sum(p.numel() for p in models[f].parameters()), prefill_tok_s=ids.shape[1] / b["prefill_s"], decode_tok_s=decode / b["decode_s"])
print(json.dumps(best))
"""


def calibration_ids(model: Path, which: str, text: Path, samples: int, out: Path) -> Path:
    """Sample the calibration blocks once (weightsmith's seeded sampler, as the prune pass draws
    them), save the token ids for the peers."""
    import torch

    from weightsmith.data import text_blocks
    from weightsmith.models import load_tokenizer

    ids = text_blocks(load_tokenizer(model), text, 512, samples, seed=0)
    path = out / f"calib-{which}-{samples}.pt"
    torch.save(ids, path)
    return path


def kept_mlp_width(model: Path, share: float) -> int:
    """The MLP width our structured pass keeps for ``share`` (the peer is cut to the same width)."""
    from compress.prune.importance import kept_width

    width = json.loads((model / "config.json").read_text())["intermediate_size"]
    return kept_width(width, share, MLP_ALIGN)


def run_row(row: Row, model: Path, work: Path, calib_ids: dict[str, Path], calib_text: dict[str, Path], samples: int) -> tuple[Path, dict]:
    dest = work / row.name.replace(" ", "_").replace("/", "-").replace("%", "pct").replace(":", "of").replace("+", "and")
    if row.tool == "weightsmith":
        calib = ["--samples", str(samples), "--seq-len", "512"] + (["--calib", str(calib_text[row.calib])] if row.calib != "none" else [])
        first = dest.parent / f"{dest.name}-pruned" if row.then else dest
        run = measure([str(VENV_BIN / "weightsmith"), "prune", str(model), str(first), *row.args, *calib, "--force"], env=OFFLINE)
        figures = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "options": " ".join(row.args)}
        if row.then:
            step = measure([str(VENV_BIN / "weightsmith"), "quantize", str(first), str(dest), *row.then, *calib, "--force"], env=OFFLINE)
            figures.update(wall_s=run.wall_s + step.wall_s, peak_rss_mb=max(run.peak_rss_mb, step.peak_rss_mb),
                           options=f"prune {' '.join(row.args)}; quantize {' '.join(row.then)}")
        return dest, figures
    if row.tool == "llmcompressor":
        script, argv = LLMC_SCRIPT, [*row.args, str(calib_ids[row.calib])]
    else:
        script, argv = TP_SCRIPT, [str(kept_mlp_width(model, float(row.args[0])))]
    script_path = work / f"peer_{row.tool.replace('-', '_')}.py"  # not the package name, which it would shadow
    script_path.write_text(script)
    run = measure([str(PEERS_BIN / "python"), str(script_path), str(model), str(dest), *argv], env=OFFLINE, cwd=work)
    return dest, {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb}


def sparsity_figures(folder: Path, pattern: str | None) -> dict:
    """Counted in the saved weights (loaded as transformers loads them, packed weights dequantized):
    the share of zeros in the decoder layers' linears and, for an N:M pattern, the share of M-weight
    windows along the input dimension that hold at most N non-zeros."""
    import torch

    from weightsmith.models import load_model

    net = load_model(folder)
    zeros = total = windows = kept = 0
    for name, module in net.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in f".{name}":
            continue
        w = module.weight.detach()
        nonzero = w != 0
        zeros += int((~nonzero).sum())
        total += w.numel()
        if pattern:
            n, m = (int(v) for v in pattern.split(":"))
            per_window = nonzero.reshape(w.shape[0], -1, m).sum(dim=-1)
            windows += per_window.numel()
            kept += int((per_window <= n).sum())
    del net
    out = {"sparsity": zeros / total}
    if pattern:
        out["nm_windows_kept"] = kept / windows
    return out


def evaluate_rows(folders: dict[str, Path], reference: Path, text: Path, max_tokens: int, work: Path) -> dict[str, dict]:
    """Evaluate every output in one `weightsmith eval` process: the reference runs once per window."""
    names = list(folders)
    out = work / "eval.json"
    run = measure([str(VENV_BIN / "weightsmith"), "eval", *[str(folders[n]) for n in names], "--text", str(text), "--reference", str(reference),
                   "--max-tokens", str(max_tokens), "--json", str(out)], env=OFFLINE)
    docs = json.loads(out.read_text())
    docs = docs if isinstance(docs, list) else [docs]
    print(json.dumps({"eval_s_all_rows": run.wall_s, "rows": len(names)}), flush=True)
    results = {}
    for name, report in zip(names, docs):
        results[name] = {"perplexity": report["perplexity"], "kl": report["kl"], "top1": report["top1_agreement"], "size_bytes": report["size_bytes"],
                         "eval_tokens": max_tokens}
    return results


def measure_speed(folders: dict[str, Path], ids: Path, reps: int) -> dict[str, dict]:
    """Tokens/s of every model in ``folders`` (name -> folder; one process, repeats interleave the
    models in this order)."""
    script = ids.parent / "speed.py"
    script.write_text(SPEED_SCRIPT)
    run = measure([str(VENV_BIN / "python"), str(script), str(ids), str(reps), "128", *[str(f) for f in folders.values()]], env=OFFLINE, cwd=ROOT)
    return dict(zip(folders, json.loads(run.stdout.strip().splitlines()[-1])))


def markdown(results: dict) -> str:
    """README tables of the measured rows, with the goals."""
    runs = results.get("_runs", [])
    meta = runs[-1] if runs else {}
    base = results.get("base", {})
    lines = ["SmolLM2-135M-Instruct on CPU (2 cores), measured by:"]
    lines += [f"- {r['date']}: `{r['command']}` ({r['samples']} calibration blocks, {r['eval_tokens']} evaluated tokens)" for r in runs]
    lines += [
        "",
        f"Pinned protocol: WikiText-2 test, first {meta.get('eval_tokens', '?')} tokens, 512-token windows, fp32, CPU; KL and top-1 against the unpruned model"
        f" (perplexity {_fmt(base.get('perplexity'), '.2f')}). Calibration: blocks of 512 tokens, the same blocks for every tool.",
        "",
    ]
    known = {r.name: r for r in rows()}
    measured = [(name, r) for name, r in results.items() if name in known and "perplexity" in r]
    failed = [(name, r) for name, r in results.items() if name in known and "error" in r]

    sparse = [(n, r) for n, r in measured if known[n].group == "sparse"]
    if sparse:
        lines += ["**Unstructured and 2:4 pruning vs llm-compressor oneshot.** Goals per setting: perplexity ours <= peer (aim <= 0.8x), wall <= 0.5x, peak RSS <= 1.0x.",
                  "Magnitude rows are ours alone: llm-compressor's MagnitudePruningModifier is a training-time modifier and changes nothing in oneshot.", "",
                  "| run | perplexity | KL | top-1 | sparsity | 2:4 windows kept | size | wall | peak RSS | ppl / peer | wall / peer | RSS / peer | goals (ppl, wall, RSS) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in sparse:
            p = results.get(known[name].peer or "", {})
            ppl, wall, rss = _ratio(r["perplexity"], p.get("perplexity")), _ratio(r["wall_s"], p.get("wall_s")), _ratio(r["peak_rss_mb"], p.get("peak_rss_mb"))
            goals = "-" if ppl is None else f"{_check(ppl <= 1.0)}{' (<=0.8x)' if ppl <= 0.8 else ''}, {_check(wall <= 0.5)}, {_check(rss <= 1.0)}"
            lines.append(f"| {name} | {r['perplexity']:.2f} | {r['kl']:.3f} | {100 * r['top1']:.1f}% | {_fmt(100 * r['sparsity'] if 'sparsity' in r else None, '.1f', '%')} "
                         f"| {_fmt(100 * r['nm_windows_kept'] if 'nm_windows_kept' in r else None, '.2f', '%')} | {r['size_bytes'] / 1e6:.0f} MB "
                         f"| {r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MiB | {_fmt(ppl, '.2f', 'x')} | {_fmt(wall, '.2f', 'x')} | {_fmt(rss, '.2f', 'x')} | {goals} |")
        lines.append("")

    width = [(n, r) for n, r in measured if known[n].group == "torch-pruning"]
    if width:
        lines += ["**MLP-width pruning vs Torch-Pruning** (its LLM example's dependency graph and group L2-norm importance, cut to our kept width: equal parameter count). Goal: perplexity ours <= Torch-Pruning's.", "",
                  "| run | parameters | perplexity | KL | top-1 | wall | peak RSS | ppl / peer | goal |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in width:
            p = results.get(known[name].peer or "", {})
            ppl = _ratio(r["perplexity"], p.get("perplexity"))
            lines.append(f"| {name} | {_fmt(r.get('params', 0) / 1e6 if r.get('params') else None, '.1f', 'M')} | {r['perplexity']:.2f} | {r['kl']:.3f} | {100 * r['top1']:.1f}% "
                         f"| {r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MiB | {_fmt(ppl, '.3g', 'x')} | {_check(None if ppl is None else ppl <= 1.0)} |")
        lines.append("")

    speed = [(n, r) for n, r in measured if "speed" in r]
    if speed and "speed" in base:
        b = base["speed"]
        lines += ["**Structured pruning, ours: quality, size and speed in transformers (CPU, fp32)** — prefill of 512 tokens, 128-token greedy decode, best of "
                  f"{meta.get('speed_reps', '?')} interleaved repeats. Goal: speed-up >= 0.8 x parameter ratio (original / pruned).", "",
                  "| run | parameters | param ratio | perplexity | KL | top-1 | prefill tok/s | speed-up | decode tok/s | speed-up | goal (prefill, decode) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| original | {b['params'] / 1e6:.1f}M | 1.00x | {_fmt(base.get('perplexity'), '.2f')} | 0 | 100% | {b['prefill_tok_s']:.0f} | 1.00x | {b['decode_tok_s']:.1f} | 1.00x | |"]
        for name, r in sorted(speed, key=lambda item: -item[1]["speed"]["params"]):
            s = r["speed"]
            pr = b["params"] / s["params"]
            up_p, up_d = s["prefill_tok_s"] / b["prefill_tok_s"], s["decode_tok_s"] / b["decode_tok_s"]
            lines.append(f"| {name} | {s['params'] / 1e6:.1f}M | {pr:.2f}x | {r['perplexity']:.2f} | {r['kl']:.3f} | {100 * r['top1']:.1f}% | {s['prefill_tok_s']:.0f} | {up_p:.2f}x "
                         f"| {s['decode_tok_s']:.1f} | {up_d:.2f}x | {_check(up_p >= 0.8 * pr)}, {_check(up_d >= 0.8 * pr)} |")
        lines.append("")
    for name, r in failed:
        lines.append(f"- {name}: failed: {r['error']}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Perplexity against parameter count of every structured output (and Torch-Pruning's)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (`.venv/bin/pip install -e '.[plot]'`, as make bench-prune does)", flush=True)
        return
    known = {r.name: r for r in rows()}
    series: dict[str, list[tuple[float, float, str]]] = {}
    for name, r in results.items():
        row = known.get(name)
        if row is None or row.group == "sparse" or "perplexity" not in r or not r.get("params"):
            continue
        kind = "Torch-Pruning (mlp)" if row.tool == "torch-pruning" else "weightsmith " + (
            "mlp, magnitude" if "--importance" in row.args else row.args[1].split("=")[0])
        series.setdefault(kind, []).append((r["params"] / 1e6, r["perplexity"], name.split(" / ")[0]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = results.get("base", {})
    if base.get("params"):
        ax.scatter([base["params"] / 1e6], [base["perplexity"]], marker="*", s=120, color="black", label="original")
    for kind, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
        for x, y, label in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("perplexity, WikiText-2 test (log)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M structured pruning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", flush=True)


def choose(patterns: list[str] | None) -> list[Row]:
    known = rows()
    if not patterns:
        return known
    chosen: list[Row] = []
    for pattern in patterns:
        hits = [r for r in known if pattern in (r.name, r.group)]
        if not hits:
            raise SystemExit(f"no row or group named {pattern!r}; see --list")
        chosen += [r for r in hits if r not in chosen]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the README tables of the saved results and stop")
    parser.add_argument("--list", action="store_true", help="print the row names and groups and stop")
    parser.add_argument("--rows", nargs="*", help="row names or groups (sparse, torch-pruning, structured) to run, in this order (default: all)")
    parser.add_argument("--samples", type=int, default=128, help="calibration blocks of 512 tokens")
    parser.add_argument("--max-tokens", type=int, default=20480, help="evaluated tokens (pinned protocol: 20480)")
    parser.add_argument("--speed-reps", type=int, default=2, help="interleaved repeats of the speed measurement (best counts)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 blocks, 2048 evaluated tokens, one speed repeat")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "prune.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "prune-structured.png", help="where the perplexity-vs-parameters PNG goes (README shows it)")
    args = parser.parse_args()
    if args.list:
        for r in rows():
            print(f"{r.group:14} {r.name}")
        return
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    if args.quick:
        args.samples, args.max_tokens, args.speed_reps = 8, 2048, 1
    chosen = choose(args.rows)
    from weightsmith.demo import fetch_demo_model
    from weightsmith.paths import asset

    model = fetch_demo_model()
    text = asset("text/wikitext2-test.raw")
    calib_text = {"wikitext": asset("text/wikitext2-test-calib.raw"), "shakespeare": asset("text/tinyshakespeare.txt")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    # every run that wrote into this file, so a table assembled from several runs names them all
    run_meta = {"date": time.strftime("%Y-%m-%d"), "command": "python bench/prune.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "samples": args.samples, "eval_tokens": args.max_tokens, "speed_reps": args.speed_reps}
    results.setdefault("_runs", []).append(run_meta)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ws-bench-p-", dir=model.parent) as tmp:
        work = Path(tmp)
        calib_ids = {c: calibration_ids(model, c, path, args.samples, work) for c, path in calib_text.items()}
        folders: dict[str, Path] = {}
        for row in chosen:  # prune every row first (tools alternate), then evaluate them together
            print(f"== {row.name}", flush=True)
            try:
                dest, timing = run_row(row, model, work, calib_ids, calib_text, args.samples)
                results[row.name] = {**timing, "samples": args.samples if row.calib != "none" else None, "calib": row.calib}
                if row.group == "sparse":
                    results[row.name].update(sparsity_figures(dest, row.pattern))
                folders[row.name] = dest
            except RuntimeError as exc:
                results[row.name] = {"error": str(exc).splitlines()[-1][:300]}
            print(json.dumps(results[row.name]), flush=True)
            args.out.write_text(json.dumps(results, indent=2))
        if folders:
            for name, figures in evaluate_rows({"base": model, **folders}, model, text, args.max_tokens, work).items():
                results.setdefault(name, {}).update(figures)
            args.out.write_text(json.dumps(results, indent=2))
        from weightsmith.checkpoint import Checkpoint

        width_rows = {n: f for n, f in folders.items() if any(r.name == n and r.group != "sparse" for r in chosen)}
        for name, folder in {"base": model, **width_rows}.items():
            results[name]["params"] = Checkpoint(folder).num_parameters
        to_time = {n: f for n, f in width_rows.items() if results[n].get("perplexity") is not None and timed(next(r for r in chosen if r.name == n))}
        if to_time:
            # the original twice, first and last, so drift during the run cannot favour the pruned models
            speeds = measure_speed({"base": model, **to_time, "base (again)": model}, calib_ids["wikitext"], args.speed_reps)
            again = speeds.pop("base (again)")
            speeds["base"] = {k: max(v, again[k]) if k.endswith("tok_s") else min(v, again[k]) for k, v in speeds["base"].items()}
            for name, s in speeds.items():
                results[name]["speed"] = s
        args.out.write_text(json.dumps(results, indent=2))
        if width_rows:
            plot(results, args.plot)
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
