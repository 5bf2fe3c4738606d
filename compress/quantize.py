"""The quantize pass: RTN (streaming), GPTQ, AWQ and AWQ+GPTQ (layer by layer), written dense or packed.

``quantize_checkpoint`` reads one checkpoint folder and writes one. RTN needs no model: it walks the
tensors. GPTQ and AWQ run the decoder layers one at a time on calibration tokens
(:mod:`weightsmith.calibrate`). Every quantized linear becomes a :class:`compress.grid.QuantizedTensor`,
from which the output format is written: ``dense`` (dequantized weights in the model dtype) or
``packed`` (compressed-tensors ``pack-quantized``, loadable by transformers and vLLM).

``gguf:TYPE`` chooses the codes on the grids of a llama.cpp type or mix instead
(:mod:`compress.gguf.calibrated`): each linear gets the block type llama-quantize would give it, RTN is
llama.cpp's reference quantizer and GPTQ sweeps on that type's blocks; the folder holds the dense
weights (the GGUF values in the model dtype) and, in :data:`GGUF_BLOCKS`, the blocks themselves,
which the GGUF export writes as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.awq import awq_clip_ratios, fold_scales_into_linear, fold_scales_into_norm, scale_input_channels, search_awq_scales
from compress.config import GPTQ_QUANTIZER, SCALED, LinearSettings, QuantizeConfig
from compress.gptq import gptq_quantize, hessian_clip_search
from compress.grid import QuantGrid, QuantizedTensor, mse_clip_search, quantize
from compress.pack import quantization_config, ragged_group_reason, to_compressed_tensors
from compress.targets import module_of, select_weights
from weightsmith.arch import ARCHITECTURES, Arch, ScaleGroup, known_arch
from weightsmith.calibkit import LayerInputs, input_statistics, layer_batches, write_layer
from weightsmith.calibrate import LayerStep, LayerwiseRunner, get_module, input_hooks, layer_output, require_finite
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.passes import Report
from weightsmith.provenance import Record
from weightsmith.runtime import Runtime

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
CALIB_ASSET = "text/wikitext2-test-calib.raw"
#: the extra file of a ``gguf:TYPE`` output: each linear's GGUF blocks (uint8 ``[rows, bytes per row]``,
#: rows in the checkpoint's order), its type in the header metadata under the tensor's name
GGUF_BLOCKS = "gguf-blocks.safetensors"


@dataclass
class QuantReport:
    """What the pass measured: figures for weightsmith.json and the CLI's closing table."""

    quantized: int = 0
    quantized_params: int = 0
    packed_bits: float = 0.0
    gptq_loss: float = 0.0
    ragged: list[str] = field(default_factory=list)

    def add(self, q: QuantizedTensor, stored_bits: float) -> None:
        n = q.shape[0] * q.shape[1]
        self.quantized += 1
        self.quantized_params += n
        self.packed_bits += stored_bits * n

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight of the quantized linears in the packed layout (16 for a linear the
        packed format has to keep dequantized)."""
        return self.packed_bits / max(self.quantized_params, 1)

    def figures(self) -> dict:
        return {
            "quantized_linears": self.quantized,
            "quantized_parameters": self.quantized_params,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "gptq_loss": self.gptq_loss,
        }


def select_linears(ckpt: Checkpoint, config: QuantizeConfig) -> dict[str, LinearSettings]:
    """Module name -> settings for every weight the pass quantizes. Known architectures default to
    their decoder-layer linears; others to every 2-D floating weight (embeddings and heads excluded)."""
    arch = ARCHITECTURES.get(ckpt.config.get("model_type"))
    chosen = select_weights(ckpt, config.selection, config.settings_for, arch.linears if arch else None)
    if not chosen:
        raise WeightsmithError(ckpt.folder, "no weight matches the targets; nothing to quantize")
    if config.gguf_mix is not None:
        chosen = _gguf_grids(ckpt, config.gguf_mix, chosen, calibrated=config.calibrated, overrides=config.gguf_type_for)
    return chosen


def _gguf_grids(
    ckpt: Checkpoint, mix: str, chosen: dict[str, LinearSettings], calibrated: bool = False, overrides: Callable[[str], str | None] = lambda m: None
) -> dict[str, LinearSettings]:
    """Each linear on the grid of the block type llama-quantize's ``mix`` gives it (with its importance
    matrix rules when ``calibrated``), or the type an override names; a linear whose width fits no
    block type stays unquantized, as llama.cpp keeps it in float16."""
    from compress.gguf.calibrated import GGUFGrid
    from compress.gguf.mixes import FLOAT_TYPES, MIXES, TypeChooser, fallback
    from compress.gguf.names import gguf_arch_of, route

    config = ckpt.config
    found = gguf_arch_of(config.get("model_type"))
    if found is None:
        raise WeightsmithError(ckpt.folder / "config.json", f"format gguf: llama.cpp export does not support model_type {config.get('model_type')!r}")
    heads = int(config.get("num_attention_heads") or 1)
    kv = int(config.get("num_key_value_heads") or heads)
    chooser = TypeChooser(
        MIXES[mix], int(config.get("num_hidden_layers") or 0), bool(config.get("tie_word_embeddings")), gqa=max(1, heads // kv), calibrated=calibrated
    )
    out: dict[str, LinearSettings] = {}
    for module, settings in chosen.items():
        r = route(f"{module}.weight", found[0], {})
        if r is None:
            raise WeightsmithError(ckpt.folder, f"format gguf: {module} has no place in a llama.cpp model")
        shape = tuple(ckpt.info(f"{module}.weight").shape)
        named = overrides(module)
        gtype = fallback(named, shape[-1]) if named else chooser.choose(r.gguf_name, r.leaf, r.block, shape)
        if gtype in FLOAT_TYPES:
            log.warning("%s: no GGUF block type fits its width; left unquantized (llama.cpp keeps it in %s)", module, gtype)
            continue
        out[module] = LinearSettings(settings.method, GGUFGrid(gtype))
    return out


def emit(writer: CheckpointWriter, module: str, q: QuantizedTensor, dtype: torch.dtype, fmt: str, report: QuantReport, transposed: bool = False) -> None:
    """Write one quantized linear in the chosen format and count its storage bits. In the packed
    format a linear whose width is not a multiple of the group size (a shorter last group, which
    compressed-tensors cannot decode) is stored dequantized, and config.json says so. ``transposed``:
    the checkpoint stores the weight ``[in, out]`` (dense only, see :func:`packed_config`). A GGUF-grid
    linear is written dense and its blocks go to :data:`GGUF_BLOCKS`."""
    from compress.gguf.quants import GGUFQuant

    if isinstance(q, GGUFQuant):
        from compress.gguf import quants

        writer.add(f"{module}.weight", quants.dequantize(q).to(dtype))
        writer.add_extra(GGUF_BLOCKS, f"{module}.weight", quants.pack(q), note=quants.gguf_type(q.gtype).name)
        report.add(q, quants.gguf_type(q.gtype).bits_per_weight)
        return
    ragged = ragged_group_reason(q.grid, q.shape[1]) is not None
    if fmt == "dense" or ragged:
        w = q.dequantize()
        writer.add(f"{module}.weight", (w.t() if transposed else w).to(dtype))
        report.add(q, torch.finfo(dtype).bits if fmt == "packed" else q.bits_per_weight)
        return
    for name, tensor in to_compressed_tensors(q, module).items():
        writer.add(name, tensor)
    report.add(q, q.bits_per_weight)


def packed_config(config: dict, linears: dict[str, LinearSettings], ragged: list[str], act_order: bool) -> dict:
    """config.json with a ``quantization_config`` grouping the quantized linears by grid."""
    arch = known_arch(config)
    flipped = [m for m in linears if arch is not None and arch.stored_transposed(m)]
    if flipped:
        raise WeightsmithError(
            None,
            f"--format packed cannot hold {flipped[0]}: {config.get('model_type')} stores its linears as Conv1D weights [in, out], "
            "which compressed-tensors does not quantize (it handles nn.Linear only); use --format dense",
        )
    by_grid: dict[QuantGrid, list[str]] = {}
    for module, settings in linears.items():
        if module not in ragged:
            by_grid.setdefault(settings.grid, []).append(module)
    if not by_grid:
        raise WeightsmithError(None, "no linear's width is a multiple of its group size, so none can be packed; use --format dense or another group size")
    metadata = {"ragged_last_group_stored_dense": ragged} if ragged else None
    block: dict | None = None
    for i, (grid, modules) in enumerate(by_grid.items()):
        part = quantization_config(grid, targets=modules, ignore=ragged, actorder="weight" if act_order else None, metadata=metadata)
        group = part["config_groups"]["group_0"]
        if block is None:
            block = {**part, "config_groups": {}}
        block["config_groups"][f"group_{i}"] = group
    return {**config, "quantization_config": block}


def quantize_checkpoint(
    src: Checkpoint,
    dest: Path,
    config: QuantizeConfig,
    *,
    force: bool = False,
    max_shard_size: int | None = None,
    calib_tokens: torch.Tensor | None = None,
    progress: Progress | None = None,
    record: Record | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> QuantReport:
    """Quantize ``src`` into the checkpoint folder ``dest``. ``calib_tokens`` ([samples, seq_len]) is
    required for GPTQ and AWQ (see :func:`calibration_tokens`); the calibrated layers run on
    ``device``."""
    linears = select_linears(src, config)
    report = QuantReport()
    report.ragged = sorted(m for m, s in linears.items() if isinstance(s.grid, QuantGrid) and ragged_group_reason(s.grid, src.info(f"{m}.weight").shape[1]))
    out_config = packed_config(src.config, linears, report.ragged, config.act_order) if config.format == "packed" else None
    record = record or Record("quantize", config.model_dump(mode="json"), seed=seed)
    record.add_input(src.folder, src.files, src.provenance)
    writer_args = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with CheckpointWriter(dest, force=force, source=src.folder, config=out_config, record=record, **writer_args) as writer:
        if config.calibrated:
            if calib_tokens is None:
                raise WeightsmithError(None, f"{config.method} needs calibration tokens")
            _layerwise(src, writer, config, linears, calib_tokens, report, progress, device)
        else:
            _streaming(src, writer, config, linears, report, progress)
        record.figures.update(report.figures())
    return report


def _rtn(w: torch.Tensor, grid: QuantGrid, clip: bool, dtype: torch.dtype, importance: torch.Tensor | None = None) -> QuantizedTensor:
    from compress.gguf.calibrated import GGUFGrid

    if isinstance(grid, GGUFGrid):  # llama.cpp's reference quantizer (its own scale search)
        from compress.gguf import quants

        return quants.quantize(w.to(dtype), grid.gtype, importance)
    w = w.to(dtype)
    ratios = mse_clip_search(w, grid, importance=importance) if clip else None
    return quantize(w, grid, ratios)


def _rtn_stored(src: Checkpoint, name: str, grid: QuantGrid, clip: bool, transposed: bool = False) -> QuantizedTensor:
    """RTN of the stored weight ``name`` (stored ``[in, out]`` when ``transposed``: quantized as its
    transpose, along the input dimension); a weight holding NaN or an infinity is refused by name."""
    w = src.get(name)
    require_finite(src, name, w)
    if transposed:
        w = w.t().contiguous()
    return _rtn(w, grid, clip, src.info(name).dtype)


def _streaming(src: Checkpoint, writer: CheckpointWriter, config: QuantizeConfig, linears: dict[str, LinearSettings], report: QuantReport, progress: Progress | None) -> None:
    names = src.names()
    arch = known_arch(src.config)
    for i, name in enumerate(names):
        module = module_of(name)
        if module in linears:
            flip = arch is not None and arch.stored_transposed(module)
            q = _rtn_stored(src, name, linears[module].grid, config.clip, flip)
            emit(writer, module, q, src.info(name).dtype, config.format, report, flip)
        else:
            writer.copy_from(src, name)
        if progress is not None:
            progress(i + 1, len(names), "rtn")


def _layerwise(
    src: Checkpoint,
    writer: CheckpointWriter,
    config: QuantizeConfig,
    linears: dict[str, LinearSettings],
    tokens: torch.Tensor,
    report: QuantReport,
    progress: Progress | None,
    device: str = "cpu",
) -> None:
    runner = LayerwiseRunner(src, tokens, batch_size=config.batch_size, dtype=calibration_dtype(config), device=device)
    arch = runner.arch
    layer_prefixes = tuple(arch.layer_prefix(i) for i in range(runner.num_layers))
    for name in src.names():
        if not name.startswith(layer_prefixes):
            module = module_of(name)
            if module in linears:  # a selected weight outside the decoder layers (e.g. lm_head): RTN
                q = _rtn_stored(src, name, linears[module].grid, config.clip)
                emit(writer, module, q, src.info(name).dtype, config.format, report)
            else:
                writer.copy_from(src, name)
    for step in runner:
        quantized = _quantize_layer(step, arch, src, config, linears, report)
        _write_layer(step, src, writer, quantized, config.format, report)
        if progress is not None:
            progress(step.index + 1, runner.num_layers, config.method)


def _quantize_layer(
    step: LayerStep, arch: Arch, src: Checkpoint, config: QuantizeConfig, linears: dict[str, LinearSettings], report: QuantReport
) -> dict[str, QuantizedTensor]:
    """Quantize every selected linear of one loaded layer; leaves the dequantized weights in the
    module so that the runner propagates the quantization error to the next layer."""
    from compress.gguf.calibrated import GGUFGrid

    mine = {lin: linears[step.prefix + lin] for lin in arch.linears if step.prefix + lin in linears}
    clip_inputs = _apply_awq(step, arch, config, mine) if any(s.method in SCALED for s in mine.values()) else {}
    # after AWQ's folding, so that awq_gptq's Hessians are those of the scaled inputs
    inputs = input_statistics(step, {lin: ("hessian",) for lin, s in mine.items() if s.method in GPTQ_QUANTIZER})
    quantized: dict[str, QuantizedTensor] = {}
    for names in _gptq_batches(mine, inputs, step.prefix, src):
        quantized.update(_gptq_together(step, names, inputs[names[0]].hessian, mine[names[0]].grid, config, src.info(f"{step.prefix}{names[0]}.weight").dtype, report))
    for lin, settings in mine.items():
        if lin in quantized:
            continue
        module = get_module(step.module, lin)
        dtype = src.info(f"{step.prefix}{lin}.weight").dtype
        w = module.weight.data
        if settings.method == "awq" and lin in clip_inputs and isinstance(settings.grid, GGUFGrid):
            # llama.cpp's importance-weighted quantizer with the scaled inputs' mean squares (its
            # imatrix), where AWQ's own clipping search has no GGUF counterpart
            x = clip_inputs[lin].reshape(-1, w.shape[1]).to(torch.float32)
            q = _rtn(w, settings.grid, False, dtype, importance=x.pow(2).mean(dim=0))
        elif settings.method == "awq" and lin in clip_inputs:
            q = quantize(w.to(dtype), settings.grid, awq_clip_ratios(w.to(dtype), clip_inputs[lin], settings.grid))
        else:
            q = _rtn(w, settings.grid, config.clip or settings.method == "awq", dtype)
        module.weight.data = dequantized(q).to(w.dtype)
        quantized[lin] = q
    return quantized


def dequantized(q) -> torch.Tensor:
    """The float weight of a quantized linear, on our grids or a GGUF type's."""
    from compress.gguf.quants import GGUFQuant, dequantize

    return dequantize(q) if isinstance(q, GGUFQuant) else q.dequantize()


