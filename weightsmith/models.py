"""Resolving a model argument (folder, GGUF file or hub id) and loading it with transformers."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from weightsmith.errors import WeightsmithError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: What we fetch of a hub repository: safetensors weights, configuration, tokenizer. Never pickle.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]

#: Warnings transformers gives about a load we make that way on purpose, as (category, message
#: pattern): passing ``CompressedTensorsConfig(dequantize=True)`` for a packed checkpoint, whose
#: config.json declares its own ``quantization_config``, is reported as a conflict of the two.
EXPECTED_LOAD_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"You passed `quantization_config` or equivalent parameters to `from_pretrained`"),
)


@contextlib.contextmanager
def expected_load_warnings_silenced() -> Iterator[None]:
    """Within the block, the warnings of :data:`EXPECTED_LOAD_WARNINGS` are dropped; the filters in
    force before are restored after it, and every other warning passes as before."""
    with warnings.catch_warnings():
        for category, pattern in EXPECTED_LOAD_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        yield

def resolve(spec: str | Path) -> Path:
    """A local checkpoint folder as is; a hub id (``HuggingFaceTB/SmolLM2-135M``) fetched with
    huggingface_hub (safetensors and config only) into its cache."""
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    if HUB_ID.match(text):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
        except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
            raise WeightsmithError(text, f"not a local folder, and fetching it from the hub failed: {str(exc).splitlines()[0]}") from None
    raise WeightsmithError(text, "no such file or folder")


def load_model(folder: Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """A transformers causal LM from a checkpoint folder (float32 unless ``dtype``), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype

    extra = {}
    if _quant_method(folder) == "compressed-tensors" and not _all_symmetric(folder):
        # Asymmetric packed checkpoints are decompressed to dense weights on load: compressed-tensors
        # 0.20 cannot load asymmetric pack-quantized weights compressed (its zero-point placeholder is
        # unpacked). Symmetric ones load compressed and are decompressed module by module with each
        # module's own scheme; transformers' dequantize-on-load path applies the first config group's
        # scheme to every module, which breaks mixed-precision checkpoints (a budget search's).
        from transformers import CompressedTensorsConfig

        extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        with expected_load_warnings_silenced():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsmithError(folder, f"transformers cannot load it: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()


def _quantization_config(folder: Path) -> dict:
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) else {}


def _quant_method(folder: Path) -> str | None:
    return _quantization_config(folder).get("quant_method")


def _all_symmetric(folder: Path) -> bool:
    """Whether every config group of a compressed-tensors checkpoint quantizes its weights symmetrically."""
    groups = _quantization_config(folder).get("config_groups") or {}
    return all(isinstance(g, dict) and (g.get("weights") or {}).get("symmetric", True) is True for g in groups.values())


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsmithError(folder, f"no usable tokenizer: {str(exc).splitlines()[0]}") from None
