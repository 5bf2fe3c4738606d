"""The budget search on SmolLM2-135M at three budgets, against uniform settings and llama.cpp.

Run:  .venv/bin/python bench/search.py [--budgets A B C] [--trials 40] [--samples 128] [--jobs-check]
      .venv/bin/python bench/search.py --table     (the table of the saved results)
Budget C needs bench/setup-llamacpp.sh (llama.cpp's tools and Python bindings).

* Space of A and B: bits 2, 3, 4 or 8 at groups of 64 columns per group (attention and MLP in four
  depth bands: eight groups, four candidates each), GPTQ with act-order, 128 calibration blocks.
* A: the size on disk of uniform GPTQ W4 g64 (packed, symmetric) of the model; goal: the found model's
  perplexity below uniform GPTQ W4 g64's (rebuilt and scored in the same search as a baseline).
* B: 3.5 bits per weight over the linears; goal: below uniform GPTQ W3 g64's perplexity by a clear
  margin (the margin is printed).
* C: the file size of llama.cpp's Q3_K_M GGUF with an importance matrix (llama-quantize from our f16
  export, llama-imatrix on the first ``--samples`` calibration blocks); goal: our GGUF's perplexity,
  scored by llama.cpp itself (bench/llamacpp_score.py: pinned protocol, 20,480 tokens), below
  llama.cpp's at no larger file.

Every search: ``weightsmith search SPEC OUT --budget ... --trials N`` as a user runs it, on a fresh study
(the candidate cache of earlier runs is reused: its time is counted once, in the first search that
computes it, and reported). ``--jobs-check``: budget A's trials run again on a fresh study with
``--jobs 2`` and with ``--jobs 1`` (the candidates cached), to compare trials per hour.

Results: bench/out/search.json and a markdown table in bench/results/search-<date>.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, VENV_BIN, goal_word, measure  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


#: The space of budgets A and B: bits 2/3/4/8 at groups of 64 (eight groups by kind and depth).
SPACE = {"bits": [2, 3, 4, 8], "group_size": [64]}


def spec_file(model: Path, work: Path, samples: int, **extra) -> Path:
    doc = {"model": str(model), "samples": samples, "seq_len": 512, "act_order": True, "front": 2, "space": dict(SPACE), **extra}
    path = work / f"spec-{len(list(work.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_search(spec: Path, out: Path, budget: str, trials: int, study: str, jobs: int = 1) -> dict:
    """One search as a user runs it; its report's figures, wall time and peak RSS."""
    cmd = [VENV_BIN / "weightsmith", "search", spec, out, "--budget", budget, "--trials", trials, "--study", study, "--jobs", jobs, "--force"]
    run = measure(cmd, env=OFFLINE)
    log = run.stdout + run.stderr
    rows = (out / "pareto.csv").read_text().splitlines()
    report = (out / "report.md").read_text()
    seconds = float(re.search(r"(\d+) s for this run's", report)[1])
    return {"wall_s": run.wall_s, "search_s": seconds, "peak_rss_mb": run.peak_rss_mb, "pareto_csv": rows, "report": report, "log_tail": log[-2000:]}


def parse_rows(csv_lines: list[str]) -> list[dict]:
    import csv

    return list(csv.DictReader(csv_lines))


def best_and_baselines(result: dict) -> tuple[dict, list[dict]]:
    rows = [r for r in parse_rows(result["pareto_csv"]) if r["perplexity"]]
    best_label = re.search(r"\| (\S+) \(best\)", result["report"])[1]
    best = next(r for r in rows if r["label"] == best_label)
    return best, [r for r in rows if r["label"].startswith("uniform-")]


def uniform_bytes(model: Path, work: Path, samples: int, cand: str) -> int:
    from weightsmith.passes import settings_from
    from weightsmith.search.run import Problem
    from weightsmith.search.space import Candidate

    settings = settings_from("search", {**yaml.safe_load(spec_file(model, work, samples).read_text()), "budget": "1TB"})
    problem = Problem.open(settings)
    return problem.size(problem.uniform(Candidate.parse(cand)))[0]


def budget_c(model: Path, work: Path, samples: int, trials: int, date: str) -> dict:
    """The GGUF budget against llama.cpp's Q3_K_M with imatrix, both scored by llama.cpp."""
    from bench.gguf_bench import calibration_text, eval_windows, file_figures, make_imatrix, score_files
    from weightsmith.paths import asset

    text, calib_source = asset("text/wikitext2-test.raw"), asset("text/wikitext2-test-calib.raw")
    calib, _ = calibration_text(model, calib_source, samples, work)
    windows = eval_windows(model, text, 20480, work)
    f16 = work / "ours-f16.gguf"
    measure([VENV_BIN / "weightsmith", "export", "gguf", model, f16, "--type", "f16", "--force"], env=OFFLINE)
    imatrix = make_imatrix(f16, calib, samples, work)
    theirs = work / "llamacpp-q3_k_m-imatrix.gguf"
    from bench.gguf_bench import LLAMA_BIN, THREADS

    measure([LLAMA_BIN / "llama-quantize", "--imatrix", imatrix[0], f16, theirs, "Q3_K_M", THREADS])
    size = theirs.stat().st_size
    spec = spec_file(model, work, samples, calib=str(calib), space={"gguf_mix": "q3_k_m", "gguf_types": ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]})
    out = work / "search-C"
    result = run_search(spec, out, f"gguf:{size}B", trials, f"bench-C-{date}-{time.time():.0f}")
    ours = out / "model.gguf"
    scores = score_files({"ours": ours, "llama.cpp Q3_K_M imatrix": theirs}, f16, windows)
    result["llamacpp_scores"] = {k: {**v, **file_figures(p)} for (k, v), p in zip(scores.items(), (ours, theirs))}
    result["budget"] = f"gguf:{size}B"
    return result


