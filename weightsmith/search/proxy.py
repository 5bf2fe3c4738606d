"""Cheap trials: every group quantized once per candidate and cached, a trial scored by assembling the
cached weights into one loaded model and measuring its KL divergence to the original on a few
thousand tokens.

The candidates are computed from the *original* model's inputs (one calibration forward collects the
input Hessian of every linear), not sequentially as the quantize pass does, so that a group's
quantized weights do not depend on the other groups' choices and can be reused by every trial. The
search rebuilds its best trials with the real passes (sequential calibration) before it reports them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from weightsmith.calibkit import accumulate_hessian
from weightsmith.search.space import Candidate, Group, group_modules

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ProxySettings:
    """How candidates are computed and trials scored (part of the cache key)."""

    samples: int = 64
    seq_len: int = 512
    batch_size: int = 4
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    #: tokens of the KL proxy, in windows of ``ctx``
    tokens: int = 2048
    ctx: int = 512
    #: how the cached candidates were computed (a new value invalidates the caches of earlier ones)
    version: int = 2

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def candidate_weight(w: Tensor, hessian: Tensor | None, cand: Candidate, settings: ProxySettings) -> Tensor:
    """``w`` ``[out, in]`` quantized as ``cand`` says and dequantized, in ``w``'s dtype: RTN on the grid,
    or GPTQ given the input Hessian (as the quantize pass computes each, without its sequential
    propagation)."""
    from compress.gguf.calibrated import GGUFGrid, gptq_gguf
    from compress.gptq import gptq_quantize
    from compress.grid import QuantGrid
    from compress.quantize import _rtn, dequantized

    grid = GGUFGrid(cand.gguf_type) if cand.gguf_type else QuantGrid(bits=cand.bits, symmetric=cand.symmetric, group_size=cand.group_size)
    if cand.sparsity is not None:
        if hessian is None:
            raise ValueError("a sparse candidate needs the input Hessian (Wanda's input norms)")
        mask = wanda_mask(w, hessian, cand.sparsity)
        if cand.method == "gptq" and isinstance(grid, QuantGrid):  # GPTQ compensates the pruned weights' error too
            q, _ = gptq_quantize(w.float(), hessian, grid, damp=settings.damp, block_size=settings.block_size, act_order=settings.act_order, mask=mask)
            return dequantized(q).to(w.dtype)
        dense = replace(cand, sparsity=None)
        return candidate_weight(w.masked_fill(mask, 0), hessian, dense, settings).masked_fill(mask, 0)
    if cand.method == "awq" and hessian is not None:
        return awq_from_hessian(w, hessian, grid)
    if cand.method == "rtn" or hessian is None:
        q = _rtn(w, grid, False, w.dtype)
    elif isinstance(grid, GGUFGrid):
        q, _ = gptq_gguf(w.float(), hessian, grid, damp=settings.damp, block_size=settings.block_size, importance=torch.diagonal(hessian), act_order=settings.act_order)
    else:
        q, _ = gptq_quantize(w.float(), hessian, grid, damp=settings.damp, block_size=settings.block_size, act_order=settings.act_order)
    return dequantized(q).to(w.dtype)


def wanda_mask(w: Tensor, hessian: Tensor, sparsity: str) -> Tensor:
    """Wanda's mask (https://arxiv.org/abs/2306.11695; True = pruned) of ``w`` at a share (``"0.5"``,
    per output row) or an N:M pattern (``"2:4"``), the input norms taken from the Hessian's diagonal
    (proportional to them, which ranks the same)."""
    from compress.prune.config import parse_nm
    from compress.prune.masks import nm_mask, row_mask, wanda_scores

    scores = wanda_scores(w, torch.diagonal(hessian.to(torch.float32)).clamp(min=0).sqrt())
    return nm_mask(scores, parse_nm(sparsity)) if ":" in sparsity else row_mask(scores, float(sparsity))


def pseudo_inputs(hessian: Tensor, damp: float = 1e-6) -> Tensor:
    """``X`` ``[in, in]`` with ``X^T X = H``: a stand-in for a linear's inputs that gives every weight
    the same output error ``tr(dW H dW^T)`` as the real inputs, from their Hessian alone."""
    H = hessian.to(torch.float32)
    H = H + damp * float(torch.diagonal(H).mean().clamp(min=1e-12)) * torch.eye(H.shape[0])
    return torch.linalg.cholesky(H).T.contiguous()


def awq_from_hessian(w: Tensor, hessian: Tensor, grid) -> Tensor:
    """AWQ (https://arxiv.org/abs/2306.00978) of one linear with its inputs known only by their Hessian:
    scales searched on the output error of :func:`pseudo_inputs`, the activation scale taken as the
    inputs' RMS per channel, then the clipping search (llama.cpp's importance-weighted quantizer on a
    GGUF grid); dequantized and unscaled, in ``w``'s dtype. The quantize pass searches one scale per
    group of linears on real block outputs; this per-linear form is the proxy's estimate of it."""
    from compress.awq import awq_clip_ratios, scale_input_channels, search_awq_scales
    from compress.gguf.calibrated import GGUFGrid, fake_quantize as gguf_fake_quantize
    from compress.grid import quantize

    x = pseudo_inputs(hessian)
    rms = torch.diagonal(hessian.to(torch.float32)).clamp(min=0).sqrt()
    s = search_awq_scales(x, [w.float()], lambda inp, ws: inp @ ws[0].to(torch.float32).T, grid, act_scale=rms)
    scaled = scale_input_channels(w.float(), s)
    if isinstance(grid, GGUFGrid):
        q = gguf_fake_quantize(scaled, grid, importance=(x / s).pow(2).mean(dim=0))
    else:
        q = quantize(scaled, grid, awq_clip_ratios(scaled, x / s, grid)).dequantize()
    return (q.to(torch.float32) / s).to(w.dtype)


