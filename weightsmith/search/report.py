"""What a search leaves beside its best model: ``best-recipe.yaml`` (re-runnable with ``weightsmith
run``), ``pareto.csv``, ``pareto.png`` (size against perplexity), ``sensitivity.json`` and
``sensitivity.png`` (where the bits matter) and ``report.md``."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PNG_NEEDS = "matplotlib is not installed (pip install 'weightsmith[search]'); %s not written"


def write_sensitivity(folder: Path, sens: Mapping[str, Mapping[str, float]], title: str) -> None:
    """``sensitivity.json`` and the heat-map ``sensitivity.png`` (groups by candidates, log KL)."""
    (folder / "sensitivity.json").write_text(json.dumps(sens, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        log.warning(PNG_NEEDS, "sensitivity.png")
        return
    groups = list(sens)
    cands = list(next(iter(sens.values())))
    values = np.array([[max(sens[g][c], 1e-6) for c in cands] for g in groups])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cands), 1.0 + 0.35 * len(groups)))
    image = ax.imshow(np.log10(values), cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(cands)), cands, rotation=45, ha="right")
    ax.set_yticks(range(len(groups)), groups)
    for i in range(len(groups)):
        for j in range(len(cands)):
            ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7, color="white" if np.log10(values[i, j]) > np.log10(values).mean() else "black")
    fig.colorbar(image, ax=ax, label="log10 KL to the original")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(folder / "sensitivity.png", dpi=120)
    plt.close(fig)


def write_outputs(
    folder: Path, problem, study, trials: Sequence, front: Sequence, built: Sequence, best, sens, timings: Mapping[str, float], struct: Mapping[str, float] | None = None
) -> None:
    """Every file of a finished search into ``folder``."""
    from weightsmith.search.run import BPW, SCORED, SIZE, best_recipe

    (folder / "best-recipe.yaml").write_text(
        f"# Best trial ({best.trial}) of study {study.study_name}: {problem.budget.describe()}.\n"
        f"# Re-run: weightsmith run best-recipe.yaml OUT\n" + best_recipe(problem, best)
    )
    by_trial = {b.trial: b for b in built if b.trial is not None}
    with open(folder / "pareto.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["label", "trial", "estimated_bytes", "bits_per_weight", "proxy_kl", "bytes_on_disk", "perplexity", "kl", "top1_agreement", "assignment"])
        for t in front:
            b = by_trial.get(t.number)
            out.writerow(
                [f"trial-{t.number}", t.number, t.user_attrs[SIZE], round(t.user_attrs[BPW], 4), round(t.value, 6)]
                + (_measured(b) if b else ["", "", "", ""])
                + [json.dumps(t.params, sort_keys=True)]
            )
        for b in built:
            if b.trial is None:
                out.writerow([b.label, "", "", _round(b.bits_per_weight), ""] + _measured(b) + [""])
    write_sensitivity(folder, sens, f"where the bits matter: {Path(problem.settings.model).name}")
    _plot(folder, problem, trials, built, best)
    feasible = [t for t in trials if t.user_attrs.get(SCORED)]
    lines = [
        f"# Budget search: {Path(problem.settings.model).name}, {problem.budget.describe()}",
        "",
        f"Study `{study.study_name}`: {len(trials)} trials, {len(feasible)} within budget and scored by the KL proxy, "
        f"{len(trials) - len(feasible)} over budget and not run.",
        "",
        f"Time: {timings['setup_s']:.0f} s to load the proxy and measure the sensitivities (the candidates cached on first use), "
        f"{timings['trials_s']:.0f} s for this run's {timings['trials_run']:.0f} trials"
        + (f" ({3600 * timings['trials_run'] / timings['trials_s']:.0f} trials per hour)" if timings["trials_s"] > 0 and timings["trials_run"] else "")
        + f", {timings['rebuild_s']:.0f} s to rebuild and score the best trials and baselines.",
        "",
        f"Best: trial {best.trial}, {best.bytes:,} bytes on disk, "
        + (f"{best.bits_per_weight:.3f} bits per weight, " if best.bits_per_weight else "")
        + f"perplexity {best.perplexity:.3f}, KL {best.kl:.4f} ({problem.settings.eval_tokens} tokens of the evaluation text).",
        "",
        "## Rebuilt with sequential calibration and scored by the full evaluation",
        "",
        "| model | bytes on disk | bits/weight | proxy KL | perplexity | KL | top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in built:
        lines.append(
            f"| {b.label}{' (best)' if b is best else ''} | {b.bytes:,} | {_round(b.bits_per_weight)} | {'' if b.proxy_kl is None else f'{b.proxy_kl:.4f}'} "
            f"| {b.perplexity:.3f} | {b.kl:.4f} | {100 * b.top1:.1f}% |"
        )
    lines += ["", "## Best trial's settings per group", "", "| group | candidate |", "|---|---|"]
    best_params = next(t.params for t in trials if t.number == best.trial)
    lines += [f"| {g} | {c} |" for g, c in best_params.items()]
    lines += ["", "## Where the bits matter (KL to the original when only this group is compressed)", ""]
    cands = list(next(iter(sens.values())))
    lines += ["| group | " + " | ".join(cands) + " |", "|---|" + "---:|" * len(cands)]
    lines += [f"| {g} | " + " | ".join(f"{row[c]:.4g}" for c in cands) + " |" for g, row in sens.items()]
    if struct:
        lines += ["", "The structure alone (layers dropped, MLP share removed): " + ", ".join(f"{k}: KL {v:.4g}" for k, v in struct.items()) + "."]
    lines += ["", "Files: best-recipe.yaml, pareto.csv, pareto.png, sensitivity.json, sensitivity.png.", ""]
    (folder / "report.md").write_text("\n".join(lines))


def _round(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _measured(b) -> list[Any]:
    return [b.bytes, round(b.perplexity, 4), round(b.kl, 6), round(b.top1, 6)]


def _plot(folder: Path, problem, trials: Sequence, built: Sequence, best) -> None:
    """``pareto.png``: every trial's estimated size against its proxy KL (left), and the rebuilt models'
    size on disk against perplexity, uniform baselines and peers marked (right)."""
    from weightsmith.search.run import SCORED, SIZE

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning(PNG_NEEDS, "pareto.png")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    scored = [t for t in trials if t.user_attrs.get(SCORED)]
    over = [t for t in trials if not t.user_attrs.get(SCORED)]
    left.scatter([t.user_attrs[SIZE] / 1e6 for t in scored], [t.value for t in scored], s=14, label="within budget (proxy KL)")
    left.scatter([t.user_attrs[SIZE] / 1e6 for t in over], [t.value for t in over], s=14, marker="x", color="grey", label="over budget (additive estimate)")
    if problem.budget.kind != "bpw":
        left.axvline(problem.budget.limit / 1e6, color="red", linestyle="--", label="budget")
    left.set_xlabel("estimated size (MB)")
    left.set_ylabel("KL to the original (proxy tokens)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    for b in built:
        marker = "*" if b is best else ("o" if b.trial is not None else "s")
        right.scatter([b.bytes / 1e6], [b.perplexity], marker=marker, s=120 if b is best else 40, label=b.label)
    for peer in problem.settings.peers:
        right.scatter([float(peer["bytes"]) / 1e6], [float(peer["perplexity"])], marker="D", s=40, label=str(peer.get("name", "peer")))
    if problem.budget.kind != "bpw":
        right.axvline(problem.budget.limit / 1e6, color="red", linestyle="--")
    right.set_xlabel("size on disk (MB)")
    right.set_ylabel("perplexity")
    right.legend(fontsize=7)
    fig.suptitle(f"{Path(problem.settings.model).name}: {problem.budget.describe()}")
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=120)
    plt.close(fig)

