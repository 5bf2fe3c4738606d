"""The real default model: GGUF -> safetensors conversion and the pinned WikiText-2 perplexity."""

from __future__ import annotations

import pytest
import torch

from weightsmith.checkpoint import Checkpoint
from weightsmith.evaluate import Protocol, evaluate

pytestmark = pytest.mark.slow


def test_default_model_perplexity_matches_reference(smollm2, assets):
    report = evaluate(smollm2, assets / "text" / "wikitext2-test.raw", Protocol())
    assert report.positions == 20440 and report.windows == 40
    # assets/README.md: 28.74 for the dequantized model, first 20,480 tokens, 512-token windows, fp32
    assert report.perplexity == pytest.approx(28.74, abs=0.02)
    assert report.num_parameters == 134_515_008


def test_convert_cli_matches_cached_conversion(smollm2, tmp_path, cli):
    from weightsmith.demo import demo_gguf

    out = tmp_path / "converted"
    result = cli("convert", demo_gguf(), out, "--dtype", "bf16", "--max-shard-size", "100MB")
    assert result.exit_code == 0, result.output
    ours, cached = Checkpoint(out), Checkpoint(smollm2)
    assert len(ours.files) == 3 and set(ours.names()) == set(cached.names())
    for name in ("model.embed_tokens.weight", "model.layers.7.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(ours.get(name), cached.get(name))
    assert ours.config["architectures"] == ["LlamaForCausalLM"] and ours.config["num_hidden_layers"] == 30
