"""What llama.cpp's own converter writes, recorded as small JSON fixtures for the GGUF exporter's tests.

Run:  .venv/bin/python bench/make_gguf_oracle.py [--out tests/fixtures/gguf_oracle] [--skip-smollm2]
(after ``bash bench/setup-llamacpp.sh``, which builds the peers venv and unpacks the converter).

llama.cpp version reflected: the ``vendor/llama.cpp`` of the llama-cpp-python 0.3.36 source
distribution on PyPI, ggml-org/llama.cpp@0c1e57098 (llama-cpp-python's changelog), llama.cpp
0.5.0, gguf-py 0.19.0. Its ``convert_hf_to_gguf.py`` runs in ``.venv-peers`` with its own gguf-py
on ``PYTHONPATH``; this script runs in our venv (it builds the tiny checkpoints with
``tests/conftest.py:make_tiny_llama`` and reads the results with the ``gguf`` package's reader).

Cases (one JSON file each in the fixture folder):

* ``tiny-llama-f32`` / ``tiny-llama-f16``: ``make_tiny_llama(folder / "tiny-llama", seed=0)``
  (hidden 32, 2 layers, 4 heads / 2 key-value heads, byte-level BPE of 320 tokens, untied).
* ``tiny-llama-tied-f16``: the same tensors without ``lm_head.weight`` and ``tie_word_embeddings``
  set in config.json.
* ``smollm2-135m-instruct-f16``: the real SmolLM2-135M-Instruct folder (the demo model: the bf16
  safetensors weightsmith made from SmolLM2-135M-Instruct.Q4_1.gguf, with its tokenizer). Its full f16 file stays
  out of git, at ``.peers/gguf/SmolLM2-135M-Instruct.llamacpp-f16.gguf`` (the bench's reference
  of llama.cpp's own conversion).

The tiny tokenizer is trained by the tests, so the converter cannot recognise its pre-tokenizer by
its hash (it raises). For those cases only, the converter runs with ``get_vocab_base_pre`` falling
back to ``"gpt-2"`` (the tiny tokenizer's pre-tokenizer is tokenizers' ByteLevel with the GPT-2
regex, which is what llama.cpp's ``gpt-2`` pre-tokenizer implements); the fixture lists that key
under ``patched``. SmolLM2 is converted without any patch.

Each fixture holds: every metadata key in file order with its GGUF value type and value (arrays
longer than :data:`LONG` items as length, sha256 and the first 5 items; see ``array_hash`` in the
file for the exact recipe); the tensors in file order with their GGUF dimensions (``ne``: fastest
first, the reverse of the numpy/torch shape), ggml type, offset in the data section and the sha256
of their bytes; the file's own size and sha256. ``tiny-checkpoint.json`` holds the sha256 of every
tensor of the tiny checkpoint itself (float32, its safetensors bytes), so a test can rebuild the
same model with the same seed and know it has the same input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOG = logging.getLogger("make_gguf_oracle")

LLAMA_CPP_SRC = ROOT / ".peers" / "llama.cpp" / "src"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SMOLLM2_F16 = ROOT / ".peers" / "gguf" / "SmolLM2-135M-Instruct.llamacpp-f16.gguf"
SOURCE = {
    "converter": "llama.cpp convert_hf_to_gguf.py",
    "llama_cpp": "ggml-org/llama.cpp@0c1e57098 (0.5.0), vendored in llama-cpp-python 0.3.36 (PyPI sdist)",
    "gguf_py": "0.19.0 (the vendored gguf-py)",
}
#: arrays longer than this are stored as length + sha256 + head
LONG = 16
HEAD = 5
ARRAY_HASH = "sha256 of json.dumps(values, ensure_ascii=False, separators=(',', ':')) encoded as UTF-8"
#: the pre-tokenizer name used when the converter does not know a tokenizer's hash (tiny cases only)
PRE_FALLBACK = "gpt-2"

#: run inside .venv-peers with llama.cpp's folder and its gguf-py on PYTHONPATH: llama.cpp's converter,
#: with an optional fallback for an unknown BPE pre-tokenizer hash (argv[1]: the fallback name or "",
#: the rest: the converter's own arguments)
CONVERT = r"""
import sys
fallback = sys.argv[1]
import conversion.base as base
if fallback:
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return fallback
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def array_digest(values: list[Any]) -> str:
    """The sha256 the fixtures give a long array (:data:`ARRAY_HASH`)."""
    return hashlib.sha256(json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    """numpy scalars and bytes as JSON values (floats exact: a float32 widened to a Python float)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item"):
        return value.item()
    return value


def describe_gguf(path: Path) -> dict[str, Any]:
    """Metadata (keys in file order with value types) and tensors (file order) of a GGUF file."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's own fields (version, counts), not key/value pairs
        kind = gguf.GGUFValueType(field.types[0]).name
        value = field.contents()
        if kind != "ARRAY":
            metadata[key] = {"type": kind, "value": _plain(value)}
            continue
        items = [_plain(v) for v in value]
        entry: dict[str, Any] = {"type": "ARRAY", "item_type": gguf.GGUFValueType(field.types[-1]).name, "length": len(items)}
        if len(items) > LONG:
            entry.update(sha256=array_digest(items), head=items[:HEAD])
        else:
            entry["value"] = items
        metadata[key] = entry
    tensors = []
    for t in reader.tensors:
        data = np.ascontiguousarray(t.data).tobytes()
        tensors.append({
            "name": t.name,
            "ne": [int(d) for d in t.shape],
            "type": gguf.GGMLQuantizationType(t.tensor_type).name,
            "offset": int(t.data_offset - reader.data_offset),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        })
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file_bytes": path.stat().st_size, "file_sha256": digest.hexdigest(), "metadata": metadata, "tensors": tensors}


def convert_command(model: Path, out: Path, outtype: str, fallback: str = "") -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run llama.cpp's convert_hf_to_gguf.py on ``model`` in
    the peers venv (``fallback``: the pre-tokenizer name used when the converter does not know the
    tokenizer's hash; empty: none, the converter raises as it would)."""
    if not (LLAMA_CPP_SRC / "convert_hf_to_gguf.py").is_file() or not PEERS_PYTHON.exists():
        raise SystemExit(f"llama.cpp's converter not found under {LLAMA_CPP_SRC}: run bash bench/setup-llamacpp.sh first")
    # NO_LOCAL_GGUF: the converter would put its gguf-py on sys.path itself; PYTHONPATH already has it
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_LOCAL_GGUF": "1",
           "PYTHONPATH": os.pathsep.join([str(LLAMA_CPP_SRC / "gguf-py"), str(LLAMA_CPP_SRC)])}
    cmd = [str(PEERS_PYTHON), "-c", CONVERT, fallback, str(model), "--outfile", str(out), "--outtype", outtype]
    return cmd, env


def convert(model: Path, out: Path, outtype: str, fallback: str = "") -> list[str]:
    """llama.cpp's convert_hf_to_gguf.py on ``model``; returns its arguments as the fixture records them."""
    cmd, env = convert_command(model, out, outtype, fallback)
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py on {model} failed:\n{proc.stderr[-4000:]}")
    LOG.info("converted %s -> %s (%d bytes)", model.name, out, out.stat().st_size)
    return [model.name, "--outtype", outtype]


def checkpoint_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 of every tensor's bytes in a checkpoint folder, with its dtype and shape."""
    import torch

    from weightsmith.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    out = {}
    for name in sorted(ckpt.names()):
        tensor = ckpt.get(name).contiguous()
        raw = tensor.view(-1).view(torch.uint8).numpy().tobytes()
        out[name] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    return out


def make_tied(untied: Path, dest: Path) -> Path:
    """The tiny checkpoint with tied embeddings: no lm_head.weight, tie_word_embeddings in config.json."""
    from weightsmith.checkpoint import Checkpoint, CheckpointWriter

    ckpt = Checkpoint(untied)
    config = {**ckpt.config, "tie_word_embeddings": True}
    with CheckpointWriter(dest, source=untied, config=config, force=True) as writer:
        for name in ckpt.names():
            if name != "lm_head.weight":
                writer.add(name, ckpt.get(name).contiguous())
    return dest


def write_fixture(out_dir: Path, case: str, gguf_path: Path, command: list[str], patched: dict[str, str], note: str) -> None:
    doc = {"case": case, "note": note, "source": {**SOURCE, "command": command}, "patched": patched,
           "array_hash": ARRAY_HASH, **describe_gguf(gguf_path)}
    write_doc(out_dir, case, doc)


def write_doc(out_dir: Path, case: str, doc: dict) -> None:
    """Fixture ``case`` as indented JSON in ``out_dir``."""
    path = out_dir / f"{case}.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    LOG.info("wrote %s (%d bytes)", path, path.stat().st_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "gguf_oracle")
    parser.add_argument("--skip-smollm2", action="store_true", help="only the tiny cases")
    parser.add_argument("--smollm2", type=Path, help="the SmolLM2-135M-Instruct folder (default: the demo model in the user cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from weightsmith.demo import fetch_demo_model

    # resolved before tests.conftest is imported: it points XDG_CACHE_HOME at a throwaway folder
    smollm2 = None if args.skip_smollm2 else (args.smollm2 or fetch_demo_model())
    from tests.conftest import make_tiny_llama

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ws-gguf-oracle-") as tmp:
        work = Path(tmp)
        tiny = make_tiny_llama(work / "tiny-llama", seed=0)
        tied = make_tied(tiny, work / "tiny-llama-tied")
        (args.out / "tiny-checkpoint.json").write_text(json.dumps({
            "made_by": "tests/conftest.py:make_tiny_llama(folder / 'tiny-llama', seed=0) with its defaults (hidden 32, 2 layers, vocab from train_tokenizer)",
            "tied_variant": "the same tensors without lm_head.weight, config.json tie_word_embeddings=true",
            "config": json.loads((tiny / "config.json").read_text()),
            "tensors": checkpoint_digests(tiny),
        }, indent=1) + "\n")
        patched = {"tokenizer.ggml.pre": f"{PRE_FALLBACK} (the converter's hash table does not know the test tokenizer)"}
        for case, model, outtype in (("tiny-llama-f32", tiny, "f32"), ("tiny-llama-f16", tiny, "f16"), ("tiny-llama-tied-f16", tied, "f16")):
            target = work / f"{case}.gguf"
            command = convert(model, target, outtype, PRE_FALLBACK)
            write_fixture(args.out, case, target, command, patched, "make_tiny_llama(seed=0) converted by llama.cpp")
        if smollm2 is not None:
            SMOLLM2_F16.parent.mkdir(parents=True, exist_ok=True)
            command = convert(smollm2, SMOLLM2_F16, "f16")
            write_fixture(args.out, "smollm2-135m-instruct-f16", SMOLLM2_F16, command, {},
                          "the demo model folder (weightsmith's bf16 conversion of SmolLM2-135M-Instruct.Q4_1.gguf, tied embeddings) "
                          "converted by llama.cpp; the file is kept out of git at .peers/gguf/")


if __name__ == "__main__":
    main()