@torch.inference_mode()
def collect_hessians(model: torch.nn.Module, modules: Sequence[str], batches: Sequence[Tensor], progress: Progress | None = None) -> dict[str, Tensor]:
    """The input Hessian ``2/n X^T X`` of each linear in ``modules`` over the calibration ``batches``
    (each ``[b, seq]`` token ids) run through the whole original ``model``. Linears that read the very
    same input tensor (q/k/v, gate/up) share one Hessian object, computed once."""
    hessians: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}
    # the inputs seen in the current layer, held so that their memory cannot be reused by a later
    # tensor of the same shape (which would then pass for the same input)
    seen: dict[tuple[int, tuple[int, ...]], tuple[str, Tensor]] = {}
    layer = [""]

    def hook(name: str):
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            prefix = name.rsplit(".", 2)[0]
            if prefix != layer[0]:
                seen.clear()
                layer[0] = prefix
            key = (x.data_ptr(), tuple(x.shape))
            first, _ = seen.setdefault(key, (name, x))
            if first != name:
                owner[name] = first
                return
            hessians[name], counts[name] = accumulate_hessian(hessians.get(name), x.detach().float(), counts.get(name, 0))

        return record

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    try:
        for i, batch in enumerate(batches):
            seen.clear()
            layer[0] = ""
            model(batch, use_cache=False)
            if progress is not None:
                progress(i + 1, len(batches), "input Hessians")
    finally:
        for h in handles:
            h.remove()
    for name, first in owner.items():
        hessians[name] = hessians[first]
    return hessians


class CandidateCache:
    """Each (group, candidate)'s quantized weights, computed once and kept on disk (safetensors, one
    file per pair) so that every trial, every worker process and a resumed search reuse them."""

    def __init__(
        self,
        folder: Path,
        weights: Callable[[str], Tensor],
        hessians: Callable[[], Mapping[str, Tensor]],
        settings: ProxySettings,
        arch,
        progress: Progress | None = None,
    ) -> None:
        self.folder = folder
        self.weights = weights
        self.hessians = hessians
        self.settings = settings
        self.arch = arch
        self.progress = progress

    def path(self, group: Group, cand: Candidate) -> Path:
        return self.folder / cand.name / f"{group.name}.safetensors"

    def get(self, group: Group, cand: Candidate) -> dict[str, Tensor]:
        """Module name -> quantized-and-dequantized weight, for every module of ``group``."""
        from filelock import FileLock
        from safetensors.torch import load_file, save_file

        path = self.path(group, cand)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock"):
                if not path.exists():
                    H = self.hessians() if cand.method != "rtn" or cand.sparsity is not None else {}
                    modules = group_modules(group, self.arch)
                    out = {}
                    for i, m in enumerate(modules):
                        out[m] = candidate_weight(self.weights(m), H.get(m), cand, self.settings).contiguous()
                        if self.progress is not None:
                            self.progress(i + 1, len(modules), f"candidate {cand.name} for {group.name}")
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    save_file(out, str(tmp))
                    os.replace(tmp, path)
                    log.info("candidate %s for %s computed", cand.name, group.name)
        return load_file(str(path))


