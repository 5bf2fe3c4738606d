"""Unstructured and N:M pruning: masks, the three methods' quality order, the pass's exact sparsity,
overrides, joint sparse + quantized weights, and quantization that keeps a pruned model's zeros."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from compress.gptq import gptq_quantize
from compress.grid import QuantGrid
from compress.obs import inverse_cholesky, obs_sweep, prune_step, zero_dead_inputs
from compress.pack import from_compressed_tensors
from compress.prune.config import NM, PruneConfig, PruneTarget, parse_nm
from compress.prune.masks import layer_mask, nm_mask, row_mask, wanda_scores
from compress.prune.unstructured import magnitude_prune
from tests.layers import outlier_inputs, output_error, random_weight
from weightsmith.calibkit import accumulate_hessian
from weightsmith.passes import run_pass

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CALIB = {"samples": 8, "seq_len": 64}


def weights(folder) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}


def linear_weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights(folder).items() if k.endswith("_proj.weight")}


def windows_ok(w: torch.Tensor, nm: NM) -> bool:
    nonzero = (w.reshape(w.shape[0], -1, nm.m) != 0).sum(dim=-1)
    return bool((nonzero <= nm.n).all())


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    """A calibration text of its own, so the tests do not need the shared assets."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial kings".split()
    g = torch.Generator().manual_seed(0)
    path.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(len(words), (40,), generator=g)) for _ in range(200)))
    return str(path)


# -- masks ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 6), groups=st.integers(1, 5), n=st.integers(1, 7), extra=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_nm_mask_leaves_at_most_n_of_every_m(out, groups, n, extra, seed):
    nm = NM(n, n + extra)
    scores = torch.rand(out, groups * nm.m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(scores, nm)
    kept = (~mask).reshape(out, groups, nm.m).sum(dim=-1)
    assert bool((kept == nm.n).all())
    # the pruned ones are the lowest of their window
    w = scores.reshape(out, groups, nm.m)
    m = mask.reshape(out, groups, nm.m)
    highest_pruned = torch.where(m, w, torch.full_like(w, -1)).amax(dim=-1)
    lowest_kept = torch.where(~m, w, torch.full_like(w, 2)).amin(dim=-1)
    assert bool((highest_pruned <= lowest_kept).all())


def test_nm_mask_refuses_a_width_that_is_not_a_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(2, 6), NM(2, 4))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.77])
def test_row_and_layer_masks_prune_exact_counts(sparsity):
    scores = torch.rand(7, 53, generator=torch.Generator().manual_seed(1))
    rows = row_mask(scores, sparsity)
    assert rows.sum(dim=1).tolist() == [math.floor(sparsity * 53 + 0.5)] * 7
    whole = layer_mask(scores, sparsity)
    assert int(whole.sum()) == math.floor(sparsity * scores.numel() + 0.5)
    if 0 < sparsity:
        assert float(scores[whole].max()) <= float(scores[~whole].min())


def test_masks_break_ties_towards_the_lower_index():
    scores = torch.ones(2, 8)
    assert row_mask(scores, 0.5)[0].tolist() == [True] * 4 + [False] * 4
    assert nm_mask(scores, NM(2, 4))[1].tolist() == [True, True, False, False] * 2
    assert layer_mask(scores, 0.25).reshape(-1).tolist() == [True] * 4 + [False] * 12


def test_wanda_scores_weigh_weights_by_input_norms():
    w = torch.tensor([[1.0, -2.0, 3.0]])
    norms = torch.tensor([10.0, 1.0, 0.1])
    assert wanda_scores(w, norms).tolist() == [[10.0, 2.0, pytest.approx(0.3)]]
    # magnitude would prune the 1.0; Wanda prunes the weight on the quiet input
    assert row_mask(wanda_scores(w, norms), 1 / 3).tolist() == [[False, False, True]]


# -- quality order on a layer with outlier input channels ---------------------------------------


