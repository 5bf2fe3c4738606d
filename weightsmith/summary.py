"""What a checkpoint is, from its headers and config alone (``weightsmith inspect``).

Parameters are logical weights: a linear stored in compressed-tensors' ``pack-quantized`` layout
(compress/pack.py: ``{module}.weight_packed`` int32 codes, ``weight_scale``, ``weight_zero_point``,
``weight_g_idx``, and ``weight_shape`` holding the logical ``(out, in)``) counts as its ``out * in``
weights; the int32 words, scales and zero points are its storage, reported as bytes and bits per
weight.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError

#: Suffixes of the tensors that store one packed linear; ``weight_shape`` is metadata (two
#: integers), counted neither as a parameter nor, like compress.grid's bits per weight, as storage.
PACKED_STORAGE = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")
PACKED_SHAPE = "weight_shape"


@dataclass(frozen=True)
class PackedStats:
    """The packed linears of a checkpoint: how many, their logical weights, their storage bytes."""

    linears: int = 0
    parameters: int = 0
    bytes: int = 0

    @property
    def bits_per_weight(self) -> float | None:
        """Storage bits per logical weight of the packed linears; None when there are none."""
        return 8 * self.bytes / self.parameters if self.parameters else None


def packed_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, int]]:
    """Module name -> logical ``(out, in)`` of every linear stored packed (a ``weight_packed``
    with its ``weight_shape``); reads only the two-integer shape tensors."""
    shapes = {}
    for name in ckpt.tensors:
        module, _, part = name.rpartition(".")
        shape_name = f"{module}.{PACKED_SHAPE}"
        if part != "weight_packed" or shape_name not in ckpt.tensors:
            continue
        values = ckpt.get(shape_name).flatten().tolist()
        if len(values) != 2 or any(not isinstance(v, int) or v <= 0 for v in values):
            raise WeightsmithError(ckpt.folder, f"{shape_name} must hold two positive integers, holds {values}")
        shapes[module] = (values[0], values[1])
    return shapes


def _packed_part(name: str, shapes: dict[str, tuple[int, int]]) -> str | None:
    """The layout suffix of ``name`` when it belongs to a packed linear, else None."""
    module, _, part = name.rpartition(".")
    return part if module in shapes and (part in PACKED_STORAGE or part == PACKED_SHAPE) else None


def logical_parameters(ckpt: Checkpoint) -> int:
    """Weights the model computes with: every tensor's elements, except that a packed linear counts
    its logical ``out * in`` instead of its storage."""
    shapes = packed_shapes(ckpt)
    plain = sum(info.numel for name, info in ckpt.tensors.items() if _packed_part(name, shapes) is None)
    return plain + sum(out * inp for out, inp in shapes.values())


def packed_storage(ckpt: Checkpoint) -> PackedStats:
    """Count, logical weights and storage bytes of the packed linears."""
    shapes = packed_shapes(ckpt)
    stored = sum(info.nbytes for name, info in ckpt.tensors.items() if _packed_part(name, shapes) in PACKED_STORAGE)
    return PackedStats(linears=len(shapes), parameters=sum(out * inp for out, inp in shapes.values()), bytes=stored)


def summarize(ckpt: Checkpoint, top: int = 10) -> dict:
    """Architecture, layer count, logical parameter count, dtype mix of the stored tensors, size,
    the packed linears' storage, largest tensors and the quantization config, read from headers
    (and the packed linears' two-integer shape tensors)."""
    config = ckpt.config
    mix: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "elements": 0, "bytes": 0})
    for info in ckpt.tensors.values():
        entry = mix[str(info.dtype).removeprefix("torch.")]
        entry["tensors"] += 1
        entry["elements"] += info.numel
        entry["bytes"] += info.nbytes
    largest = sorted(ckpt.tensors.values(), key=lambda t: (-t.nbytes, t.name))[:top]
    packed = packed_storage(ckpt)
    return {
        "path": str(ckpt.folder),
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers", config.get("n_layer")),
        "hidden_size": config.get("hidden_size", config.get("n_embd")),
        "vocab_size": config.get("vocab_size"),
        "tensors": len(ckpt.tensors),
        "parameters": ckpt.num_parameters,
        "size_bytes": ckpt.file_bytes,
        "files": [f.name for f in ckpt.files],
        "dtypes": dict(sorted(mix.items())),
        "packed": None
        if not packed.linears
        else {
            "linears": packed.linears,
            "parameters": packed.parameters,
            "bytes": packed.bytes,
            "bits_per_weight": round(packed.bits_per_weight, 4),
        },
        "largest": [
            {"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "bytes": t.nbytes}
            for t in largest
        ],
        "quantization_config": config.get("quantization_config"),
    }
