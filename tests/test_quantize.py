"""The quantize pass on tiny checkpoints: every method and format, two architecture families."""

from __future__ import annotations

import json

import pytest
import torch

from compress.config import Override, QuantizeConfig
from compress.grid import QuantGrid
from compress.quantize import quantize_checkpoint
from weightsmith.checkpoint import Checkpoint
from weightsmith.data import text_blocks
from weightsmith.errors import WeightsmithError
from weightsmith.models import load_model, load_tokenizer

from .conftest import SAMPLE_TEXT, make_tiny_llama, train_tokenizer
from .ongrid import assert_rtn_on_grid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_tiny_neox(folder, seed: int = 0):
    """A tiny random GPT-NeoX (fused query_key_value, LayerNorm with bias, parallel residual)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from weightsmith.checkpoint import CheckpointWriter

    side = folder.parent / f".{folder.name}-side"
    side.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(side)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0)
    config.architectures = ["GPTNeoXForCausalLM"]
    config.save_pretrained(side)
    with CheckpointWriter(folder, source=side, force=True) as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor.contiguous())
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qmodels")
    return {"llama": make_tiny_llama(root / "llama", hidden=64), "neox": make_tiny_neox(root / "neox")}


def calib(folder, n=8, seq=32):
    return text_blocks(load_tokenizer(folder), SAMPLE_TEXT, seq, n, seed=0)


def logits(folder, ids):
    with torch.no_grad():
        return load_model(folder)(ids).logits


@pytest.mark.parametrize("family", ["llama", "neox"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq_gptq"])
def test_every_method_and_format_loads_and_agrees(models, tmp_path, family, method):
    src = Checkpoint(models[family])
    tokens = calib(src.folder)
    ids = tokens[:2, :16]
    outs = {}
    for fmt in ("dense", "packed"):
        config = QuantizeConfig(method=method, bits=4, group_size=32, format=fmt, samples=8, seq_len=32, awq_samples=4)
        report = quantize_checkpoint(src, tmp_path / fmt, config, calib_tokens=tokens)
        assert report.quantized == 2 * (7 if family == "llama" else 4)
        outs[fmt] = logits(tmp_path / fmt, ids)
        assert torch.isfinite(outs[fmt]).all()
    # packed loads through compressed-tensors and decodes to exactly the dense weights
    assert torch.allclose(outs["dense"], outs["packed"], atol=1e-5, rtol=0)
    base = logits(src.folder, ids)
    assert not torch.equal(base, outs["dense"])  # something was quantized
    packed_cfg = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert packed_cfg["format"] == "pack-quantized" and packed_cfg["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    packed = Checkpoint(tmp_path / "packed")
    first = f"{'model.layers' if family == 'llama' else 'gpt_neox.layers'}.0"
    assert any(n.startswith(first) and n.endswith("weight_packed") for n in packed.names())


def test_dense_weights_lie_on_the_grid(models, tmp_path):
    src = Checkpoint(models["llama"])
    quantize_checkpoint(src, tmp_path / "q", QuantizeConfig(method="rtn", bits=3, group_size=16, symmetric=False))
    w = Checkpoint(tmp_path / "q").get("model.layers.1.mlp.down_proj.weight").double()
    for row in w[:4]:
        for group in row.split(16):
            assert len(torch.unique(group)) <= 2**3
    # untouched tensors are byte-identical
    assert torch.equal(Checkpoint(tmp_path / "q").get("model.embed_tokens.weight"), src.get("model.embed_tokens.weight"))
    assert torch.equal(Checkpoint(tmp_path / "q").get("lm_head.weight"), src.get("lm_head.weight"))


def test_gptq_and_awq_beat_rtn_on_the_model_output(models, tmp_path):
    src = Checkpoint(models["llama"])
    tokens = calib(src.folder, n=16)
    ids = calib(src.folder, n=4, seq=32)
    base = logits(src.folder, ids)
    err = {}
    for method in ("rtn", "gptq", "awq", "awq_gptq"):
        quantize_checkpoint(src, tmp_path / method, QuantizeConfig(method=method, bits=3, group_size=32), calib_tokens=tokens)
        err[method] = float((logits(tmp_path / method, ids) - base).pow(2).mean())
    assert err["gptq"] < err["rtn"] and err["awq"] < err["rtn"] and err["awq_gptq"] < err["rtn"], err


def test_same_seed_gives_byte_identical_output(models, tmp_path):
    src = Checkpoint(models["llama"])
    tokens = calib(src.folder)
    for name in ("a", "b"):
        quantize_checkpoint(src, tmp_path / name, QuantizeConfig(method="gptq", bits=4, group_size=32, act_order=True, format="packed"), calib_tokens=tokens)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "weightsmith.json" in files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_overrides_and_skip(models, tmp_path):
    src = Checkpoint(models["llama"])
    config = QuantizeConfig(
        method="rtn",
        bits=2,
        group_size=32,
        format="packed",
        overrides=[Override(match="down_proj", bits=8, group_size=-1), Override(match="re:model\\.layers\\.0\\.self_attn\\.q_proj", skip=True)],
    )
    quantize_checkpoint(src, tmp_path / "q", config)
    out = Checkpoint(tmp_path / "q")
    assert torch.equal(out.get("model.layers.0.self_attn.q_proj.weight"), src.get("model.layers.0.self_attn.q_proj.weight"))
    assert out.info("model.layers.1.mlp.down_proj.weight_scale").shape == (64, 1)  # per channel
    assert out.info("model.layers.1.mlp.up_proj.weight_scale").shape == (128, 2)
    assert out.info("model.layers.1.mlp.up_proj.weight_packed").shape == (128, 64 * 2 // 32)
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert sorted(by_bits) == [2, 8] and "model.layers.0.mlp.down_proj" in by_bits[8]
    assert torch.isfinite(logits(tmp_path / "q", calib(src.folder)[:1])).all()


def test_ragged_last_group_is_quantized_and_packed_layers_stay_loadable(tmp_path):
    src = Checkpoint(make_tiny_llama(tmp_path / "m48", hidden=48))  # 48 = 32 + 16: a shorter last group
    config = QuantizeConfig(method="rtn", bits=4, group_size=32)
    quantize_checkpoint(src, tmp_path / "d", config)
    w = Checkpoint(tmp_path / "d").get("model.layers.0.self_attn.q_proj.weight")
    # columns 0-31 and the short group 32-47 each on their own 16-point grid, rounded to nearest
    assert_rtn_on_grid(w, src.get("model.layers.0.self_attn.q_proj.weight"), QuantGrid(bits=4, symmetric=config.symmetric, group_size=32))
    report = quantize_checkpoint(src, tmp_path / "p", QuantizeConfig(method="rtn", bits=4, group_size=32, format="packed"))
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" in qc["weightsmith"]["ragged_last_group_stored_dense"]
    assert "model.layers.0.mlp.down_proj" not in report.ragged  # 96 = 3 x 32 packs
    ids = calib(src.folder, n=1, seq=16)
    assert torch.allclose(logits(tmp_path / "p", ids), logits(tmp_path / "d", ids), atol=1e-5)


def test_unknown_architecture_gets_rtn_and_a_clear_error_for_gptq(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    from weightsmith.checkpoint import CheckpointWriter

    side = tmp_path / "side"
    side.mkdir()
    train_tokenizer(side)
    config = BloomConfig(vocab_size=320, hidden_size=32, n_layer=1, n_head=2)
    model = BloomForCausalLM(config)
    config.save_pretrained(side)
    with CheckpointWriter(tmp_path / "bloom", source=side) as writer:
        for name, t in model.state_dict().items():
            if name != "lm_head.weight":
                writer.add(name, t.contiguous())
    src = Checkpoint(tmp_path / "bloom")
    with pytest.raises(WeightsmithError, match="architecture 'bloom' is not supported by layer-by-layer passes"):
        quantize_checkpoint(src, tmp_path / "g", QuantizeConfig(method="gptq"), calib_tokens=torch.zeros(2, 8, dtype=torch.long))
    assert not (tmp_path / "g").exists()
    report = quantize_checkpoint(src, tmp_path / "r", QuantizeConfig(method="rtn", group_size=32))
    assert report.quantized == 4  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h; word_embeddings left alone


def test_quantize_cli_prints_table_and_evaluates(models, tmp_path, cli):
    out = tmp_path / "q"
    result = cli("quantize", models["llama"], out, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", SAMPLE_TEXT,
                 "--samples", "8", "--seq-len", "32", "--eval", SAMPLE_TEXT, "--format", "packed")
    assert result.exit_code == 0, result.output
    assert "bits/weight" in result.stdout and "before" in result.stdout and "perplexity" in result.stdout
    record = json.loads((out / "weightsmith.json").read_text())
    assert record["pass"] == "quantize" and record["parameters"]["method"] == "gptq"
    assert record["figures"]["quantized_linears"] == 14 and record["figures"]["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # fp32 scales, one per 32 weights


def test_quantize_cli_bad_settings_are_one_line(models, tmp_path, cli):
    result = cli("quantize", models["llama"], tmp_path / "q", "--bits", "5")
    assert result.exit_code == 2 and "bits must be 2, 3, 4 or 8" in result.stderr
    result = cli("quantize", models["llama"], tmp_path / "q", "--override", "down_proj:bitz=3")
    assert result.exit_code == 2 and "bitz" in result.stderr
    result = cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", "--calib", tmp_path / "none.txt")
    assert result.exit_code == 2 and f"{tmp_path / 'none.txt'}: no such file or folder" in result.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(("method", "tensor"), [
    ("rtn", "model.layers.1.mlp.down_proj.weight"),
    ("gptq", "model.layers.1.mlp.down_proj.weight"),
    ("awq", "model.layers.0.self_attn.q_proj.weight"),
    ("gptq", "model.layers.1.post_attention_layernorm.weight"),
    ("awq_gptq", "model.embed_tokens.weight"),
])
def test_a_non_finite_weight_is_one_line_naming_the_file_and_tensor(models, tmp_path, cli, method, tensor):
    from weightsmith.checkpoint import CheckpointWriter

    src = Checkpoint(models["llama"])
    with CheckpointWriter(tmp_path / "bad", source=src.folder) as writer:
        for name in src.names():
            t = src.get(name).clone()
            if name == tensor:
                t.view(-1)[3] = float("nan") if method != "awq" else float("inf")
            writer.add(name, t)
    result = cli("quantize", tmp_path / "bad", tmp_path / "q", "--method", method, "--group-size", "32", "--calib", SAMPLE_TEXT, "--samples", "4", "--seq-len", "16")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{tmp_path / 'bad' / 'model.safetensors'}: tensor '{tensor}' holds NaN or infinite values" in lines[0]
    assert not (tmp_path / "q").exists()