@pytest.mark.parametrize("target", [PruneTarget(0.5), PruneTarget(0.5, NM(2, 4))], ids=["50%", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_and_sparsegpt_beats_wanda(target):
    x = outlier_inputs(2048, seed=0)
    w = random_weight(seed=0)
    H, _ = accumulate_hessian(None, x, 0)
    norms = x.square().sum(dim=0).sqrt()
    magnitude = magnitude_prune(w, target)
    scores = wanda_scores(w, norms)
    wanda = w.masked_fill(nm_mask(scores, target.nm) if target.nm else row_mask(scores, target.sparsity), 0)
    W, Hd = zero_dead_inputs(w, H)
    U = inverse_cholesky(Hd, 0.01, 1.0)
    step = prune_step(torch.diagonal(U), n_m=(target.nm.pruned, target.nm.m)) if target.nm else prune_step(torch.diagonal(U), target.sparsity)
    sparsegpt, _ = obs_sweep(W, U, step)
    errors = {name: output_error(x, w, p) for name, p in (("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparsegpt))}
    for pruned in (magnitude, wanda, sparsegpt):
        assert int((pruned == 0).sum()) == w.numel() // 2
    assert errors["wanda"] < errors["magnitude"]
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["sparsegpt"] <= errors["wanda"]


def test_sparsegpt_rows_end_exactly_as_sparse_whatever_the_blocks():
    x = outlier_inputs(512, seed=1, width=200)
    w = random_weight(out=16, inp=200, seed=1)
    H, _ = accumulate_hessian(None, x, 0)
    U = inverse_cholesky(H, 0.01, 1.0)
    pruned, _ = obs_sweep(w, U, prune_step(torch.diagonal(U), 0.3), block_size=64)
    assert (pruned == 0).sum(dim=1).tolist() == [60] * 16


# -- the pass ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pass_prunes_each_linear_to_the_exact_sparsity(tmp_path, tiny_llama, calib_text, method):
    run_pass("prune", [tiny_llama], tmp_path / "out", {"method": method, "sparsity": 0.3, "calib": calib_text, **CALIB})
    before, after = weights(tiny_llama), weights(tmp_path / "out")
    for name, w in after.items():
        if not name.endswith("_proj.weight"):
            assert torch.equal(w, before[name]), name  # norms and embeddings untouched
            continue
        out, inp = w.shape
        expected = math.floor(0.3 * w.numel() + 0.5) if method == "magnitude" else out * math.floor(0.3 * inp + 0.5)
        assert int((w == 0).sum()) == expected, name
        if method != "sparsegpt":  # the kept weights are the original ones
            kept = w != 0
            assert torch.equal(w[kept], before[name][kept]), name
    record = json.loads((tmp_path / "out" / "weightsmith.json").read_text())
    assert record["pass"] == "prune" and record["parameters"]["method"] == method
    assert record["figures"]["pruned_linears"] == 14


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_pass_keeps_every_nm_window(tmp_path, tiny_llama, calib_text, method, pattern):
    report = run_pass("prune", [tiny_llama], tmp_path / "out", {"method": method, "pattern": pattern, "calib": calib_text, **CALIB})
    nm = parse_nm(pattern)
    for name, w in linear_weights(tmp_path / "out").items():
        assert windows_ok(w, nm), name
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)


def test_overrides_are_honoured(tmp_path, tiny_llama, calib_text):
    # the first match wins: layer 0's attention is skipped before q_proj's pattern is reached
    overrides = ["re:model\\.layers\\.0\\.self_attn\\..*:skip", "down_proj:sparsity=0.25", "q_proj:pattern=2:8"]
    run_pass("prune", [tiny_llama], tmp_path / "out", {"method": "wanda", "sparsity": 0.5, "overrides": overrides, "calib": calib_text, **CALIB})
    before, after = weights(tiny_llama), linear_weights(tmp_path / "out")
    for name, w in after.items():
        share = float((w == 0).float().mean())
        if "layers.0.self_attn" in name:
            assert torch.equal(w, before[name]), name
        elif name.endswith("down_proj.weight"):
            assert share == pytest.approx(0.25, abs=0.02), name
        elif name.endswith("q_proj.weight"):
            assert windows_ok(w, NM(2, 8)) and share == 0.75, name
        else:
            assert share == pytest.approx(0.5, abs=0.02), name


def test_global_magnitude_uses_one_cut_across_linears(tmp_path, tiny_llama):
    run_pass("prune", [tiny_llama], tmp_path / "out", {"method": "magnitude", "scope": "global", "sparsity": 0.4})
    before, after = weights(tiny_llama), linear_weights(tmp_path / "out")
    total = sum(w.numel() for w in after.values())
    assert sum(int((w == 0).sum()) for w in after.values()) == math.floor(0.4 * total + 0.5)
    pruned = torch.cat([before[n][w == 0].abs() for n, w in after.items()])
    kept = torch.cat([before[n][w != 0].abs() for n, w in after.items()])
    assert float(pruned.max()) <= float(kept.min())
    shares = [float((w == 0).float().mean()) for w in after.values()]
    assert max(abs(share - 0.4) for share in shares) > 0.01  # not each linear at 40%


def test_joint_sparsegpt_keeps_the_pattern_and_puts_codes_on_the_grid(tmp_path, tiny_llama, calib_text):
    settings_ = {"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 16, "format": "packed", "calib": calib_text, **CALIB}
    report = run_pass("prune", [tiny_llama], tmp_path / "out", settings_)
    assert report.bits_per_weight is not None and report.bits_per_weight < 16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")})
    assert len(modules) == 14
    for module in modules:
        q = from_compressed_tensors(tensors, module, QuantGrid(bits=4, symmetric=True, group_size=16))
        assert int(q.codes.max()) <= 15
        w = q.dequantize()
        assert windows_ok(w, NM(2, 4)), module
        # a pruned weight is the grid's zero code, exactly
        assert bool((q.codes[w == 0] == 8).all())


def test_joint_sweep_alone_keeps_every_window():
    x = outlier_inputs(1024, seed=3)
    w = random_weight(seed=3)
    H, _ = accumulate_hessian(None, x, 0)
    q, _ = gptq_quantize(w, H, QuantGrid(bits=4, symmetric=False, group_size=32), prune=lambda d: prune_step(d, n_m=(2, 4)))
    assert windows_ok(q.dequantize(), NM(2, 4))
    assert float((q.dequantize() == 0).float().mean()) >= 0.5


@pytest.mark.parametrize(("keep", "kept_everywhere"), [("auto", True), ("yes", True), ("no", False)])
def test_gptq_after_pruning_keeps_the_zeros(tmp_path, tiny_llama, calib_text, keep, kept_everywhere):
    run_pass("prune", [tiny_llama], tmp_path / "sparse", {"method": "sparsegpt", "pattern": "2:4", "calib": calib_text, **CALIB})
    run_pass("quantize", [tmp_path / "sparse"], tmp_path / "q", {"method": "gptq", "group_size": 16, "keep_zeros": keep, "calib": calib_text, **CALIB})
    pruned, quantized = linear_weights(tmp_path / "sparse"), linear_weights(tmp_path / "q")
    zeros_kept = all(bool((quantized[n][w == 0] == 0).all()) for n, w in pruned.items())
    pattern_kept = all(windows_ok(w, NM(2, 4)) for w in quantized.values())
    assert zeros_kept is kept_everywhere
    assert pattern_kept is kept_everywhere


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pattern": "2:4", "sparsity": 0.5}, "not both"),
        ({"method": "wanda", "bits": 4}, "only sparsegpt"),
        ({"format": "packed"}, "give --bits"),
        ({"pattern": "5:4"}, "0 < N < M"),
        ({"method": "wanda", "scope": "global"}, "scope=global"),
        ({"structured": "mlp=0.25", "method": "wanda"}, "unstructured"),
    ],
)
def test_inconsistent_settings_fail_in_one_line(tmp_path, tiny_llama, cli, values, message):
    args = ["prune", str(tiny_llama), str(tmp_path / "out")]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = cli(*args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_nm_on_a_width_that_does_not_fit_names_the_linear(tmp_path, tiny_llama, cli):
    result = cli("prune", str(tiny_llama), str(tmp_path / "out"), "--method", "magnitude", "--pattern", "3:7")
    assert result.exit_code == 2
    assert "multiple of 7" in result.stderr and "proj" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_table_says_the_dense_file_does_not_shrink(tmp_path, tiny_llama, cli):
    result = cli("prune", str(tiny_llama), str(tmp_path / "out"), "--method", "magnitude", "--sparsity", "0.5")
    assert result.exit_code == 0, result.stderr
    text = re.sub(r"[\s│]+", " ", result.stdout)
    assert "50.0%" in text and "the file does not shrink" in text
    assert PruneConfig().method == "wanda"


# -- sparse storage through the pass ------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "fmt"), [(None, "sparse-bitmask"), ("2:4", "sparse-24-bitmask")])
def test_sparse_format_holds_the_dense_result_in_fewer_bytes(tmp_path, tiny_llama, pattern, fmt):
    from compress.prune.sparse import bitmask_decompress, sparse24_decompress

    values = {"method": "magnitude", **({"pattern": pattern} if pattern else {"sparsity": 0.5})}
    run_pass("prune", [tiny_llama], tmp_path / "dense", values)
    report = run_pass("prune", [tiny_llama], tmp_path / "sparse", {**values, "format": "sparse"})
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    sparse = load_file(tmp_path / "sparse" / "model.safetensors")
    decode = sparse24_decompress if pattern else bitmask_decompress
    for name, w in dense.items():
        module = name.removesuffix(".weight")
        if name.endswith("_proj.weight"):
            assert name not in sparse
            local = {k[len(module) + 1 :]: v for k, v in sparse.items() if k.startswith(module + ".")}
            assert torch.equal(decode(local), w), name
        else:
            assert torch.equal(sparse[name], w), name
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["format"] == fmt
    assert config["sparsity_config"]["global_sparsity"] == pytest.approx(0.5)
    linear_bytes = sum(w.numel() * w.element_size() for n, w in dense.items() if n.endswith("_proj.weight"))
    saved = json.loads((tmp_path / "sparse" / "weightsmith.json").read_text())["figures"]["bytes_saved"]
    # float32 weights at 50%: half the values stay, plus one bit per weight (and row offsets)
    assert 0.4 * linear_bytes < saved < 0.5 * linear_bytes
    file_saved = (tmp_path / "dense" / "model.safetensors").stat().st_size - (tmp_path / "sparse" / "model.safetensors").stat().st_size
    assert abs(file_saved - saved) < 4096  # the headers differ a little
    assert report.parameters == run_pass("copy", [tiny_llama], tmp_path / "copy").parameters  # logical weights, not stored values


def test_sparse_quantized_2of4_is_written_as_marlin24(tmp_path, calib_text):
    from compress.prune.sparse import marlin24_decompress
    from tests.conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "wide", hidden=128)
    run_pass("copy", [src], tmp_path / "half", {"dtype": "fp16"})
    targets = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # k/v are 64 wide: marlin-24 needs multiples of 128
    values = {"method": "sparsegpt", "pattern": "2:4", "bits": 4, "targets": targets, "calib": calib_text, **CALIB}
    run_pass("prune", [tmp_path / "half"], tmp_path / "dense", values)
    report = run_pass("prune", [tmp_path / "half"], tmp_path / "marlin", {**values, "format": "sparse"})
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    stored = load_file(tmp_path / "marlin" / "model.safetensors")
    grid = QuantGrid(bits=4, symmetric=True, group_size=128)
    modules = sorted({k.rsplit(".", 1)[0] for k in stored if k.endswith(".weight_packed")})
    assert len(modules) == 10
    for module in modules:
        local = {k[len(module) + 1 :]: v for k, v in stored.items() if k.startswith(module + ".")}
        w = marlin24_decompress(local, grid).dequantize()
        assert windows_ok(w, NM(2, 4))
        assert torch.equal(w.to(torch.float16), dense[f"{module}.weight"]), module
    config = json.loads((tmp_path / "marlin" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "marlin-24"
    # half the 4-bit codes, 2 bits of position metadata per kept code, a float16 scale per 128
    assert report.bits_per_weight == pytest.approx(2 + 1 + 16 / 128)


def test_marlin24_refuses_widths_its_kernel_does_not_take_before_any_work(tmp_path, tiny_llama, cli):
    result = cli("prune", str(tiny_llama), str(tmp_path / "out"), "--method", "sparsegpt", "--pattern", "2:4", "--bits", "4", "--format", "sparse")
    assert result.exit_code == 2
    assert "marlin-24" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
