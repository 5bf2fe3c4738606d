"""Unstructured and N:M pruning of a checkpoint: magnitude (streaming, tensor by tensor), Wanda and
SparseGPT (layer by layer on calibration tokens, each layer's pruned outputs feeding the next), and
SparseGPT joint with quantization. Shapes do not change; the zeros are written densely (the file
keeps its size), in compressed-tensors' sparse formats, or as packed quantized codes.

* Wanda: https://arxiv.org/abs/2306.11695 — scores from :mod:`compress.prune.masks`.
* SparseGPT: https://arxiv.org/abs/2301.00774 — the Optimal-Brain-Surgeon sweep of
  :mod:`compress.obs` with :func:`compress.obs.prune_step`; with ``bits`` the same sweep also rounds
  every kept weight to its grid (:func:`compress.gptq.gptq_quantize` with ``prune``), so the error
  of both is compensated together and the pruned weights stay exactly 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from compress.config import LinearSettings
from compress.gptq import gptq_quantize
from compress.grid import QuantGrid, QuantizedTensor
from compress.obs import inner_block, inverse_cholesky, obs_sweep, prune_step, zero_dead_inputs
from compress.prune.config import PruneConfig, PruneTarget
from compress.prune.masks import count_for, mask_for, wanda_scores
from compress.prune.sparse import MARLIN_24, marlin24_quantization_config, marlin24_reason, model_format, sparse_linear, sparse_quantization_config, sparsity_config, stored_bytes
from compress.quantize import QuantReport, calibration_dtype, emit, packed_config
from compress.targets import module_of, select_weights
from weightsmith.arch import ARCHITECTURES, known_arch
from weightsmith.calibkit import input_statistics, write_layer
from weightsmith.calibrate import LayerStep, LayerwiseRunner, get_module, require_finite
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.provenance import Record
from weightsmith.topk import Chunked, Selector, key_bits, magnitude_keys, select

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
#: Elements per chunk when one magnitude threshold is chosen across every target linear.
GLOBAL_CHUNK = 1 << 20


@dataclass
class PruneTally:
    """What the pass did, for weightsmith.json and the closing table."""

    linears: int = 0
    weights: int = 0
    zeros: int = 0
    sparsegpt_loss: float = 0.0

    def add(self, w: Tensor) -> None:
        self.linears += 1
        self.weights += w.numel()
        self.zeros += int((w == 0).sum())

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.weights, 1)

    def figures(self) -> dict:
        figures: dict = {"pruned_linears": self.linears, "pruned_parameters": self.weights, "zeros": self.zeros, "sparsity": round(self.sparsity, 6)}
        if self.sparsegpt_loss:
            figures["sparsegpt_loss"] = self.sparsegpt_loss
        return figures


class _Output:
    """Writes pruned (or pruned and quantized) linears in the chosen format and counts them."""

    def __init__(self, writer: CheckpointWriter, settings: PruneConfig, targets: dict[str, PruneTarget], tally: PruneTally, quant: QuantReport) -> None:
        self.writer, self.settings, self.targets, self.tally, self.quant = writer, settings, targets, tally, quant
        self.sparse_format = sparse_format(settings, targets) if settings.format == "sparse" else None
        self.bytes_saved = 0

    def _sparse(self, module: str, weight: Tensor | QuantizedTensor) -> int:
        """Writes the linear in the sparse format; returns its stored bytes."""
        try:
            stored = sparse_linear(module, weight, self.targets[module].nm, self.sparse_format)
        except ValueError as exc:
            raise WeightsmithError(None, str(exc)) from None
        for name, tensor in stored.tensors.items():
            self.writer.add(name, tensor)
        self.bytes_saved += stored.bytes_saved
        return stored_bytes(stored.tensors)

    def dense(self, module: str, w: Tensor, dtype: torch.dtype, transposed: bool) -> None:
        """A pruned weight ``[out, in]`` (stored ``[in, out]`` when ``transposed``)."""
        stored = w.to(dtype)
        self.tally.add(stored)
        if self.sparse_format is not None:
            self._sparse(module, stored)
        else:
            self.writer.add(f"{module}.weight", stored.t() if transposed else stored)

    def quantized(self, module: str, q: QuantizedTensor, dtype: torch.dtype, transposed: bool) -> None:
        self.tally.add(q.dequantize())
        if self.sparse_format is not None:
            self.quant.add(q, 8 * self._sparse(module, q) / (q.shape[0] * q.shape[1]))
        else:
            emit(self.writer, module, q, dtype, "packed" if self.settings.format == "packed" else "dense", self.quant, transposed)

    def config(self, src_config: dict) -> dict | None:
        """config.json's ``quantization_config`` for a sparse format (None for the others)."""
        if self.sparse_format is None:
            return None
        modules = sorted(self.targets)
        ignore = sorted(set(self.settings.ignore) - set(modules))
        if self.sparse_format == MARLIN_24:
            block = marlin24_quantization_config(_grid(self.settings), modules, ignore, global_sparsity=self.tally.sparsity)
        else:
            nms = {t.nm for t in self.targets.values()}
            structure = nms.pop() if len(nms) == 1 else None
            block = sparse_quantization_config(sparsity_config(self.sparse_format, modules, ignore, global_sparsity=self.tally.sparsity, structure=structure))
        return {**src_config, "quantization_config": block}


