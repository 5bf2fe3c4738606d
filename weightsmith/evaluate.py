"""The pinned evaluation protocol (docs/design.md): perplexity, KL to a reference, top-1 agreement, size.

Text is LF-normalized and tokenized whole (no special tokens added); the first ``max_tokens`` tokens
are cut into non-overlapping windows of ``ctx`` tokens (a last, shorter window is kept when it has
at least two tokens); each window is run on its own, and the loss covers every token but the first
of each window. When the model's tokenizer adds a BOS token, the first token of every window is
replaced by BOS before the window is run, as llama.cpp's perplexity tool does; the scored positions
do not change. With a reference model, each window is run through both models and only per-window
sums are kept, so memory stays at one window of logits per model; a model that is also the
reference is run once per window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from weightsmith.checkpoint import Checkpoint
from weightsmith.data import bos_id, read_text, tokenize, with_bos
from weightsmith.errors import WeightsmithError


@dataclass(frozen=True)
class Protocol:
    """The protocol's settings. ``bos`` is a fact of the model's tokenizer, not a choice: None until
    :func:`evaluate_many` has looked at the tokenizer."""

    ctx: int = 512
    max_tokens: int = 20480
    dtype: str = "float32"
    device: str = "cpu"
    bos: bool | None = None

    def describe(self) -> str:
        start = {True: "BOS at window start", False: "no BOS", None: "BOS at window start when the tokenizer adds one"}[self.bos]
        return (
            f"LF-normalized text tokenized whole, first {self.max_tokens} tokens, non-overlapping {self.ctx}-token "
            f"windows, {start}, loss on every token but the first of each window, {self.dtype} on {self.device}"
        )


@dataclass
class WindowSums:
    """Per-window sums; everything the report needs, without keeping logits."""

    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    positions: int = 0
    windows: int = 0

    def add(self, other: WindowSums) -> None:
        self.nll += other.nll
        self.kl += other.kl
        self.top1 += other.top1
        self.positions += other.positions
        self.windows += other.windows


@dataclass
class Report:
    model: str
    text: str
    text_sha256: str
    protocol: str
    perplexity: float
    mean_nll: float
    positions: int
    windows: int
    size_bytes: int
    num_parameters: int
    reference: str | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    bits_per_weight: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def window_spans(n_tokens: int, ctx: int) -> list[tuple[int, int]]:
    """[start, end) of each window; a tail shorter than two tokens is dropped."""
    if ctx < 2:
        raise WeightsmithError(None, f"ctx must be at least 2, got {ctx}")
    return [(s, min(s + ctx, n_tokens)) for s in range(0, n_tokens, ctx) if min(s + ctx, n_tokens) - s >= 2]


#: Positions per slice of :func:`window_sums`: float64 log-probabilities of a slice stay a few MB
#: (reused by the allocator) instead of one window-sized array faulted in afresh for every window.
SUM_ROWS = 32


def window_sums(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None = None) -> WindowSums:
    """Sums over one window. ``logits`` (T, V) predict ``ids`` (T,) shifted by one; KL is
    KL(reference || model) of the next-token distributions, in float64. ``ref_logits`` that are
    ``logits`` themselves (the model is its own reference) give KL 0 and full agreement without
    computing them. Top-1 agreement compares the argmax of the logits, which is the argmax of the
    log-probabilities."""
    targets = ids[1:]
    n = targets.numel()
    out = WindowSums(positions=n, windows=1)
    same = ref_logits is logits
    if same:
        out.top1 = n
    for start in range(0, n, SUM_ROWS):
        rows = slice(start, min(start + SUM_ROWS, n))
        logp = torch.log_softmax(logits[rows].double(), dim=-1)
        out.nll -= float(logp.gather(1, targets[rows, None]).sum())
        if ref_logits is not None and not same:
            ref_logp = torch.log_softmax(ref_logits[rows].double(), dim=-1)
            out.kl += float(torch.nn.functional.kl_div(logp, ref_logp, reduction="sum", log_target=True))
            out.top1 += int((ref_logits[rows].argmax(-1) == logits[rows].argmax(-1)).sum())
    return out


@torch.inference_mode()
def evaluate_tokens_many(
    models: list,
    tokens: torch.Tensor,
    ctx: int,
    reference=None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    bos: int | None = None,
) -> list[WindowSums]:
    """:func:`evaluate_tokens` for several models at once: each window's reference logits are
    computed once and compared with every model's; a model that is the reference object itself is
    not run a second time. With ``bos``, each window's first token is replaced by it before the
    forward pass (the scored targets are the window's own tokens)."""
    spans = window_spans(tokens.numel(), ctx)
    totals = [WindowSums() for _ in models]
    for i, (start, end) in enumerate(spans):
        ids = tokens[start:end].to(device)
        inputs = with_bos(ids, bos)[None]
        ref_logits = reference(inputs, use_cache=False).logits[0].float() if reference is not None else None
        for model, total in zip(models, totals):
            logits = ref_logits if model is reference else model(inputs, use_cache=False).logits[0].float()
            total.add(window_sums(logits, ids, ref_logits))
        if progress is not None:
            progress(i + 1, len(spans))
    return totals


def evaluate_tokens(
    model,
    tokens: torch.Tensor,
    ctx: int,
    reference=None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    bos: int | None = None,
) -> WindowSums:
    """Run the protocol's windows over ``tokens`` (already cut to max_tokens)."""
    return evaluate_tokens_many([model], tokens, ctx, reference, device, progress, bos)[0]


def evaluate(
    model_dir: Path,
    text_path: Path,
    protocol: Protocol = Protocol(),
    reference_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Evaluate the checkpoint folder ``model_dir`` on ``text_path`` by the pinned protocol."""
    return evaluate_many([model_dir], text_path, protocol, reference_dir, progress)[0]


def evaluate_many(
    model_dirs: list[Path],
    text_path: Path,
    protocol: Protocol = Protocol(),
    reference_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Report]:
    """Evaluate several checkpoint folders on the same tokens (tokenized with the first model's
    tokenizer, which also decides whether windows start with BOS), running the reference once per
    window for all of them; a reference that is one of ``model_dirs`` is loaded and run once."""
    from weightsmith.models import load_model, load_tokenizer
    from weightsmith.summary import packed_storage
    from weightsmith.stformat import parse_torch_dtype

    ckpts = [Checkpoint(d) for d in model_dirs]
    dtype = parse_torch_dtype(protocol.dtype)
    tokenizer = load_tokenizer(model_dirs[0])
    text = read_text(text_path)
    tokens = tokenize(tokenizer, text, protocol.max_tokens)
    if tokens.numel() < 2:
        raise WeightsmithError(text_path, "text has fewer than two tokens")
    bos = bos_id(tokenizer)
    protocol = replace(protocol, bos=bos is not None)
    models = [load_model(d, dtype, protocol.device) for d in model_dirs]
    for d, model in zip(model_dirs[1:], models[1:]):
        if model.config.vocab_size != models[0].config.vocab_size:
            raise WeightsmithError(d, f"vocabulary size {model.config.vocab_size} differs from {model_dirs[0]}'s {models[0].config.vocab_size}")
    reference = None
    if reference_dir is not None:
        loaded = [m for d, m in zip(model_dirs, models) if Path(d).resolve() == Path(reference_dir).resolve()]
        reference = loaded[0] if loaded else load_model(reference_dir, dtype, protocol.device)
        ours, theirs = models[0].config.vocab_size, reference.config.vocab_size
        if ours != theirs:
            raise WeightsmithError(reference_dir, f"vocabulary size {theirs} differs from the model's {ours}")
    all_sums = evaluate_tokens_many(models, tokens, protocol.ctx, reference, protocol.device, progress, bos)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    reports = []
    for model_dir, ckpt, sums in zip(model_dirs, ckpts, all_sums):
        mean_nll = sums.nll / sums.positions
        reports.append(
            Report(
                model=str(model_dir),
                text=str(text_path),
                text_sha256=digest,
                protocol=protocol.describe(),
                perplexity=math.exp(mean_nll),
                mean_nll=mean_nll,
                positions=sums.positions,
                windows=sums.windows,
                size_bytes=ckpt.file_bytes,
                num_parameters=ckpt.num_parameters,
                reference=None if reference_dir is None else str(reference_dir),
                kl=None if reference is None else sums.kl / sums.positions,
                top1_agreement=None if reference is None else sums.top1 / sums.positions,
                bits_per_weight=packed_storage(ckpt).bits_per_weight,
            )
        )
    return reports
