"""The size of a recipe's output, computed before anything runs: from tensor headers and the grids.

A :class:`Layout` is what a checkpoint folder holds, without data: each tensor's name, dtype and shape
in the order it is stored, config.json, and the extra files a pass writes beside the weights (the GGUF
blocks of ``quantize --format gguf:TYPE``). :func:`estimate` opens the input's headers and chains
layout -> layout through each recipe step, the way each pass would write its output:

* **copy**: floating tensors cast to the dtype asked for;
* **quantize**: the linears :func:`compress.quantize.select_linears` picks (overrides, GGUF mixes and
  all), written ``dense``, ``packed`` (compressed-tensors ``pack-quantized``: int32 codes, scales, zero
  points when asymmetric, the shape; a ragged last group kept dense, as :func:`compress.quantize.emit`
  does) or ``gguf:TYPE`` (dense weights plus each linear's blocks in the extra file);
* **prune**: unstructured zeros keep the layout (SparseGPT with ``bits`` quantizes as above);
  structured pruning takes its widths from :func:`compress.prune.structured.plan_pruning` and its
  tensors from :func:`compress.prune.slicing.pruned_tensors`; ``format: sparse`` stores only the
  non-zeros, which depend on the values, so it is refused;
* **gguf** (export): the exporter's own plan (:func:`compress.gguf.export.plan`) gives every tensor's
  type and bytes, and the header is the one its writer (:func:`compress.gguf.export.gguf_writer`)
  writes, measured without tensor data.

Sizes are exact, byte for byte, because every file is laid out as the writer lays it out: tensors in
the order the pass writes them (calibrated passes write the tensors outside the decoder layers first,
then layer by layer), cut into shards at ``max_shard_size`` as :class:`weightsmith.checkpoint.CheckpointWriter`
cuts them, each shard's header encoded by the writer's own encoder with its reserved room.

The search calls this for every trial: keep one :class:`Sizer` per model, which caches the input's
headers and the bytes of the GGUF vocabulary's metadata (reading the tokenizer is the slow part), so
that an estimate then takes tens of milliseconds on SmolLM2-135M.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from weightsmith.checkpoint import DEFAULT_MAX_SHARD_SIZE, SINGLE_NAME, Checkpoint, CheckpointWriter, config_with_dtype
from weightsmith.errors import WeightsmithError
from weightsmith.stformat import DTYPES, encode_header, parse_dtype, read_header, torch_dtype

if TYPE_CHECKING:
    import torch

    from compress.config import QuantizeConfig
    from compress.gguf.config import GGUFExportConfig
    from compress.prune.config import PruneConfig
    from weightsmith.copying import CopySettings

__all__ = ["Estimate", "Layout", "Sizer", "StepEstimate", "TensorSpec", "estimate", "folder_files"]

#: The room CheckpointWriter reserves for each shard's header (its default, read from its signature so
#: that the two cannot drift apart).
HEADER_RESERVE: int = inspect.signature(CheckpointWriter.__init__).parameters["header_reserve"].default
#: The header metadata of every shard the writer writes.
SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor without its data: enough to write its header entry."""

    name: str
    #: the safetensors dtype name (``BF16``, ``I32``...)
    st_dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.st_dtype].itemsize

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return torch_dtype(self.st_dtype)


