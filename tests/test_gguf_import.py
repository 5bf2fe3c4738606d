"""GGUF in: the streamed reader, the tensor names and layouts llama.cpp wrote undone, the tokenizer
rebuilt from metadata, and bad files refused with one line."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.conftest import SAMPLE_TEXT, make_tiny_llama, train_tokenizer
from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.gguf_import import convert_gguf, unpermute_rows
from weightsmith.gguf_read import GGUFFile
from weightsmith.gguf_vocab import tokenizer_spec
from weightsmith.models import load_tokenizer

#: transformers config -> the GGUF architecture llama.cpp writes it as
GGUF_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "phi3": gguf.MODEL_ARCH.PHI3,
}
#: GGUF architecture -> transformers model_type
HF_TYPE = {"gemma3": "gemma3_text"}


def llama_cpp_permute(x: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``: the rotary halves of each head interleaved."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def make_tiny(folder: Path, model_type: str, hidden: int = 64, seed: int = 0, head_dim: int | None = None) -> Path:
    """A tiny random model of ``model_type`` (llama, qwen2, qwen3) as a checkpoint folder with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from weightsmith.checkpoint import CheckpointWriter

    if model_type == "llama":
        return make_tiny_llama(folder, seed=seed, hidden=hidden)
    side = folder.parent / f".{folder.name}-side"
    side.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(side)
    config = AutoConfig.for_model(
        HF_TYPE.get(model_type, model_type), pad_token_id=0, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim or hidden // 4, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    config.architectures = [type(model).__name__]
    config.save_pretrained(side)
    with CheckpointWriter(folder, source=side, force=True) as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor.contiguous())
    return folder