def _gptq_batches(mine: dict[str, LinearSettings], inputs: LayerInputs, prefix: str, src: Checkpoint) -> list[list[str]]:
    """The GPTQ linears of a layer in batches that share one input (so one Hessian), grid and
    stored dtype: GPTQ treats every output row alike given the Hessian, so a batch is quantized as
    one stacked weight, one column sweep for q/k/v and one for gate/up."""
    batches: dict[tuple, list[str]] = {}
    for lin, settings in mine.items():
        if settings.method in GPTQ_QUANTIZER:
            key = (id(inputs[lin]), settings.grid, src.info(f"{prefix}{lin}.weight").dtype)
            batches.setdefault(key, []).append(lin)
    return list(batches.values())


#: ``keep_zeros: auto`` keeps a linear's zeros when at least this share of its weights is exactly 0:
#: trained dense weights hold almost none, a pruned linear holds its sparsity.
PRUNED_SHARE = 0.1


def zero_mask(w: torch.Tensor, keep_zeros: str) -> torch.Tensor | None:
    """The weights GPTQ must leave at exactly 0 (a pruned model's zeros), or None."""
    if keep_zeros == "no":
        return None
    mask = w == 0
    if keep_zeros == "auto" and float(mask.float().mean()) < PRUNED_SHARE:
        return None
    return mask if bool(mask.any()) else None


