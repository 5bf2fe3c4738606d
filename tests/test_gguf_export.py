"""GGUF export: names, layout, mixes, tokenizer metadata, kept codes, loading back (gguf reader and
transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.gguf import mixes
from compress.gguf.names import permute_rows
from tests.conftest import make_tiny_llama
from weightsmith.gguf_import import unpermute_rows


@pytest.fixture(scope="module")
def llama256(tmp_path_factory) -> Path:
    """A tiny Llama whose widths (256, 512) fit every block type, K-quants included."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama256", hidden=256, layers=2)


def _export(cli, model: Path, out: Path, *args: str) -> None:
    result = cli("export", "gguf", model, out, *args)
    assert result.exit_code == 0, result.output


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _dequantized(reader, name: str) -> np.ndarray:
    from gguf.quants import dequantize

    t = next(t for t in reader.tensors if t.name == name)
    values = dequantize(t.data, t.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


def _meta(reader, key: str):
    field = reader.fields[key]
    return field.contents()


def test_permute_rows_is_the_inverse_of_import():
    w = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        permuted = w[permute_rows(24, heads)]
        assert np.array_equal(unpermute_rows(permuted, heads), w)
        assert not np.array_equal(permuted, w) or heads == 12


def test_mix_rules_follow_llama_quantize_on_smollm2_shapes():
    """SmolLM2-135M: 30 layers, width 576 (not a multiple of 256), MLP 1536, tied embeddings, 3 query
    heads per key/value head."""
    chooser = mixes.TypeChooser(mixes.MIXES["q4_k_m"], 30, tied=True, gqa=3)
    assert chooser.choose("token_embd.weight", "token_embd", None, (49152, 576)) == "q8_0"
    assert chooser.choose("blk.0.attn_norm.weight", "attn_norm", 0, (576,)) == "f32"
    assert chooser.choose("blk.5.attn_q.weight", "attn_q", 5, (576, 576)) == "q5_0"  # q4_k falls back
    assert chooser.choose("blk.0.ffn_down.weight", "ffn_down", 0, (576, 1536)) == "q6_k"  # first eighth
    assert chooser.choose("blk.4.ffn_down.weight", "ffn_down", 4, (576, 1536)) == "q4_k"
    assert chooser.choose("blk.5.ffn_down.weight", "ffn_down", 5, (576, 1536)) == "q6_k"  # (5 - 3) % 3 == 2
    assert chooser.choose("blk.0.attn_v.weight", "attn_v", 0, (192, 576)) == "q8_0"  # q6_k falls back
    assert chooser.choose("blk.4.attn_v.weight", "attn_v", 4, (192, 576)) == "q5_0"
    assert [i for i in range(30) if mixes.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]

    q4_0 = mixes.TypeChooser(mixes.MIXES["q4_0"], 30, tied=True, gqa=3)
    assert q4_0.choose("token_embd.weight", "token_embd", None, (49152, 576)) == "q8_0"
    assert q4_0.choose("blk.0.ffn_down.weight", "ffn_down", 0, (576, 1536)) == "q4_0"
    untied = mixes.TypeChooser(mixes.MIXES["q4_0"], 30, tied=False, gqa=3)
    assert untied.choose("token_embd.weight", "token_embd", None, (49152, 512)) == "q4_0"
    assert untied.choose("output.weight", "output", None, (49152, 512)) == "q6_k"

    q3 = mixes.TypeChooser(mixes.MIXES["q3_k_m"], 32, tied=False)
    assert [q3.choose(f"blk.{i}.attn_v.weight", "attn_v", i, (1024, 4096)) for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]
    assert [q3.choose(f"blk.{i}.ffn_down.weight", "ffn_down", i, (4096, 11008 // 256 * 256)) for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]
    assert q3.choose("blk.3.attn_output.weight", "attn_output", 3, (4096, 4096)) == "q4_k"
    assert q3.choose("blk.3.attn_q.weight", "attn_q", 3, (4096, 4096)) == "q3_k"
    assert mixes.TypeChooser(mixes.MIXES["q2_k"], 32, tied=False, gqa=4).choose("blk.3.attn_v.weight", "attn_v", 3, (1024, 4096)) == "q4_k"


def test_pure_and_overrides():
    overrides = mixes.parse_tensor_types([r"attn_v=q8_0", r"blk\.1\.=f16"])
    chooser = mixes.TypeChooser(mixes.MIXES["q4_k_m"], 4, tied=False, pure=True, overrides=overrides)
    assert chooser.choose("blk.0.attn_v.weight", "attn_v", 0, (256, 256)) == "q8_0"
    assert chooser.choose("blk.1.attn_q.weight", "attn_q", 1, (256, 256)) == "f16"
    assert chooser.choose("blk.0.ffn_down.weight", "ffn_down", 0, (256, 512)) == "q4_k"  # pure: no rule
    assert chooser.choose("output.weight", "output", None, (320, 256)) == "q4_k"
    for bad in ("attn_v", "attn_v=q9_0", "(=q4_0"):
        with pytest.raises(ValueError):
            mixes.parse_tensor_types([bad])
    assert mixes.fallback("q6_k", 96) == "q8_0" and mixes.fallback("q4_0", 48) == "f16" and mixes.fallback("q4_k", 512) == "q4_k"


def test_f32_export_holds_the_checkpoint_exactly(cli, tiny_llama, tmp_path):
    from weightsmith.checkpoint import Checkpoint

    out = tmp_path / "m.gguf"
    _export(cli, tiny_llama, out, "--type", "f32")
    reader = _reader(out)
    src = Checkpoint(tiny_llama)
    config = src.config
    assert _meta(reader, "general.architecture") == "llama"
    assert _meta(reader, "llama.block_count") == config["num_hidden_layers"]
    assert _meta(reader, "llama.embedding_length") == config["hidden_size"]
    assert _meta(reader, "llama.feed_forward_length") == config["intermediate_size"]
    assert _meta(reader, "llama.attention.head_count") == 4
    assert _meta(reader, "llama.attention.head_count_kv") == 2
    assert _meta(reader, "llama.rope.dimension_count") == config["hidden_size"] // 4
    assert _meta(reader, "general.file_type") == 0
    names = [t.name for t in reader.tensors]
    assert "output.weight" in names and "token_embd.weight" in names and len(names) == len(src.names())
    q = _dequantized(reader, "blk.1.attn_q.weight")
    w = src.get("model.layers.1.self_attn.q_proj.weight").float().numpy()
    assert np.array_equal(unpermute_rows(q, 4), w)
    k = _dequantized(reader, "blk.0.attn_k.weight")
    assert np.array_equal(unpermute_rows(k, 2), src.get("model.layers.0.self_attn.k_proj.weight").float().numpy())
    assert np.array_equal(_dequantized(reader, "blk.0.ffn_down.weight"), src.get("model.layers.0.mlp.down_proj.weight").float().numpy())
    assert np.array_equal(_dequantized(reader, "output_norm.weight"), src.get("model.norm.weight").float().numpy())


def test_tokenizer_metadata_matches_tokenizer_json(cli, tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    _export(cli, tiny_llama, out, "--type", "f16")
    reader = _reader(out)
    doc = json.loads((tiny_llama / "tokenizer.json").read_text())
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    vocab = doc["model"]["vocab"]
    assert len(tokens) == max(vocab.values()) + 1
    assert all(tokens[i] == t for t, i in vocab.items())
    merges = _meta(reader, "tokenizer.ggml.merges")
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    assert _meta(reader, "tokenizer.ggml.model") == "gpt2"
    assert _meta(reader, "tokenizer.ggml.pre") == "gpt-2"
    types = list(_meta(reader, "tokenizer.ggml.token_type"))
    eos = tokens.index("<eos>")
    assert types[eos] == 3 and types.count(3) == 1 and set(types) == {1, 3}
    assert _meta(reader, "tokenizer.ggml.eos_token_id") == eos
    assert _meta(reader, "tokenizer.ggml.add_bos_token") is False


def test_transformers_loads_the_export_to_the_same_logits(cli, llama256, tmp_path):
    """transformers reads our names, layout and hyper-parameters as we meant them: the model it loads
    from each file gives the logits of the source model with every weight replaced by the file's
    dequantized tensor (q/k rows put back), to float32 accuracy; at f32 those are the source's own."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(llama256, dtype=torch.float32).eval()
    source_state = {k: v.clone() for k, v in ref.state_dict().items()}
    ids = torch.arange(2, 66).remainder(300).unsqueeze(0)
    with torch.no_grad():
        source_logits = ref(ids).logits
    back = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for gtype in ("f32", "f16", "q8_0", "q4_0", "q4_k_m"):
        out = tmp_path / f"m-{gtype}.gguf"
        _export(cli, llama256, out, "--type", gtype)
        reader = _reader(out)
        state = {}
        for t in reader.tensors:
            parts = t.name.split(".")
            values = _dequantized(reader, t.name)
            if parts[0] == "blk":
                leaf = parts[2]
                if leaf in ("attn_q", "attn_k"):
                    values = unpermute_rows(values, 4 if leaf == "attn_q" else 2)
                state[f"model.layers.{parts[1]}.{layer[leaf]}.weight"] = torch.from_numpy(values.copy())
            else:
                state[f"{back[parts[0]]}.weight"] = torch.from_numpy(values.copy())
        ref.load_state_dict(state)
        with torch.no_grad():
            want = ref(ids).logits
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(ids).logits
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), gtype
        if gtype == "f32":
            assert torch.equal(got, source_logits)
        ref.load_state_dict(source_state)


def test_kept_codes_are_written_as_they_are(cli, llama256, tmp_path):
    """RTN W4 g32 symmetric, packed -> GGUF q4_0: every block dequantizes to our codes x scales exactly
    (after llama.cpp's row permutation of q and k), and no linear is rounded again. A float32 model's
    scales are not float16 values: those linears are rounded again, and the report says so."""
    from compress.packed_input import packed_layers, read_quantized
    from weightsmith.checkpoint import Checkpoint

    half, q_dir = tmp_path / "bf16", tmp_path / "q"
    assert cli("copy", llama256, half, "--dtype", "bf16").exit_code == 0  # bf16 scales are float16 values
    result = cli("quantize", half, q_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "--symmetric", "--format", "packed")
    assert result.exit_code == 0, result.output
    out = tmp_path / "q.gguf"
    _export(cli, q_dir, out)
    reader = _reader(out)
    src = Checkpoint(q_dir)
    layers = packed_layers(src)
    assert layers
    for name, layer in layers.items():
        q = read_quantized(src, layer)
        want = ((q.codes.float() - q.zeros.float().repeat_interleave(32, 1)) * q.scales.float().repeat_interleave(32, 1)).numpy()
        block, leaf = name.split(".")[2], {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.split(".")[-2]]
        gguf_name = f"blk.{block}.{leaf}.weight"
        t = next(t for t in reader.tensors if t.name == gguf_name)
        assert t.tensor_type.name == "Q4_0"
        got = _dequantized(reader, gguf_name)
        if leaf in ("attn_q", "attn_k"):
            got = unpermute_rows(got, 4 if leaf == "attn_q" else 2)
        assert np.array_equal(got, want), gguf_name
    assert _meta(reader, "general.file_type") == 2
    from compress.gguf.config import GGUFExportConfig
    from compress.gguf.export import export_gguf

    report = export_gguf(Checkpoint(q_dir), tmp_path / "q-again.gguf", GGUFExportConfig(type="q4_0"))
    assert report.extra["kept_codes"] == 14 and report.extra["requantized"] == 0
    q32 = tmp_path / "q32"
    assert cli("quantize", llama256, q32, "--method", "rtn", "--bits", "4", "--group-size", "32", "--symmetric", "--format", "packed").exit_code == 0
    report = export_gguf(Checkpoint(q32), tmp_path / "q32.gguf", GGUFExportConfig(type="q4_0"))
    assert report.extra["kept_codes"] == 0 and report.extra["requantized"] == 14


def test_refusals(cli, tmp_path, tiny_llama):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"x")
    result = cli("export", "gguf", tiny_llama, out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert out.read_bytes() == b"x"
    result = cli("export", "gguf", tiny_llama, tmp_path / "n.gguf", "--type", "q9_k")
    assert result.exit_code == 2 and "unknown GGUF type 'q9_k'" in result.output
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "opt"}))
    from safetensors.torch import save_file

    save_file({"model.decoder.embed_tokens.weight": torch.zeros(4, 4)}, str(opt / "model.safetensors"))
    result = cli("export", "gguf", opt, tmp_path / "o.gguf")
    assert result.exit_code == 2 and "does not support model_type 'opt'" in result.output
    assert not (tmp_path / "o.gguf").exists()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq_gptq"])
def test_quantize_on_gguf_grids_then_export_keeps_the_blocks(cli, llama256, tmp_path, method):
    """quantize --format gguf:q4_k_m chooses each linear's codes on the type llama-quantize gives it;
    export writes those blocks as they are, and they dequantize to the checkpoint's dense weights."""
    from safetensors import safe_open

    from compress.quantize import GGUF_BLOCKS
    from tests.conftest import SAMPLE_TEXT
    from weightsmith.checkpoint import Checkpoint

    q_dir = tmp_path / "q"
    args = ["--method", method, "--format", "gguf:q4_k_m"]
    if method != "rtn":
        args += ["--calib", str(SAMPLE_TEXT), "--samples", "4", "--seq-len", "64", "--awq-samples", "2", "--awq-grid", "4"]
    result = cli("quantize", llama256, q_dir, *args)
    assert result.exit_code == 0, result.output
    src = Checkpoint(q_dir)
    with safe_open(str(q_dir / GGUF_BLOCKS), framework="pt") as fh:
        types = fh.metadata()
        stored = {name: fh.get_tensor(name).numpy() for name in fh.keys()}
    assert len(stored) == 14
    # llama-quantize's q4_k_m on 2 layers: attn_v and ffn_down get q6_k in the last eighth (layer 1) only
    assert types["model.layers.1.self_attn.v_proj.weight"] == "q6_k" and types["model.layers.1.mlp.down_proj.weight"] == "q6_k"
    assert types["model.layers.0.self_attn.v_proj.weight"] == "q4_k" and types["model.layers.0.self_attn.q_proj.weight"] == "q4_k"
    out = tmp_path / "q.gguf"
    _export(cli, q_dir, out, "--type", "q4_k_m")
    reader = _reader(out)
    for name, blocks in stored.items():
        parts = name.split(".")
        leaf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[parts[-2]]
        t = next(t for t in reader.tensors if t.name == f"blk.{parts[2]}.{leaf}.weight")
        assert t.tensor_type.name == types[name].upper()
        data = np.asarray(t.data).reshape(blocks.shape)
        if leaf in ("attn_q", "attn_k"):
            data = data[np.argsort(permute_rows(blocks.shape[0], 4 if leaf == "attn_q" else 2))]
        assert np.array_equal(data, blocks), name
        got = _dequantized(reader, t.name)
        if leaf in ("attn_q", "attn_k"):
            got = unpermute_rows(got, 4 if leaf == "attn_q" else 2)
        assert np.array_equal(got, src.get(name).float().numpy()), name
    from compress.gguf.config import GGUFExportConfig
    from compress.gguf.export import export_gguf

    report = export_gguf(src, tmp_path / "auto.gguf", GGUFExportConfig())
    assert report.extra["kept_codes"] == 14 and report.extra["requantized"] == 0
    report = export_gguf(src, tmp_path / "other.gguf", GGUFExportConfig(type="q8_0"))
    assert report.extra["kept_codes"] == 0 and report.extra["requantized"] == 14


def test_float_gguf_format_is_refused(cli, llama256, tmp_path):
    result = cli("quantize", llama256, tmp_path / "q", "--format", "gguf:f16")
    assert result.exit_code == 2 and "float type" in result.output


def test_recipe_ends_in_a_gguf_file_and_refuses_one_in_the_middle(cli, tiny_llama, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("steps:\n  - pass: quantize\n    method: rtn\n    bits: 8\n    group_size: 32\n    format: packed\n  - pass: gguf\n")
    out = tmp_path / "m.gguf"
    result = cli("run", recipe, out, "--model", tiny_llama)
    assert result.exit_code == 0, result.output
    reader = _reader(out)
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith("attn_q.weight")} == {"Q8_0"}
    recipe.write_text("steps:\n  - pass: gguf\n  - pass: copy\n")
    result = cli("run", recipe, tmp_path / "x", "--model", tiny_llama)
    assert result.exit_code == 2 and "step 1 (gguf) writes a single file" in result.output


def test_gpt2_exports_for_transformers(cli, tmp_path):
    """GPT-2: Conv1D weights transposed, learned positions, biased LayerNorms; the f32 file loads in
    transformers to the source's logits."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_family

    # transformers' GGUF loader reads gpt2.context_length into n_ctx, not n_positions, and builds the
    # position table at GPT-2's default 1024: a model of that length loads
    folder = make_tiny_family(tmp_path / "gpt2", "gpt2", max_position_embeddings=1024)
    out = tmp_path / "g.gguf"
    _export(cli, folder, out, "--type", "f32")
    reader = _reader(out)
    assert _meta(reader, "general.architecture") == "gpt2" and _meta(reader, "gpt2.block_count") == 2
    names = {t.name for t in reader.tensors}
    assert {"position_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias", "blk.1.ffn_down.bias", "output_norm.bias"} <= names
    ids = torch.arange(3, 40).unsqueeze(0)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


LLAMA_FAMILY = {
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),  # biased q/k/v
    # q/k norms; head width 128 != hidden / heads (transformers' GGUF loader ignores key_length and
    # assumes Qwen3's default 128, which llama.cpp reads from the file)
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=128)),
}


@pytest.mark.parametrize("family", sorted(LLAMA_FAMILY))
def test_llama_family_exports_load_in_transformers(family, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_hf

    class_name, extra = LLAMA_FAMILY[family]
    # transformers' GGUF loader takes a general.name holding "mistral" for an architecture of its own
    folder = make_tiny_hf(tmp_path / f"tiny-{len(family)}", class_name, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = tmp_path / "m.gguf"
    _export(cli, folder, out, "--type", "f32")
    reader = _reader(out)
    arch = {"mistral": "llama"}.get(family, family)
    assert _meta(reader, "general.architecture") == arch
    assert _meta(reader, f"{arch}.attention.key_length") == extra.get("head_dim", 16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_gemma2_exports_for_transformers(cli, tmp_path):
    """Gemma 2: norms written as 1 + weight, soft-capping and the sliding window as keys."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_family

    # head width 256 with query_pre_attn_scalar 256, as in Gemma 2 2B and 9B: transformers' GGUF loader
    # keeps its default scalar (256) and llama.cpp scales by the head width
    folder = make_tiny_family(tmp_path / "gemma2", "gemma2", head_dim=256, query_pre_attn_scalar=256)
    out = tmp_path / "g.gguf"
    _export(cli, folder, out, "--type", "f32")
    reader = _reader(out)
    assert _meta(reader, "general.architecture") == "gemma2"
    assert _meta(reader, "gemma2.attn_logit_softcapping") == 50.0 and _meta(reader, "gemma2.final_logit_softcapping") == 30.0
    assert _meta(reader, "gemma2.attention.sliding_window") == 8 and _meta(reader, "gemma2.attention.key_length") == 256
    from weightsmith.checkpoint import Checkpoint

    norm = Checkpoint(folder).get("model.layers.0.input_layernorm.weight").float().numpy()
    assert np.array_equal(_dequantized(reader, "blk.0.attn_norm.weight"), norm + 1)
    ids = torch.arange(3, 40).unsqueeze(0)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-4)


def test_calibrated_q4_0_gives_the_first_ffn_down_layers_q4_1(cli, tmp_path):
    """llama-quantize's Q4_0 with an importance matrix writes ffn_down of the first eighth of the layers
    as Q4_1; GPTQ on gguf:q4_0 does the same, and the export keeps those blocks at --type q4_0."""
    from compress.quantize import GGUF_BLOCKS
    from safetensors import safe_open

    from tests.conftest import SAMPLE_TEXT

    folder = make_tiny_llama(tmp_path / "llama16", hidden=64, layers=16)
    q_dir = tmp_path / "q"
    result = cli("quantize", folder, q_dir, "--method", "gptq", "--format", "gguf:q4_0", "--calib", SAMPLE_TEXT, "--samples", "2", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    with safe_open(str(q_dir / GGUF_BLOCKS), framework="pt") as fh:
        types = fh.metadata()
    assert [types[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(4)] == ["q4_1", "q4_1", "q4_0", "q4_0"]
    assert types["model.layers.0.mlp.up_proj.weight"] == "q4_0"
    out = tmp_path / "q.gguf"
    _export(cli, q_dir, out, "--type", "q4_0")
    from compress.gguf.config import GGUFExportConfig
    from compress.gguf.export import export_gguf
    from weightsmith.checkpoint import Checkpoint

    report = export_gguf(Checkpoint(q_dir), tmp_path / "again.gguf", GGUFExportConfig(type="q4_0"))
    assert report.extra["kept_codes"] == 16 * 7 and report.extra["requantized"] == 0
    rtn = tmp_path / "rtn.gguf"
    _export(cli, folder, rtn, "--type", "q4_0")
    assert {t.tensor_type.name for t in _reader(rtn).tensors if "ffn_down" in t.name} == {"Q4_0"}


def test_gguf_type_overrides_per_tensor(cli, llama256, tmp_path):
    """quantize's --override gives a tensor its own GGUF type (the budget search's per-tensor choice);
    the export keeps it."""
    from safetensors import safe_open

    from compress.quantize import GGUF_BLOCKS

    q_dir = tmp_path / "q"
    result = cli("quantize", llama256, q_dir, "--method", "rtn", "--format", "gguf:q4_k_m", "--override", "mlp.up_proj:gguf_type=q2_k", "--override", "re:.*\\.0\\.self_attn\\.q_proj:gguf_type=q8_0")
    assert result.exit_code == 0, result.output
    with safe_open(str(q_dir / GGUF_BLOCKS), framework="pt") as fh:
        types = fh.metadata()
    assert types["model.layers.0.mlp.up_proj.weight"] == types["model.layers.1.mlp.up_proj.weight"] == "q2_k"
    assert types["model.layers.0.self_attn.q_proj.weight"] == "q8_0" and types["model.layers.1.self_attn.q_proj.weight"] == "q4_k"
    out = tmp_path / "q.gguf"
    _export(cli, q_dir, out)
    got = {t.name: t.tensor_type.name for t in _reader(out).tensors}
    assert got["blk.0.ffn_up.weight"] == "Q2_K" and got["blk.0.attn_q.weight"] == "Q8_0" and got["blk.1.attn_q.weight"] == "Q4_K"
    result = cli("quantize", llama256, tmp_path / "x", "--override", "up_proj:gguf_type=q4_0")
    assert result.exit_code == 2 and "gguf_type override needs --format gguf:TYPE" in result.output
    result = cli("quantize", llama256, tmp_path / "x", "--format", "gguf:q4_0", "--override", "up_proj:gguf_type=f16")
    assert result.exit_code == 2 and "gguf_type must be a GGUF block type" in result.output