def vocabulary(folder: Path) -> tuple[list[str], list[str]]:
    tok = json.loads((folder / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]


def write_gguf(
    folder: Path, dest: Path, *, arch: str = "llama", types: dict[str, Q] | None = None, add_bos: bool | None = None,
    tie: bool = False, tokens: list[str] | None = None, merges: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Write ``folder`` as llama.cpp would (names from the ``gguf`` package's own table, q/k rows
    permuted for Llama, ``types`` per Hugging Face name, F32 otherwise); return the float32 values
    each Hugging Face tensor must come back as."""
    ckpt, cfg = Checkpoint(folder), Checkpoint(folder).config
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], cfg["num_hidden_layers"])
    if tokens is None:
        tokens, merges = vocabulary(folder)
    # llama.cpp writes Mistral as Llama
    writer = gguf.GGUFWriter(str(dest), "llama" if arch == "mistral" else arch)
    if arch == "mistral":
        writer.add_name("Mistral 7B Instruct v0.3")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<eos>" else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    expected: dict[str, np.ndarray] = {}
    for name in ckpt.names():
        if tie and name == "lm_head.weight":
            continue
        x = ckpt.get(name).float().numpy()
        module = name.rsplit(".", 1)[0]
        stored = x
        if arch in ("llama", "mistral") and module.endswith("self_attn.q_proj"):
            stored = llama_cpp_permute(x, cfg["num_attention_heads"])
        elif arch in ("llama", "mistral") and module.endswith("self_attn.k_proj"):
            stored = llama_cpp_permute(x, cfg["num_key_value_heads"])
        if arch.startswith("gemma") and module.endswith("norm"):  # llama.cpp stores Gemma's norm scales as 1 + w
            stored = x + np.float32(1.0)
            x = stored - np.float32(1.0)
        qtype = (types or {}).get(name, Q.F32)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(stored))
            expected[name] = x
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            expected[name] = x.astype(np.float16).astype(np.float32)
        else:
            blocks = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name, blocks, raw_dtype=qtype)
            back = gguf.quants.dequantize(blocks, qtype)
            expected[name] = back if stored is x else _unpermute_like(name, back, cfg)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _unpermute_like(name: str, x: np.ndarray, cfg: dict) -> np.ndarray:
    heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
    return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("gguf") / "llama", "llama")


def test_unpermute_inverts_llama_cpp_permute():
    x = np.arange(8 * 12 * 3, dtype=np.float32).reshape(8 * 12, 3)
    for heads in (1, 2, 4, 12):
        assert np.array_equal(unpermute_rows(llama_cpp_permute(x, heads), heads), x)
    assert not np.array_equal(llama_cpp_permute(x, 4), x)
    bias = np.arange(16, dtype=np.float32)
    assert np.array_equal(unpermute_rows(llama_cpp_permute(bias, 2), 2), bias)


def test_llama_tensors_per_ggml_type(tiny64, tmp_path):
    """F32 and F16 come back exactly, Q8_0 / Q4_0 as gguf dequantizes them, in Hugging Face row order."""
    types = {
        "model.embed_tokens.weight": Q.Q8_0,
        "model.layers.0.self_attn.q_proj.weight": Q.Q4_0,
        "model.layers.0.self_attn.k_proj.weight": Q.Q8_0,
        "model.layers.1.self_attn.k_proj.weight": Q.F16,
        "model.layers.1.mlp.down_proj.weight": Q.Q4_0,
        "lm_head.weight": Q.F16,
    }
    expected = write_gguf(tiny64, tmp_path / "tiny.gguf", types=types)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", dtype=torch.float32)
    ckpt, src = Checkpoint(out), Checkpoint(tiny64)
    assert ckpt.names() == src.names()
    for name in src.names():
        assert np.array_equal(ckpt.get(name).numpy(), expected[name]), name
    # quantized tensors did change, and F32 ones are the source's exactly
    assert not torch.equal(ckpt.get("model.layers.0.self_attn.q_proj.weight"), src.get("model.layers.0.self_attn.q_proj.weight"))
    assert torch.equal(ckpt.get("model.layers.1.self_attn.q_proj.weight"), src.get("model.layers.1.self_attn.q_proj.weight"))
    config = ckpt.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (4, 2, False)
    assert config["dtype"] == "float32"
    record = json.loads((out / "weightsmith.json").read_text())
    assert record["pass"] == "convert" and list(record["inputs"][0]["files"]) == ["tiny.gguf"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_same_tensors_and_config_as_transformers_loader(arch, tmp_path):
    """The converted checkpoint equals what transformers' own GGUF loader builds (the path it replaces)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers reads no head width from a Qwen3 GGUF: its default (128) is the one it can load
    folder = make_tiny(tmp_path / arch, arch, head_dim=128 if arch == "qwen3" else None)
    write_gguf(folder, tmp_path / "m.gguf", arch=arch, types={"model.layers.0.mlp.up_proj.weight": Q.Q8_0}, tie=True)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = Checkpoint(out)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    ref.pop("lm_head.weight")
    assert ours.names() == list(ref)
    for name, tensor in ref.items():
        assert torch.equal(ours.get(name), tensor.to(torch.bfloat16)), name
    ref_config = AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf").to_dict()
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "vocab_size"):
        assert ours.config.get(key) == ref_config.get(key), key
    assert ours.config["tie_word_embeddings"] is True and "lm_head.weight" not in ours.names()
    assert ours.config["model_type"] == ref_config["model_type"] == {"mistral": "llama"}.get(arch, HF_TYPE.get(arch, arch))
    if arch == "qwen2":
        assert "model.layers.1.self_attn.q_proj.bias" in ours.names()
    if arch in ("qwen3", "gemma3"):
        assert "model.layers.1.self_attn.k_norm.weight" in ours.names()
    if arch.startswith("gemma"):
        assert "model.layers.1.post_feedforward_layernorm.weight" in ours.names()
        source = Checkpoint(folder).get("model.layers.1.post_feedforward_layernorm.weight")
        assert torch.allclose(ours.get("model.layers.1.post_feedforward_layernorm.weight").float(), source, atol=1e-2)
    assert ours.config["architectures"] == [type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))).__name__]
    if arch == "mistral":
        assert ours.config["architectures"] == ["LlamaForCausalLM"]
    if arch == "phi3":
        assert ours.info("model.layers.0.self_attn.qkv_proj.weight").shape == (64 + 2 * 32, 64)


