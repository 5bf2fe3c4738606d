"""Sentencepiece-style vocabularies in GGUF export (``tokenizer.ggml.model = llama``): the metadata keys
and values, the tokenizer transformers rebuilds from our file, llama.cpp's own converter on the same
folders (fixtures by bench/make_gguf_spm_oracle.py), and llama.cpp's tokenizer on our files (through
llama-cpp-python in .venv-peers, skipped where it is absent)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import struct
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from compress.gguf.vocab import TokenType, merge_scores, parse_sentencepiece_model, read_vocab, space_prefix
from tests.conftest import SAMPLE_TEXT, make_tiny_llama
from weightsmith.errors import WeightsmithError

ROOT = Path(__file__).resolve().parent.parent
ORACLE = Path(__file__).parent / "fixtures" / "gguf_oracle"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SPECIALS = ("<unk>", "<s>", "</s>")
#: a non-special added token (user-defined in llama.cpp)
TOOL = "<tool>"
#: text to tokenize: words of the training text, digits and non-ASCII characters the vocabulary does not
#: hold (byte fallback), newlines, runs of spaces
SENTENCES = (
    "Hello world",
    "The harbour town woke slowly.",
    "the market hall was already loud with the calls of traders",
    "Fishing boats had come in before dawn, and the market",
    "digits 0123456789",
    "naïve café — ünïcödé ☃ 日本",
    "line one\nline two\n\n  indented",
    "two  spaces  between",
)
#: text where llama.cpp's space prefix and a Metaspace(prepend_scheme="first") pre-tokenizer disagree:
#: llama.cpp prepends a space also before a leading space and after an added token
LEADING = ("  leading spaces", f"{TOOL} call it")


def make_spm_tokenizer(folder: Path, style: str = "metaspace") -> int:
    """A sentencepiece-style tokenizer (BPE with byte fallback, spaces as ``▁``) trained on the bundled
    sample text and saved into ``folder``; returns its size (560).

    The ids follow Llama 2's layout: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens ``<0x00>``..
    ``<0xFF>``, the trained characters and merge results, then the added token ``<tool>`` (not
    special). ``style``: ``metaspace`` (a Metaspace pre-tokenizer with prepend scheme ``first``, as
    transformers converts sentencepiece models today) or ``legacy`` (Llama 2's normalizer:
    Prepend("▁") then Replace(" ", "▁"), no pre-tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    learner.train_from_iterator([SAMPLE_TEXT.read_text()], trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    trained = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    elif style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        raise ValueError(style)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    tok.add_tokens([AddedToken(TOOL, normalized=False, special=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return tok.get_vocab_size()


def make_spm_llama(folder: Path, style: str = "metaspace", files: Mapping[str, bytes] | None = None, extra: int = 0) -> Path:
    """The tiny Llama of tests/conftest.py (seed 0) with a sentencepiece-style tokenizer: the one
    :func:`make_spm_tokenizer` trains, or the tokenizer ``files`` given (name -> bytes); ``extra``
    embedding rows past the tokenizer's size."""
    side = folder.parent / f".{folder.name}-side"
    side.mkdir(parents=True, exist_ok=True)
    if files is None:
        size = make_spm_tokenizer(side, style)
    else:
        for name, data in files.items():
            (side / name).write_bytes(data)
        size = len(json.loads(files["tokenizer.json"])["model"]["vocab"])
        size = max(size, *(t["id"] + 1 for t in json.loads(files["tokenizer.json"])["added_tokens"]))
    return make_tiny_llama(folder, vocab=size + extra)


def fixture_files(case: Mapping) -> dict[str, bytes]:
    """The tokenizer files a spm oracle fixture stores (text as is, binary as base64)."""
    out = {name: text.encode("utf-8") for name, text in case["files"].items()}
    out.update({name: base64.b64decode(data) for name, data in case.get("binary_files", {}).items()})
    return out


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_field(number: int, wire: int, payload: bytes) -> bytes:
    length = _pb_varint(len(payload)) if wire == 2 else b""
    return _pb_varint(number << 3 | wire) + length + payload


def spm_model_bytes(pieces: Sequence[tuple[str, float, int]]) -> bytes:
    """A sentencepiece ModelProto with these (piece, score, type) entries, written by hand: a trainer
    spec and a normalizer spec around them (fields the reader skips), a default type (normal) left
    out, as protobuf writers do."""
    trainer = _pb_field(3, 0, _pb_varint(2)) + _pb_field(35, 0, _pb_varint(1)) + _pb_field(40, 1, struct.pack("<d", 0.5))
    out = _pb_field(2, 2, trainer)
    for text, score, kind in pieces:
        body = _pb_field(1, 2, text.encode("utf-8")) + _pb_field(2, 5, struct.pack("<f", score))
        if kind != TokenType.NORMAL:
            body += _pb_field(3, 0, _pb_varint(kind))
        out += _pb_field(1, 2, body)
    return out + _pb_field(3, 2, _pb_field(1, 2, b"identity") + _pb_field(3, 0, _pb_varint(1)))


def _export(cli, folder: Path, out: Path) -> dict:
    """Export ``folder`` (f32) and read back every tokenizer key: name -> value (arrays as lists)."""
    import gguf

    result = cli("export", "gguf", folder, out, "--type", "f32")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(out))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _types(doc: Mapping) -> tuple[list[str], list[int]]:
    """A tokenizer.json's tokens by id and the llama.cpp types its structure gives them."""
    vocab = {i: t for t, i in doc["model"]["vocab"].items()}
    added = {t["id"]: t for t in doc["added_tokens"]}
    size = max([*vocab, *added]) + 1
    tokens = [added[i]["content"] if i in added else vocab[i] for i in range(size)]
    types = []
    for i, t in enumerate(tokens):
        if i in added:
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        elif t.startswith("<0x"):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return tokens, types


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory) -> Path:
    return make_spm_llama(tmp_path_factory.mktemp("models") / "spm-llama")


# --- pure parts -----------------------------------------------------------------------------------


def test_merge_scores_rank_tokens_by_their_first_merge():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "zz", "<0x41>"]
    merges = [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c"), ("x", "y")]
    # ab: 1st merge result, bc: 2nd, abc: 3rd (its second spelling keeps the rank); 4 distinct results
    assert merge_scores(tokens, merges) == [-4.0, -4.0, -4.0, -0.0, -1.0, -2.0, -4.0, -4.0]
    assert merge_scores(["a"], []) == [-0.0]


def test_sentencepiece_model_is_parsed_by_hand():
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("<0x0A>", 0.0, 6), ("\u2581the", -1.5, 1), ("é", -2.25, 1), ("<tool>", 0.0, 4), ("x" * 200, -3e9, 5)]
    parsed = parse_sentencepiece_model(spm_model_bytes(pieces))
    assert [tuple(p) for p in parsed] == pieces
    assert [p.piece for p in parsed][-1] == "x" * 200  # a length past one varint byte


@pytest.mark.parametrize("data,why", [
    (b"", "no pieces"),
    (b"\x0a\x05\x0a\x03ab", "runs past the end"),
    (b"\x0a\x02\x10\x01", "has no text"),
    (b"\x0b", "unsupported wire type 3"),
    (b"\x08\xff", "truncated varint"),
    (b"\x10\x01", "no pieces"),  # only another field
    (b"\x08\x01", "pieces has wire type 0"),
    (b"\x0d\x00\x00\x00\x00", "pieces has wire type 5"),
])
def test_malformed_sentencepiece_models_are_refused(data, why):
    with pytest.raises(ValueError, match=why):
        parse_sentencepiece_model(data)


@pytest.mark.parametrize("normalizer,pre,config,want", [
    (None, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}, {}, True),
    (None, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}, {}, True),
    (None, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": False}, {}, False),
    (None, {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": False}, {}, False),
    (None, {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}, {}, True),
    ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}, None, {}, True),
    ({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}, None, {}, False),  # Gemma
    (None, {"type": "Sequence", "pretokenizers": [{"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}]}, {}, True),
    (None, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}, {"add_prefix_space": False}, False),
    ({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}, None, {"add_prefix_space": True}, True),
    (None, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}, {"add_prefix_space": None}, True),
])
def test_space_prefix(normalizer, pre, config, want):
    assert space_prefix({"normalizer": normalizer, "pre_tokenizer": pre}, config) is want


# --- our export -----------------------------------------------------------------------------------


def test_export_writes_every_tokenizer_key(cli, spm_llama, tmp_path):
    doc = json.loads((spm_llama / "tokenizer.json").read_text())
    tokens, types = _types(doc)
    assert len(tokens) == 560 and types[:3] == [TokenType.CONTROL] * 3 and types[559] == TokenType.USER_DEFINED
    meta = _export(cli, spm_llama, tmp_path / "m.gguf")
    merge_results = []
    for m in doc["model"]["merges"]:
        if "".join(m) not in merge_results:
            merge_results.append("".join(m))
    chars = [t for t, k in zip(tokens, types) if k == TokenType.NORMAL and t not in merge_results]
    assert all(len(t) == 1 for t in chars)  # every longer trained token is a merge result
    want_scores = [-1000.0] * 3 + [0.0] * 256 + [-float(merge_results.index(t)) if t in merge_results else -float(len(merge_results)) for t in tokens[259:559]] + [-1000.0]
    assert meta == {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": want_scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_sep_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }
    assert meta["tokenizer.ggml.scores"][tokens.index("\u2581t")] == 0.0 and len(merge_results) == 258


def test_transformers_reads_the_export_back_to_the_same_ids(cli, spm_llama, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    _export(cli, spm_llama, out)
    original = AutoTokenizer.from_pretrained(spm_llama)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in (*SENTENCES, *LEADING, "<s>x</s>"):
        ids = original.encode(text)
        assert back.encode(text) == ids, text
        assert back.decode(ids) == original.decode(ids)
    assert original.encode("日") == [1, original.convert_tokens_to_ids("\u2581")] + [3 + b for b in "日".encode()]  # byte fallback


def test_config_vocab_size_past_the_tokenizer_is_unused_holes(cli, tmp_path):
    folder = make_spm_llama(tmp_path / "spm-llama", extra=3)
    meta = _export(cli, folder, tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.tokens"][559:] == [TOOL, "[PAD560]", "[PAD561]", "[PAD562]"]
    assert meta["tokenizer.ggml.token_type"][559:] == [TokenType.USER_DEFINED] + [TokenType.UNUSED] * 3
    assert meta["tokenizer.ggml.scores"][559:] == [-1000.0] + [-10000.0] * 3


def test_legacy_normalizer_and_config_flags(spm_llama, tmp_path):
    """Llama 2's normalizer prepends the space; without a post-processor a sentencepiece model adds
    BOS and no EOS, and adds no separator; tokenizer_config.json's add_prefix_space wins over the
    structure, and its add_*_token flags decide where there is no post-processor."""
    side = tmp_path / "legacy"
    make_spm_tokenizer(side, "legacy")
    doc = json.loads((side / "tokenizer.json").read_text())
    config = {"vocab_size": 560}
    vocab = read_vocab(side, config)
    assert vocab.add_space_prefix is True and vocab.add_bos is True and vocab.add_sep is False
    doc["post_processor"] = None
    (side / "tokenizer.json").write_text(json.dumps(doc))
    vocab = read_vocab(side, config)
    assert (vocab.add_bos, vocab.add_eos, vocab.add_sep) == (True, False, None)
    tok_config = json.loads((side / "tokenizer_config.json").read_text())
    (side / "tokenizer_config.json").write_text(json.dumps({**tok_config, "add_prefix_space": False, "add_bos_token": False, "add_eos_token": True}))
    vocab = read_vocab(side, config)
    assert (vocab.add_space_prefix, vocab.add_bos, vocab.add_eos) == (False, False, True)
    keys = [k for k, _, _ in vocab.items()]
    assert keys.index("tokenizer.ggml.scores") == keys.index("tokenizer.ggml.tokens") + 1 and "tokenizer.ggml.merges" not in keys


def test_tokenizer_model_gives_tokens_scores_and_types(spm_llama, tmp_path, caplog):
    """tokenizer.model beside tokenizer.json: its pieces, scores and types, then the added tokens of
    added_tokens.json and tokenizer_config.json's added_tokens_decoder (llama.cpp's order), the holes
    tokenizer.json names filled, the rest [PAD<id>]."""
    folder = tmp_path / "with-model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((spm_llama / name).read_bytes())
    doc = json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in doc["model"]["vocab"].items()}
    kinds = {0: TokenType.UNKNOWN, 1: TokenType.CONTROL, 2: TokenType.CONTROL}
    pieces = [(by_id[i], -0.25 * i if i >= 259 else 0.0, kinds.get(i, TokenType.BYTE if 3 <= i < 259 else TokenType.NORMAL)) for i in range(559)]
    pieces[300] = (pieces[300][0], pieces[300][1], TokenType.USER_DEFINED)
    (folder / "tokenizer.model").write_bytes(spm_model_bytes(pieces))
    (folder / "added_tokens.json").write_text(json.dumps({"<extra>": 560}))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["added_tokens_decoder"] = {
        "1": {"content": "<s>", "special": True},
        "561": {"content": "<|im_end|>", "special": False},  # named like a control token
        "562": {"content": "\u2581hi", "special": False},
        "900": {"content": "<far>", "special": False},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with caplog.at_level(logging.WARNING, logger="compress.gguf.vocab"):
        vocab = read_vocab(folder, {"vocab_size": 564})
    assert "'<far>' has id 900, past vocab_size 564" in caplog.text
    assert vocab.tokens == [p[0] for p in pieces] + [TOOL, "<extra>", "<|im_end|>", " hi", "[PAD563]"]
    assert vocab.scores == [0.0, -1000.0] + [p[1] for p in pieces[2:]] + [-1000.0] * 4 + [-10000.0]
    assert vocab.token_types == [p[2] for p in pieces] + [TokenType.USER_DEFINED, TokenType.USER_DEFINED, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNUSED]
    assert vocab.token_types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] and vocab.scores[1] == -1000.0
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unknown": 0}


def test_tokenizer_model_that_disagrees_with_tokenizer_json_is_skipped(spm_llama, tmp_path, caplog):
    folder = tmp_path / "mismatch"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((spm_llama / name).read_bytes())
    doc = json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in doc["model"]["vocab"].items()}
    swapped = [by_id[i] for i in range(559)]
    swapped[300], swapped[301] = swapped[301], swapped[300]
    (folder / "tokenizer.model").write_bytes(spm_model_bytes([(t, 0.0, TokenType.NORMAL) for t in swapped]))
    plain = read_vocab(spm_llama, {"vocab_size": 560})
    with caplog.at_level(logging.WARNING, logger="compress.gguf.vocab"):
        assert read_vocab(folder, {"vocab_size": 560}) == plain
    assert "2 pieces sit at other ids in tokenizer.json (first: id 300" in caplog.text
    caplog.clear()
    (folder / "tokenizer.model").write_bytes(b"\x0b not a protobuf")
    with caplog.at_level(logging.WARNING, logger="compress.gguf.vocab"):
        assert read_vocab(folder, {"vocab_size": 560}) == plain
    assert "not a sentencepiece model (unsupported wire type 3" in caplog.text


def test_other_tokenizer_models_are_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0]]}}))
    with pytest.raises(WeightsmithError, match="tokenizer model Unigram is not supported"):
        read_vocab(tmp_path, {})


