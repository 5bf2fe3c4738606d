"""weightsmith merge vs mergekit-yaml on the merge set (SmolLM2-135M + two fine-tunes), side by side.

Run:  .venv/bin/python bench/merge.py [--parts startup speed ties_stable scale quality] [--methods ...] [--repeats 3] [--scale-repeats 2]
                                      [--set-steps 30] [--requality METHOD ...] [--out bench/out/merge.json]
      .venv/bin/python bench/merge.py --table      (README tables of the saved results)

The merge set comes from bench/make_merge_set.py (cached; built on first use with ``--set-steps``).

* ``startup``: each tool's interpreter and import time, which every run pays (median of 5).
* ``speed``: ties, dare_ties, slerp and linear, each from the same YAML file, as whole processes
  measured by /usr/bin/time -v (wall time, peak RSS); weightsmith and mergekit alternate, and the
  order flips every repeat (ws, mk, mk, ws, ...) so drift on a shared machine hits both alike.
  Medians of ``--repeats``. Then the first outputs of both tools are compared tensor by tensor:
  linear and slerp must be identical; for ties the differing entries are counted and checked to sit
  where a task vector's magnitude equals its top-k cut (mergekit picks among equal magnitudes with
  an unstable argsort; weightsmith keeps the lower index).
* ``ties_stable``: ties once more, against mergekit-yaml run with ``torch.argsort`` patched to
  ``stable=True`` (so it too keeps the lower index among equal magnitudes): identical tensors
  expected.
  dare_ties draws its masks from different random streams in the two tools and is not compared.
* ``identity``: every deterministic method once per tool on uneven weights and inputs far from
  parallel (the fine-tunes' task vectors, or a fine-tune and a randomly initialised model of the
  same architecture), compared tensor by tensor.
* ``scale``: a model 4x deeper (120 layers, SmolLM2's 30 stacked four times) is built from each
  input with a weightsmith passthrough config (bf16), and linear and ties are measured on the
  stacked set for both tools (and the streaming-friendly new methods, ``--scale-methods``), to set
  the peak RSS at 4x beside the 1x figures of ``speed``.
* ``quality``: per-domain held-out perplexity (pinned protocol: first ``--max-tokens`` tokens of
  the held-out text, 512-token windows, fp32, CPU) of the base, both fine-tunes, weightsmith's four
  merges, and mergekit's ties and dare_ties for reference, all models in one `weightsmith eval` per
  domain.

Peers run from .venv-peers (see ../shared/PEERS.md) with HF_HUB_OFFLINE=1, default options plus
``--random-seed 0``. Large outputs live in a temporary folder beside the merge set and are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PEERS_BIN, ROOT, STABLE_MERGEKIT, VENV_BIN, folder_bytes, measure, median  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
METHODS = ("ties", "dare_ties", "slerp", "linear", "della", "sce", "nuslerp", "multislerp", "karcher")
#: the methods whose outputs must equal mergekit's (ties up to its unstable sort, see ``ties_stable``)
DETERMINISTIC = ("linear", "slerp", "ties", "sce", "nuslerp", "multislerp", "karcher")
STACK = 4
PARTS = ("startup", "speed", "ties_stable", "identity", "scale", "quality")


def merge_configs(base: str, shakespeare: str, python: str) -> dict[str, dict]:
    """The four configs of the bench (mergekit syntax; no dtype, so both tools compute in bf16)."""
    fine_tunes = lambda params: [{"model": m, "parameters": dict(params)} for m in (shakespeare, python)]  # noqa: E731
    return {
        "ties": {"merge_method": "ties", "base_model": base, "models": fine_tunes({"weight": 1.0, "density": 0.5}),
                 "parameters": {"normalize": True}},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": fine_tunes({"weight": 1.0, "density": 0.5}),
                      "parameters": {"normalize": True}},
        "slerp": {"merge_method": "slerp", "base_model": shakespeare, "models": [{"model": shakespeare}, {"model": python}],
                  "parameters": {"t": 0.5}},
        "linear": {"merge_method": "linear", "models": fine_tunes({"weight": 0.5})},
        "della": {"merge_method": "della", "base_model": base, "models": fine_tunes({"weight": 1.0, "density": 0.5, "epsilon": 0.1})},
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": shakespeare}, {"model": python}],
                "parameters": {"select_topk": 0.5}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base,
                    "models": [{"model": shakespeare, "parameters": {"weight": 0.6}}, {"model": python, "parameters": {"weight": 0.4}}]},
        "multislerp": {"merge_method": "multislerp", "base_model": base,
                       "models": [{"model": shakespeare, "parameters": {"weight": 0.6}}, {"model": python, "parameters": {"weight": 0.4}}]},
        "karcher": {"merge_method": "karcher", "models": [{"model": shakespeare}, {"model": python}]},
    }


def identity_configs(base: str, shakespeare: str, python: str, far: str) -> dict[str, dict]:
    """Every deterministic method on uneven weights and inputs that are far from parallel: the two
    fine-tunes' task vectors (methods with a base), or a fine-tune and ``far``, a randomly
    initialised model of the same architecture (cosine about 0 on every tensor)."""
    uneven = lambda second, **extra: [  # noqa: E731
        {"model": shakespeare, "parameters": {"weight": 0.7, **extra}},
        {"model": second, "parameters": {"weight": 0.3, **extra}},
    ]
    plain = [{"model": shakespeare}, {"model": python}]
    return {
        "linear": {"merge_method": "linear", "models": uneven(far)},
        "slerp": {"merge_method": "slerp", "base_model": shakespeare, "models": [{"model": shakespeare}, {"model": far}], "parameters": {"t": 0.35}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "models": uneven(python)},
        "nuslerp_rows": {"merge_method": "nuslerp", "models": uneven(far), "parameters": {"nuslerp_row_wise": True, "nuslerp_flatten": False}},
        "multislerp": {"merge_method": "multislerp", "base_model": base, "models": uneven(python)},
        "karcher": {"merge_method": "karcher", "models": [{"model": shakespeare}, {"model": far}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": uneven(python)},
        "ties": {"merge_method": "ties", "base_model": base, "models": uneven(python, density=0.5)},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": uneven(python, density=0.8)},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": plain},
        "sce": {"merge_method": "sce", "base_model": base, "models": plain, "parameters": {"select_topk": 0.5}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": base}, {"model": shakespeare}]},
        "nearswap": {"merge_method": "nearswap", "base_model": shakespeare, "models": [{"model": shakespeare}, {"model": python}],
                     "parameters": {"t": 0.0001}},
        "ram": {"merge_method": "ram", "base_model": base, "models": plain},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": plain, "parameters": {"r": 0.05, "alpha": 1.0}},
    }


def far_model(mset: dict) -> str:
    """A randomly initialised model of the base's architecture (torch seed 0, transformers' own
    initialisation), saved in bf16 beside the merge set with the base's config and tokenizer;
    cached."""
    dest = Path(mset["base"]).parent / "random-init"
    if (dest / "model.safetensors").is_file():
        return str(dest)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from weightsmith.checkpoint import CheckpointWriter

    config = AutoConfig.from_pretrained(mset["base"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with CheckpointWriter(dest, source=Path(mset["base"]), force=True) as writer:
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            writer.add(name, tensor.to(torch.bfloat16).contiguous())
    return str(dest)


def stack_config(model: str, layers: int) -> dict:
    return {"merge_method": "passthrough", "dtype": "bfloat16",
            "slices": [{"sources": [{"model": model, "layer_range": [0, layers]}]} for _ in range(STACK)]}


def write_yaml(doc: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ws_cmd(config: Path, dest: Path) -> list[str]:
    return [str(VENV_BIN / "weightsmith"), "merge", str(config), str(dest), "--seed", "0"]


def mk_cmd(config: Path, dest: Path) -> list[str]:
    return [str(PEERS_BIN / "mergekit-yaml"), str(config), str(dest), "--random-seed", "0", "--quiet"]


def warm(folders: list[str]) -> None:
    """Read the inputs once so every run starts from a warm page cache."""
    files = [str(f) for folder in folders for f in sorted(Path(folder).glob("*.safetensors"))]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def alternate(config: Path, work: Path, tag: str, repeats: int, keep: bool) -> tuple[dict, Path | None, Path | None]:
    """Both tools on ``config``, alternating (order flips each repeat); returns the figures and, with
    ``keep``, the first output of each tool (the others are deleted as soon as they are measured)."""
    runs: dict[str, list] = {"weightsmith": [], "mergekit": []}
    kept: dict[str, Path] = {}
    for i in range(repeats):
        order = ("weightsmith", "mergekit") if i % 2 == 0 else ("mergekit", "weightsmith")
        for tool in order:
            dest = work / f"{tag}-{tool}-{i}"
            cmd = ws_cmd(config, dest) if tool == "weightsmith" else mk_cmd(config, dest)
            run = measure(cmd, env=OFFLINE)
            runs[tool].append({"wall_s": round(run.wall_s, 3), "peak_rss_mb": round(run.peak_rss_mb, 1)})
            print(f"  {tag} {tool} #{i}: {run.wall_s:.2f} s, {run.peak_rss_mb:.0f} MiB", flush=True)
            if keep and i == 0:
                kept[tool] = dest
            else:
                shutil.rmtree(dest)
    out: dict = {"runs": runs}
    for tool, rows in runs.items():
        out[tool] = {"wall_s": round(median([r["wall_s"] for r in rows]), 3), "peak_rss_mb": round(median([r["peak_rss_mb"] for r in rows]), 1)}
    out["time_ratio"] = round(out["weightsmith"]["wall_s"] / out["mergekit"]["wall_s"], 3)
    out["rss_ratio"] = round(out["weightsmith"]["peak_rss_mb"] / out["mergekit"]["peak_rss_mb"], 3)
    return out, kept.get("weightsmith"), kept.get("mergekit")


#: What each tool imports before its first tensor: weightsmith's CLI and merge pass with the numpy
#: engine (no torch: the engine the four benchmark merges but ties use; ties' torch engine adds
#: `import torch`, about 1.2 s), and mergekit-yaml, whose module imports torch and transformers at
#: load (its --help pays all of it).
STARTUP = {
    "weightsmith": [str(VENV_BIN / "python"), "-c", "import weightsmith.cli, merge.run, merge.engine_numpy"],
    "mergekit": [str(PEERS_BIN / "mergekit-yaml"), "--help"],
}


def startup(repeats: int) -> dict:
    """Wall time and RSS of each tool's start-up (interpreter and imports), alternating."""
    rows: dict[str, list] = {"weightsmith": [], "mergekit": []}
    for _ in range(repeats):
        for tool, cmd in STARTUP.items():
            run = measure(cmd, env=OFFLINE)
            rows[tool].append((run.wall_s, run.peak_rss_mb))
    return {tool: {"wall_s": round(median([r[0] for r in v]), 3), "peak_rss_mb": round(median([r[1] for r in v]), 1)} for tool, v in rows.items()}


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor comparison of two checkpoint folders."""
    import torch

    from weightsmith.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    names_a, names_b = set(a.names()), set(b.names())
    shared = sorted(names_a & names_b)
    total = differing = identical_tensors = 0
    dtypes, max_abs = set(), 0.0
    worst: list[tuple[str, int]] = []
    for name in shared:
        x, y = a.get(name), b.get(name)
        dtypes.add(f"{str(x.dtype).removeprefix('torch.')}/{str(y.dtype).removeprefix('torch.')}")
        if x.shape != y.shape or x.dtype != y.dtype:
            worst.append((name, -1))
            continue
        diff = int((x != y).sum())
        total += x.numel()
        differing += diff
        if diff == 0:
            identical_tensors += 1
        else:
            max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
            worst.append((name, diff))
    worst.sort(key=lambda item: -item[1])
    return {
        "tensors_compared": len(shared),
        "only_weightsmith": sorted(names_a - names_b),
        "only_mergekit": sorted(names_b - names_a),
        "identical_tensors": identical_tensors,
        "entries": total,
        "differing_entries": differing,
        "differing_share": differing / total if total else 0.0,
        "max_abs_diff": max_abs,
        "dtypes": sorted(dtypes),
        "most_differing": worst[:5],
        "identical": differing == 0 and not worst and names_a == names_b,
    }


def explain_ties(ours: Path, theirs: Path, base: str, fine_tunes: list[str], density: float) -> dict:
    """For the entries where the two ties outputs differ: the share at which some fine-tune's task
    vector (bf16, as both tools compute it) has exactly the magnitude of its top-k cut, where the
    choice among equal magnitudes is up to the sort."""
    import torch

    from weightsmith.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    base_ckpt, fts = Checkpoint(base), [Checkpoint(f) for f in fine_tunes]
    differing = at_cut = 0
    tied_at_cut = 0
    for name in a.names():
        x, y = a.get(name), b.get(name)
        if x.dtype != y.dtype or torch.equal(x, y):
            continue
        diff = (x != y).reshape(-1)
        cut_here = torch.zeros_like(diff)
        b0 = base_ckpt.get(name)
        for ft in fts:
            mag = (ft.get(name) - b0).abs().reshape(-1).float()
            k = max(1, int(density * mag.numel()))
            cut = torch.topk(mag, k).values[-1]
            at = mag == cut
            tied_at_cut += int(at.sum())
            cut_here |= at
        differing += int(diff.sum())
        at_cut += int((diff & cut_here).sum())
    return {"differing_entries": differing, "differing_at_a_cut_tie": at_cut,
            "share_explained": at_cut / differing if differing else 1.0, "entries_tied_at_cut_in_those_tensors": tied_at_cut}


def part_speed(args, mset: dict, work: Path, results: dict) -> dict[str, Path]:
    """Timing, RSS and identity on the merge set; returns weightsmith's (and mergekit's ties /
    dare_ties) outputs for the quality part."""
    configs = merge_configs(mset["base"], mset["shakespeare"], mset["python"])
    warm([mset["base"], mset["shakespeare"], mset["python"]])
    speed: dict = {**results.get("speed", {}), "input_bytes": folder_bytes(Path(mset["base"]))}
    keep: dict[str, Path] = {}
    for method in args.methods:
        config = write_yaml(configs[method], work / f"{method}.yml")
        figures, ours, theirs = alternate(config, work, method, args.repeats, keep=True)
        figures["config"] = configs[method]
        if method in DETERMINISTIC:
            figures["identity"] = compare(ours, theirs)
            if method == "ties" and not figures["identity"]["identical"]:
                figures["identity"]["explained"] = explain_ties(ours, theirs, mset["base"], [mset["shakespeare"], mset["python"]], 0.5)
        keep[f"{method} (weightsmith)"] = ours
        if method in ("ties", "dare_ties"):
            keep[f"{method} (mergekit)"] = theirs
        else:
            shutil.rmtree(theirs)
        speed[method] = figures
        print(json.dumps({method: {k: v for k, v in figures.items() if k not in ("runs", "config")}}), flush=True)
        results["speed"] = speed
        save(args.out, results)
    return keep


def part_ties_stable(args, mset: dict, work: Path, results: dict) -> None:
    """TIES by weightsmith vs mergekit with a stable argsort (STABLE_MERGEKIT), on the bf16 set."""
    config = write_yaml(merge_configs(mset["base"], mset["shakespeare"], mset["python"])["ties"], work / "ties.yml")
    ours, theirs = work / "ties-stable-weightsmith", work / "ties-stable-mergekit"
    script = work / "mergekit_stable_argsort.py"
    script.write_text(STABLE_MERGEKIT)
    warm([mset["base"], mset["shakespeare"], mset["python"]])
    ws = measure(ws_cmd(config, ours), env=OFFLINE)
    mk = measure([str(PEERS_BIN / "python"), str(script), *mk_cmd(config, theirs)[1:]], env=OFFLINE)
    figures = {"weightsmith": {"wall_s": round(ws.wall_s, 3), "peak_rss_mb": round(ws.peak_rss_mb, 1)},
               "mergekit_stable_argsort": {"wall_s": round(mk.wall_s, 3), "peak_rss_mb": round(mk.peak_rss_mb, 1)},
               "identity": compare(ours, theirs)}
    print(json.dumps({"ties vs mergekit with a stable argsort": figures}), flush=True)
    results.get("speed", {}).pop("ties_fp32_perturbed", None)  # an earlier check, replaced by this one
    results["ties_stable"] = figures
    shutil.rmtree(ours)
    shutil.rmtree(theirs)


def part_identity(args, mset: dict, work: Path, results: dict) -> None:
    """Each deterministic method once per tool on :func:`identity_configs`, compared tensor by
    tensor (ties against mergekit with a stable argsort, as in ``ties_stable``)."""
    far = far_model(mset)
    configs = identity_configs(mset["base"], mset["shakespeare"], mset["python"], far)
    script = work / "mergekit_stable_argsort.py"
    script.write_text(STABLE_MERGEKIT)
    identity: dict = {**results.get("identity", {}), "far_model": far}
    for method, doc in configs.items():
        if args.identity_only and method not in args.identity_only:
            continue
        config = write_yaml(doc, work / f"identity-{method}.yml")
        ours, theirs = work / f"identity-{method}-weightsmith", work / f"identity-{method}-mergekit"
        mk = mk_cmd(config, theirs)
        if method in ("ties", "breadcrumbs"):
            mk = [str(PEERS_BIN / "python"), str(script), *mk[1:]]
        try:
            measure(ws_cmd(config, ours), env=OFFLINE)
            measure(mk, env=OFFLINE)
            identity[method] = {"config": doc, "identity": compare(ours, theirs)}
        except RuntimeError as exc:
            identity[method] = {"config": doc, "failed": str(exc).splitlines()[-1]}
        print(json.dumps({method: {k: v for k, v in identity[method].items() if k != "config"}}), flush=True)
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(theirs, ignore_errors=True)
        results["identity"] = identity
        save(args.out, results)


def part_scale(args, mset: dict, work: Path, results: dict) -> None:
    """The --scale-methods (default: linear, ties and the new streaming-friendly methods) on a 4x deeper stack of the merge set, both tools."""
    from weightsmith.checkpoint import Checkpoint

    layers = int(Checkpoint(mset["base"]).config["num_hidden_layers"])
    stacked: dict[str, str] = {}
    build = {}
    for key in ("base", "shakespeare", "python"):
        dest = work / f"stack4-{key}"
        config = write_yaml(stack_config(mset[key], layers), work / f"stack4-{key}.yml")
        run = measure(ws_cmd(config, dest), env=OFFLINE)
        build[key] = {"wall_s": round(run.wall_s, 2), "peak_rss_mb": round(run.peak_rss_mb, 1)}
        stacked[key] = str(dest)
    info = Checkpoint(stacked["base"])
    scale: dict = {
        "layers": int(info.config["num_hidden_layers"]),
        "bytes": folder_bytes(Path(stacked["base"])),
        "bytes_1x": folder_bytes(Path(mset["base"])),
        "build": build,
        "stack_config": stack_config("<model>", layers),
    }
    print(json.dumps({k: v for k, v in scale.items() if k != "stack_config"}), flush=True)
    configs = merge_configs(stacked["base"], stacked["shakespeare"], stacked["python"])
    warm(list(stacked.values()))
    for method in args.scale_methods:
        config = write_yaml(configs[method], work / f"stack4-{method}.yml")
        figures, ours, theirs = alternate(config, work, f"stack4-{method}", args.scale_repeats, keep=method == "linear")
        if method == "linear":
            figures["identity"] = compare(ours, theirs)
            shutil.rmtree(ours)
            shutil.rmtree(theirs)
        scale[method] = figures
        print(json.dumps({f"stack4 {method}": {k: v for k, v in figures.items() if k != "runs"}}), flush=True)
        results["scale"] = scale
        save(args.out, results)
    for path in stacked.values():
        shutil.rmtree(path)


def part_quality(args, mset: dict, merged: dict[str, Path], work: Path, results: dict) -> None:
    models = {"base": Path(mset["base"]), "shakespeare fine-tune": Path(mset["shakespeare"]), "python fine-tune": Path(mset["python"]), **merged}
    names = list(models)
    quality: dict = {"max_tokens": args.max_tokens, "ctx": 512, "models": names, "domains": {}}
    if args.requality is not None:
        quality = results["quality"]
        names = [f"{m} (weightsmith)" for m in args.requality]
    for domain in ("shakespeare", "python"):
        out = work / f"eval-{domain}.json"
        cmd = [str(VENV_BIN / "weightsmith"), "eval", *[str(models[n]) for n in names], "--text", mset[f"{domain}_heldout"],
               "--max-tokens", str(args.max_tokens), "--json", str(out)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, **OFFLINE}, stdout=subprocess.DEVNULL)
        docs = json.loads(out.read_text())
        docs = docs if isinstance(docs, list) else [docs]
        figures = {n: d["perplexity"] for n, d in zip(names, docs)}
        if args.requality is not None:
            quality["domains"][domain]["perplexity"].update(figures)
            quality["domains"][domain].setdefault("remeasured", {}).update({n: time.strftime("%Y-%m-%d %H:%M") for n in names})
        else:
            quality["domains"][domain] = {
                "heldout": mset[f"{domain}_heldout"],
                "seconds": round(time.perf_counter() - start, 1),
                "perplexity": figures,
                "protocol": docs[0]["protocol"],
                "positions": docs[0]["positions"],
                "windows": docs[0]["windows"],
            }
        print(json.dumps({domain: quality["domains"][domain]["perplexity"]}), flush=True)
        results["quality"] = quality
        save(args.out, results)


def save(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))


def merge_set(steps: int) -> dict:
    proc = subprocess.run([str(VENV_BIN / "python"), str(ROOT / "bench" / "make_merge_set.py"), "--steps", str(steps)],
                          check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(config: dict) -> str:
    """A config in a few words for a table: its models (by folder name) with their parameters, and
    the shared parameters."""
    models = []
    for m in config.get("models", []):
        params = ", ".join(f"{k} {v}" for k, v in (m.get("parameters") or {}).items())
        models.append(Path(m["model"]).name + (f" ({params})" if params else ""))
    shared = ", ".join(f"{k} {v}" for k, v in (config.get("parameters") or {}).items())
    base = f"base {Path(config['base_model']).name}; " if config.get("base_model") else ""
    return base + " + ".join(models) + (f"; {shared}" if shared else "")


def ratio_mark(value: float, goal: float) -> str:
    return f"{value:.2f}× ({'met' if value <= goal else 'not met'})"


def markdown(results: dict) -> str:
    lines: list[str] = []
    speed = results.get("speed")
    if speed:
        lines += ["| method | weightsmith wall | mergekit wall | time ratio (goal ≤ 0.3) | weightsmith peak RSS | mergekit peak RSS "
                  "| RSS ratio (goal ≤ 0.5) | tensors vs mergekit |", "|---|---|---|---|---|---|---|---|"]
        for method in (m for m in METHODS if m in speed):
            f = speed[method]
            ident = f.get("identity")
            if ident is None:
                same = "not comparable (different random streams)"
            elif ident["identical"]:
                same = f"identical ({ident['tensors_compared']} tensors)"
            else:
                same = f"{100 * ident['differing_share']:.4f}% of entries differ"
            lines.append(f"| {method} | {f['weightsmith']['wall_s']:.2f} s | {f['mergekit']['wall_s']:.2f} s | {ratio_mark(f['time_ratio'], 0.3)} "
                         f"| {f['weightsmith']['peak_rss_mb']:.0f} MiB | {f['mergekit']['peak_rss_mb']:.0f} MiB | {ratio_mark(f['rss_ratio'], 0.5)} | {same} |")
    s = results.get("startup")
    if speed and s:
        lines.append(f"| start-up only (interpreter and imports) | {s['weightsmith']['wall_s']:.2f} s | {s['mergekit']['wall_s']:.2f} s | "
                     f"{s['weightsmith']['wall_s'] / s['mergekit']['wall_s']:.2f}× | {s['weightsmith']['peak_rss_mb']:.0f} MiB "
                     f"| {s['mergekit']['peak_rss_mb']:.0f} MiB | {s['weightsmith']['peak_rss_mb'] / s['mergekit']['peak_rss_mb']:.2f}× | |")
    identity = results.get("identity")
    if identity:
        lines += ["", "| method | config | tensors | entries that differ | max difference |", "|---|---|---|---|---|"]
        for method, f in identity.items():
            if method == "far_model":
                continue
            if "failed" in f:
                lines.append(f"| {method} | | failed: {f['failed']} | | |")
                continue
            ident = f["identity"]
            lines.append(f"| {method} | {describe(f['config'])} | {ident['identical_tensors']} of {ident['tensors_compared']} identical "
                         f"| {ident['differing_entries']} of {ident['entries']} | {ident['max_abs_diff']:.3g} |")
    scale = results.get("scale")
    if speed and scale:
        lines += ["", f"| method | model | size | weightsmith peak RSS | mergekit peak RSS | RSS ratio | weightsmith wall | mergekit wall | time ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in (m for m in METHODS if m in scale and m in speed):
            for label, f, size in (("1×", speed[method], scale["bytes_1x"]), (f"{STACK}× ({scale['layers']} layers)", scale[method], scale["bytes"])):
                lines.append(f"| {method} | {label} | {size / 1e6:.0f} MB | {f['weightsmith']['peak_rss_mb']:.0f} MiB | {f['mergekit']['peak_rss_mb']:.0f} MiB "
                             f"| {f['rss_ratio']:.2f}× | {f['weightsmith']['wall_s']:.1f} s | {f['mergekit']['wall_s']:.1f} s | {f['time_ratio']:.2f}× |")
    quality = results.get("quality")
    if quality:
        domains = list(quality["domains"])
        lines += ["", "| model | " + " | ".join(f"{d} held-out perplexity" for d in domains) + " |", "|---|" + "---|" * len(domains)]
        for name in quality["models"]:
            lines.append(f"| {name} | " + " | ".join(f"{quality['domains'][d]['perplexity'][name]:.3f}" for d in domains) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale-repeats", type=int, default=2)
    parser.add_argument("--set-steps", type=int, default=30, help="fine-tuning steps of the merge set (bench/make_merge_set.py --steps)")
    parser.add_argument("--max-tokens", type=int, default=20480)
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS),
                        help="speed part: measure only these methods, keeping the saved figures of the others")
    parser.add_argument("--scale-methods", nargs="*", choices=METHODS, default=["linear", "ties", "della", "sce", "nuslerp", "multislerp", "karcher"],
                        help="scale part: the methods measured on the 4x set")
    parser.add_argument("--identity-only", nargs="*", default=None,
                        help="identity part: run only these configs, keeping the saved figures of the others")
    parser.add_argument("--requality", nargs="*", choices=METHODS, default=None,
                        help="quality part: re-merge and re-evaluate only these weightsmith merges (after a change to "
                             "their math), keeping the saved figures of the other models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "merge.json")
    parser.add_argument("--table", action="store_true", help="print the README tables of the saved results and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    mset = merge_set(args.set_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["merge_set"] = mset
    results.setdefault("timestamps", {})
    with tempfile.TemporaryDirectory(prefix="ws-bench-merge-", dir=Path(mset["base"]).parent) as tmp:
        work = Path(tmp)
        merged: dict[str, Path] = {}
        for part in args.parts:
            start = time.perf_counter()
            print(f"== {part}", flush=True)
            if part == "startup":
                results.get("speed", {}).pop("startup", None)  # an earlier layout kept it there
                results["startup"] = startup(5)
                print(json.dumps({"startup": results["startup"]}), flush=True)
            elif part == "speed":
                merged = part_speed(args, mset, work, results)
            elif part == "ties_stable":
                part_ties_stable(args, mset, work, results)
            elif part == "identity":
                part_identity(args, mset, work, results)
            elif part == "scale":
                part_scale(args, mset, work, results)
            elif part == "quality":
                if not merged:
                    configs = merge_configs(mset["base"], mset["shakespeare"], mset["python"])
                    for method in args.requality if args.requality is not None else METHODS:
                        dest = work / f"{method}-weightsmith"
                        subprocess.run(ws_cmd(write_yaml(configs[method], work / f"{method}.yml"), dest), check=True, stdout=subprocess.DEVNULL)
                        merged[f"{method} (weightsmith)"] = dest
                part_quality(args, mset, merged, work, results)
            results["timestamps"][part] = {"seconds": round(time.perf_counter() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M")}
            save(args.out, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