def markdown(results: dict) -> str:
    lines = [
        "| budget | trials | search time | trials/hour | found: size | found: ppl | compared with | its size | its ppl | goal |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for key in ("A", "B", "C"):
        r = results.get(key)
        if not r or "error" in r:
            continue
        rate = 3600 * r["trials"] / r["search_s"] if r["search_s"] else 0
        if key == "C":
            ours, theirs = r["llamacpp_scores"]["ours"], r["llamacpp_scores"]["llama.cpp Q3_K_M imatrix"]
            ok = ours["perplexity"] < theirs["perplexity"] and ours["size_bytes"] <= theirs["size_bytes"]
            lines.append(
                f"| C: {r['budget']} (llama.cpp Q3_K_M imatrix file) | {r['trials']} | {r['search_s'] / 60:.1f} min | {rate:.0f} | {ours['size_bytes'] / 1e6:.2f} MB "
                f"| {ours['perplexity']:.2f} (llama.cpp) | llama.cpp Q3_K_M imatrix | {theirs['size_bytes'] / 1e6:.2f} MB | {theirs['perplexity']:.2f} | {goal_word(ok)} |"
            )
            continue
        best, bases = best_and_baselines(r)
        for base in bases:
            margin = float(base["perplexity"]) - float(best["perplexity"])
            ok = margin > 0
            lines.append(
                f"| {key}: {r['budget']} | {r['trials']} | {r['search_s'] / 60:.1f} min | {rate:.0f} | {int(best['bytes_on_disk']) / 1e6:.2f} MB "
                f"| {float(best['perplexity']):.2f} | {base['label']} | {int(base['bytes_on_disk']) / 1e6:.2f} MB | {float(base['perplexity']):.2f} | {goal_word(ok)} ({margin:+.2f}) |"
            )
    jobs = results.get("jobs")
    if jobs:
        lines += ["", f"Trials per hour with the candidates cached, {jobs['trials']} trials of budget A: "
                  f"--jobs 1 {jobs['1']:.0f}, --jobs 2 {jobs['2']:.0f} ({jobs['2'] / jobs['1']:.2f}x)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="*", default=["A", "B", "C"])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--jobs-check", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "search.json")
    parser.add_argument("--md", type=Path, default=ROOT / "bench" / "results" / f"search-{time.strftime('%Y-%m-%d')}.md")
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    from weightsmith.demo import fetch_demo_model

    model = fetch_demo_model()
    date = time.strftime("%Y%m%d")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["_run"] = {"date": time.strftime("%Y-%m-%d"), "command": "python bench/search.py " + " ".join(sys.argv[1:])}
    work = args.keep or Path(tempfile.mkdtemp(prefix="ws-bench-search-", dir=model.parent))
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for key in args.budgets:
            print(f"== budget {key}", flush=True)
            try:
                if key == "A":
                    budget = f"{uniform_bytes(model, work, args.samples, 'gptq-w4g64')}B"
                    r = run_search(spec_file(model, work, args.samples, baselines=["gptq-w4g64"]), work / "search-A", budget, args.trials, f"bench-A-{date}-{time.time():.0f}")
                elif key == "B":
                    budget = "3.5bpw"
                    r = run_search(spec_file(model, work, args.samples, baselines=["gptq-w3g64"]), work / "search-B", budget, args.trials, f"bench-B-{date}-{time.time():.0f}")
                else:
                    r = budget_c(model, work, args.samples, args.trials, date)
                    budget = r["budget"]
                r.update(budget=budget, trials=args.trials)
            except RuntimeError as exc:
                r = {"error": str(exc)[-1500:]}
            results[key] = r
            print(json.dumps({k: v for k, v in r.items() if k not in ("report", "pareto_csv", "log_tail")}), flush=True)
            args.out.write_text(json.dumps(results, indent=2))
        if args.jobs_check:
            budget = f"{uniform_bytes(model, work, args.samples, 'gptq-w4g64')}B"
            rates = {}
            for jobs in (1, 2):
                spec = spec_file(model, work, args.samples, front=1)
                r = run_search(spec, work / f"jobs-{jobs}", budget, args.trials, f"bench-jobs{jobs}-{date}-{time.time():.0f}", jobs=jobs)
                rates[str(jobs)] = 3600 * args.trials / r["search_s"]
            results["jobs"] = {**rates, "trials": args.trials}
            args.out.write_text(json.dumps(results, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    table = markdown(results)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(f"{results['_run']['command']} ({results['_run']['date']})\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
