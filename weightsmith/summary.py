"""What a checkpoint is, from its headers and config alone (``weightsmith inspect``)."""

from __future__ import annotations

from collections import defaultdict

from weightsmith.checkpoint import Checkpoint


def summarize(ckpt: Checkpoint, top: int = 10) -> dict:
    """Architecture, layer count, parameter count, dtype mix, size, largest tensors and the
    quantization config, read without touching tensor data."""
    config = ckpt.config
    mix: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for info in ckpt.tensors.values():
        entry = mix[str(info.dtype).removeprefix("torch.")]
        entry["tensors"] += 1
        entry["parameters"] += info.numel
        entry["bytes"] += info.nbytes
    largest = sorted(ckpt.tensors.values(), key=lambda t: (-t.nbytes, t.name))[:top]
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
        "largest": [
            {"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "bytes": t.nbytes}
            for t in largest
        ],
        "quantization_config": config.get("quantization_config"),
    }