# --- llama.cpp's converter on the same folders ------------------------------------------------------


def _oracle(case: str) -> dict:
    return json.loads((ORACLE / f"{case}.json").read_text(encoding="utf-8"))


def _digest(values: list) -> str:
    return hashlib.sha256(json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def _tokenizer_keys(oracle: Mapping) -> dict:
    """llama.cpp's tokenizer keys as values (arrays stored whole in these fixtures)."""
    return {k: v["value"] for k, v in oracle["metadata"].items() if k.startswith("tokenizer.")}


def test_oracle_fixtures_hold_what_they_say():
    for case in ("spm-hf-f32", "spm-model-f32"):
        oracle = _oracle(case)
        for key, entry in oracle["metadata"].items():
            if entry["type"] == "ARRAY":
                assert len(entry["value"]) == entry["length"] and _digest(entry["value"]) == entry["sha256"], key
        for name, data in fixture_files(oracle).items():
            assert hashlib.sha256(data).hexdigest() == oracle["file_sha256"][name], name


def test_matches_llama_cpp_converter_from_tokenizer_json(cli, tmp_path):
    """llama.cpp's ``_set_vocab_llama_hf`` (LlamaHfVocab) on the trained tokenizer: every key, type and
    value the same but the scores, which llama.cpp writes as -1000 for every token."""
    oracle = _oracle("spm-hf-f32")
    folder = make_spm_llama(tmp_path / "spm-llama", files=fixture_files(oracle))
    meta = _export(cli, folder, tmp_path / "m.gguf")
    want = _tokenizer_keys(oracle)
    assert set(want) - set(meta) == set()
    assert set(meta) - set(want) == {"tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"}
    for key, value in want.items():
        if key != "tokenizer.ggml.scores":
            assert meta[key] == value, key
    for key, kind in (("tokenizer.ggml.tokens", "STRING"), ("tokenizer.ggml.scores", "FLOAT32"), ("tokenizer.ggml.token_type", "INT32")):
        assert oracle["metadata"][key]["item_type"] == kind
    assert set(want["tokenizer.ggml.scores"]) == {-1000.0}
    ours = meta["tokenizer.ggml.scores"]
    added = [i for i, k in enumerate(meta["tokenizer.ggml.token_type"]) if k != TokenType.NORMAL and k != TokenType.BYTE]
    assert added == [0, 1, 2, 559] and all(ours[i] == -1000.0 for i in added)


def test_matches_llama_cpp_converter_from_tokenizer_model(cli, tmp_path):
    """llama.cpp's ``_set_vocab_sentencepiece`` on a model sentencepiece trained (tokenizer.model
    beside the tokenizer.json transformers converted from it): every key and value the same, scores
    bit for bit, except the user-defined piece ``<tool>``, which llama.cpp makes normal."""
    oracle = _oracle("spm-model-f32")
    folder = make_spm_llama(tmp_path / "spm-llama", files=fixture_files(oracle))
    meta = _export(cli, folder, tmp_path / "m.gguf")
    want = _tokenizer_keys(oracle)
    # transformers' conversion puts no BOS in the template: we write that; llama.cpp writes nothing and adds BOS by default
    assert set(meta) - set(want) == {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"}
    assert set(want) - set(meta) == set() and meta["tokenizer.ggml.add_bos_token"] is False
    for key, value in want.items():
        if key != "tokenizer.ggml.token_type":
            assert meta[key] == value, key
    tool = want["tokenizer.ggml.tokens"].index(TOOL)
    theirs, ours = want["tokenizer.ggml.token_type"], meta["tokenizer.ggml.token_type"]
    assert [i for i in range(len(ours)) if ours[i] != theirs[i]] == [tool]
    assert (theirs[tool], ours[tool]) == (TokenType.NORMAL, TokenType.USER_DEFINED)


def test_tokenizer_json_scores_equal_sentencepiece_scores(tmp_path):
    """The same sentencepiece folder without its tokenizer.model: the scores derived from
    tokenizer.json's merges are sentencepiece's own for every merged piece; characters, which
    sentencepiece scores one by one after the merges, share the score after the last merge."""
    oracle = _oracle("spm-model-f32")
    files = fixture_files(oracle)
    folder = tmp_path / "json-only"
    folder.mkdir()
    for name, data in files.items():
        if name != "tokenizer.model":
            (folder / name).write_bytes(data)
    vocab = read_vocab(folder, {"vocab_size": 560})
    spm = _tokenizer_keys(oracle)
    tokens, scores, types = spm["tokenizer.ggml.tokens"], spm["tokenizer.ggml.scores"], spm["tokenizer.ggml.token_type"]
    assert vocab.tokens == tokens
    normal = [i for i, k in enumerate(types) if k == TokenType.NORMAL and i != tokens.index(TOOL)]
    merged = [i for i in normal if len(tokens[i]) > 1]
    assert len(merged) == 259 and all(vocab.scores[i] == scores[i] for i in merged)
    single = [i for i in normal if len(tokens[i]) == 1]
    assert all(vocab.scores[i] == -259.0 and scores[i] < -258.0 for i in single)


# --- llama.cpp's tokenizer ------------------------------------------------------------------------

_TOKENIZE = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps([llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in json.loads(sys.argv[2])]))
"""


def _has_llama_cpp() -> bool:
    return PEERS_PYTHON.exists() and subprocess.run([str(PEERS_PYTHON), "-c", "import llama_cpp"], capture_output=True).returncode == 0


def llama_cpp_tokenize(path: Path, texts: Sequence[str]) -> list[list[int]]:
    """llama.cpp's ids for ``texts`` with the file's own BOS flag and special tokens parsed."""
    done = subprocess.run([str(PEERS_PYTHON), "-c", _TOKENIZE, str(path), json.dumps(list(texts))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_llama_cpp_converter_file_tokenizes_unlike_transformers():
    """Why the scores are ours: llama.cpp's tokenizer on its own converter's file (recorded in the
    fixture) merges left to right among its equal scores and splits words transformers keeps."""
    from tokenizers import Tokenizer

    oracle = _oracle("spm-hf-f32")
    assert tuple(oracle["texts"]) == SENTENCES

    tok = Tokenizer.from_str(fixture_files(oracle)["tokenizer.json"].decode("utf-8"))
    want = [tok.encode(t).ids for t in SENTENCES]
    differ = [t for t, w, g in zip(SENTENCES, want, oracle["llama_cpp_ids"]) if w != g]
    assert differ == [SENTENCES[1], SENTENCES[2], SENTENCES[3], SENTENCES[6], SENTENCES[7]]
    market = SENTENCES[2]
    pieces = tok.encode(market).tokens
    theirs = [tok.id_to_token(i) for i in oracle["llama_cpp_ids"][2]]
    # BPE joins "e"+"t" (an earlier merge than "k"+"e"); with equal scores llama.cpp joins the leftmost pair
    assert pieces[4:6] == ["k", "et"] and theirs[4:6] == ["ke", "t"]


@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python not in .venv-peers (run bench/setup-llamacpp.sh)")
@pytest.mark.parametrize("style", ["metaspace", "legacy", "spm-model"])
def test_llama_cpp_tokenizes_our_export_like_transformers(style, cli, tmp_path):
    """llama.cpp's tokenizer on our files gives transformers' ids: for the trained tokenizer in both
    styles and for the sentencepiece-trained one with its tokenizer.model. With Llama 2's normalizer
    the leading-space and added-token text agrees too; with a Metaspace "first" pre-tokenizer llama.cpp
    puts one more ``▁`` there."""
    from transformers import AutoTokenizer

    files = fixture_files(_oracle("spm-model-f32")) if style == "spm-model" else None
    folder = make_spm_llama(tmp_path / "spm-llama", "legacy" if style == "legacy" else "metaspace", files=files)
    out = tmp_path / "m.gguf"
    _export(cli, folder, out)
    original = AutoTokenizer.from_pretrained(folder)
    texts = (*SENTENCES, *LEADING)
    got = llama_cpp_tokenize(out, texts)
    want = [original.encode(t) for t in texts]
    agree = [t for t, w, g in zip(texts, want, got) if w == g]
    assert agree == list(texts if style == "legacy" else SENTENCES)
    if style != "legacy":
        for text, w, g in zip(LEADING, want[len(SENTENCES):], got[len(SENTENCES):]):
            space = original.convert_tokens_to_ids("\u2581")
            extra = [i for i in range(len(g)) if g[:i] + g[i + 1:] == w]
            assert extra and g[extra[0]] == space, text
