"""Structured pruning (the prune pass with ``structured``): remove a share of the MLP channels, a
share of the key/value head groups and decoder layers, so the model really gets smaller and still
loads with plain ``AutoModelForCausalLM.from_pretrained``.

Minitron's width pruning (https://arxiv.org/abs/2407.14679) and ShortGPT's depth pruning
(https://arxiv.org/abs/2403.03853), in three steps:

1. **plan**: the request as counts (the same MLP width, a multiple of ``align``, and the same number
   of key/value groups in every layer), refused with one line when it cannot be expressed;
2. **measure**: importance of each layer's channels and groups (:mod:`compress.prune.importance`)
   and each layer's block influence. Magnitude importance reads the weights only; activation
   importance and block influence run the model on calibration text one layer at a time
   (:class:`weightsmith.calibrate.LayerwiseRunner`), all in one pass over the unpruned model, as both
   papers measure it;
3. **write**: each layer keeps its own most important channels and groups; the least influential
   layers (or the listed ones) go; the checkpoint is written tensor by tensor as slices
   (:mod:`compress.prune.slicing`).

Under grouped-query attention a key/value head and the query heads that read it are removed
together, so every layer keeps ``heads / kv_heads`` query heads per key/value head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from compress.prune.config import PruneConfig, StructuredSpec
from compress.prune.importance import (
    block_influence,
    channel_contribution,
    group_contribution,
    group_magnitude,
    keep_most,
    kept_groups,
    kept_width,
    least_influential,
    mlp_magnitude,
)
from compress.prune.slicing import Choice, Plan, layer_of, pruned_config, write_pruned
from weightsmith.arch import Arch, arch_for
from weightsmith.calibrate import get_module, layer_output, require_finite
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.passes import Report
from weightsmith.provenance import Record
from weightsmith.runtime import Runtime

__all__ = ["Scores", "choose", "measure", "plan_pruning", "run"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def plan_pruning(ckpt: Checkpoint, spec: StructuredSpec, align: int) -> Plan:
    """Check the request against the checkpoint and turn it into counts; a one-line
    :class:`WeightsmithError` when it cannot be done with uniform widths or would remove everything."""
    where = ckpt.folder / "config.json"
    config = ckpt.config
    arch = arch_for(config, where)
    model_type = str(config.get("model_type"))
    if config.get("quantization_config") is not None:
        raise WeightsmithError(where, "structured pruning slices dense weights; this checkpoint is quantized (quantization_config), prune it before quantizing")
    layers = arch.num_layers(config)
    if layers is None:
        raise WeightsmithError(where, f"{arch.keys.layers} (the layer count) is missing")
    stored = {found[0] for found in (layer_of(arch, name) for name in ckpt.names()) if found is not None}
    if stored != set(range(layers)):
        found = ", ".join(map(str, sorted(stored)[:8])) or "none"
        raise WeightsmithError(ckpt.folder, f"config.json says {layers} layers; the tensors named {arch.layers}.N. are for layers: {found}")
    st = arch.structure
    mlp_width = _mlp_width(arch, config, where, needed=bool(spec.mlp))
    mlp_keep = None
    if spec.mlp:
        if not st.cuts_mlp:
            raise WeightsmithError(where, f"structured mlp pruning is not possible for {model_type}: {st.mlp_refusal}")
        mlp_keep = kept_width(mlp_width, spec.mlp, align)
        if mlp_keep <= 0:
            raise WeightsmithError(where, f"mlp={spec.mlp:g} leaves no MLP channel: the width {mlp_width} has no positive multiple of align={align} at or below {(1 - spec.mlp) * mlp_width:g}")
    heads = arch.head_layout(config)
    groups_keep = None
    if spec.heads:
        if not st.cuts_heads:
            raise WeightsmithError(where, f"structured head pruning is not possible for {model_type}: {st.heads_refusal}")
        if heads.heads % heads.kv_heads:
            raise WeightsmithError(where, f"{heads.heads} heads do not split into {heads.kv_heads} key/value groups")
        groups_keep = kept_groups(heads.kv_heads, spec.heads)
        if groups_keep <= 0:
            raise WeightsmithError(
                where,
                f"heads={spec.heads:g} would remove all {heads.kv_heads} key/value head groups (whole groups are removed, at least the share asked for)",
            )
    drop: tuple[int, ...] | int
    if isinstance(spec.layers, int):
        drop = spec.layers
        if drop >= layers:
            raise WeightsmithError(where, f"layers={drop} would remove every one of the {layers} layers")
    else:
        outside = [i for i in spec.layers if i >= layers]
        if outside:
            raise WeightsmithError(where, f"layer index {outside[0]} is out of range: the model has {layers} layers (0..{layers - 1})")
        if len(spec.layers) == layers:
            raise WeightsmithError(where, f"layers={sorted(spec.layers)} would remove every one of the {layers} layers")
        drop = tuple(sorted(spec.layers))
    return Plan(arch, model_type, layers, mlp_width, heads, mlp_keep, groups_keep, drop)


def _mlp_width(arch: Arch, config: dict, where: Path, needed: bool) -> int:
    """The MLP width config.json gives (0 when it gives none and the MLP is not cut)."""
    value = config.get(arch.keys.mlp_width)
    if isinstance(value, list):
        raise WeightsmithError(where, f"{arch.keys.mlp_width} differs between layers; structured pruning keeps one width for all layers")
    if value is None and arch.keys.mlp_width_default is None:
        if needed:
            raise WeightsmithError(where, f"{arch.keys.mlp_width} (the MLP width) is missing")
        return 0
    return arch.mlp_width(config)


@dataclass
class Scores:
    """What was measured: per layer (input index) the importance of each MLP channel and each
    key/value group, and each layer's mean block influence (None when not measured)."""

    mlp: dict[int, Tensor] = field(default_factory=dict)
    groups: dict[int, Tensor] = field(default_factory=dict)
    influence: Tensor | None = None


