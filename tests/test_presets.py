"""The presets: every recipe in presets/ is run on tiny models, and its output checked for what the
preset promises (grid and format, sparsity pattern, widths, GGUF block types, merge values).

Calibrated presets run with a few short calibration blocks of the bundled sample text: the test
rewrites `calib`, `samples` and `seq_len` (and AWQ's search size) in a copy of the preset, keeping
every other key as shipped. Data-free and merge presets run as shipped, by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compress.grid import QuantGrid
from compress.packed_input import packed_layers, read_quantized
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.recipe import load_recipe, preset_path

from .conftest import SAMPLE_TEXT, make_tiny_llama
from .ongrid import assert_rtn_on_grid

PRESETS_DIR = preset_path("demo-int4").parent
#: presets run by another test file: the budget search's (tests/test_search.py)
TESTED_ELSEWHERE = {"fit-budget"}
NAMES = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if p.stem not in TESTED_ELSEWHERE)
MERGES = ("soup", "merge-slerp", "merge-ties", "merge-dare-ties")
#: what a calibrated step gets in the tests instead of its shipped calibration
SMALL_CALIB = {"calib": str(SAMPLE_TEXT), "samples": 4, "seq_len": 32}
SMALL_AWQ = {"awq_samples": 2, "awq_grid": 4}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def llama64(tmp_path_factory) -> Path:
    """A tiny Llama whose widths (64, 128) take groups of 64; 6 layers, so that 4 can be dropped."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama64", hidden=64, layers=6)


