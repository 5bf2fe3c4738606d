"""The pinned evaluation protocol (docs/design.md): perplexity, KL to a reference, top-1 agreement, size.

Text is LF-normalized and tokenized whole (no special tokens added); the first ``max_tokens`` tokens
are cut into non-overlapping windows of ``ctx`` tokens (a last, shorter window is kept when it has
at least two tokens); each window is run on its own, and the loss covers every token but the first
of each window. With a reference model, each window is run through both models and only per-window
sums are kept, so memory stays at one window of logits per model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from weightsmith.checkpoint import Checkpoint
from weightsmith.data import read_text, tokenize
from weightsmith.errors import WeightsmithError


@dataclass(frozen=True)
class Protocol:
    ctx: int = 512
    max_tokens: int = 20480
    dtype: str = "float32"
    device: str = "cpu"

    def describe(self) -> str:
        return (
            f"LF-normalized text tokenized whole, first {self.max_tokens} tokens, non-overlapping {self.ctx}-token "
            f"windows, loss on every token but the first of each window, {self.dtype} on {self.device}"
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
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def window_spans(n_tokens: int, ctx: int) -> list[tuple[int, int]]:
    """[start, end) of each window; a tail shorter than two tokens is dropped."""
    if ctx < 2:
        raise WeightsmithError(None, f"ctx must be at least 2, got {ctx}")
    return [(s, min(s + ctx, n_tokens)) for s in range(0, n_tokens, ctx) if min(s + ctx, n_tokens) - s >= 2]


def window_sums(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None = None) -> WindowSums:
    """Sums over one window. ``logits`` (T, V) predict ``ids`` (T,) shifted by one; KL is
    KL(reference || model) of the next-token distributions."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    targets = ids[1:]
    out = WindowSums(nll=float(-logp.gather(1, targets[:, None]).sum()), positions=targets.numel(), windows=1)
    if ref_logits is not None:
        ref_logp = torch.log_softmax(ref_logits[:-1].double(), dim=-1)
        out.kl = float((ref_logp.exp() * (ref_logp - logp)).sum())
        out.top1 = int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    return out


@torch.inference_mode()
def evaluate_tokens_many(
    models: list,
    tokens: torch.Tensor,
    ctx: int,
    reference=None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> list[WindowSums]:
    """:func:`evaluate_tokens` for several models at once: each window's reference logits are
    computed once and compared with every model's."""
    spans = window_spans(tokens.numel(), ctx)
    totals = [WindowSums() for _ in models]
    for i, (start, end) in enumerate(spans):
        ids = tokens[start:end].to(device)
        ref_logits = reference(ids[None]).logits[0].float() if reference is not None else None
        for model, total in zip(models, totals):
            total.add(window_sums(model(ids[None]).logits[0].float(), ids, ref_logits))
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
) -> WindowSums:
    """Run the protocol's windows over ``tokens`` (already cut to max_tokens)."""
    return evaluate_tokens_many([model], tokens, ctx, reference, device, progress)[0]


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
    tokenizer), running the reference once per window for all of them."""
    from weightsmith.models import load_model, load_tokenizer
    from weightsmith.stformat import parse_torch_dtype

    ckpts = [Checkpoint(d) for d in model_dirs]
    dtype = parse_torch_dtype(protocol.dtype)
    tokenizer = load_tokenizer(model_dirs[0])
    text = read_text(text_path)
    tokens = tokenize(tokenizer, text, protocol.max_tokens)
    if tokens.numel() < 2:
        raise WeightsmithError(text_path, "text has fewer than two tokens")
    models = [load_model(d, dtype, protocol.device) for d in model_dirs]
    for d, model in zip(model_dirs[1:], models[1:]):
        if model.config.vocab_size != models[0].config.vocab_size:
            raise WeightsmithError(d, f"vocabulary size {model.config.vocab_size} differs from {model_dirs[0]}'s {models[0].config.vocab_size}")
    reference = None
    if reference_dir is not None:
        reference = load_model(reference_dir, dtype, protocol.device)
        ours, theirs = models[0].config.vocab_size, reference.config.vocab_size
        if ours != theirs:
            raise WeightsmithError(reference_dir, f"vocabulary size {theirs} differs from the model's {ours}")
    all_sums = evaluate_tokens_many(models, tokens, protocol.ctx, reference, protocol.device, progress)
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
            )
        )
    return reports