def measure(src: Checkpoint, plan: Plan, settings: PruneConfig, runtime: Runtime) -> Scores:
    """Importance of the channels and groups of every layer that stays (every layer when the layers to
    drop are chosen by influence), and the block influence of every layer when it is needed."""
    scores = Scores()
    given = set(plan.drop) if isinstance(plan.drop, tuple) else set()
    width_layers = [i for i in range(plan.layers) if i not in given]
    cuts_width = plan.mlp_keep is not None or plan.groups_keep is not None
    by_activation = cuts_width and settings.importance == "activation"
    if by_activation or plan.drop_count:
        _calibrated(src, plan, settings, runtime, scores, width_layers if by_activation else [])
    if cuts_width and not by_activation:
        _magnitudes(src, plan, scores, width_layers, runtime.progress)
    return scores


def _calibrated(src: Checkpoint, plan: Plan, settings: PruneConfig, runtime: Runtime, scores: Scores, width_layers: list[int]) -> None:
    """One layer-by-layer pass over the calibration tokens: the activation importance of the layers in
    ``width_layers`` and, when layers are chosen by influence, every layer's block influence."""
    from compress.quantize import calibration_dtype, calibration_tokens
    from weightsmith.calibkit import input_statistics
    from weightsmith.calibrate import LayerwiseRunner

    st = plan.arch.structure
    tokens = calibration_tokens(src, settings, runtime.seed)
    runner = LayerwiseRunner(src, tokens, batch_size=settings.batch_size, dtype=calibration_dtype(settings), device=runtime.device)
    wanted: dict[str, tuple[str, ...]] = {}
    if plan.mlp_keep is not None:
        wanted.update({lin: ("norms",) for lin in st.mlp_cols})
    if plan.groups_keep is not None:
        wanted[st.attn_out] = ("hessian",)
    sums = [[0.0, 0] for _ in range(plan.layers)]
    hook = None
    try:
        for step in runner:
            if hook is not None:
                hook.remove()
                hook = None
            if step.index in width_layers:
                stats = input_statistics(step, wanted)
                if plan.mlp_keep is not None:
                    parts = [channel_contribution(stats[lin].square_sum, stats[lin].tokens, get_module(step.module, lin).weight.data) for lin in st.mlp_cols]
                    scores.mlp[step.index] = torch.stack(parts).square().sum(dim=0).sqrt().cpu()
                if plan.groups_keep is not None:
                    out = get_module(step.module, st.attn_out).weight.data
                    scores.groups[step.index] = group_contribution(stats[st.attn_out].hessian, out, plan.heads.kv_heads).cpu()
            if plan.drop_count:
                # the runner runs the layer on every batch right after this step: measure input vs output then
                hook = step.module.register_forward_hook(partial(_influence_hook, sums[step.index]), with_kwargs=True)
            if runtime.progress is not None:
                runtime.progress(step.index + 1, runner.num_layers, "importance")
    finally:
        if hook is not None:
            hook.remove()
    if plan.drop_count:
        if any(count == 0 for _, count in sums):
            raise RuntimeError("block influence: a layer ran on no calibration tokens")
        scores.influence = torch.tensor([total / count for total, count in sums], dtype=torch.float64)