@pytest.fixture(scope="module")
def llama256(tmp_path_factory) -> Path:
    """A tiny Llama whose widths (256, 512) fit llama.cpp's K-quant super-blocks."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "llama256", hidden=256, layers=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    """A base and two fine-tunes of it: the base plus a seeded perturbation of every tensor (a tenth
    of the weights' spread), as full fine-tunes differ from their base."""
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_llama(root / "base", seed=0)
    src = Checkpoint(base)
    tunes = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        with CheckpointWriter(root / f"tune{seed}", source=base) as writer:
            for name in src.names():
                t = src.get(name)
                writer.add(name, t + 0.02 * torch.randn(t.shape, generator=gen))
        tunes.append(root / f"tune{seed}")
    return [base, *tunes]


def small(name: str, folder: Path) -> Path:
    """A copy of preset ``name`` whose calibrated steps use :data:`SMALL_CALIB`; every other key as
    shipped. A calibrated step must state its calibration size (the presets document it)."""
    doc = yaml.safe_load(preset_path(name).read_text(encoding="utf-8"))
    for step in doc["steps"]:
        if "samples" in step:
            step.update(SMALL_CALIB)
            if step.get("method") == "awq":
                step.update(SMALL_AWQ)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def run(cli, recipe: str | Path, out: Path, *models: Path) -> Path:
    """``weightsmith run RECIPE OUT --model M ...``; asserts success."""
    args = ["run", recipe, out]
    for model in models:
        args += ["--model", model]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return out


def record(folder: Path) -> dict:
    return json.loads((folder / "weightsmith.json").read_text())


def dequantized(ckpt: Checkpoint) -> dict[str, tuple[torch.Tensor, QuantGrid]]:
    """Every packed linear's weights (by dense name) and grid."""
    return {name: (read_quantized(ckpt, layer).dequantize().float(), layer.grid) for name, layer in packed_layers(ckpt).items()}


def linear_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.{leaf}.weight" for i in range(layers) for leaf in LINEARS]


def weights_config(ckpt: Checkpoint) -> dict:
    quant = ckpt.config["quantization_config"]
    assert quant["format"] == "pack-quantized"
    (group,) = quant["config_groups"].values()
    return group["weights"]


# --- every preset: documented, listed, covered by a test here --------------------------------------


def test_every_preset_is_documented_and_loads():
    assert set(MERGES) | {"demo-int4", "rtn-w4", "gptq-w4", "awq-w4", "int8", "wanda-50", "sparse-2of4", "sparse-2of4-w4",
                          "shrink-mlp-25", "drop-layers-4", "edge-q4", "edge-q4-small"} == set(NAMES)
    for name in NAMES:
        text = preset_path(name).read_text(encoding="utf-8")
        lines = text.splitlines()
        assert lines[0].startswith("# ") and len(lines[0]) > 20, name
        comments = "\n".join(line for line in lines if line.startswith("#"))
        for part in ("# What:", "# When:", "# Cost:"):
            assert part in comments, (name, part)
        if name not in MERGES:  # the figure bench/presets.py measured, with its date
            reached = comments[comments.index("# Reached:"):]
            assert re.search(r"perplexity \d+\.\d+", reached) and re.search(r"20\d\d-\d\d-\d\d", reached), name
        assert load_recipe(preset_path(name))
    assert preset_path("preset:gptq-w4") == preset_path("gptq-w4.yaml") == PRESETS_DIR / "gptq-w4.yaml"


def test_presets_command_lists_every_preset_with_its_description(cli):
    result = cli("presets")
    assert result.exit_code == 0, result.output
    rows = result.stdout
    for name in NAMES:
        assert name in rows
    assert "prune → quantize → gguf" in rows


def test_demo_refuses_a_merge_preset_before_fetching_anything(cli):
    result = cli("demo", "--preset", "soup")
    assert result.exit_code == 2
    assert "merges several models" in result.output and "weightsmith run preset:soup OUT --model A --model B" in result.output


def test_demo_runs_a_preset_on_the_default_model(cli, llama64, tmp_path, monkeypatch):
    """The demo with the default model replaced by a tiny one: the preset's output, and a table."""
    import weightsmith.demo

    monkeypatch.setattr(weightsmith.demo, "fetch_demo_model", lambda: llama64)
    result = cli("demo", "--preset", "demo-int4", "--text", SAMPLE_TEXT, "--max-tokens", "256", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert weights_config(Checkpoint(tmp_path / "demo"))["num_bits"] == 4
    assert "preset demo-int4" in result.stdout and "after" in result.stdout


# --- quantization ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "grid"),
    [("demo-int4", QuantGrid(4, True, 64)), ("rtn-w4", QuantGrid(4, False, 64)), ("int8", QuantGrid(8, True, -1))],
)
def test_round_to_nearest_presets(cli, llama64, tmp_path, name, grid):
    """Data-free presets, run by name: every decoder linear packed on the preset's grid, each weight
    the grid point nearest to the source weight; zero points only on the asymmetric grid."""
    out = run(cli, f"preset:{name}", tmp_path / "out", llama64)
    ckpt, src = Checkpoint(out), Checkpoint(llama64)
    weights = weights_config(ckpt)
    assert (weights["num_bits"], weights["symmetric"]) == (grid.bits, grid.symmetric)
    assert weights["strategy"] == ("channel" if grid.group_size == -1 else "group")
    layers = dequantized(ckpt)
    assert sorted(layers) == sorted(linear_names(6))
    for linear, (w, got_grid) in layers.items():
        assert got_grid == grid
        assert_rtn_on_grid(w, src.get(linear).float(), grid)
        assert (f"{linear.removesuffix('.weight')}.weight_zero_point" in ckpt) == (not grid.symmetric)
    assert torch.equal(ckpt.get("model.embed_tokens.weight"), src.get("model.embed_tokens.weight"))


@pytest.mark.parametrize("name", ["gptq-w4", "awq-w4"])
def test_calibrated_4bit_presets(cli, llama64, tmp_path, name):
    """GPTQ and AWQ: packed W4 g64 symmetric; the weights are not plain rounding of the source (GPTQ
    moves them to compensate, AWQ scales them), every group holds at most 16 values, and the record
    names the method and the calibration the step ran with."""
    out = run(cli, small(name, tmp_path), tmp_path / "out", llama64)
    ckpt, src = Checkpoint(out), Checkpoint(llama64)
    weights = weights_config(ckpt)
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 64, True)
    assert weights["actorder"] == ("weight" if name == "gptq-w4" else None)
    params = record(out)["parameters"]
    assert params["method"] == name.removesuffix("-w4") and params["samples"] == 4 and params["seq_len"] == 32
    layers = dequantized(ckpt)
    assert sorted(layers) == sorted(linear_names(6))
    differs = 0
    for linear, (w, grid) in layers.items():
        assert grid == QuantGrid(4, True, 64)
        groups = w.reshape(w.shape[0], -1, 64)
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, 64)) <= 16
        try:
            assert_rtn_on_grid(w, src.get(linear).float(), grid)
        except AssertionError:
            differs += 1
    assert differs == len(layers)
    if name == "awq-w4":  # the searched scales went into the norms in front of q/k/v and gate/up
        norms = [f"model.layers.{i}.{norm}.weight" for i in range(6) for norm in ("input_layernorm", "post_attention_layernorm")]
        assert any(not torch.equal(ckpt.get(norm), src.get(norm)) for norm in norms)


