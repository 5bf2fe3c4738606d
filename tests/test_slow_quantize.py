"""Quantization on the real SmolLM2-135M: GPTQ and AWQ beat RTN on WikiText-2; packed loads back."""

from __future__ import annotations

import pytest
import torch

from compress.config import QuantizeConfig
from compress.quantize import calibration_tokens, quantize_checkpoint
from weightsmith.checkpoint import Checkpoint
from weightsmith.evaluate import Protocol, evaluate_many
from weightsmith.models import load_model

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def quantized(smollm2, assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol-q")
    src = Checkpoint(smollm2)
    out = {}
    for method in ("rtn", "gptq", "awq"):
        config = QuantizeConfig(method=method, bits=4, group_size=64, samples=64, act_order=method == "gptq", format="packed" if method == "gptq" else "dense")
        tokens = calibration_tokens(src, config) if method != "rtn" else None
        quantize_checkpoint(src, root / method, config, calib_tokens=tokens)
        out[method] = root / method
    return out


def test_gptq_and_awq_beat_rtn_on_wikitext(quantized, smollm2, assets):
    text = assets / "text" / "wikitext2-test.raw"
    reports = evaluate_many(list(quantized.values()), text, Protocol())
    ppl = {m: r.perplexity for m, r in zip(quantized, reports)}
    base = 28.74
    assert base < ppl["gptq"] < ppl["rtn"], ppl
    assert base < ppl["awq"] < ppl["rtn"], ppl


def test_packed_real_model_matches_its_dequantized_weights(quantized, smollm2):
    packed = Checkpoint(quantized["gptq"])
    assert any(n.endswith("down_proj.weight_packed") for n in packed.names())
    assert "weightsmith" not in packed.config["quantization_config"]  # 576 and 1536 are multiples of 64: nothing kept dense
    model = load_model(quantized["gptq"])
    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    down = model.model.layers[3].mlp.down_proj.weight
    # 1536 / 64 = 24 groups per row; each group holds at most 16 distinct values
    row = down[0].double()
    assert all(len(torch.unique(g)) <= 16 for g in row.split(64))
