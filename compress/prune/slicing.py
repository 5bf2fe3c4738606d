"""Structured pruning's output: the checkpoint rewritten tensor by tensor with the chosen MLP channels,
key/value head groups and decoder layers removed, and config.json with the new widths.

Which tensors are sliced, along which dimension, comes from the architecture table
(:class:`weightsmith.arch.Structure`); every other tensor of a kept layer is copied under its new
layer number, file to file, and tensors outside the layers are copied unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from compress.prune.importance import group_rows
from weightsmith.arch import Arch, HeadLayout
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.errors import WeightsmithError

__all__ = ["Choice", "Plan", "layer_of", "pruned_config", "pruned_tensors", "write_pruned"]


@dataclass(frozen=True)
class Plan:
    """What a request removes, as counts, checked against the checkpoint's config. ``mlp_keep`` /
    ``groups_keep``: channels / key/value groups every layer keeps (None: that axis is not cut);
    ``drop``: the layer indices to remove, or how many to choose by block influence."""

    arch: Arch
    model_type: str
    layers: int
    mlp_width: int
    heads: HeadLayout
    mlp_keep: int | None = None
    groups_keep: int | None = None
    drop: tuple[int, ...] | int = ()

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads.heads // self.heads.kv_heads

    @property
    def drop_count(self) -> int:
        """Layers to choose by block influence (0 when the indices are given)."""
        return self.drop if isinstance(self.drop, int) else 0


@dataclass
class Choice:
    """What is removed: ``kept_layers`` (input indices, ascending; their new numbers are their
    positions), and per kept layer the kept MLP channels and key/value groups (ascending indices)."""

    kept_layers: list[int]
    channels: dict[int, Tensor] = field(default_factory=dict)
    groups: dict[int, Tensor] = field(default_factory=dict)


def layer_of(arch: Arch, name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "mlp.up_proj.weight")``; None outside the layers."""
    suffix = arch.layer_suffix(name)
    if suffix is None:
        return None
    index = name[len(arch.layers) + 1 :].partition(".")[0]
    return int(index), suffix


def _cut(plan: Plan, choice: Choice, index: int, local: str) -> tuple[int, Tensor, int] | None:
    """How tensor ``local`` of layer ``index`` is sliced: (dimension, kept indices, its expected size
    along that dimension), or None when it is kept whole."""
    st = plan.arch.structure
    module, _, param = local.rpartition(".")
    channels = choice.channels.get(index)
    if channels is not None:
        if module in st.mlp_rows:
            return 0, channels, plan.mlp_width
        if module in st.mlp_cols and param == "weight":
            return 1, channels, plan.mlp_width
    groups = choice.groups.get(index)
    if groups is not None:
        h = plan.heads
        if module == st.query:
            return 0, group_rows(groups, plan.group_size * h.head_dim), h.heads * h.head_dim
        if module in (st.key, st.value):
            return 0, group_rows(groups, h.head_dim), h.kv_heads * h.head_dim
        if module == st.attn_out and param == "weight":
            return 1, group_rows(groups, plan.group_size * h.head_dim), h.heads * h.head_dim
    return None


def pruned_tensors(src: Checkpoint, plan: Plan, choice: Choice) -> Iterator[tuple[str, str, tuple[int, Tensor, int] | None]]:
    """Every tensor the pruned checkpoint holds, in the order it is written (``src``'s storage order):
    (source name, output name, how it is sliced as :func:`_cut` says, None when copied whole). Reads
    headers only, so the size estimate (:mod:`weightsmith.sizing`) walks the same tensors."""
    renumber = {old: new for new, old in enumerate(choice.kept_layers)}
    for name in src.names():
        where = layer_of(plan.arch, name)
        if where is None:
            yield name, name, None
        elif where[0] in renumber:
            index, local = where
            yield name, plan.arch.layer_prefix(renumber[index]) + local, _cut(plan, choice, index, local)


def write_pruned(src: Checkpoint, writer: CheckpointWriter, plan: Plan, choice: Choice, progress: Callable[[int, int, str], None] | None = None) -> int:
    """Write ``src`` without what ``choice`` removes, tensor by tensor in storage order; returns the
    number of parameters written."""
    tensors = list(pruned_tensors(src, plan, choice))
    written = 0
    for n, (name, new_name, cut) in enumerate(tensors):
        if cut is None:
            writer.copy_from(src, name, as_name=new_name)
            written += src.info(name).numel
        else:
            dim, keep, size = cut
            info = src.info(name)
            if len(info.shape) <= dim or info.shape[dim] != size:
                raise WeightsmithError(info.file, f"tensor {name!r} has shape {info.shape}; config.json implies {size} along dimension {dim}")
            sliced = src.get(name).index_select(dim, keep).contiguous()
            writer.add(new_name, sliced)
            written += sliced.numel()
        if progress is not None:
            progress(n + 1, len(tensors), "write")
    return written


def _derived(folder: Path, key: str) -> object:
    """The value transformers derives for a config key that config.json leaves out (Qwen2 computes
    ``layer_types`` from ``max_window_layers``)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(folder), key, None)


def pruned_config(src: Checkpoint, plan: Plan, choice: Choice) -> dict:
    """config.json of the pruned model: the new MLP width, head counts with an explicit head width
    (Llama otherwise derives it from hidden / heads), layer count, and per-layer lists trimmed to the
    kept layers."""
    keys = plan.arch.keys
    config = dict(src.config)
    if plan.mlp_keep is not None:
        config[keys.mlp_width] = plan.mlp_keep
    if plan.groups_keep is not None:
        if keys.kv_heads is None:
            raise WeightsmithError(src.folder / "config.json", f"{plan.model_type} has no key/value head count to rewrite")
        config[keys.heads] = plan.groups_keep * plan.group_size
        config[keys.kv_heads] = plan.groups_keep
        config[keys.head_dim] = plan.heads.head_dim
    if len(choice.kept_layers) != plan.layers:
        config[keys.layers] = len(choice.kept_layers)
        for key in keys.per_layer:
            values = config[key] if config.get(key) is not None else _derived(src.folder, key)
            if values is None:
                continue
            if not isinstance(values, list) or len(values) != plan.layers:
                raise WeightsmithError(src.folder / "config.json", f"{key} should list one entry per layer ({plan.layers}), got {values!r}")
            config[key] = [values[i] for i in choice.kept_layers]
    return config