class ProxyScorer:
    """The original model loaded once, its next-token logits on the proxy tokens kept, and the KL
    divergence of the model with some linears replaced, measured on the same windows."""

    def __init__(self, model: torch.nn.Module, tokens: Tensor, ctx: int, bos: int | None, layers: str = "model.layers") -> None:
        from weightsmith.data import with_bos
        from weightsmith.evaluate import window_spans

        self.model = model
        self.layers: torch.nn.ModuleList = model.get_submodule(layers)
        self.windows = [tokens[a:b] for a, b in window_spans(tokens.numel(), ctx)]
        self.inputs = [with_bos(ids, bos)[None] for ids in self.windows]
        self.original: dict[str, Tensor] = {}
        with torch.inference_mode():
            self.reference = [model(x, use_cache=False).logits[0].float() for x in self.inputs]

    def _param(self, module: str) -> torch.nn.Parameter:
        return self.model.get_submodule(module).weight

    def assign(self, weights: Mapping[str, Tensor]) -> None:
        """Put ``weights`` into their modules (the originals are kept to restore)."""
        with torch.no_grad():
            for name, w in weights.items():
                p = self._param(name)
                if name not in self.original:
                    self.original[name] = p.detach().clone()
                p.copy_(w.to(p.dtype))

    def restore(self, keep: Sequence[str] = ()) -> None:
        """Every replaced module back to its original weight, except those in ``keep``."""
        with torch.no_grad():
            for name in [n for n in self.original if n not in set(keep)]:
                self._param(name).copy_(self.original.pop(name))

    @torch.inference_mode()
    def kl(self, skip: Sequence[int] = ()) -> float:
        """Mean KL(original || current) per scored position over the proxy windows, with the decoder
        layers ``skip`` left out (their input passed on unchanged, as if removed)."""
        from weightsmith.evaluate import WindowSums, window_sums

        kept = {i: self.layers[i] for i in skip}
        for i in skip:
            self.layers[i] = _Skip()
        try:
            total = WindowSums()
            for ids, x, ref in zip(self.windows, self.inputs, self.reference):
                total.add(window_sums(self.model(x, use_cache=False).logits[0].float(), ids, ref))
        finally:
            for i, layer in kept.items():
                self.layers[i] = layer
        return total.kl / max(total.positions, 1)

    def score(
        self, parts: Mapping[str, Mapping[str, Tensor]], skip: Sequence[int] = (), channels: Mapping[str, tuple[int, Tensor]] | None = None
    ) -> float:
        """KL with each group's modules replaced by its weights (``parts``: group -> module -> weight),
        the layers ``skip`` left out and, with ``channels`` (module -> (dimension, kept indices)), every
        other channel of those modules zeroed: the function of a model whose MLP is narrower. Modules
        named by no part are restored first."""
        merged = {m: w for part in parts.values() for m, w in part.items()}
        self.restore(keep=list(merged))
        self.assign(merged)
        if channels:
            cut = {}
            for module, (dim, kept) in channels.items():
                w = self._param(module).detach()
                keep = torch.zeros(w.shape[dim], dtype=torch.bool)
                keep[kept] = True
                cut[module] = w * (keep[:, None] if dim == 0 else keep[None, :]).to(w.dtype)
            self.assign(cut)
        return self.kl(skip)

    @torch.inference_mode()
    def layer_order(self) -> list[int]:
        """Decoder layers from the least to the most influential (ShortGPT's block influence,
        https://arxiv.org/abs/2403.03853, on the proxy windows of the original model): dropping the
        first ``k`` is what a structured prune of ``k`` layers by influence does."""
        from compress.prune.importance import block_influence

        sums = [[0.0, 0] for _ in self.layers]

        def hook(i: int):
            def record(_module, args, kwargs, output) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                out = output[0] if isinstance(output, tuple) else output
                total, count = block_influence(hidden, out)
                sums[i][0] += total
                sums[i][1] += count

            return record

        self.restore()
        handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            for x in self.inputs:
                self.model(x, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        influence = torch.tensor([t / max(c, 1) for t, c in sums], dtype=torch.float64)
        return torch.argsort(influence, stable=True).tolist()


class _Skip(torch.nn.Module):
    """A decoder layer left out: its input hidden states go on unchanged."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


def sensitivity(
    scorer: ProxyScorer, cache: CandidateCache, groups: Sequence[Group], candidates: Sequence[Candidate], progress: Progress | None = None
) -> dict[str, dict[str, float]]:
    """KL to the original when only one group is compressed to one candidate, the rest left as they
    are: group name -> candidate name -> KL. "Where the bits matter": the groups whose KL climbs
    fastest as their bits drop."""
    table: dict[str, dict[str, float]] = {}
    total, done = len(groups) * len(candidates), 0
    for g in groups:
        for c in candidates:
            table.setdefault(g.name, {})[c.name] = scorer.score({g.name: cache.get(g, c)})
            done += 1
            if progress is not None:
                progress(done, total, f"sensitivity {g.name} {c.name}")
    scorer.restore()
    return table
