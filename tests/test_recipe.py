"""Recipes: validation errors that name the key, the step and the allowed keys; chained steps."""

from __future__ import annotations

import json

import pytest
import torch

from compress.grid import QuantGrid
from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.recipe import load_recipe, preset_path, run_recipe

from .ongrid import assert_rtn_on_grid


def write(tmp_path, text):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_step_and_allowed_keys(tmp_path):
    path = write(tmp_path, "steps:\n  - pass: quantize\n    bits: 4\n  - pass: quantize\n    bitz: 3\n")
    with pytest.raises(WeightsmithError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: step 2 (quantize): unknown key 'bitz'; allowed keys: ")
    assert "bits" in message and "group_size" in message


def test_unknown_pass_and_bad_value(tmp_path):
    with pytest.raises(WeightsmithError, match="step 1: unknown pass .shrink.; passes: copy, gguf, merge, prune, quantize"):
        load_recipe(write(tmp_path, "steps:\n  - pass: shrink\n"))
    with pytest.raises(WeightsmithError, match=r"step 1 \(quantize\): bits: bits must be 2, 3, 4 or 8"):
        load_recipe(write(tmp_path, "steps:\n  - pass: quantize\n    bits: 5\n"))
    with pytest.raises(WeightsmithError, match="not valid YAML"):
        load_recipe(write(tmp_path, "steps: [\n"))


def test_presets_parse():
    """Every preset parses into the steps its name promises (tests/test_presets.py runs them)."""
    quantize = {name: load_recipe(preset_path(name))[0][1] for name in ("demo-int4", "rtn-w4", "gptq-w4", "awq-w4", "int8")}
    assert all(s.format == "packed" for s in quantize.values())
    assert [(quantize[n].method, quantize[n].bits, quantize[n].symmetric) for n in quantize] == [
        ("rtn", 4, True), ("rtn", 4, False), ("gptq", 4, True), ("awq", 4, True), ("rtn", 8, True)
    ]
    pruning = {name: load_recipe(preset_path(name))[0] for name in ("wanda-50", "sparse-2of4", "sparse-2of4-w4", "shrink-mlp-25", "drop-layers-4")}
    assert all(step == "prune" for step, _ in pruning.values())
    assert pruning["wanda-50"][1].method == "wanda" and pruning["wanda-50"][1].sparsity == 0.5
    assert pruning["sparse-2of4"][1].pattern == "2:4" and pruning["sparse-2of4"][1].bits is None
    assert pruning["sparse-2of4-w4"][1].pattern == "2:4" and pruning["sparse-2of4-w4"][1].bits == 4
    assert pruning["shrink-mlp-25"][1].structured.mlp == 0.25
    assert pruning["drop-layers-4"][1].structured.layers == 4
    assert [name for name, _ in load_recipe(preset_path("edge-q4"))] == ["quantize", "gguf"]
    assert [name for name, _ in load_recipe(preset_path("edge-q4-small"))] == ["prune", "quantize", "gguf"]
    merges = {name: load_recipe(preset_path(f"preset:{name}"))[0][1] for name in ("soup", "merge-slerp", "merge-ties", "merge-dare-ties")}
    assert [m.merge_method for m in merges.values()] == ["linear", "slerp", "ties", "dare_ties"]
    with pytest.raises(WeightsmithError, match="no preset named 'nope'; presets: .*gptq-w4.*wanda-50"):
        preset_path("nope")


def test_two_steps_chain_and_record_lineage(tmp_path, tiny_llama, cli):
    path = write(
        tmp_path,
        "steps:\n  - pass: quantize\n    method: rtn\n    bits: 8\n    group_size: 16\n"
        "  - pass: quantize\n    method: rtn\n    bits: 4\n    group_size: 16\n    format: packed\n",
    )
    result = cli("run", path, tmp_path / "out", "--model", tiny_llama)
    assert result.exit_code == 0, result.output
    out = Checkpoint(tmp_path / "out")
    assert out.config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    record = json.loads((tmp_path / "out" / "weightsmith.json").read_text())
    assert record["parameters"]["bits"] == 4
    assert record["inputs"][0]["parent"]["parameters"]["bits"] == 8  # the first step's record, kept as parent
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    again = cli("run", path, tmp_path / "out", "--model", tiny_llama)
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr


def test_merge_then_quantize(tmp_path, cli):
    from .conftest import make_tiny_llama

    a = make_tiny_llama(tmp_path / "a", seed=1)
    b = make_tiny_llama(tmp_path / "b", seed=2, vocab=Checkpoint(a).config["vocab_size"])
    merge_step = (
        f"  - pass: merge\n    merge_method: linear\n    models:\n      - model: {a}\n        parameters: {{weight: 1.0}}\n"
        f"      - model: {b}\n        parameters: {{weight: 1.0}}\n"
    )
    path = write(tmp_path, "steps:\n" + merge_step + "  - pass: quantize\n    method: rtn\n    bits: 8\n    group_size: 16\n    symmetric: false\n")
    steps = load_recipe(path)
    assert [name for name, _ in steps] == ["merge", "quantize"]
    result = cli("run", path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out, ca, cb = Checkpoint(tmp_path / "out"), Checkpoint(a), Checkpoint(b)
    mean = (ca.get("model.norm.weight") + cb.get("model.norm.weight")) / 2
    assert torch.allclose(out.get("model.norm.weight"), mean)  # norms are merged, not quantized
    # the linears are the 8-bit, group-16 round to nearest of the merged weights: the merge alone
    # gives those weights exactly
    (tmp_path / "merge-only").mkdir()
    assert cli("run", write(tmp_path / "merge-only", "steps:\n" + merge_step), tmp_path / "merged").exit_code == 0
    merged = Checkpoint(tmp_path / "merged")
    assert torch.equal(out.get("model.norm.weight"), merged.get("model.norm.weight"))
    grid = QuantGrid(bits=8, symmetric=False, group_size=16)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert_rtn_on_grid(out.get(name), merged.get(name), grid)
    record = json.loads((tmp_path / "out" / "weightsmith.json").read_text())
    assert record["pass"] == "quantize" and record["inputs"][0]["parent"]["pass"] == "merge"