def sparse_format(settings: PruneConfig, targets: dict[str, PruneTarget]) -> str:
    """The checkpoint's one compressed-tensors sparse format; a request no sparse format can hold is
    refused before any work."""
    try:
        return model_format((t.nm for t in targets.values()), quantized=settings.bits is not None)
    except ValueError as exc:
        raise WeightsmithError(None, f"format=sparse: {exc}") from None


def _check_sparse(ckpt: Checkpoint, targets: dict[str, PruneTarget], settings: PruneConfig) -> None:
    """What the sparse formats cannot hold, refused up front: Conv1D weights (compressed-tensors
    handles nn.Linear only) and, for marlin-24, grids and widths its kernel does not take."""
    arch = known_arch(ckpt.config)
    flipped = [m for m in targets if arch is not None and arch.stored_transposed(m)]
    if flipped:
        raise WeightsmithError(None, f"format=sparse cannot hold {flipped[0]}: its weight is a Conv1D [in, out], compressed-tensors stores nn.Linear only; use dense")
    if sparse_format(settings, targets) != MARLIN_24:
        return
    grid = _grid(settings)
    for module in targets:
        info = ckpt.info(f"{module}.weight")
        if info.dtype == torch.float32:
            raise WeightsmithError(ckpt.folder, f"format=sparse with bits stores marlin-24, whose scales are float16; {module} is float32: cast the model to bf16 or fp16 first (weightsmith copy --dtype)")
        out, inp = info.shape
        probe = QuantizedTensor(
            codes=torch.zeros((out, inp), dtype=torch.uint8),
            scales=torch.ones((out, grid.n_groups(inp)), dtype=torch.float16),
            zeros=torch.full((out, grid.n_groups(inp)), grid.midpoint, dtype=torch.uint8),
            grid=grid,
            shape=(out, inp),
        )
        reason = marlin24_reason(probe)
        if reason is not None:
            raise WeightsmithError(ckpt.folder, f"format=sparse with bits stores marlin-24; {module}: {reason}")


def select_targets(ckpt: Checkpoint, settings: PruneConfig) -> dict[str, PruneTarget]:
    """Module name -> pruning for every weight the pass prunes (by default the decoder-layer linears)."""
    arch = ARCHITECTURES.get(ckpt.config.get("model_type"))
    chosen = select_weights(ckpt, settings.selection, settings.target_for, arch.linears if arch else None)
    if not chosen:
        raise WeightsmithError(ckpt.folder, "no weight matches the targets; nothing to prune")
    return chosen


