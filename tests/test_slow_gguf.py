"""GGUF export of the real SmolLM2-135M: f16, q4_0 and q4_k_m files load in transformers and evaluate by
the pinned protocol close to the checkpoint they came from; GPTQ's codes survive into q4_0."""

from __future__ import annotations

import math

import pytest
import torch

from compress.gguf.config import GGUFExportConfig
from compress.gguf.export import export_gguf
from weightsmith.checkpoint import Checkpoint
from weightsmith.data import read_text, tokenize
from weightsmith.evaluate import evaluate_tokens_many
from weightsmith.models import load_model, load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

#: evaluated tokens: enough for stable figures, short enough for the slow suite
_TOKENS = 4096


def _score(models, smollm2, assets):
    tokenizer = load_tokenizer(smollm2)
    tokens = tokenize(tokenizer, read_text(assets / "text" / "wikitext2-test.raw"), _TOKENS)
    reference = load_model(smollm2)
    sums = evaluate_tokens_many([reference, *models], tokens, 512, reference=reference)
    return [(math.exp(s.nll / s.positions), s.kl / s.positions) for s in sums]


def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_smollm2_exports_load_and_evaluate(smollm2, assets, tmp_path):
    src = Checkpoint(smollm2)
    files = {}
    for gtype in ("f16", "q4_0", "q4_k_m"):
        files[gtype] = tmp_path / f"smol-{gtype}.gguf"
        report = export_gguf(src, files[gtype], GGUFExportConfig(type=gtype))
        assert report.bytes_written == files[gtype].stat().st_size
    sizes = {g: f.stat().st_size for g, f in files.items()}
    assert sizes["q4_0"] < sizes["q4_k_m"] < sizes["f16"] < src.file_bytes * 1.01
    scores = _score([_load_gguf(f) for f in files.values()], smollm2, assets)
    (base_ppl, _), *rest = scores
    got = dict(zip(files, rest))
    assert abs(got["f16"][0] - base_ppl) / base_ppl < 0.002 and got["f16"][1] < 1e-3, got
    for gtype in ("q4_0", "q4_k_m"):
        ppl, kl = got[gtype]
        assert base_ppl < ppl < 1.6 * base_ppl and 0.001 < kl < 0.5, (gtype, got)
    assert got["q4_k_m"][1] < got["q4_0"][1], got


def test_gptq_q4_0_keeps_its_codes(smollm2, assets, tmp_path):
    """GPTQ W4 g32 symmetric, packed, exported at q4_0: every linear keeps its codes; transformers
    reads each back as exactly our codes times our scales."""
    from compress.config import QuantizeConfig
    from compress.quantize import calibration_tokens, quantize_checkpoint

    src = Checkpoint(smollm2)
    config = QuantizeConfig(method="gptq", bits=4, group_size=32, symmetric=True, samples=16, format="packed")
    quantize_checkpoint(src, tmp_path / "gptq", config, calib_tokens=calibration_tokens(src, config))
    out = tmp_path / "gptq-q4_0.gguf"
    report = export_gguf(Checkpoint(tmp_path / "gptq"), out, GGUFExportConfig(type="q4_0"))
    assert report.extra["kept_codes"] == 30 * 7 and report.extra["requantized"] == 0
    from compress.packed_input import packed_layers, read_quantized

    gguf_model = _load_gguf(out)
    weights = dict(gguf_model.named_parameters())
    src = Checkpoint(tmp_path / "gptq")
    for name, layer in packed_layers(src).items():
        q = read_quantized(src, layer)
        g = q.column_groups()
        exact = (q.codes.float() - q.zeros[:, g].float()) * q.scales[:, g].float()
        assert torch.equal(weights[name].detach(), exact), name
