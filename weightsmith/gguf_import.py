"""GGUF file -> safetensors checkpoint folder, so that GGUF models can enter every pass.

transformers reads the GGUF (architecture, config, tokenizer, and weights dequantized from any GGUF
block type it knows); we write the weights with our own writer, in the asked dtype.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from weightsmith.checkpoint import CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.provenance import Record

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Refuse a path that is not a GGUF file before handing it to a parser."""
    if not path.is_file():
        raise WeightsmithError(path, "no such file")
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise WeightsmithError(path, "not a GGUF file (wrong magic bytes)")


def convert_gguf(
    gguf_path: str | Path,
    dest: str | Path,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: int | None = None,
) -> Path:
    """Convert ``gguf_path`` into the checkpoint folder ``dest`` (weights cast to ``dtype``,
    default bfloat16)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if dtype is None else dtype

    gguf_path = Path(gguf_path)
    check_gguf(gguf_path)
    folder, name = gguf_path.parent, gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - the GGUF parser raises many kinds of errors
        raise WeightsmithError(gguf_path, f"cannot read as a GGUF model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    record = Record("convert", {"source": gguf_path.name, "dtype": str(dtype).removeprefix("torch.")})
    record.add_input(gguf_path.parent, [gguf_path], None)
    writer_args = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with tempfile.TemporaryDirectory(prefix="weightsmith-gguf-") as side:
        side_dir = Path(side)
        config.dtype = dtype
        config.save_pretrained(side_dir)
        tokenizer.save_pretrained(side_dir)
        config_doc = json.loads((side_dir / "config.json").read_text())
        config_doc["architectures"] = [type(model).__name__]
        with CheckpointWriter(dest, force=force, source=side_dir, config=config_doc, record=record, **writer_args) as writer:
            for tensor_name, tensor in state.items():
                writer.add(tensor_name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    log.info("converted %s -> %s", gguf_path, dest)
    return Path(dest)