def _gptq_together(
    step: LayerStep, names: list[str], hessian: torch.Tensor, grid: QuantGrid, config: QuantizeConfig, dtype: torch.dtype, report: QuantReport
) -> dict[str, QuantizedTensor]:
    """GPTQ on the stacked weights of ``names`` (one Hessian), on our grid or a GGUF type's (block
    parameters weighted by the Hessian's diagonal, llama.cpp's importance matrix); each module gets
    its rows back, dequantized, so that the runner propagates the error."""
    from compress.gguf.calibrated import GGUFGrid, gptq_gguf, rows_of

    modules = [get_module(step.module, lin) for lin in names]
    w = torch.cat([m.weight.data.to(dtype) for m in modules])
    mask = zero_mask(w, config.keep_zeros)
    if isinstance(grid, GGUFGrid):
        if mask is not None:
            log.warning("%s: GPTQ on GGUF grids does not keep a pruned model's zeros; they are rounded like any weight", ", ".join(names))
        q, loss = gptq_gguf(w, hessian, grid, damp=config.damp, block_size=config.block_size, importance=torch.diagonal(hessian), act_order=config.act_order)
        rows = rows_of
    else:
        clip = hessian_clip_search(w, hessian, grid) if config.clip else None
        q, loss = gptq_quantize(w, hessian, grid, damp=config.damp, block_size=config.block_size, act_order=config.act_order, clip=clip, mask=mask)
        rows = type(q).rows
    report.gptq_loss += loss
    out: dict[str, QuantizedTensor] = {}
    start = 0
    for lin, module in zip(names, modules):
        stop = start + module.weight.shape[0]
        out[lin] = rows(q, start, stop)
        module.weight.data = dequantized(out[lin]).to(module.weight.dtype)
        start = stop
    return out