@dataclass
class Layout:
    """What a checkpoint folder holds, from headers: the tensors in storage order and config.json,
    read through the same queries as :class:`weightsmith.checkpoint.Checkpoint` (``names``, ``info``,
    ``in``, ``config``, ``folder``) so that the passes' own planning functions take it as it is.

    ``folder`` is the real folder whose tokenizer files and config the output carries (the recipe's
    input: every pass copies them through); ``name`` is the name a GGUF export of it records
    (``general.name``) unless its settings give one: the input model's name all along the chain, as
    ``weightsmith run`` names the export (a single export names it after its input folder, the same).
    ``values`` holds the few integer tensors whose values the planning reads (a packed linear's
    ``weight_shape``); ``extra`` the extra files: file name -> (tensor, header note) in write order."""

    folder: Path
    name: str
    config: dict
    tensors: dict[str, TensorSpec]
    values: dict[str, tuple[int, ...]] = field(default_factory=dict)
    extra: dict[str, list[tuple[TensorSpec, str | None]]] = field(default_factory=dict)

    @classmethod
    def of(cls, ckpt: Checkpoint, name: str | None = None) -> Layout:
        """The layout of a checkpoint on disk (named ``name``, default its folder's name): its headers,
        its packed linears' shape tensors (two integers each, the only data read) and the header of
        its GGUF blocks file."""
        from compress.quantize import GGUF_BLOCKS

        tensors = {name: TensorSpec(name, ckpt.info(name).st_dtype, tuple(ckpt.info(name).shape)) for name in ckpt.names()}
        values = {
            name: tuple(int(v) for v in ckpt.get(name).flatten().tolist())
            for name, spec in tensors.items()
            if name.endswith(".weight_shape") and spec.st_dtype in ("I64", "I32") and spec.shape == (2,)
        }
        extra = {}
        blocks = ckpt.folder / GGUF_BLOCKS
        if blocks.is_file():
            header = read_header(blocks)
            entries = sorted(header.tensors.values(), key=lambda e: e.start)
            extra[GGUF_BLOCKS] = [(TensorSpec(e.name, e.dtype, e.shape), header.metadata.get(e.name)) for e in entries]
        return cls(ckpt.folder, ckpt.folder.name if name is None else name, dict(ckpt.config), tensors, values, extra)

    def names(self) -> list[str]:
        """Tensor names in storage order."""
        return list(self.tensors)

    def info(self, name: str) -> TensorSpec:
        try:
            return self.tensors[name]
        except KeyError:
            raise WeightsmithError(self.folder, f"no tensor named {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """The value of a tensor the layout knows (a packed linear's shape); no other data exists."""
        import torch

        if name not in self.values:
            raise WeightsmithError(self.folder, f"tensor {name!r}: the size estimate reads no tensor data")
        return torch.tensor(self.values[name], dtype=torch.int64)


@dataclass(frozen=True)
class StepEstimate:
    """One step's output as the pass would write it: each file's bytes, and the figures its
    :class:`weightsmith.passes.Report` gives (logical parameters, bits per weight of the quantized
    linears, None when the pass quantizes nothing)."""

    pass_name: str
    #: file name -> bytes: the shards and extra files of a folder, or the one GGUF file
    files: dict[str, int]
    parameters: int
    bits_per_weight: float | None = None

    @property
    def bytes(self) -> int:
        """The output's size on disk: every ``*.safetensors`` file of a folder (headers included), or
        the GGUF file."""
        return sum(self.files.values())


@dataclass(frozen=True)
class Estimate:
    """The chain of step estimates; the figures of the final output."""

    steps: list[StepEstimate]

    @property
    def bytes(self) -> int:
        return self.steps[-1].bytes

    @property
    def parameters(self) -> int:
        return self.steps[-1].parameters

    @property
    def bits_per_weight(self) -> float | None:
        """Bits per weight of the quantized linears as the last step that quantized reports them."""
        return next((s.bits_per_weight for s in reversed(self.steps) if s.bits_per_weight is not None), None)


class _Output:
    """A folder being laid out, as :class:`weightsmith.checkpoint.CheckpointWriter` would write it."""

    def __init__(self, src: Layout) -> None:
        self.src = src
        self.tensors: dict[str, TensorSpec] = {}
        self.values: dict[str, tuple[int, ...]] = {}
        self.extra: dict[str, list[tuple[TensorSpec, str | None]]] = {}

    def add(self, name: str, st_dtype: str, shape: Sequence[int], value: tuple[int, ...] | None = None) -> None:
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} written twice")
        self.tensors[name] = TensorSpec(name, st_dtype, tuple(int(d) for d in shape))
        if value is not None:
            self.values[name] = value

    def copy(self, name: str, as_name: str | None = None) -> None:
        spec = self.src.info(name)
        self.add(as_name or name, spec.st_dtype, spec.shape, self.src.values.get(name))

    def add_extra(self, fname: str, name: str, shape: Sequence[int], note: str | None) -> None:
        self.extra.setdefault(fname, []).append((TensorSpec(name, "U8", tuple(shape)), note))

    def layout(self, config: dict) -> Layout:
        return Layout(self.src.folder, self.src.name, config, self.tensors, self.values, self.extra)


def folder_files(layout: Layout, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> dict[str, int]:
    """File name -> bytes of every safetensors file of ``layout`` written as a checkpoint folder: the
    shards, cut where :class:`~weightsmith.checkpoint.CheckpointWriter` cuts them, and the extra files."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in layout.tensors.values():
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    files = {fname: _file_bytes(specs, SHARD_METADATA) for fname, specs in zip(names, shards)}
    for fname, entries in layout.extra.items():
        notes = {spec.name: note for spec, note in entries if note is not None}
        files[fname] = _file_bytes([spec for spec, _ in entries], {**SHARD_METADATA, **notes})
    return files


def _file_bytes(specs: Iterable[TensorSpec], metadata: dict[str, str]) -> int:
    """Bytes of one safetensors file: the header the writer encodes, then the data."""
    entries = []
    offset = 0
    for spec in specs:
        entries.append((spec.name, spec.st_dtype, spec.shape, offset, offset + spec.nbytes))
        offset += spec.nbytes
    reserve = HEADER_RESERVE + (-HEADER_RESERVE) % 8
    return len(encode_header(entries, metadata, reserve=reserve)) + offset


class _Bits:
    """The quantized linears' storage bits, summed as :class:`compress.quantize.QuantReport` sums them."""

    def __init__(self) -> None:
        self.params = 0
        self.bits = 0.0

    def add(self, n: int, stored_bits: float) -> None:
        self.params += n
        self.bits += stored_bits * n

    @property
    def per_weight(self) -> float:
        return self.bits / max(self.params, 1)


def _packed_parts(module: str, grid: Any, out: int, inp: int, st_dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of one linear's ``pack-quantized`` tensors, in the order
    :func:`compress.pack.to_compressed_tensors` returns them (an act-order ``g_idx`` is never written:
    the quantize pass's act-order uses static groups)."""
    from compress.pack import packed_width

    groups = grid.n_groups(inp)
    parts = [
        (f"{module}.weight_packed", "I32", (out, packed_width(inp, grid.bits))),
        (f"{module}.weight_scale", st_dtype, (out, groups)),
        (f"{module}.weight_shape", "I64", (2,)),
    ]
    if not grid.symmetric:
        parts.append((f"{module}.weight_zero_point", "I32", (packed_width(out, grid.bits), groups)))
    return parts


def _emit(out: _Output, module: str, grid: Any, fmt: str, transposed: bool, bits: _Bits) -> None:
    """One quantized linear as :func:`compress.quantize.emit` writes it, and its storage bits."""
    from compress.gguf.calibrated import GGUFGrid
    from compress.gguf.quants import gguf_type
    from compress.pack import ragged_group_reason
    from compress.quantize import GGUF_BLOCKS

    stored = out.src.info(f"{module}.weight")
    rows, cols = stored.shape[::-1] if transposed else stored.shape
    if isinstance(grid, GGUFGrid):
        t = gguf_type(grid.gtype)
        out.add(f"{module}.weight", stored.st_dtype, (rows, cols))
        out.add_extra(GGUF_BLOCKS, f"{module}.weight", (rows, cols // t.block_size * t.type_size), t.name)
        bits.add(rows * cols, t.bits_per_weight)
        return
    parts = _packed_parts(module, grid, rows, cols, stored.st_dtype)
    packed_bits = 8 * sum(math.prod(shape) * DTYPES[dtype].itemsize for part, dtype, shape in parts if not part.endswith(".weight_shape")) / (rows * cols)
    if fmt == "dense" or ragged_group_reason(grid, cols) is not None:
        out.add(f"{module}.weight", stored.st_dtype, stored.shape)
        bits.add(rows * cols, 8 * DTYPES[stored.st_dtype].itemsize if fmt == "packed" else packed_bits)
        return
    for name, dtype, shape in parts:
        out.add(name, dtype, shape, (rows, cols) if name.endswith(".weight_shape") else None)
    bits.add(rows * cols, packed_bits)


def _layerwise_split(src: Layout) -> tuple[list[str], list[str]]:
    """How a calibrated pass (:class:`weightsmith.calibrate.LayerwiseRunner`) orders its writes: the
    tensors outside the decoder layers in storage order, then each layer's tensors in storage order."""
    from weightsmith.arch import arch_for

    arch = arch_for(src.config, src.folder / "config.json")
    layers = arch.num_layers(src.config)
    if layers is None:
        raise WeightsmithError(src.folder / "config.json", f"{arch.keys.layers} (the layer count) is missing")
    prefixes = [arch.layer_prefix(i) for i in range(layers)]
    names = src.names()
    outside = [n for n in names if not n.startswith(tuple(prefixes))]
    return outside, [n for prefix in prefixes for n in names if n.startswith(prefix)]


def _copy(src: Layout, settings: CopySettings) -> tuple[_Output, dict, float | None]:
    """The copy pass (:func:`weightsmith.checkpoint.copy_checkpoint`): floating tensors cast."""
    out = _Output(src)
    target = parse_dtype(settings.dtype) if settings.dtype else None
    for name in src.names():
        spec = src.info(name)
        if target is not None and spec.dtype.is_floating_point and spec.st_dtype != target:
            out.add(name, target, spec.shape)
        else:
            out.copy(name)
    config = src.config if target is None else config_with_dtype(src.config, target)
    return out, config, None


def _quantize(src: Layout, settings: QuantizeConfig) -> tuple[_Output, dict, float | None]:
    """The quantize pass (:func:`compress.quantize.quantize_checkpoint`)."""
    from compress.grid import QuantGrid
    from compress.pack import ragged_group_reason
    from compress.quantize import packed_config, select_linears
    from compress.targets import module_of
    from weightsmith.arch import known_arch

    linears = select_linears(src, settings)
    config = src.config
    if settings.format == "packed":
        ragged = sorted(m for m, s in linears.items() if isinstance(s.grid, QuantGrid) and ragged_group_reason(s.grid, src.info(f"{m}.weight").shape[1]))
        config = packed_config(src.config, linears, ragged, settings.act_order)
    arch = known_arch(src.config)
    out, bits = _Output(src), _Bits()
    outside, inside = _layerwise_split(src) if settings.calibrated else ([], src.names())
    layered = set(inside)
    for name in [*outside, *inside]:
        module = module_of(name)
        if module in linears:
            # outside the decoder layers (lm_head) a calibrated pass quantizes the weight as stored
            flip = name in layered and arch is not None and arch.stored_transposed(module)
            _emit(out, module, linears[module].grid, settings.format, flip, bits)
        else:
            out.copy(name)
    return out, config, bits.per_weight


def _prune(src: Layout, settings: PruneConfig) -> tuple[_Output, dict, float | None]:
    """The prune pass: structured (:mod:`compress.prune.structured`) or unstructured
    (:func:`compress.prune.unstructured.prune_checkpoint`)."""
    if settings.structured is not None:
        return _structured(src, settings)
    if settings.format == "sparse":
        raise WeightsmithError(
            None, "prune format: sparse stores only the non-zero weights, whose count depends on the values: its size cannot be estimated before running"
        )
    from compress.config import LinearSettings
    from compress.grid import QuantGrid
    from compress.prune.unstructured import select_targets
    from compress.quantize import packed_config
    from compress.targets import module_of
    from weightsmith.arch import known_arch

    targets = select_targets(src, settings)
    grid = None if settings.bits is None else QuantGrid(bits=settings.bits, symmetric=settings.symmetric, group_size=settings.group_size)
    config = src.config
    if settings.format == "packed" and grid is not None:
        config = packed_config(src.config, {m: LinearSettings("gptq", grid) for m in targets}, [], act_order=False)
    arch = known_arch(src.config)
    fmt = "packed" if settings.format == "packed" else "dense"
    out, bits = _Output(src), _Bits()
    # magnitude streams in storage order; Wanda and SparseGPT run layer by layer, and prune the weights
    # outside the decoder layers by magnitude (dense): only SparseGPT's layers quantize with bits
    outside, inside = _layerwise_split(src) if settings.method != "magnitude" else (src.names(), [])
    layered = set(inside)
    for name in [*outside, *inside]:
        module = module_of(name)
        if module in targets and grid is not None and name in layered:
            _emit(out, module, grid, fmt, arch is not None and arch.stored_transposed(module), bits)
        else:
            out.copy(name)
    return out, config, bits.per_weight if settings.bits is not None else None


def _structured(src: Layout, settings: PruneConfig) -> tuple[_Output, dict, float | None]:
    """Structured pruning: the widths :func:`compress.prune.structured.plan_pruning` keeps, the
    tensors :func:`compress.prune.slicing.pruned_tensors` writes. Which channels, groups and layers go
    depends on the data; their number does not, and every layer has the same shapes, so any choice
    of that many gives the same files (the layers dropped by count are taken from the end here)."""
    import torch

    from compress.prune.slicing import Choice, pruned_config, pruned_tensors
    from compress.prune.structured import plan_pruning

    assert settings.structured is not None
    plan = plan_pruning(src, settings.structured, settings.align)
    dropped = set(plan.drop) if isinstance(plan.drop, tuple) else set(range(plan.layers - plan.drop_count, plan.layers))
    choice = Choice([i for i in range(plan.layers) if i not in dropped])
    for i in choice.kept_layers:
        if plan.mlp_keep is not None:
            choice.channels[i] = torch.arange(plan.mlp_keep)
        if plan.groups_keep is not None:
            choice.groups[i] = torch.arange(plan.groups_keep)
    out = _Output(src)
    for name, new_name, cut in pruned_tensors(src, plan, choice):
        if cut is None:
            out.copy(name, as_name=new_name)
        else:
            dim, keep, _ = cut
            shape = list(src.info(name).shape)
            shape[dim] = len(keep)
            out.add(new_name, src.info(name).st_dtype, shape)
    return out, pruned_config(src, plan, choice), None


#: pass name -> how it lays out its output folder: (output, its config.json, bits per weight)
_FOLDER_PASSES: dict[str, Callable[[Layout, Any], tuple[_Output, dict, float | None]]] = {
    "copy": _copy,
    "quantize": _quantize,
    "prune": _prune,
}


class Sizer:
    """Estimates for one input model; caches its headers and its GGUF vocabulary's header bytes, so
    that estimating many recipes (a search's trials) costs milliseconds each."""

    def __init__(self, model: str | Path | Checkpoint, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
        from weightsmith.passes import open_input

        # named as a recipe names its input (a hub id's snapshot folder would be a commit hash)
        self.source = Layout.of(open_input(model), None if isinstance(model, Checkpoint) else Path(model).name)
        self.max_shard_size = max_shard_size
        self._vocab_bytes: dict[tuple[str, str, str], int] = {}

    def estimate(self, steps: Sequence[tuple[str, BaseModel]]) -> Estimate:
        """The size of what ``steps`` (as :func:`weightsmith.recipe.load_recipe` returns them) write
        from the model: each step's output files, parameters and bits per weight. A pass whose output
        cannot be known before running (a merge, a sparse format) is a :class:`WeightsmithError`."""
        from weightsmith.summary import logical_parameters

        if not steps:
            raise WeightsmithError(None, "a recipe needs at least one step")
        layout = self.source
        done: list[StepEstimate] = []
        for i, (name, settings) in enumerate(steps, start=1):
            if name == "gguf":
                if i < len(steps):
                    raise WeightsmithError(None, f"step {i} (gguf) writes a single file, which no later step can read; make it the last step")
                done.append(self._gguf(layout, settings))
                break
            if name not in _FOLDER_PASSES:
                raise WeightsmithError(None, f"step {i} ({name}): the size of its output is not estimated before running (estimated passes: {', '.join([*_FOLDER_PASSES, 'gguf'])})")
            out, config, bits = _FOLDER_PASSES[name](layout, settings)
            layout = out.layout(config)
            done.append(StepEstimate(name, folder_files(layout, self.max_shard_size), logical_parameters(layout), bits))
        return Estimate(done)

    def _gguf(self, src: Layout, settings: GGUFExportConfig) -> StepEstimate:
        """The GGUF export (:func:`compress.gguf.export.export_gguf`): its plan's tensors, each padded to
        the file's alignment, after the header its writer writes."""
        from gguf import GGUFWriter

        from compress.gguf.export import gguf_writer, plan
        from compress.gguf.metadata import hparams
        from compress.gguf.mixes import FLOAT_TYPES
        from compress.quantize import GGUF_BLOCKS

        blocks = {spec.name: note for spec, note in src.extra.get(GGUF_BLOCKS, []) if note is not None}
        arch, tensors = plan(src, settings, blocks)
        name = settings.name or src.name
        metadata = hparams(arch, src.config, src.folder / "config.json")
        header, align = _header_bytes(lambda path: gguf_writer(path, arch, settings, name, metadata, tensors))
        header += self._vocabulary(src, arch, settings, name)
        data = sum(GGUFWriter.ggml_pad(t.nbytes, align) for t in tensors)
        quantized = [t for t in tensors if t.gtype not in FLOAT_TYPES]
        q_params = sum(math.prod(t.shape) for t in quantized)
        bits = 8 * sum(t.nbytes for t in quantized) / q_params if q_params else None
        return StepEstimate("gguf", {"model.gguf": GGUFWriter.ggml_pad(header, align) + data}, sum(math.prod(t.shape) for t in tensors), bits)

    def _vocabulary(self, src: Layout, arch: str, settings: GGUFExportConfig, name: str) -> int:
        """Bytes the vocabulary's metadata adds to the GGUF header: key/value records are written one
        after another, so it is the header with them less the header without."""
        from compress.gguf.export import gguf_writer
        from compress.gguf.vocab import read_vocab

        key = (str(src.folder.resolve()), arch, json.dumps(src.config, sort_keys=True, default=str))
        if key not in self._vocab_bytes:
            items = read_vocab(src.folder, src.config).items()
            with_vocab, _ = _header_bytes(lambda path: gguf_writer(path, arch, settings, name, items, []))
            without, _ = _header_bytes(lambda path: gguf_writer(path, arch, settings, name, [], []))
            self._vocab_bytes[key] = with_vocab - without
        return self._vocab_bytes[key]


def _header_bytes(build: Callable[[Path], Any]) -> tuple[int, int]:
    """(bytes, data alignment) of the header, metadata and tensor table a gguf writer built by
    ``build(path)`` writes, measured by writing them (no tensor data) to a temporary file."""
    with tempfile.TemporaryDirectory(prefix="weightsmith-sizing-") as tmp:
        path = Path(tmp) / "header.gguf"
        writer = build(path)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        return os.path.getsize(path), writer.data_alignment


def estimate(model_folder: str | Path | Checkpoint, steps: Sequence[tuple[str, BaseModel]], *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Estimate:
    """The exact size of what ``steps`` write from ``model_folder``, from headers only: see
    :class:`Sizer` (keep one to estimate many recipes of the same model)."""
    return Sizer(model_folder, max_shard_size=max_shard_size).estimate(steps)
