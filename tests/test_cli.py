"""The CLI: inspect from headers, copy / reshard / cast, refusal to overwrite."""

from __future__ import annotations

import json

import pytest
import torch

from weightsmith.checkpoint import Checkpoint


def test_inspect_json_reports_headers(tiny_llama, cli):
    result = cli("inspect", tiny_llama, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    ckpt = Checkpoint(tiny_llama)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 2 and info["hidden_size"] == 32
    assert info["parameters"] == ckpt.num_parameters
    assert info["dtypes"] == {"float32": {"tensors": len(ckpt.tensors), "elements": ckpt.num_parameters, "bytes": 4 * ckpt.num_parameters}}
    assert info["packed"] is None
    vocab = ckpt.config["vocab_size"]
    assert info["largest"][0]["bytes"] == vocab * 32 * 4
    assert info["largest"][0]["name"] in ("lm_head.weight", "model.embed_tokens.weight")
    assert info["quantization_config"] is None
    assert info["size_bytes"] == (tiny_llama / "model.safetensors").stat().st_size


def test_inspect_table(tiny_llama, cli):
    result = cli("inspect", tiny_llama)
    assert result.exit_code == 0
    assert "LlamaForCausalLM" in result.stdout and "largest tensors" in result.stdout and "dtype mix" in result.stdout


def test_inspect_counts_packed_linears_by_their_logical_shape(tiny_llama, tmp_path, cli):
    """14 linears (2 layers x q, k, v, o, gate, up, down) hold 18,432 weights; packed at 4 bits with
    one fp32 scale per 32 weights they take 5 bits per weight. Parameters stay those of the dense model."""
    from .test_evaluate import make_packed

    packed = make_packed(tiny_llama, tmp_path / "packed")
    result = cli("inspect", packed, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    dense = Checkpoint(tiny_llama).num_parameters
    assert info["parameters"] == dense == 39072 == Checkpoint(packed).num_parameters
    assert info["packed"] == {"linears": 14, "parameters": 18432, "bytes": 11520, "bits_per_weight": 5.0}
    assert info["dtypes"]["int32"] == {"tensors": 14, "elements": 18432 // 8, "bytes": 18432 // 2}  # 8 codes per word
    assert info["dtypes"]["int64"] == {"tensors": 14, "elements": 28, "bytes": 224}  # the weight_shape pairs
    table = cli("inspect", packed)
    assert table.exit_code == 0
    assert "39,072" in table.stdout and "14 holding 18,432 weights in 11.5 KB: 5.000 bits per weight" in table.stdout


def test_copy_casts_and_reshards(tiny_llama, tmp_path, cli):
    out = tmp_path / "bf16"
    result = cli("copy", tiny_llama, out, "--dtype", "bf16", "--max-shard-size", "10KB")
    assert result.exit_code == 0, result.output
    src, dst = Checkpoint(tiny_llama), Checkpoint(out)
    assert len(dst.files) > 1 and (out / "model.safetensors.index.json").exists()
    for name in src.names():
        assert torch.equal(dst.get(name), src.get(name).to(torch.bfloat16))
    assert (out / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()
    again = cli("copy", tiny_llama, out)
    assert again.exit_code == 2 and again.stderr.strip() == f"error: {out}: already exists; pass --force to overwrite it"
    assert cli("copy", tiny_llama, out, "--force").exit_code == 0
    assert len(Checkpoint(out).files) == 1


def test_bad_size_and_dtype_are_one_line(tiny_llama, tmp_path, cli):
    result = cli("copy", tiny_llama, tmp_path / "x", "--max-shard-size", "lots")
    assert result.exit_code == 2 and "cannot read size 'lots'" in result.stderr
    result = cli("copy", tiny_llama, tmp_path / "x", "--dtype", "fp8")
    assert result.exit_code == 2 and "unknown dtype 'fp8'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_help_explains_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in ("inspect", "eval", "convert", "copy", "fetch-demo-model", "demo"):
        assert name in result.stdout


@pytest.mark.slow
def test_demo_table_counts_logical_parameters_and_states_its_tokens(smollm2, assets, tmp_path, cli):
    result = cli("demo", "--max-tokens", "1024", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps the table to the runner's width
    rows = [line for line in result.stdout.splitlines() if "before (reference)" in line or line.startswith("│ after")]
    assert len(rows) == 2 and all("134,515,008" in row for row in rows)  # packed or not, the same weights
    assert "1,024 tokens of wikitext2-test.raw (2 windows of up to 512), 1,022 scored" in text
    assert "after: 4.250 bits per weight in its packed linears" in text  # 4-bit codes + a bf16 scale per 64
    assert "no BOS" in text
    assert "Warning" not in result.output
    assert "evaluating before and after (windows): 2/2 done in" in result.stderr
