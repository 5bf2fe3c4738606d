"""weightsmith quantize vs llm-compressor (and GPTQModel) on SmolLM2-135M, side by side in one run.

Run:  .venv/bin/python bench/quantize.py [--rows NAME ...] [--samples 128] [--out bench/out/quantize.json]

Every run is a whole process measured by /usr/bin/time -v (wall time, peak RSS); runs alternate
between weightsmith and the peer. All outputs are then evaluated together by one `weightsmith eval`
(the reference model runs once per window for all of them). Quality is the pinned protocol (WikiText-2 test, first 20,480
tokens, 512-token windows, fp32) with KL and top-1 agreement against the unquantized model.
Calibration: `--samples` blocks of 512 tokens of wikitext2-test-calib.raw (in domain; disjoint from
the evaluated tokens) or of Tiny Shakespeare (out of domain), the same blocks for both tools (they
are sampled once, by seed, and handed to the peer as token ids).
Peers run from .venv-peers (see ../shared/PEERS.md), with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PEERS_BIN, ROOT, VENV_BIN, folder_bytes, measure  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Row:
    name: str
    tool: str  # weightsmith | llmcompressor | gptqmodel
    method: str  # rtn | gptq | awq
    bits: int
    group_size: int
    calib: str  # wikitext | shakespeare | none
    extra: tuple[str, ...] = ()


def rows() -> list[Row]:
    """Every row the bench knows, in run order: the peer beside ours for each setting (RTN and GPTQ at
    three grids and two calibrations; AWQ at W4 g64 against GPTQModel), then our candidates for the
    best result at 4.5 bits per weight or less. weightsmith's GPTQ runs with --act-order because
    llm-compressor's GPTQModifier applies static activation ordering by default, and per channel
    with --clip (its Hessian-weighted range search)."""
    out: list[Row] = []
    for bits, gs, tag in ((4, 64, "W4 g64"), (3, 64, "W3 g64"), (4, -1, "W4 per-channel")):
        out.append(Row(f"{tag} rtn / llmc", "llmcompressor", "rtn", bits, gs, "none"))
        out.append(Row(f"{tag} rtn / ws", "weightsmith", "rtn", bits, gs, "none"))
        for calib in ("wikitext", "shakespeare"):
            out.append(Row(f"{tag} gptq {calib} / llmc", "llmcompressor", "gptq", bits, gs, calib))
            # one scale per row is where the range matters most: there our GPTQ searches it (--clip)
            extra = ("--act-order", "--clip") if gs == -1 else ("--act-order",)
            out.append(Row(f"{tag} gptq {calib} / ws", "weightsmith", "gptq", bits, gs, calib, extra))
    out.append(Row("W4 g64 awq wikitext / ws", "weightsmith", "awq", 4, 64, "wikitext"))
    out.append(Row("W4 g64 awq wikitext / gptqmodel", "gptqmodel", "awq", 4, 64, "wikitext"))
    out.append(Row("W4 g64 asym gptq clip wikitext / ws", "weightsmith", "gptq", 4, 64, "wikitext", ("--asym", "--clip", "--act-order")))
    out.append(Row("W4 g64 awq_gptq wikitext / ws", "weightsmith", "awq_gptq", 4, 64, "wikitext", ("--act-order",)))
    out.append(Row("W4 g64 asym awq_gptq wikitext / ws", "weightsmith", "awq_gptq", 4, 64, "wikitext", ("--asym", "--act-order")))
    out.append(Row("W4 g32 awq_gptq wikitext / ws", "weightsmith", "awq_gptq", 4, 32, "wikitext", ("--act-order",)))
    return out


LLMC_SCRIPT = r"""
import sys, torch, json
from transformers import AutoModelForCausalLM
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from compressed_tensors.quantization import QuantizationScheme, QuantizationArgs
model_dir, out_dir, method, bits, gs, calib = sys.argv[1:7]
bits, gs = int(bits), int(gs)
weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                           strategy="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs)
scheme = QuantizationScheme(targets=["Linear"], weights=weights)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
kwargs = {}
if method == "rtn":
    recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
