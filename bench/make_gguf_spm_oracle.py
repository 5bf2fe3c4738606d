"""What llama.cpp's converter writes for sentencepiece-style vocabularies, recorded as fixtures for
tests/test_gguf_vocab.py.

Run:  .venv/bin/python bench/make_gguf_spm_oracle.py [--out tests/fixtures/gguf_oracle]
(after ``bash bench/setup-llamacpp.sh``: the peers venv with llama-cpp-python, sentencepiece and
transformers, and llama.cpp's converter unpacked; same llama.cpp version as bench/make_gguf_oracle.py).

Cases (one JSON file each), both the tiny Llama of tests/conftest.py (seed 0, 560-row embedding)
converted with ``--outtype f32``:

* ``spm-hf-f32``: the tokenizer ``tests/test_gguf_vocab.py:make_spm_tokenizer`` trains with the
  ``tokenizers`` library (BPE with byte fallback, a Metaspace pre-tokenizer, Llama 2's id layout, an
  added ``<tool>``); the folder has no tokenizer.model, so llama.cpp takes ``_set_vocab_llama_hf``
  (gguf-py's ``LlamaHfVocab``).
* ``spm-model-f32``: a BPE model trained by sentencepiece itself on the same text (byte fallback,
  user-defined symbol ``<tool>``, 560 pieces), saved by transformers' ``LlamaTokenizer`` (which
  converts it to tokenizer.json); the folder has tokenizer.model, so llama.cpp takes
  ``_set_vocab_sentencepiece``.

Each fixture holds: every metadata key in file order with its GGUF type and value (arrays whole,
with their length and the sha256 of bench/make_gguf_oracle.py's array recipe); the folder's tokenizer
files (text as is, tokenizer.model as base64) with their sha256, so the tests convert the very same
files; and the ids llama.cpp's own tokenizer (llama-cpp-python, ``vocab_only``) gives
``tests/test_gguf_vocab.py:SENTENCES`` with the converted file. No pre-tokenizer patch is needed (this
path does not hash the tokenizer).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.make_gguf_oracle import ARRAY_HASH, PEERS_PYTHON, SOURCE, array_digest, convert, write_doc  # noqa: E402


#: run in .venv-peers: sentencepiece trains a BPE model on argv[2]'s text, transformers' LlamaTokenizer
#: converts it and saves the folder argv[1] (tokenizer.model, tokenizer.json, tokenizer_config.json)
TRAIN_SPM = r"""
import io, sys
from pathlib import Path
import sentencepiece as spm
from transformers import LlamaTokenizer
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(Path(sys.argv[2]).read_text().splitlines()), model_writer=model, model_type="bpe", vocab_size=560,
    byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True, remove_extra_whitespaces=False,
    normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<tool>"],
    split_digits=True, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
(out / "tokenizer.model").write_bytes(model.getvalue())
LlamaTokenizer.from_pretrained(str(out), legacy=False).save_pretrained(str(out))
"""

#: run in .venv-peers: llama.cpp's ids for the texts argv[2] (JSON) with the GGUF file argv[1]
TOKENIZE = r"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps([llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in json.loads(sys.argv[2])]))
"""

TEXT_FILES = ("tokenizer.json", "tokenizer_config.json")
BINARY_FILES = ("tokenizer.model",)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if hasattr(value, "item") else value


def metadata(path: Path) -> dict[str, Any]:
    """Every key of a GGUF file with its value type and value, arrays whole."""
    import gguf

    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = gguf.GGUFValueType(field.types[0]).name
        if kind != "ARRAY":
            out[key] = {"type": kind, "value": _plain(field.contents())}
            continue
        items = [_plain(v) for v in field.contents()]
        out[key] = {"type": "ARRAY", "item_type": gguf.GGUFValueType(field.types[-1]).name, "length": len(items),
                    "sha256": array_digest(items), "value": items}
    return out


def _peers(code: str, *args: str) -> str:
    proc = subprocess.run([str(PEERS_PYTHON), "-c", code, *args], env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peers venv command failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def record(out_dir: Path, case: str, side: Path, work: Path, note: str) -> None:
    """The tiny Llama with the tokenizer files in ``side``, converted by llama.cpp, as fixture ``case``."""
    from tests.test_gguf_vocab import SENTENCES, make_spm_llama

    folder = make_spm_llama(work / case, files={n.name: n.read_bytes() for n in side.iterdir()})
    target = work / f"{case}.gguf"
    command = convert(folder, target, "f32")
    ids = json.loads(_peers(TOKENIZE, str(target), json.dumps(list(SENTENCES))).strip().splitlines()[-1])
    files = {n: (side / n).read_text(encoding="utf-8") for n in TEXT_FILES}
    binary = {n: base64.b64encode((side / n).read_bytes()).decode("ascii") for n in BINARY_FILES if (side / n).is_file()}
    digests = {n: hashlib.sha256((side / n).read_bytes()).hexdigest() for n in (*files, *binary)}
    doc = {"case": case, "note": note, "source": {**SOURCE, "command": command}, "array_hash": ARRAY_HASH,
           "metadata": metadata(target), "files": files, "binary_files": binary, "file_sha256": digests,
           "texts": list(SENTENCES), "llama_cpp_ids": ids}
    write_doc(out_dir, case, doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "gguf_oracle")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tests.conftest import SAMPLE_TEXT
    from tests.test_gguf_vocab import make_spm_tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ws-gguf-spm-oracle-") as tmp:
        work = Path(tmp)
        side = work / "hf-tokenizer"
        make_spm_tokenizer(side, "metaspace")
        record(args.out, "spm-hf-f32", side, work, "tests/test_gguf_vocab.py:make_spm_tokenizer('metaspace') in the tiny Llama, converted by llama.cpp (no tokenizer.model: LlamaHfVocab)")
        side = work / "spm-tokenizer"
        _peers(TRAIN_SPM, str(side), str(SAMPLE_TEXT))
        for name in list(side.iterdir()):
            if name.name not in (*TEXT_FILES, *BINARY_FILES):
                shutil.rmtree(name) if name.is_dir() else name.unlink()
        record(args.out, "spm-model-f32", side, work, "a sentencepiece BPE model trained on the sample text, saved by transformers' LlamaTokenizer, "
               "in the tiny Llama, converted by llama.cpp (tokenizer.model: _set_vocab_sentencepiece)")


if __name__ == "__main__":
    main()