def test_tokenizer_round_trip(tiny64, tmp_path):
    """The rebuilt tokenizer gives the original tokenizer's ids, and the same tokenizer.json as transformers' GGUF path."""
    from transformers import AutoTokenizer

    write_gguf(tiny64, tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    text = SAMPLE_TEXT.read_text()[:4000]
    original = AutoTokenizer.from_pretrained(tiny64)
    ours = load_tokenizer(out)
    ids = ours(text, add_special_tokens=False)["input_ids"]
    assert ids == original(text, add_special_tokens=False)["input_ids"] and len(ids) > 500
    assert ours.decode(ids) == text
    AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf").save_pretrained(tmp_path / "ref")
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((tmp_path / "ref" / "tokenizer.json").read_text())


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_add_bos_follows_the_gguf(tiny64, tmp_path, add_bos):
    write_gguf(tiny64, tmp_path / "tiny.gguf", add_bos=add_bos)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    ids = load_tokenizer(out)("the cat")["input_ids"]
    plain = load_tokenizer(out)("the cat", add_special_tokens=False)["input_ids"]
    assert ids == ([0] + plain if add_bos else plain)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["add_bos_token"] is bool(add_bos) and saved["add_eos_token"] is False


def big_vocabulary(size: int) -> tuple[list[str], list[str]]:
    """``size`` distinct byte-level tokens with the merges that build them: the 256 byte symbols,
    their pairs, then pair + symbol triples."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    pairs = [a + b for a in symbols for b in symbols]
    triples = (p + c for p in pairs for c in symbols)
    tokens = symbols + pairs
    merges = [f"{a} {b}" for a in symbols for b in symbols]
    while len(tokens) < size:
        t = next(triples)
        tokens.append(t)
        merges.append(f"{t[:2]} {t[2]}")
    return tokens[:size], merges


def test_262k_vocabulary_parsed_in_bounded_memory(tmp_path):
    """The vocabulary step (metadata parse + tokenizer spec) of a 262,144-token GGUF allocates a small
    multiple of what the token and merge strings themselves take, and the file converts."""
    size = 262_144
    folder = make_tiny_llama(tmp_path / "src", hidden=32, layers=1, vocab=size)
    tokens, merges = big_vocabulary(size)
    write_gguf(folder, tmp_path / "big.gguf", tokens=tokens, merges=merges, types={"model.embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.Q8_0})
    strings = sum(len(t.encode()) for t in tokens) + sum(len(m.encode()) for m in merges)
    tracemalloc.start()
    try:
        parsed = GGUFFile(tmp_path / "big.gguf")
        spec, config = tokenizer_spec(parsed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert spec["tokens"] == tokens and spec["merges"] == merges and config["eos_token"] == tokens[0]
    # Python keeps each short str in about 50-60 bytes and a list slot in 8: the lists alone are
    # ~36 MB here; a per-element reader (a numpy view per string) takes several times that
    live = (len(tokens) + len(merges)) * (8 + 56) + strings
    assert peak < 2 * live, (peak, live)
    out = convert_gguf(tmp_path / "big.gguf", tmp_path / "out")
    tok = load_tokenizer(out)
    assert tok.vocab_size == size
    assert tok.decode(tok("hello world", add_special_tokens=False)["input_ids"]) == "hello world"
    assert Checkpoint(out).info("model.embed_tokens.weight").shape == (size, 32)


def test_bad_files_are_one_line_errors(tiny64, tmp_path, cli):
    good = tmp_path / "tiny.gguf"
    write_gguf(tiny64, good)
    data = good.read_bytes()
    meta_end = GGUFFile(good).data_start
    for cut in (10, 40, meta_end // 2, meta_end + 100, len(data) - 1):
        bad = tmp_path / f"cut-{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsmithError) as info:
            convert_gguf(bad, tmp_path / f"out-{cut}")
        assert info.value.path == str(bad) and "\n" not in str(info.value) and "truncated" in info.value.problem
        assert not (tmp_path / f"out-{cut}").exists()
    result = cli("convert", tmp_path / "cut-40.gguf", tmp_path / "o")
    assert result.exit_code == 2 and result.stderr.strip().startswith(f"error: {tmp_path / 'cut-40.gguf'}: truncated")
    assert len(result.stderr.strip().splitlines()) == 1

    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "nosucharch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = cli("convert", other, tmp_path / "o2")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.strip().startswith(f"error: {other}: GGUF architecture 'nosucharch' is not supported")


def test_unknown_tensor_is_refused(tiny64, tmp_path):
    src = tmp_path / "tiny.gguf"
    write_gguf(tiny64, src)
    reader = GGUFFile(src)
    # rename a tensor in place: same length, a leaf llama.cpp never writes for Llama
    raw = bytearray(src.read_bytes())
    at = raw.index(b"blk.1.ffn_up.weight")
    raw[at : at + len(b"blk.1.ffn_up.weight")] = b"blk.1.ffn_xx.weight"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    assert "blk.1.ffn_up.weight" in reader.tensors
    with pytest.raises(WeightsmithError, match=r"tensor 'blk\.1\.ffn_xx\.weight' has no Hugging Face counterpart"):
        convert_gguf(bad, tmp_path / "out")


def write_sentencepiece_gguf(dest: Path, arch: str, add_bos: bool | None) -> list[str]:
    """A one-layer model of ``arch`` whose vocabulary is sentencepiece-style (scores, byte tokens,
    no merges), as llama.cpp writes Llama 2 and Gemma vocabularies."""
    letters = "thecaosnm"
    words = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁", "  ", *letters, "th", "the", "▁t", "▁th", "at", "▁c", "▁ca", "▁s", "▁sa", "▁o", "▁m", "▁ma"]
    tokens = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)] + words
    # scores deliberately out of file order for a few tokens: Gemma ranks merges by position instead
    scores = [0.0] * 260 + [-float((i * 7) % len(words)) for i in range(len(words))]
    writer = gguf.GGUFWriter(str(dest), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(8)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * len(words))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], 1)
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens": (len(tokens), 32), "model.norm": (32,), "model.layers.0.input_layernorm": (32,),
              "model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.k_proj": (16, 32), "model.layers.0.self_attn.v_proj": (16, 32),
              "model.layers.0.self_attn.o_proj": (32, 32), "model.layers.0.mlp.gate_proj": (64, 32), "model.layers.0.mlp.up_proj": (64, 32),
              "model.layers.0.mlp.down_proj": (32, 64)}
    if arch == "gemma3":
        shapes |= {f"model.layers.0.{n}": (32,) for n in ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")}
        shapes |= {"model.layers.0.self_attn.q_norm": (8,), "model.layers.0.self_attn.k_norm": (8,)}
    else:
        shapes["model.layers.0.post_attention_layernorm"] = (32,)
    for module, shape in shapes.items():
        writer.add_tensor(names.get_name(module) + ".weight", rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


@pytest.mark.parametrize(("arch", "add_bos"), [("llama", None), ("llama", False), ("gemma3", True)])
def test_sentencepiece_tokenizer_as_transformers_builds_it(tmp_path, arch, add_bos):
    """Merges derived from the vocabulary (scores for Llama, file order for Gemma) give transformers'
    own tokenizer.json; a Llama vocabulary adds BOS unless the file says not to."""
    from transformers import AutoTokenizer

    write_sentencepiece_gguf(tmp_path / "spm.gguf", arch, add_bos)
    out = convert_gguf(tmp_path / "spm.gguf", tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf").save_pretrained(tmp_path / "ref")
    ours = json.loads((out / "tokenizer.json").read_text())
    assert ours == json.loads((tmp_path / "ref" / "tokenizer.json").read_text())
    assert len(ours["model"]["merges"]) > 10
    ids = load_tokenizer(out)(" the cat sat on the mat")["input_ids"]
    adds_bos = add_bos is not False
    assert (ids[0] == 1) is adds_bos and 1 not in ids[1:] and len(ids) >= 6


def test_dequantize_in_row_chunks_is_exact_and_holds_one_tensor(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4096, 256)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        writer.add_tensor(f"t.{qtype.name}", gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parsed = GGUFFile(tmp_path / "t.gguf")
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        whole = gguf.quants.dequantize(parsed.raw(f"t.{qtype.name}"), qtype)
        tracemalloc.start()
        try:
            chunked = parsed.dequantize(f"t.{qtype.name}", chunk_bytes=16 * 1024)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert np.array_equal(chunked, whole) and chunked.shape == x.shape
        # the float32 output plus one chunk's temporaries
        assert peak < 1.25 * x.nbytes, (qtype.name, peak, x.nbytes)


def test_gpt2_as_transformers_loader_reads_it(tmp_path):
    """GPT-2: Conv1D weights stored transposed by llama.cpp come back as (in, out); positions, biases
    and the output head as transformers' loader reads them."""
    from transformers import AutoModelForCausalLM, GPT2Config

    side = tmp_path / "side"
    side.mkdir()
    vocab = train_tokenizer(side)
    config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=96, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, 2)
    tokens, merges = vocabulary(side)
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    for name, x in state.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        conv1d = name.endswith(".weight") and any(m in name for m in ("c_attn", "c_proj", "c_fc"))
        writer.add_tensor(gguf_name, np.ascontiguousarray(x.T if conv1d else x))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = convert_gguf(tmp_path / "g.gguf", tmp_path / "out", dtype=torch.float32)
    ours = Checkpoint(out)
    assert ours.config["architectures"] == ["GPT2LMHeadModel"] and ours.config["n_positions"] == 128
    for name, x in state.items():
        assert np.array_equal(ours.get(name).numpy(), x), name
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="g.gguf", dtype=torch.float32, n_positions=128, n_inner=96).state_dict()
    for name in ours.names():
        assert torch.equal(ours.get(name), ref[name]), name