else:
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01)
    ids = torch.load(calib)
    kwargs = dict(dataset=Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}),
                  num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
oneshot(model=model, recipe=recipe, output_dir=out_dir, save_compressed=True, **kwargs)
"""

#: GPTQModel quantizes and saves its own format (AWQ GEMM), which our venv cannot load; so the script
#: loads the saved model back with GPTQModel and writes a dense bf16 copy for the shared evaluation:
#: each quantized linear's weight is read out by feeding it the identity matrix, and every other
#: tensor (norms that AWQ rescaled, embeddings) is copied, and the tokenizer saved beside it (the
#: shared evaluation reads it from each folder). Its size is that of the native folder.
GPTQMODEL_SCRIPT = r"""
import sys, torch
from gptqmodel import GPTQModel
from gptqmodel.quantization import QuantizeConfig, METHOD, FORMAT
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, out_dir, method, bits, gs, calib = sys.argv[1:7]
ids = torch.load(calib)
data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
backend = "awq_torch" if method == "awq" else "auto"
qcfg = QuantizeConfig(bits=int(bits), group_size=int(gs), sym=True, quant_method=METHOD.AWQ if method == "awq" else METHOD.GPTQ,
                      format=FORMAT.GEMM if method == "awq" else FORMAT.GPTQ)
model = GPTQModel.load(model_dir, qcfg, device="cpu")
model.quantize(data, batch_size=8, backend=backend)
native = out_dir + "-native"
model.save(native)
del model
qmodel = GPTQModel.load(native, device="cpu", backend=backend)
dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
target = dict(dense.named_modules())
state = dense.state_dict()
n = 0
with torch.no_grad():
    for name, mod in qmodel.model.named_modules():
        lin = target.get(name)
        if not isinstance(lin, torch.nn.Linear) or type(mod) is torch.nn.Linear or not hasattr(mod, "qweight"):
            continue
        out = mod(torch.eye(lin.in_features, dtype=torch.float16)).float()
        if getattr(mod, "bias", None) is not None:
            out = out - mod.bias.float()
        lin.weight.copy_(out.t().to(lin.weight.dtype))
        n += 1
    for key, value in qmodel.model.state_dict().items():
        if key in state and state[key].shape == value.shape and value.is_floating_point():
            state[key].copy_(value.to(state[key].dtype))
assert n > 0, "no quantized linear found"
dense.save_pretrained(out_dir)
AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
"""


def calibration_ids(model: Path, which: str, samples: int, out: Path) -> Path:
    """Sample the calibration blocks once (weightsmith's seeded sampler), save the token ids."""
    import torch

    from weightsmith.data import text_blocks
    from weightsmith.models import load_tokenizer
    from weightsmith.paths import asset

    text = asset("text/wikitext2-test-calib.raw" if which == "wikitext" else "text/tinyshakespeare.txt")
    ids = text_blocks(load_tokenizer(model), text, 512, samples, seed=0)
    path = out / f"calib-{which}-{samples}.pt"
    torch.save(ids, path)
    return path


def run_row(row: Row, model: Path, work: Path, calib_ids: dict[str, Path], calib_text: dict[str, Path], samples: int) -> tuple[Path, dict]:
    dest = work / row.name.replace(" ", "_").replace("/", "-")
    if row.tool == "weightsmith":
        cmd = [str(VENV_BIN / "weightsmith"), "quantize", str(model), str(dest), "--method", row.method, "--bits", str(row.bits),
               "--group-size", str(row.group_size), "--samples", str(samples), "--seq-len", "512", "--force", *row.extra]
        if row.calib != "none":
            cmd += ["--calib", str(calib_text[row.calib])]
        run = measure(cmd, env=OFFLINE)
        return dest, {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "options": " ".join(row.extra)}
    script = LLMC_SCRIPT if row.tool == "llmcompressor" else GPTQMODEL_SCRIPT
    script_path = work / f"peer_{row.tool}.py"  # not the package name, which it would shadow
    script_path.write_text(script)
    # run in the work folder: GPTQModel writes a logs/ folder into its working directory
    run = measure([str(PEERS_BIN / "python"), str(script_path), str(model), str(dest), row.method, str(row.bits), str(row.group_size),
                   str(calib_ids.get(row.calib, ""))], env=OFFLINE, cwd=work)
    figures = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb}
    native = dest.parent / f"{dest.name}-native"
    if native.is_dir():  # GPTQModel: the size is its own format's, not the dense copy's
        figures["native_size_bytes"] = folder_bytes(native)
    return dest, figures


