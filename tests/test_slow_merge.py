"""Merging the real SmolLM2-135M: the streaming pass on a 270 MB bf16 checkpoint, values checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge.run import merge_checkpoints
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.evaluate import Protocol, evaluate_many

pytestmark = pytest.mark.slow

PROBES = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight")


@pytest.fixture(scope="module")
def variants(smollm2, tmp_path_factory) -> dict[str, Path]:
    """The real model and two seeded perturbations of it standing in for fine-tunes."""
    root = tmp_path_factory.mktemp("smol-merge")
    src = Checkpoint(smollm2)
    out = {"base": smollm2}
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        dest = root / f"ft{seed}"
        with CheckpointWriter(dest, source=smollm2) as writer:
            for name in src.names():
                t = src.get(name)
                noise = torch.randn(t.shape, generator=gen) * t.float().std().clamp_min(1e-3) * 0.05
                writer.add(name, (t.float() + noise).to(t.dtype))
        out[f"ft{seed}"] = dest
    return out


def _models(variants, *keys, **params):
    return [{"model": str(variants[k]), **({"parameters": params} if params else {})} for k in keys]


def test_slerp_ends_return_the_inputs(variants, tmp_path):
    for t, expected in ((0.0, "base"), (1.0, "ft1")):
        config = {"merge_method": "slerp", "base_model": str(variants["base"]), "models": _models(variants, "base", "ft1"), "parameters": {"t": t}}
        merge_checkpoints(config, tmp_path / f"t{t}")
        out, ref = Checkpoint(tmp_path / f"t{t}"), Checkpoint(variants[expected])
        for name in PROBES:
            assert torch.equal(out.get(name), ref.get(name)), (t, name)


def test_ties_with_one_model_and_full_density_is_task_arithmetic(variants, tmp_path):
    common = {"base_model": str(variants["base"]), "dtype": "float32"}
    ties_config = {**common, "merge_method": "ties", "models": _models(variants, "ft1", weight=0.7, density=1.0), "parameters": {"normalize": False}}
    merge_checkpoints(ties_config, tmp_path / "ties")
    merge_checkpoints({**common, "merge_method": "task_arithmetic", "models": _models(variants, "ft1", weight=0.7)}, tmp_path / "ta")
    ties, ta = Checkpoint(tmp_path / "ties"), Checkpoint(tmp_path / "ta")
    assert set(ties.names()) == set(ta.names())
    for name in ties.names():
        assert torch.allclose(ties.get(name).float(), ta.get(name).float(), atol=1e-6, rtol=0), name


def test_linear_with_weights_one_and_zero_scores_the_first_model(variants, tmp_path, assets):
    models = [{"model": str(variants["base"]), "parameters": {"weight": 1.0}}, {"model": str(variants["ft1"]), "parameters": {"weight": 0.0}}]
    merge_checkpoints({"merge_method": "linear", "models": models}, tmp_path / "self")
    merged_ckpt, base_ckpt = Checkpoint(tmp_path / "self"), Checkpoint(variants["base"])
    assert merged_ckpt.names() == base_ckpt.names()
    for name in base_ckpt.names():
        assert torch.equal(merged_ckpt.get(name), base_ckpt.get(name)), name
    protocol = Protocol(max_tokens=2048)
    base, merged = evaluate_many([variants["base"], tmp_path / "self"], assets / "text" / "wikitext2-test.raw", protocol)
    # The same weights; the float32 CPU forward itself is not bit-stable when other processes load
    # the cores (2026-12-01: 30.243283 vs 30.243312 under load, equal when alone), hence rel=1e-5.
    assert merged.perplexity == pytest.approx(base.perplexity, rel=1e-5) and 20 < base.perplexity < 40


def test_passthrough_doubles_the_depth_and_loads(variants, tmp_path):
    from transformers import AutoModelForCausalLM

    slices = [{"sources": [{"model": str(variants[k]), "layer_range": [0, 30]}]} for k in ("base", "ft2")]
    report = merge_checkpoints({"merge_method": "passthrough", "dtype": "bfloat16", "slices": slices}, tmp_path / "deep")
    out = Checkpoint(tmp_path / "deep")
    assert report.layers == 60 and out.config["num_hidden_layers"] == 60
    assert torch.equal(out.get("model.layers.45.mlp.up_proj.weight"), Checkpoint(variants["ft2"]).get("model.layers.15.mlp.up_proj.weight"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "deep", dtype=torch.float32)
    assert len(model.model.layers) == 60
    with torch.no_grad():
        logits = model(torch.arange(100, 132)[None]).logits
    assert logits.shape == (1, 32, 49152) and torch.isfinite(logits).all()


# ---- the methods added for mergekit parity, on the real model: properties each must show ---------


def _merge(variants, tmp_path, tag: str, config: dict) -> Checkpoint:
    merge_checkpoints(config, tmp_path / tag)
    out = Checkpoint(tmp_path / tag)
    assert set(out.names()) == set(Checkpoint(variants["base"]).names())
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(-1)


def test_nearswap_at_t_zero_keeps_the_base(variants, tmp_path):
    config = {"merge_method": "nearswap", "base_model": str(variants["base"]), "models": _models(variants, "base", "ft1"), "parameters": {"t": 0.0}}
    out, base = _merge(variants, tmp_path, "nearswap", config), Checkpoint(variants["base"])
    for name in PROBES:
        assert torch.equal(out.get(name), base.get(name)), name


def test_arcee_fusion_takes_each_entry_from_the_base_or_the_fine_tune(variants, tmp_path):
    config = {"merge_method": "arcee_fusion", "base_model": str(variants["base"]), "models": _models(variants, "base", "ft1")}
    out, base, ft = _merge(variants, tmp_path, "fusion", config), Checkpoint(variants["base"]), Checkpoint(variants["ft1"])
    for name in PROBES[1:]:
        b, f, o = base.get(name), ft.get(name), out.get(name)
        assert o.dtype == torch.float32  # mergekit's dtype for this method
        kept, taken = o == b.float(), o == b.float() + (f - b).float()
        assert bool((kept | taken).all()), name
        assert 0 < int((taken & ~kept).sum()) < o.numel() // 2, name  # some entries, the important ones only


def test_karcher_keeps_the_mean_norm(variants, tmp_path):
    config = {"merge_method": "karcher", "models": _models(variants, "ft1", "ft2")}
    out = _merge(variants, tmp_path, "karcher", config)
    for name in PROBES[:3]:
        norms = [float(_flat(Checkpoint(variants[k]).get(name)).norm()) for k in ("ft1", "ft2")]
        assert abs(float(_flat(out.get(name)).norm()) - sum(norms) / 2) < 1e-2 * sum(norms) / 2, name


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_spherical_merges_of_task_vectors_bisect_them_at_equal_weights(variants, tmp_path, method):
    config = {"merge_method": method, "base_model": str(variants["base"]), "models": _models(variants, "ft1", "ft2", weight=0.5)}
    out, base = _merge(variants, tmp_path, method, config), Checkpoint(variants["base"])
    for name in PROBES[:3]:
        b = _flat(base.get(name))
        merged, d1, d2 = _flat(out.get(name)) - b, _flat(Checkpoint(variants["ft1"]).get(name)) - b, _flat(Checkpoint(variants["ft2"]).get(name)) - b
        cos = [float(merged @ d / (merged.norm() * d.norm())) for d in (d1, d2)]
        assert abs(cos[0] - cos[1]) < 0.01 and cos[0] > 0.6, (name, cos)  # independent noises: each at 45 degrees


def test_ram_averages_deltas_that_both_models_make(variants, tmp_path):
    config = {"merge_method": "ram", "base_model": str(variants["base"]), "models": _models(variants, "ft1", "ft2")}
    out, base = _merge(variants, tmp_path, "ram", config), Checkpoint(variants["base"])
    for name in PROBES[:3]:
        b = base.get(name).double()
        mean = (Checkpoint(variants["ft1"]).get(name).double() + Checkpoint(variants["ft2"]).get(name).double()) / 2
        # changed: a task vector (in the checkpoint's dtype) larger than ram's epsilon, 1e-5, as
        # that dtype compares them
        changed = [(Checkpoint(variants[k]).get(name) - base.get(name)).abs() > 1e-5 for k in ("ft1", "ft2")]
        both = changed[0] & changed[1]
        assert float(both.double().mean()) > 0.9, name
        # a few bf16 steps of the base value at most (the sum instead of the mean would be off by
        # about half a delta: 5% of the tensor's spread)
        scale = b.abs() + b.std()
        assert float(((out.get(name).double() - mean).abs() / scale)[both].max()) <= 3 * 2**-8, name