@torch.inference_mode()
def _apply_awq(step: LayerStep, arch: Arch, config: QuantizeConfig, mine: dict[str, LinearSettings]) -> dict[str, torch.Tensor]:
    """Search and fold AWQ scales for every scale group whose linears all use AWQ; returns the
    scaled inputs of each scaled linear (for the clipping search)."""
    groups = [g for g in arch.scale_groups if all(mine.get(lin) is not None and mine[lin].method in SCALED for lin in g.linears)]
    if not groups:
        return {}
    inputs: dict[str, list[torch.Tensor]] = {}
    block_calls: dict[str, list[tuple[tuple, dict]]] = {}
    hooks = []

    def record_call(key: str):
        def hook(_module, args, kwargs):
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            block_calls.setdefault(key, []).append((args[1:], rest))

        return hook

    for group in groups:
        if group.block:
            hooks.append(get_module(step.module, group.block).register_forward_pre_hook(record_call(group.block), with_kwargs=True))
    with input_hooks(step.module, tuple(g.linears[0] for g in groups), lambda name, x: inputs.setdefault(name, []).append(x)):
        for hidden, kwargs in layer_batches(step, config.awq_samples):
            step.module(hidden, **kwargs)
    for handle in hooks:
        handle.remove()
    scaled_inputs: dict[str, torch.Tensor] = {}
    for group in groups:
        x = torch.cat(inputs[group.linears[0]])
        grids = [mine[lin].grid for lin in group.linears]
        scaled_inputs.update(_awq_group(step, group, x, block_calls.get(group.block, []), grids, config.awq_grid, arch.norm_offset))
    return scaled_inputs