def _influence_hook(acc: list, _module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    total, count = block_influence(hidden, layer_output(output))
    acc[0] += total
    acc[1] += count


def _with_bias(src: Checkpoint, module: str) -> Tensor:
    """``module``'s weight ``[out, in]`` with its bias (when stored) appended as a last column."""
    w = _finite(src, f"{module}.weight")
    if f"{module}.bias" in src:
        w = torch.cat([w.to(torch.float64), _finite(src, f"{module}.bias").to(torch.float64)[:, None]], dim=1)
    return w


def _finite(src: Checkpoint, name: str) -> Tensor:
    tensor = src.get(name)
    require_finite(src, name, tensor)
    return tensor


def _expect(src: Checkpoint, name: str, dim: int, size: int) -> None:
    shape = src.info(name).shape
    if len(shape) != 2 or shape[dim] != size:
        raise WeightsmithError(src.info(name).file, f"tensor {name!r} has shape {shape}; config.json implies {size} along dimension {dim}")


def _magnitudes(src: Checkpoint, plan: Plan, scores: Scores, layers: list[int], progress: Progress | None) -> None:
    """Magnitude importance of the layers' channels and groups, from the stored weights."""
    st, h = plan.arch.structure, plan.heads
    for n, i in enumerate(layers):
        prefix = plan.arch.layer_prefix(i)
        if plan.mlp_keep is not None:
            for lin in st.mlp_rows:
                _expect(src, f"{prefix}{lin}.weight", 0, plan.mlp_width)
            for lin in st.mlp_cols:
                _expect(src, f"{prefix}{lin}.weight", 1, plan.mlp_width)
            rows = [_with_bias(src, prefix + lin) for lin in st.mlp_rows]
            cols = [_finite(src, f"{prefix}{lin}.weight") for lin in st.mlp_cols]
            scores.mlp[i] = mlp_magnitude(rows, cols)
        if plan.groups_keep is not None:
            _expect(src, f"{prefix}{st.value}.weight", 0, h.kv_heads * h.head_dim)
            _expect(src, f"{prefix}{st.attn_out}.weight", 1, h.heads * h.head_dim)
            value = _with_bias(src, prefix + st.value)
            out = _finite(src, f"{prefix}{st.attn_out}.weight")
            scores.groups[i] = group_magnitude(value, out, h.kv_heads)
        if progress is not None:
            progress(n + 1, len(layers), "importance")


def choose(plan: Plan, scores: Scores) -> Choice:
    """The layers that stay, and in each the channels and groups it keeps (its most important ones)."""
    if plan.drop_count:
        if scores.influence is None:
            raise RuntimeError("layers are chosen by block influence, which was not measured")
        dropped = set(least_influential(scores.influence, plan.drop_count))
    else:
        dropped = set(plan.drop) if isinstance(plan.drop, tuple) else set()
    kept = [i for i in range(plan.layers) if i not in dropped]
    choice = Choice(kept)
    for i in kept:
        if plan.mlp_keep is not None:
            choice.channels[i] = keep_most(scores.mlp[i], plan.mlp_keep)
        if plan.groups_keep is not None:
            choice.groups[i] = keep_most(scores.groups[i], plan.groups_keep)
    return choice


def _removed(kept: Tensor, total: int) -> list[int]:
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten().tolist()


def _figures(plan: Plan, choice: Choice, scores: Scores, before: int, after: int) -> dict:
    """weightsmith.json's figures: sizes before and after, and exactly what was removed (layer indices
    are the input model's)."""
    h = plan.heads
    kv_after = plan.groups_keep if plan.groups_keep is not None else h.kv_heads
    figures: dict = {
        "parameters_before": before,
        "parameters": after,
        "mlp_width": [plan.mlp_width, plan.mlp_keep if plan.mlp_keep is not None else plan.mlp_width],
        "heads": [h.heads, kv_after * plan.group_size],
        "kv_heads": [h.kv_heads, kv_after],
        "layers": [plan.layers, len(choice.kept_layers)],
        "removed": {
            "layers": [i for i in range(plan.layers) if i not in choice.kept_layers],
            "mlp_channels": {str(i): _removed(k, plan.mlp_width) for i, k in choice.channels.items()},
            "kv_groups": {str(i): _removed(k, h.kv_heads) for i, k in choice.groups.items()},
        },
    }
    if scores.influence is not None:
        figures["block_influence"] = [round(float(v), 6) for v in scores.influence]
    return figures


def _title(settings: PruneConfig, plan: Plan) -> str:
    measured = []
    if plan.mlp_keep is not None or plan.groups_keep is not None:
        measured.append(settings.importance)
    if plan.drop_count:
        measured.append("block influence")
    return f"structured {settings.structured}" + (f" ({', '.join(measured)})" if measured else "")


def run(inputs: Sequence[Checkpoint], dest: Path, settings: PruneConfig, runtime: Runtime) -> Report:
    """Structured pruning of ``inputs[0]`` into ``dest`` (the prune pass when ``settings.structured``
    is set)."""
    if settings.structured is None:
        raise WeightsmithError(None, "structured pruning needs --structured (mlp=SHARE,heads=SHARE,layers=N)")
    src = inputs[0]
    plan = plan_pruning(src, settings.structured, settings.align)
    scores = measure(src, plan, settings, runtime)
    choice = choose(plan, scores)
    before = src.num_parameters
    record = Record("prune", settings.model_dump(mode="json"), seed=runtime.seed)
    record.add_input(src.folder, src.files, src.provenance)
    config = pruned_config(src, plan, choice)
    with CheckpointWriter(dest, force=runtime.force, max_shard_size=runtime.max_shard_size, source=src.folder, config=config, record=record) as writer:
        after = write_pruned(src, writer, plan, choice, runtime.progress)
        figures = _figures(plan, choice, scores, before, after)
        record.figures.update(figures)
    extra = {
        "parameters_before": before,
        "mlp_width": "{}->{}".format(*figures["mlp_width"]),
        "kv_heads": "{}->{}".format(*figures["kv_heads"]),
        "layers": "{}->{}".format(*figures["layers"]),
    }
    log.info("structured pruning: %d -> %d parameters", before, after)
    return Report("prune", dest, parameters=after, extra=extra, title=_title(settings, plan))
