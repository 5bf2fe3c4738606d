"""Score a GGUF file with llama.cpp's own logits by the project's pinned protocol (runs in .venv-peers).

Run:  .venv-peers/bin/python bench/llamacpp_score.py MODEL.gguf [MORE.gguf ...] --windows windows.npy [--ref REF.gguf | --ref none]

``windows.npy`` holds int32 token ids [n_windows, 512] made by the caller from our tokenizer (the
pinned protocol: WikiText-2 test text normalised to LF, tokenized whole, the first 20,480 tokens in
non-overlapping windows of 512; when the tokenizer adds BOS the caller has already put BOS in each
window's first place). The ids go to llama.cpp as they are: no tokenization, no BOS added here.

Each window runs in a fresh KV cache through llama-cpp-python's ``Llama`` (``logits_all=True``,
n_ctx = n_batch = the window length), in the model and in the reference. Scored: every position but
the first (the logits at position t predict token t+1), in float64 log-probabilities, in slices of
:data:`SUM_ROWS` rows; per scored position, KL(reference || model) of the next-token distributions
and whether the two argmaxes agree; the same sums as weightsmith's own evaluation
(weightsmith/evaluate.py: window_sums). Several models are scored together, all loaded at once,
the reference run once per window. Prints one JSON line per model:
{"perplexity", "kl", "top1", "tokens", "positions", "windows", "mean_nll", "model", "ref"}
(kl and top1 are null with ``--ref none``).

The bindings load the libraries that bench/setup-llamacpp.sh built (linked into their ``lib``
folder, or named by ``LLAMA_CPP_LIB_PATH``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOG = logging.getLogger("llamacpp_score")

#: rows of float64 log-probabilities computed at once (a few MB at a 49k vocabulary)
SUM_ROWS = 32


@dataclass
class Sums:
    """Running sums over scored positions."""

    positions: int = 0
    windows: int = 0
    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def window_sums(logits: np.ndarray, ids: np.ndarray, ref_logits: np.ndarray | None = None) -> Sums:
    """Sums over one window: ``logits`` (T, V) predict ``ids`` (T,) shifted by one. KL is
    KL(reference || model) = sum_v p_ref(v) (log p_ref(v) - log p(v)) per position; top-1 agreement
    compares the argmax of the two logit rows; ``ref_logits`` that are ``logits`` themselves give KL 0
    and full agreement without computing them. Cross-entropy, KL and agreement as the pinned protocol
    defines them (docs/design.md; weightsmith/evaluate.py computes the same sums in torch)."""
    return window_sums_many([logits], ids, ref_logits)[0]


def window_sums_many(all_logits: list[np.ndarray], ids: np.ndarray, ref_logits: np.ndarray | None = None) -> list[Sums]:
    """:func:`window_sums` of several models on one window, the reference's log-probabilities
    computed once per slice of rows for all of them."""
    targets = ids[1:].astype(np.int64)
    n = targets.shape[0]
    out = [Sums(positions=n, windows=1) for _ in all_logits]
    for sums, logits in zip(out, all_logits):
        if ref_logits is logits:
            sums.top1 = n
    for start in range(0, n, SUM_ROWS):
        rows = slice(start, min(start + SUM_ROWS, n))
        ref_logp = None
        if ref_logits is not None and any(logits is not ref_logits for logits in all_logits):
            ref_logp = log_softmax(ref_logits[rows])
            ref_p = np.exp(ref_logp)
            ref_top = ref_logits[rows].argmax(-1)
        for sums, logits in zip(out, all_logits):
            logp = log_softmax(logits[rows])
            sums.nll -= float(np.take_along_axis(logp, targets[rows, None], axis=1).sum())
            if ref_logp is not None and logits is not ref_logits:
                sums.kl += float((ref_p * (ref_logp - logp)).sum())
                sums.top1 += int((ref_top == logits[rows].argmax(-1)).sum())
    return out


def load(path: Path, ctx: int, threads: int):
    """A llama.cpp context that keeps the logits of every position (CPU, no offload)."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=True, n_gpu_layers=0, verbose=False)


def window_logits(llm, ids: np.ndarray) -> np.ndarray:
    """Logits (T, V) of one window, run from an empty KV cache (``reset`` makes ``eval`` drop every
    cached position). A view of the context's own buffer: valid until its next ``eval``."""
    llm.reset()
    llm.eval(ids.tolist())
    return llm.scores[: len(ids)]


def score_many(models: list[Path], windows: np.ndarray, ref: Path | None, threads: int) -> list[dict]:
    """The pinned-protocol figures of each model (and against ``ref``) on ``windows`` [n, T]; every
    model stays loaded, the reference runs once per window (not at all when it is one of the models)."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise SystemExit(f"windows must be [n_windows, window_len >= 2], got shape {windows.shape}")
    ctx = int(windows.shape[1])
    llms = [load(m, ctx, threads) for m in models]
    resolved = [m.resolve() for m in models]
    ref_llm = None
    if ref is not None:
        ref_llm = llms[resolved.index(ref.resolve())] if ref.resolve() in resolved else load(ref, ctx, threads)
        for m, llm in zip(models, llms):
            if llm.n_vocab() != ref_llm.n_vocab():
                raise SystemExit(f"vocabulary sizes differ: {m} has {llm.n_vocab()}, {ref} has {ref_llm.n_vocab()}")
    totals = [Sums() for _ in models]
    for i, ids in enumerate(windows):
        all_logits = [window_logits(llm, ids) for llm in llms]
        ref_logits = None
        if ref_llm is not None:
            ref_logits = next((lg for llm, lg in zip(llms, all_logits) if llm is ref_llm), None)
            if ref_logits is None:
                ref_logits = window_logits(ref_llm, ids)
        for total, s in zip(totals, window_sums_many(all_logits, ids, ref_logits)):
            total.positions += s.positions
            total.windows += s.windows
            total.nll += s.nll
            total.kl += s.kl
            total.top1 += s.top1
        LOG.info("window %d/%d: perplexity so far %s", i + 1, len(windows),
                 ", ".join(f"{math.exp(t.nll / t.positions):.4f}" for t in totals))
    out = []
    for m, total in zip(models, totals):
        mean_nll = total.nll / total.positions
        out.append({
            "perplexity": math.exp(mean_nll),
            "kl": None if ref_llm is None else total.kl / total.positions,
            "top1": None if ref_llm is None else total.top1 / total.positions,
            "tokens": int(windows.size),
            "positions": total.positions,
            "windows": total.windows,
            "mean_nll": mean_nll,
            "model": str(m),
            "ref": None if ref is None else str(ref),
        })
    return out


def score(model: Path, windows: np.ndarray, ref: Path | None, threads: int) -> dict:
    """The pinned-protocol figures of one model (and against ``ref``) on ``windows`` [n, T]."""
    return score_many([model], windows, ref, threads)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="GGUF files to score (one JSON line each, in this order)")
    parser.add_argument("--windows", type=Path, required=True, help=".npy of int32 token ids [n_windows, window_len]")
    parser.add_argument("--ref", default="none", help="reference GGUF (our f16) for KL and top-1, or 'none'")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--verbose", action="store_true", help="log the running perplexity per window")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    windows = np.load(args.windows)
    ref = None if args.ref == "none" else Path(args.ref)
    for result in score_many(args.models, windows, ref, args.threads):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