def _awq_group(step: LayerStep, group: ScaleGroup, x: torch.Tensor, calls: list[tuple[tuple, dict]], grid: list, n_grid: int, norm_offset: float = 0.0) -> dict[str, torch.Tensor]:
    prev = get_module(step.module, group.prev)
    mods = [get_module(step.module, lin) for lin in group.linears]
    part, parts = group.prev_rows
    width = prev.weight.shape[0] // parts
    rows = slice(part * width, (part + 1) * width)  # the rows of prev that produce the linears' input
    if group.needs_equal_width and width != mods[0].weight.shape[1]:
        return {}
    block = get_module(step.module, group.block) if group.block else mods[0]
    sizes = [h.shape[0] for h, _ in layer_batches(step)][: len(calls)] if calls else [x.shape[0]]

    def block_fn(inp: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        saved = [m.weight.data for m in mods]
        for m, w in zip(mods, weights):
            m.weight.data = w
        try:
            outs = []
            for part, (args, kwargs) in zip(inp.split(sizes), calls or [((), {})]):
                outs.append(layer_output(block(part, *args, **kwargs)))
            return torch.cat(outs)
        finally:
            for m, w in zip(mods, saved):
                m.weight.data = w

    s = search_awq_scales(x, [m.weight.data for m in mods], block_fn, grid, n_grid)
    for m in mods:
        m.weight.data = scale_input_channels(m.weight.data, s)
    if isinstance(prev, nn.Linear):
        prev.weight.data, new_bias = _fold_into_rows(prev.weight.data, prev.bias.data if prev.bias is not None else None, s, rows)
    else:
        prev.weight.data, new_bias = fold_scales_into_norm(prev.weight.data, s, prev.bias.data if getattr(prev, "bias", None) is not None else None, norm_offset)
    if new_bias is not None:
        prev.bias.data = new_bias
    x_scaled = x / s.to(x.dtype)
    return {lin: x_scaled for lin in group.linears}


def _fold_into_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`fold_scales_into_linear` on the output rows ``rows`` of a fused linear (the value rows of
    a qkv projection, the up rows of a gate_up projection); its other rows are unchanged."""
    if rows == slice(0, weight.shape[0]):
        return fold_scales_into_linear(weight, s, bias)
    part_weight, part_bias = fold_scales_into_linear(weight[rows], s, bias[rows] if bias is not None else None)
    weight = weight.clone()
    weight[rows] = part_weight
    if bias is not None:
        bias = bias.clone()
        bias[rows] = part_bias
    return weight, bias


def _write_layer(step: LayerStep, src: Checkpoint, writer: CheckpointWriter, quantized: dict[str, QuantizedTensor], fmt: str, report: QuantReport) -> None:
    """Write one layer: its quantized linears in the chosen format, its other parameters (norms AWQ may
    have rescaled) from the module, and any other stored tensor of the layer unchanged."""

    def emitter(lin: str, q: QuantizedTensor) -> Callable[[str, torch.dtype], None]:
        return lambda module, dtype: emit(writer, module, q, dtype, fmt, report, f"{lin}.weight" in step.transposed)

    write_layer(step, src, writer, {lin: emitter(lin, q) for lin, q in quantized.items()})


def calibration_dtype(config: QuantizeConfig) -> torch.dtype:
    """The dtype the layers run in during calibration. ``auto`` is float32: calibration runs on the
    CPU, where float32 matmuls are the fast ones unless the CPU has AMX (measured on an AVX512-BF16
    Xeon: 300 GFLOPS in float32 against 160 in bfloat16 for SmolLM2's layer shapes), and float32
    keeps the propagated activations free of rounding. Hessians and GPTQ's updates are always
    accumulated in float32."""
    if config.calib_dtype != "auto":
        from weightsmith.stformat import parse_torch_dtype

        return parse_torch_dtype(config.calib_dtype)
    return torch.float32


def calibration_tokens(ckpt: Checkpoint, config: QuantizeConfig, seed: int = 0) -> torch.Tensor:
    """``config.samples`` blocks of ``config.seq_len`` tokens of the calibration text, drawn by ``seed``."""
    from weightsmith.data import text_blocks
    from weightsmith.models import load_tokenizer
    from weightsmith.paths import asset, assets_dir

    path = Path(config.calib) if config.calib else asset(CALIB_ASSET)
    if path is None:
        raise WeightsmithError(assets_dir() / CALIB_ASSET, "default calibration text not found; pass --calib FILE")
    return text_blocks(load_tokenizer(ckpt.folder), path, config.seq_len, config.samples, seed)


def run(inputs: Sequence[Checkpoint], dest: Path, settings: QuantizeConfig, runtime: Runtime) -> Report:
    """The quantize pass as the registry runs it (:mod:`weightsmith.passes`)."""
    src = inputs[0]
    tokens = calibration_tokens(src, settings, runtime.seed) if settings.calibrated else None
    done = quantize_checkpoint(
        src,
        dest,
        settings,
        force=runtime.force,
        max_shard_size=runtime.max_shard_size,
        calib_tokens=tokens,
        progress=runtime.progress,
        seed=runtime.seed,
        device=runtime.device,
    )
    extra = {k: v for k, v in done.figures().items() if k != "bits_per_weight"}
    if done.ragged:
        extra["ragged_last_group"] = len(done.ragged)
    grid = settings.format if settings.gguf_mix else f"W{settings.bits} g{settings.group_size} {'sym' if settings.symmetric else 'asym'}"
    return Report("quantize", dest, bits_per_weight=done.bits_per_weight, extra=extra, title=f"{settings.method} {grid} ({settings.format})")