def evaluate_rows(folders: dict[str, Path], reference: Path, text: Path) -> dict[str, dict]:
    """Evaluate every output in one `weightsmith eval` process: the reference runs once per window."""
    names = list(folders)
    out = folders[names[0]].parent / "eval.json"
    run = measure([str(VENV_BIN / "weightsmith"), "eval", *[str(folders[n]) for n in names], "--text", str(text), "--reference", str(reference),
                   "--json", str(out)], env=OFFLINE)
    docs = json.loads(out.read_text())
    docs = docs if isinstance(docs, list) else [docs]
    results = {}
    for name, report in zip(names, docs):
        record = folders[name] / "weightsmith.json"
        bpw = json.loads(record.read_text())["figures"].get("bits_per_weight") if record.exists() else None
        results[name] = {"perplexity": report["perplexity"], "kl": report["kl"], "top1": report["top1_agreement"],
                         "size_bytes": report["size_bytes"], "bits_per_weight": bpw}
    log_eval = {"eval_s_all_rows": run.wall_s, "rows": len(names)}
    print(json.dumps(log_eval), flush=True)
    return results


def markdown(results: dict) -> str:
    """README table of the measured rows."""
    lines = [
        "| run | calibration blocks | perplexity | KL | top-1 | size | bits/weight | wall | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | | failed: {r['error']} | | | | | | |")
            continue
        if "perplexity" not in r:
            continue  # quantized, not evaluated yet
        bpw = "-" if r.get("bits_per_weight") is None else f"{r['bits_per_weight']:.2f}"
        lines.append(
            f"| {name} | {'-' if ' rtn ' in name else r.get('samples', '?')} | {r['perplexity']:.2f} | {r['kl']:.3f} | {100 * r['top1']:.1f}% | {r.get('native_size_bytes', r['size_bytes']) / 1e6:.0f} MB | {bpw} "
            f"| {r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the README table of the saved results and stop")
    parser.add_argument("--rows", nargs="*", help="names of the rows to run, in this order (default: all)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quantize.json")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    from weightsmith.demo import fetch_demo_model
    from weightsmith.paths import asset

    model = fetch_demo_model()
    text = asset("text/wikitext2-test.raw")
    calib_text = {"wikitext": asset("text/wikitext2-test-calib.raw"), "shakespeare": asset("text/tinyshakespeare.txt")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="ws-bench-q-", dir=model.parent) as tmp:
        work = Path(tmp)
        calib_ids = {c: calibration_ids(model, c, args.samples, work) for c in calib_text}
        known = rows()
        chosen = [r for pattern in args.rows for r in known if pattern == r.name] if args.rows else known
        folders: dict[str, Path] = {}
        for row in chosen:  # quantize every row first (tools alternate), then evaluate them together
            print(f"== {row.name}", flush=True)
            try:
                dest, timing = run_row(row, model, work, calib_ids, calib_text, args.samples)
                results[row.name] = {**timing, "samples": args.samples}
                folders[row.name] = dest
            except RuntimeError as exc:
                results[row.name] = {"error": str(exc).splitlines()[-1][:300]}
            print(json.dumps(results[row.name]), flush=True)
            args.out.write_text(json.dumps(results, indent=2))
        if folders:
            for name, figures in evaluate_rows(folders, model, text).items():
                results[name].update(figures)
            args.out.write_text(json.dumps(results, indent=2))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
