"""Unstructured pruning on the real SmolLM2-135M: 50% Wanda and SparseGPT beat 50% magnitude on
WikiText-2; 2:4 SparseGPT joint with 4-bit weights loads (packed) and evaluates."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.evaluate import Protocol, evaluate_many
from weightsmith.models import load_model
from weightsmith.passes import run_pass

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

RUNS = {
    "magnitude": {"method": "magnitude", "sparsity": 0.5},
    "wanda": {"method": "wanda", "sparsity": 0.5, "samples": 32},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5, "samples": 32},
    "sparsegpt-2of4-w4": {"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 64, "format": "packed", "samples": 32},
}


@pytest.fixture(scope="module")
def pruned(smollm2, assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol-prune")
    reports = {name: run_pass("prune", [smollm2], root / name, settings) for name, settings in RUNS.items()}
    return root, reports


def test_wanda_and_sparsegpt_beat_magnitude_on_wikitext(pruned, smollm2, assets):
    root, reports = pruned
    for name in ("magnitude", "wanda", "sparsegpt"):
        assert reports[name].sparsity == pytest.approx(0.5, abs=1e-3), name
    names = ["magnitude", "wanda", "sparsegpt", "sparsegpt-2of4-w4"]
    results = evaluate_many([smollm2] + [root / n for n in names], assets / "text" / "wikitext2-test.raw", Protocol(max_tokens=8192), smollm2)
    ppl = {n: r.perplexity for n, r in zip(["base"] + names, results)}
    assert ppl["base"] < ppl["wanda"] < ppl["magnitude"], ppl
    assert ppl["base"] < ppl["sparsegpt"] < ppl["magnitude"], ppl
    assert math.isfinite(ppl["sparsegpt-2of4-w4"]) and ppl["sparsegpt-2of4-w4"] < 20 * ppl["base"], ppl


def test_joint_2of4_w4_loads_packed_and_keeps_the_pattern(pruned):
    root, reports = pruned
    assert reports["sparsegpt-2of4-w4"].bits_per_weight is not None
    model = load_model(root / "sparsegpt-2of4-w4")
    with torch.no_grad():
        logits = model(torch.arange(100, 164)[None]).logits
    assert torch.isfinite(logits).all()
    for layer in (0, 15, 29):
        w = model.model.layers[layer].mlp.down_proj.weight.float()
        nonzero = (w.reshape(w.shape[0], -1, 4) != 0).sum(dim=-1)
        assert int(nonzero.max()) <= 2