def _check_widths(ckpt: Checkpoint, targets: dict[str, PruneTarget], settings: PruneConfig) -> None:
    """N:M needs input widths (and SparseGPT's blocks) that are multiples of M: refused up front."""
    arch = known_arch(ckpt.config)
    for module, target in targets.items():
        if target.nm is None:
            continue
        shape = ckpt.info(f"{module}.weight").shape
        width = shape[0] if arch is not None and arch.stored_transposed(module) else shape[1]
        if width % target.nm.m:
            raise WeightsmithError(ckpt.folder, f"{module}: {target} sparsity needs an input width that is a multiple of {target.nm.m}, got {width}")
        if settings.method == "sparsegpt" and settings.block_size % target.nm.m:
            raise WeightsmithError(None, f"block_size {settings.block_size} is not a multiple of {target.nm.m}, which {target} sparsity needs")


def _grid(settings: PruneConfig) -> QuantGrid | None:
    return None if settings.bits is None else QuantGrid(bits=settings.bits, symmetric=settings.symmetric, group_size=settings.group_size)


def prune_checkpoint(
    src: Checkpoint,
    dest: Path,
    settings: PruneConfig,
    *,
    calib_tokens: Tensor | None = None,
    force: bool = False,
    max_shard_size: int | None = None,
    progress: Progress | None = None,
    record: Record | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[PruneTally, QuantReport]:
    """Prune ``src`` into the checkpoint folder ``dest``. ``calib_tokens`` ([samples, seq_len]) is
    required for Wanda and SparseGPT."""
    targets = select_targets(src, settings)
    _check_widths(src, targets, settings)
    if settings.format == "sparse":
        _check_sparse(src, targets, settings)
    grid = _grid(settings)
    out_config = None
    if settings.format == "packed" and grid is not None:
        out_config = packed_config(src.config, {m: LinearSettings("gptq", grid) for m in targets}, [], act_order=False)
    record = record or Record("prune", settings.model_dump(mode="json"), seed=seed)
    record.add_input(src.folder, src.files, src.provenance)
    tally, quant = PruneTally(), QuantReport()
    writer_args = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with CheckpointWriter(dest, force=force, source=src.folder, config=out_config, record=record, **writer_args) as writer:
        output = _Output(writer, settings, targets, tally, quant)
        if settings.method == "magnitude":
            _streaming(src, output, settings, targets, progress)
        else:
            if calib_tokens is None:
                raise WeightsmithError(None, f"{settings.method} needs calibration tokens")
            _layerwise(src, output, settings, targets, calib_tokens, progress, device)
        writer.config = output.config(src.config) or writer.config
        record.figures.update(tally.figures())
        if output.sparse_format is not None:
            record.figures["sparse_format"] = output.sparse_format
            record.figures["bytes_saved"] = output.bytes_saved
        if grid is not None:
            record.figures["bits_per_weight"] = round(quant.bits_per_weight, 4)
    return tally, quant


def _oriented(src: Checkpoint, name: str, module: str) -> tuple[Tensor, bool]:
    """The stored weight as ``[out, in]`` (transposed back from a Conv1D ``[in, out]``), and whether
    it was transposed."""
    w = src.get(name)
    require_finite(src, name, w)
    arch = known_arch(src.config)
    flip = arch is not None and arch.stored_transposed(module)
    return (w.t() if flip else w), flip


def magnitude_prune(w: Tensor, target: PruneTarget) -> Tensor:
    """``w`` with its smallest magnitudes zeroed as ``target`` asks (a share of the whole tensor, or
    N:M windows along the input dimension)."""
    return w.masked_fill(mask_for(w.abs(), target, per_row=False), 0)


def _streaming(src: Checkpoint, output: _Output, settings: PruneConfig, targets: dict[str, PruneTarget], progress: Progress | None) -> None:
    names = src.names()
    threshold = _global_selection(src, targets, settings.sparsity) if settings.scope == "global" else None
    for i, name in enumerate(names):
        module = module_of(name)
        if module in targets:
            w, flip = _oriented(src, name, module)
            if threshold is not None:
                stored = w.t() if flip else w
                mask = threshold(module, stored)
                pruned = w.masked_fill(mask.t() if flip else mask, 0)
            else:
                pruned = magnitude_prune(w, targets[module])
            output.dense(module, pruned, src.info(name).dtype, flip)
        else:
            output.writer.copy_from(src, name)
        if progress is not None:
            progress(i + 1, len(names), "magnitude")


def _global_selection(src: Checkpoint, targets: dict[str, PruneTarget], sparsity: float) -> Callable[[str, Tensor], Tensor]:
    """One magnitude cut across every target linear: the ``round(sparsity * total)`` smallest
    magnitudes of them all (ties: the earlier linear in checkpoint order, then the lower index),
    found by a radix select over float32 magnitudes read chunk by chunk. Returns
    ``mask(module, stored)`` for each linear's pruned entries, given the weight as stored."""
    modules = [m for m in (module_of(n) for n in src.names()) if m in targets]
    chunks: list[tuple[str, int, int]] = []
    for module in modules:
        n = src.info(f"{module}.weight").numel
        chunks += [(module, a, min(a + GLOBAL_CHUNK, n)) for a in range(0, n, GLOBAL_CHUNK)]

    def keys_of(j: int) -> Tensor:
        module, a, b = chunks[j]
        return magnitude_keys(src.get(f"{module}.weight").reshape(-1)[a:b].to(torch.float32))

    total = sum(b - a for _, a, b in chunks)
    selection = select(Chunked(len(chunks), keys_of), total, count_for(sparsity, total), key_bits(torch.float32), largest=False)
    selector = Selector(selection, torch.float32)
    first = {}
    for j, (module, _, _) in enumerate(chunks):
        first.setdefault(module, j)

    def mask(module: str, stored: Tensor) -> Tensor:
        """The pruned entries of ``module``'s weight ``stored`` (as the checkpoint stores it: the chunks
        index it that way)."""
        flat = stored.reshape(-1)
        parts = []
        for j in range(first[module], len(chunks)):
            if chunks[j][0] != module:
                break
            _, a, b = chunks[j]
            parts.append(selector.mask(j, magnitude_keys(flat[a:b].to(torch.float32))))
        return torch.cat(parts).reshape(stored.shape)

    return mask


def _layerwise(
    src: Checkpoint,
    output: _Output,
    settings: PruneConfig,
    targets: dict[str, PruneTarget],
    tokens: Tensor,
    progress: Progress | None,
    device: str,
) -> None:
    runner = LayerwiseRunner(src, tokens, batch_size=settings.batch_size, dtype=calibration_dtype(settings), device=device)
    arch = runner.arch
    layer_prefixes = tuple(arch.layer_prefix(i) for i in range(runner.num_layers))
    outside = [module_of(n) for n in src.names() if not n.startswith(layer_prefixes) and module_of(n) in targets]
    if outside:
        log.warning("%s prunes the decoder layers on calibration data; %s outside them is pruned by magnitude", settings.method, ", ".join(outside))
    for name in src.names():
        if name.startswith(layer_prefixes):
            continue
        module = module_of(name)
        if module in targets:
            w, flip = _oriented(src, name, module)
            output.dense(module, magnitude_prune(w, targets[module]), src.info(name).dtype, flip)
        else:
            output.writer.copy_from(src, name)
    for step in runner:
        mine = {lin: targets[step.prefix + lin] for lin in arch.linears if step.prefix + lin in targets}
        if settings.method == "wanda":
            custom = _wanda_layer(step, mine, src, output)
        else:
            custom = _sparsegpt_layer(step, mine, src, settings, output)
        write_layer(step, src, output.writer, custom)
        if progress is not None:
            progress(step.index + 1, runner.num_layers, settings.method)


def _dense_emitter(output: _Output, step: LayerStep, lin: str) -> Callable[[str, torch.dtype], None]:
    module = get_module(step.module, lin)
    flip = f"{lin}.weight" in step.transposed
    return lambda name, dtype: output.dense(name, module.weight.data, dtype, flip)


@torch.inference_mode()
def _wanda_layer(step: LayerStep, mine: dict[str, PruneTarget], src: Checkpoint, output: _Output) -> dict[str, Callable[[str, torch.dtype], None]]:
    """Wanda on every target linear of the layer: per-row masks of ``|W| * ||X_j||``."""
    inputs = input_statistics(step, {lin: ("norms",) for lin in mine})
    custom = {}
    for lin, target in mine.items():
        module = get_module(step.module, lin)
        w = module.weight.data
        mask = mask_for(wanda_scores(w, inputs[lin].norms), target, per_row=True)
        module.weight.data = w.masked_fill(mask, 0)
        custom[lin] = _dense_emitter(output, step, lin)
    return custom


def _sparsegpt_layer(
    step: LayerStep, mine: dict[str, PruneTarget], src: Checkpoint, settings: PruneConfig, output: _Output
) -> dict[str, Callable[[str, torch.dtype], None]]:
    """SparseGPT (joint with quantization when ``settings.bits``) on the target linears of the layer,
    those that share an input, a target and a stored dtype as one stacked weight (the sweep treats
    every row alike given the Hessian)."""
    inputs = input_statistics(step, {lin: ("hessian",) for lin in mine})
    batches: dict[tuple, list[str]] = {}
    for lin, target in mine.items():
        key = (id(inputs[lin]), target, src.info(f"{step.prefix}{lin}.weight").dtype)
        batches.setdefault(key, []).append(lin)
    grid = _grid(settings)
    custom = {}
    for (_, target, dtype), names in batches.items():
        modules = [get_module(step.module, lin) for lin in names]
        w = torch.cat([m.weight.data.to(dtype) for m in modules])
        hessian = inputs[names[0]].hessian
        prune = _prune_step_for(target)
        if grid is None:
            W, H = zero_dead_inputs(w.to(torch.float32), hessian)
            U = inverse_cholesky(H, settings.damp, 1.0)
            spans = (target.nm.m,) if target.nm is not None else ()
            pruned, losses = obs_sweep(W, U, prune(torch.diagonal(U)), block_size=settings.block_size, inner=inner_block(*spans))
            output.tally.sparsegpt_loss += float(losses.sum())
            start = 0
            for lin, module in zip(names, modules):
                stop = start + module.weight.shape[0]
                module.weight.data = pruned[start:stop].to(module.weight.dtype)
                custom[lin] = _dense_emitter(output, step, lin)
                start = stop
        else:
            spans = (target.nm.m,) if target.nm is not None else ()
            q, loss = gptq_quantize(w, hessian, grid, damp=settings.damp, block_size=settings.block_size, prune=prune, prune_spans=spans)
            output.tally.sparsegpt_loss += loss
            start = 0
            for lin, module in zip(names, modules):
                stop = start + module.weight.shape[0]
                part = q.rows(start, stop)
                module.weight.data = part.dequantize().to(module.weight.dtype)
                flip = f"{lin}.weight" in step.transposed
                custom[lin] = lambda name, dtype, part=part, flip=flip: output.quantized(name, part, dtype, flip)
                start = stop
    return custom


def _prune_step_for(target: PruneTarget) -> Callable[[Tensor], Callable]:
    if target.nm is not None:
        nm = target.nm
        return lambda d: prune_step(d, n_m=(nm.pruned, nm.m))
    return lambda d: prune_step(d, target.sparsity)