# --- pruning -----------------------------------------------------------------------------------------


def test_wanda_50(cli, llama64, tmp_path):
    """Half of every row of every decoder linear set to zero, the kept weights untouched, and the
    mask is not plain magnitude (the input norms weigh in)."""
    out = run(cli, small("wanda-50", tmp_path), tmp_path / "out", llama64)
    ckpt, src = Checkpoint(out), Checkpoint(llama64)
    other_than_magnitude = 0
    for linear in linear_names(6):
        w, s = ckpt.get(linear), src.get(linear)
        zeros = w == 0
        assert torch.equal(zeros.sum(1), torch.full((w.shape[0],), w.shape[1] // 2))
        assert torch.equal(w[~zeros], s[~zeros])
        by_magnitude = s.abs() <= s.abs().kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
        other_than_magnitude += not torch.equal(zeros, by_magnitude)
    assert other_than_magnitude > 0
    assert record(out)["parameters"]["method"] == "wanda"


def _two_of_four(w: torch.Tensor, exact: bool = True) -> None:
    """Two zeros in every 4 consecutive weights of a row: exactly, or at least (a kept weight may
    round to 0 on a quantization grid)."""
    zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
    assert bool((zeros == 2).all() if exact else (zeros >= 2).all()), "2:4 pattern broken"


def test_sparse_2of4(cli, llama64, tmp_path):
    """Exactly two zeros in every four consecutive weights of each row; the kept weights refitted."""
    out = run(cli, small("sparse-2of4", tmp_path), tmp_path / "out", llama64)
    ckpt, src = Checkpoint(out), Checkpoint(llama64)
    for linear in linear_names(6):
        w = ckpt.get(linear)
        _two_of_four(w)
        kept = w != 0
        assert not torch.equal(w[kept], src.get(linear)[kept])  # SparseGPT's update moved them
    assert "quantization_config" not in ckpt.config


def test_sparse_2of4_w4(cli, llama64, tmp_path):
    """Packed W4 g64 whose dequantized weights keep the 2:4 pattern in every window."""
    out = run(cli, small("sparse-2of4-w4", tmp_path), tmp_path / "out", llama64)
    ckpt = Checkpoint(out)
    assert (weights_config(ckpt)["num_bits"], weights_config(ckpt)["group_size"]) == (4, 64)
    layers = dequantized(ckpt)
    assert sorted(layers) == sorted(linear_names(6))
    for w, grid in layers.values():
        assert grid == QuantGrid(4, True, 64)
        _two_of_four(w, exact=False)


def test_shrink_mlp_25(cli, llama64, tmp_path):
    """intermediate_size 128 -> 96 in the config and the shapes; the kept channels are source channels,
    the same ones in gate, up and down."""
    out = run(cli, small("shrink-mlp-25", tmp_path), tmp_path / "out", llama64)
    ckpt, src = Checkpoint(out), Checkpoint(llama64)
    assert ckpt.config["intermediate_size"] == 96 and src.config["intermediate_size"] == 128
    for i in range(6):
        p = f"model.layers.{i}.mlp."
        gate, src_gate = ckpt.get(p + "gate_proj.weight"), src.get(p + "gate_proj.weight")
        assert gate.shape == (96, 64) and ckpt.get(p + "down_proj.weight").shape == (64, 96)
        kept = [int(torch.nonzero((src_gate == row).all(1))[0]) for row in gate]
        assert len(set(kept)) == 96
        assert torch.equal(ckpt.get(p + "up_proj.weight"), src.get(p + "up_proj.weight")[kept])
        assert torch.equal(ckpt.get(p + "down_proj.weight"), src.get(p + "down_proj.weight")[:, kept])
        assert torch.equal(ckpt.get(p.replace("mlp.", "self_attn.") + "q_proj.weight"), src.get(p.replace("mlp.", "self_attn.") + "q_proj.weight"))


def test_drop_layers_4(cli, llama64, tmp_path):
    """6 layers -> 2: config rewritten, the kept layers are two of the source's, in order, whole."""
    out = run(cli, small("drop-layers-4", tmp_path), tmp_path / "out", llama64)
    ckpt, src = Checkpoint(out), Checkpoint(llama64)
    assert ckpt.config["num_hidden_layers"] == 2
    kept = []
    for i in range(2):
        q = ckpt.get(f"model.layers.{i}.self_attn.q_proj.weight")
        (j,) = [j for j in range(6) if torch.equal(q, src.get(f"model.layers.{j}.self_attn.q_proj.weight"))]
        kept.append(j)
        for leaf in LINEARS:
            assert torch.equal(ckpt.get(f"model.layers.{i}.{leaf}.weight"), src.get(f"model.layers.{j}.{leaf}.weight"))
    assert kept == sorted(kept) and len(set(kept)) == 2
    assert not any(name.startswith("model.layers.2.") for name in ckpt.names())


# --- GGUF --------------------------------------------------------------------------------------------


def _gguf(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _types(reader) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader.tensors}


def test_edge_q4_keeps_gptq_codes_in_a_q4_k_m_file(cli, llama256, tmp_path):
    """One GGUF file, Q4_K_M's per-tensor types (Q6_K for attn_v and ffn_down of the last layer of
    two, Q4_K elsewhere), and every linear's blocks dequantize exactly to the weights of the GPTQ
    step run by hand: the export kept GPTQ's codes."""
    from gguf.quants import dequantize

    from weightsmith.gguf_import import unpermute_rows
    from weightsmith.passes import run_pass

    recipe = small("edge-q4", tmp_path)
    out = run(cli, recipe, tmp_path / "edge.gguf", llama256)
    assert out.is_file()
    reader = _gguf(out)
    types = _types(reader)
    assert reader.fields["general.file_type"].contents() == 15  # MOSTLY_Q4_K_M
    for leaf in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert types[f"blk.0.{leaf}.weight"] == types[f"blk.1.{leaf}.weight"] == "Q4_K"
    assert (types["blk.0.attn_v.weight"], types["blk.0.ffn_down.weight"]) == ("Q4_K", "Q4_K")
    assert (types["blk.1.attn_v.weight"], types["blk.1.ffn_down.weight"]) == ("Q6_K", "Q6_K")
    (quantize_step, _) = load_recipe(recipe)
    by_hand = tmp_path / "by-hand"
    run_pass("quantize", [llama256], by_hand, quantize_step[1])
    dense = Checkpoint(by_hand)
    leaves = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for t in reader.tensors:
        block, _, rest = t.name.removeprefix("blk.").partition(".")
        leaf = rest.removesuffix(".weight")
        if leaf not in leaves:
            continue
        got = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
        if leaf in ("attn_q", "attn_k"):
            got = unpermute_rows(got, 4 if leaf == "attn_q" else 2)
        assert np.array_equal(got, dense.get(f"model.layers.{block}.{leaves[leaf]}.weight").float().numpy()), t.name


def test_edge_q4_small_prunes_then_writes_q4_k_m(cli, llama256, tmp_path):
    """MLP 512 -> 384 wide in the GGUF file's metadata and shapes; ffn_down, 384 values per row (no
    multiple of 256), takes llama-quantize's fallbacks of Q4_K and Q6_K (Q5_0, Q8_0); the rest as
    in edge-q4."""
    out = run(cli, small("edge-q4-small", tmp_path), tmp_path / "small.gguf", llama256)
    reader = _gguf(out)
    types = _types(reader)
    assert reader.fields["llama.feed_forward_length"].contents() == 384
    assert reader.fields["general.file_type"].contents() == 15
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_up.weight"] == [256, 384] and shapes["blk.1.ffn_down.weight"] == [384, 256]
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q5_0", "Q8_0")
    assert types["blk.0.ffn_gate.weight"] == types["blk.1.attn_q.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
    assert out.stat().st_size < run(cli, small("edge-q4", tmp_path), tmp_path / "edge.gguf", llama256).stat().st_size


# --- merges ------------------------------------------------------------------------------------------


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {name: ckpt.get(name).double() for name in ckpt.names()}


def test_soup_is_the_mean_of_every_model(cli, family, tmp_path):
    out = run(cli, "preset:soup", tmp_path / "out", *family)
    inputs = [_tensors(f) for f in family]
    merged = _tensors(out)
    assert sorted(merged) == sorted(inputs[0])
    for name, value in merged.items():
        mean = sum(t[name] for t in inputs) / 3
        assert torch.allclose(value, mean, atol=1e-6, rtol=0), name
    assert not torch.allclose(merged["model.layers.0.mlp.up_proj.weight"], inputs[0]["model.layers.0.mlp.up_proj.weight"])


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp of two tensors (flattened vectors; linear where they are nearly parallel)."""
    na, nb = a / a.norm(), b / b.norm()
    dot = float((na * nb).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def test_merge_slerp_is_the_spherical_midpoint(cli, tmp_path):
    """Two unrelated tiny models: every tensor is the slerp midpoint, whose norm stays near the
    inputs' where the plain mean of near-orthogonal matrices shrinks by about 1/sqrt(2)."""
    a = make_tiny_llama(tmp_path / "a", seed=1)
    b = make_tiny_llama(tmp_path / "b", seed=2, vocab=Checkpoint(a).config["vocab_size"])
    out = run(cli, "preset:merge-slerp", tmp_path / "out", a, b)
    ta, tb, merged = _tensors(a), _tensors(b), _tensors(out)
    for name, value in merged.items():
        assert torch.allclose(value, _slerp(ta[name], tb[name], 0.5), atol=1e-5, rtol=1e-5), name
    w = "model.layers.1.self_attn.q_proj.weight"
    assert float(merged[w].norm()) > 0.95 * min(float(ta[w].norm()), float(tb[w].norm()))
    assert float(((ta[w] + tb[w]) / 2).norm()) < 0.8 * float(merged[w].norm())


def test_merge_ties_trims_elects_and_averages_onto_the_base(cli, family, tmp_path):
    """TIES by hand on every tensor: each fine-tune's delta keeps its largest half, the sign of the
    delta sum is elected per weight, the agreeing deltas are averaged onto the base; the base, listed
    among the inputs, is no task."""
    base, *tunes = family
    out = run(cli, "preset:merge-ties", tmp_path / "out", *family)
    tb, merged = _tensors(base), _tensors(out)
    tt = [_tensors(f) for f in tunes]
    for name, value in merged.items():
        deltas = []
        for t in tt:
            d = (t[name] - tb[name]).flatten()
            k = int(0.5 * d.numel())
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[d.abs().topk(k).indices] = True
            deltas.append(torch.where(keep, d, 0).reshape(value.shape))
        stack = torch.stack(deltas)
        elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = stack.sign() == elected
        divisor = agree.double().sum(0)
        want = tb[name] + (stack * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
        assert torch.allclose(value, want, atol=1e-6, rtol=0), name


def test_merge_dare_ties_drops_rescales_and_follows_the_seed(cli, family, tmp_path):
    """DARE-TIES: each fine-tune keeps a random half of its delta d_i, scaled by c_i (so that its L1
    norm is unchanged: about 1 / density = 2); after sign election and averaging, every weight's delta
    onto the base is 0 (both dropped), c1 d1, c2 d2 or their mean. About a quarter of the weights keep
    the base's value; another seed draws other weights."""
    base, *tunes = family
    out = run(cli, "preset:merge-dare-ties", tmp_path / "out", *family)
    tb, merged = _tensors(base), _tensors(out)
    d1, d2 = (_tensors(f) for f in tunes)
    name = "model.layers.1.mlp.down_proj.weight"
    delta = (merged[name] - tb[name]).flatten()
    a, b = (d1[name] - tb[name]).flatten(), (d2[name] - tb[name]).flatten()
    c1, c2 = ((delta / x)[((delta / x) - 2).abs() < 0.2].median() for x in (a, b))
    assert 1.9 < float(c1) < 2.1 and 1.9 < float(c2) < 2.1
    allowed = torch.stack([torch.zeros_like(a), c1 * a, c2 * b, (c1 * a + c2 * b) / 2])
    assert bool(((delta - allowed).abs().amin(0) <= 1e-6 + 1e-5 * delta.abs()).all())
    unchanged = float((delta.abs() < 1e-9).double().mean())
    assert 0.15 < unchanged < 0.35
    result = cli("run", "preset:merge-dare-ties", tmp_path / "seed1", *[x for f in family for x in ("--model", f)], "--seed", "1")
    assert result.exit_code == 0, result.output
    assert not torch.equal(Checkpoint(tmp_path / "seed1").get(name), Checkpoint(out).get(name))
