"""Structured pruning: MLP channels, key/value head groups and decoder layers removed for real.

Channels, groups and layers are planted with zero importance (a channel whose gate/up rows or down
column are zero, a group whose query heads' o_proj columns are zero, a layer whose residual writers are
zero); the pass must remove exactly those, and the pruned model, loaded with plain transformers, must
give the logits of the unpruned one."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.prune.importance import (
    block_influence,
    channel_contribution,
    group_contribution,
    group_magnitude,
    group_rows,
    keep_most,
    kept_groups,
    kept_width,
    least_influential,
    mlp_magnitude,
)
from weightsmith.arch import ARCHITECTURES
from weightsmith.checkpoint import CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.passes import run_pass

from .conftest import FAMILY_CONFIGS, SAMPLE_TEXT, make_tiny_family, make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CALIB = {"calib": str(SAMPLE_TEXT), "samples": 8, "seq_len": 32}

#: Tiny configs of the families conftest does not build (three layers each, like the others here).
EXTRA_FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)),
}
THREE_TYPES = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}

#: family -> what structured pruning may cut there (mlp, heads); layers can always be dropped
CUTS = {
    "llama": (True, True),
    "qwen2": (True, True),
    "qwen3": (True, True),
    "gemma2": (True, True),
    "gemma3_text": (True, True),
    "opt": (True, False),
    "gpt_neox": (True, False),
    "phi3": (False, False),
    "gpt2": (False, False),
}
#: the modules that add to the residual stream, for families whose structure does not name them all
RESIDUAL_WRITERS = {
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}
IDENTITY_LAYER = 1


def make_model(folder: Path, family: str) -> Path:
    """A tiny three-layer checkpoint of ``family``."""
    if family == "llama":
        return make_tiny_llama(folder, layers=3)
    layers_key = ARCHITECTURES[family].keys.layers
    extra = {layers_key: 3, **(THREE_TYPES if family.startswith("gemma") else {})}
    if family in FAMILY_CONFIGS:
        return make_tiny_family(folder, family, **extra)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FAMILY_CONFIGS, family, EXTRA_FAMILIES[family])
        return make_tiny_family(folder, family, **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("structured")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_model(root / family, family)
        return built[family]

    return get


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def record_of(folder: Path) -> dict:
    return json.loads((folder / "weightsmith.json").read_text())


def rewrite(src: Path, dest: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of checkpoint ``src`` with its tensors changed by ``change`` (in place, on a dict)."""
    tensors = {k: v.clone() for k, v in load_file(src / "model.safetensors").items()}
    change(tensors)
    with CheckpointWriter(dest, source=src) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    return dest


def load(folder: Path):
    """The checkpoint in plain transformers, float32; every stored tensor must fit the model."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits(folder: Path) -> torch.Tensor:
    model = load(folder)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def expected_parameters(src: Path, changes: dict) -> int:
    """Parameters of the model transformers builds from ``src``'s config with ``changes``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**config_of(src), **changes}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # from_config leaves a tied head untied on the meta device
    return model.num_parameters()


def prune(src: Path, dest: Path, structured: str, **settings):
    return run_pass("prune", [src], dest, {"structured": structured, **CALIB, **settings})


# -- planting ----------------------------------------------------------------------------------------


def pick(n: int, k: int, seed: int) -> list[int]:
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def zero_rows(tensors: dict, name: str, rows: list[int]) -> None:
    tensors[f"{name}.weight"][rows] = 0
    if f"{name}.bias" in tensors:
        tensors[f"{name}.bias"][rows] = 0


def plant_channels(tensors: dict, family: str, layer: int, channels: list[int], rows: bool) -> None:
    """Channels with zero importance: their gate/up (fc1) rows (``rows``), or their down (fc2)
    columns."""
    arch = ARCHITECTURES[family]
    prefix = arch.layer_prefix(layer)
    if rows:
        for lin in arch.structure.mlp_rows:
            zero_rows(tensors, prefix + lin, channels)
    else:
        for lin in arch.structure.mlp_cols:
            tensors[f"{prefix}{lin}.weight"][:, channels] = 0


def plant_groups(tensors: dict, family: str, layer: int, groups: list[int], width: int) -> None:
    """Key/value groups with zero importance: the o_proj columns of their query heads (``width`` per
    group) are zero."""
    arch = ARCHITECTURES[family]
    cols = group_rows(torch.tensor(groups), width)
    tensors[f"{arch.layer_prefix(layer)}{arch.structure.attn_out}.weight"][:, cols] = 0


def plant_identity(tensors: dict, family: str, layer: int) -> None:
    """A layer that returns its input: everything it adds to the residual stream is zero."""
    arch = ARCHITECTURES[family]
    writers = RESIDUAL_WRITERS.get(family) or (arch.structure.attn_out, *arch.structure.mlp_cols)
    for module in writers:
        for param in ("weight", "bias"):
            name = f"{arch.layer_prefix(layer)}{module}.{param}"
            if name in tensors:
                tensors[name].zero_()


# -- the pass on every family -------------------------------------------------------------------------


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
@pytest.mark.parametrize("family", sorted(CUTS))
def test_planted_channels_groups_and_layer_are_removed_and_logits_unchanged(tmp_path, models, family, importance):
    src = models(family)
    arch = ARCHITECTURES[family]
    config = config_of(src)
    cut_mlp, cut_heads = CUTS[family]
    width = arch.mlp_width(config)
    heads, kv, head_dim = arch.head_layout(config)
    group = heads // kv
    mlp_keep, groups_keep = kept_width(width, 0.25, 16), kept_groups(kv, 0.5)
    kept = [i for i in range(3) if i != IDENTITY_LAYER]
    channels = {i: pick(width, width - mlp_keep, seed=i) for i in kept}
    groups = {i: pick(kv, kv - groups_keep, seed=10 + i) for i in kept}

    def plant(tensors: dict) -> None:
        for n, i in enumerate(kept):
            if cut_mlp:
                plant_channels(tensors, family, i, channels[i], rows=n == 0)
            if cut_heads:
                plant_groups(tensors, family, i, groups[i], group * head_dim)
        plant_identity(tensors, family, IDENTITY_LAYER)

    planted = rewrite(src, tmp_path / "planted", plant)
    spec = ",".join(["mlp=0.25"] * cut_mlp + ["heads=0.5"] * cut_heads + ["layers=1"])
    report = prune(planted, tmp_path / "out", spec, importance=importance, align=16)

    out = tmp_path / "out"
    removed = record_of(out)["figures"]["removed"]
    assert removed["layers"] == [IDENTITY_LAYER]
    assert removed["mlp_channels"] == ({str(i): channels[i] for i in kept} if cut_mlp else {})
    assert removed["kv_groups"] == ({str(i): groups[i] for i in kept} if cut_heads else {})
    torch.testing.assert_close(logits(out), logits(planted), rtol=1e-5, atol=1e-5)

    keys = arch.keys
    changes: dict = {keys.layers: 2}
    if cut_mlp:
        changes[keys.mlp_width] = mlp_keep
    if cut_heads:
        changes.update({keys.heads: groups_keep * group, keys.kv_heads: groups_keep, keys.head_dim: head_dim})
    if config.get("layer_types"):
        changes["layer_types"] = [config["layer_types"][i] for i in kept]
    written = config_of(out)
    assert {k: written.get(k) for k in changes} == changes
    assert report.parameters == expected_parameters(src, changes) == load(out).num_parameters()
    assert report.parameters < expected_parameters(src, {})


def test_tensors_are_slices_of_the_kept_rows_and_layers_renumbered(tmp_path, models):
    src = models("qwen2")  # q/k/v biases
    report = prune(src, tmp_path / "out", "mlp=0.25,heads=0.5,layers=[0]", importance="magnitude", align=32)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    removed = record_of(tmp_path / "out")["figures"]["removed"]
    assert removed["layers"] == [0] and report.extra["layers"] == "3->2"
    for new, old in ((0, 1), (1, 2)):
        ch = [c for c in range(128) if c not in removed["mlp_channels"][str(old)]]
        gr = torch.tensor([g for g in range(4) if g not in removed["kv_groups"][str(old)]])
        q_rows, kv_rows = group_rows(gr, 2 * 8), group_rows(gr, 8)

        def pair(local: str) -> tuple[torch.Tensor, torch.Tensor]:
            return after[f"model.layers.{new}.{local}"], before[f"model.layers.{old}.{local}"]

        a, b = pair("mlp.up_proj.weight")
        assert torch.equal(a, b[ch])
        a, b = pair("mlp.down_proj.weight")
        assert torch.equal(a, b[:, ch])
        a, b = pair("self_attn.q_proj.bias")
        assert torch.equal(a, b[q_rows])
        a, b = pair("self_attn.v_proj.bias")
        assert torch.equal(a, b[kv_rows])
        a, b = pair("self_attn.o_proj.weight")
        assert torch.equal(a, b[:, q_rows])
        a, b = pair("input_layernorm.weight")
        assert torch.equal(a, b)
    assert not any(k.startswith("model.layers.2.") for k in after)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_mlp_width_is_a_multiple_of_align(tmp_path, models):
    report = prune(models("opt"), tmp_path / "out", "mlp=0.3", importance="magnitude", align=32)
    written = config_of(tmp_path / "out")
    # 0.7 * 128 = 89.6: the largest multiple of 32 below is 64
    assert written["ffn_dim"] == 64 and report.extra["mlp_width"] == "128->64"
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert tensors["model.decoder.layers.0.fc1.weight"].shape == (64, 64)
    assert tensors["model.decoder.layers.0.fc1.bias"].shape == (64,)
    assert tensors["model.decoder.layers.1.fc2.weight"].shape == (64, 64)


@pytest.mark.parametrize(
    ("width", "share", "align"),
    [(w, s, a) for w in (64, 100, 1536, 8192) for s in (0.05, 0.25, 0.3, 0.5, 0.7) for a in (1, 8, 32, 128)],
)
def test_kept_width_is_the_largest_aligned_width_removing_the_share(width, share, align):
    keep = kept_width(width, share, align)
    assert keep % align == 0 and 0 <= keep
    assert keep <= (1 - share) * width + 1e-6 < keep + align


def test_report_and_record(tmp_path, models):
    src = models("llama")
    report = prune(src, tmp_path / "out", "mlp=0.25,heads=0.5,layers=1", align=16)
    assert report.title == "structured mlp=0.25,heads=0.5,layers=1 (activation, block influence)"
    assert report.extra == {"parameters_before": 48352, "mlp_width": "64->48", "kv_heads": "2->1", "layers": "3->2"}
    record = record_of(tmp_path / "out")
    assert record["pass"] == "prune" and record["parameters"]["structured"] == {"mlp": 0.25, "heads": 0.5, "layers": 1}
    figures = record["figures"]
    assert figures["parameters_before"] == 48352 and figures["parameters"] == report.parameters
    assert figures["mlp_width"] == [64, 48] and figures["kv_heads"] == [2, 1] and figures["heads"] == [4, 2] and figures["layers"] == [3, 2]
    kept = [i for i in range(3) if i not in figures["removed"]["layers"]]
    assert sorted(figures["removed"]["mlp_channels"]) == [str(i) for i in kept]
    assert all(len(v) == 16 for v in figures["removed"]["mlp_channels"].values())
    assert all(len(v) == 1 for v in figures["removed"]["kv_groups"].values())
    influence = figures["block_influence"]
    assert figures["removed"]["layers"] == [influence.index(min(influence))]


def test_same_inputs_give_the_same_bytes(tmp_path, models):
    src = models("gemma2")
    for name in ("a", "b"):
        prune(src, tmp_path / name, "mlp=0.25,heads=0.5,layers=1", align=16)
    for file in ("model.safetensors", "config.json", "weightsmith.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_magnitude_and_given_layers_need_no_model(tmp_path, models, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("magnitude importance ran the model")

    monkeypatch.setattr("weightsmith.calibrate.LayerwiseRunner", refuse)
    report = prune(models("llama"), tmp_path / "out", "mlp=0.25,heads=0.5,layers=[2]", importance="magnitude", align=16)
    assert report.extra["layers"] == "3->2"
    with pytest.raises(AssertionError, match="ran the model"):
        prune(models("llama"), tmp_path / "out2", "mlp=0.25", importance="activation", align=16)


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "structured", "align", "message"),
    [
        ("llama", "heads=0.6", 32, "would remove all 2 key/value head groups"),
        ("llama", "mlp=0.5", 64, "leaves no MLP channel"),
        ("llama", "layers=[3]", 32, "layer index 3 is out of range: the model has 3 layers"),
        ("llama", "layers=[0,1,2]", 32, "would remove every one of the 3 layers"),
        ("llama", "layers=3", 32, "would remove every one of the 3 layers"),
        ("opt", "heads=0.25", 32, "head pruning is not possible for opt: transformers derives OPT's head width"),
        ("gpt_neox", "heads=0.25", 32, "fused in query_key_value"),
        ("phi3", "mlp=0.25", 32, "mlp pruning is not possible for phi3: gate and up are fused"),
        ("gpt2", "mlp=0.25", 32, "Conv1D"),
    ],
)
def test_impossible_requests_fail_in_one_line(tmp_path, models, family, structured, align, message):
    with pytest.raises(WeightsmithError) as failure:
        prune(models(family), tmp_path / "out", structured, align=align, importance="magnitude")
    assert message in str(failure.value) and "\n" not in str(failure.value)
    assert not (tmp_path / "out").exists()


def test_cli_refusal_exits_2_with_one_line(tmp_path, models, cli):
    result = cli("prune", models("llama"), tmp_path / "out", "--structured", "heads=0.75", "--importance", "magnitude")
    assert result.exit_code == 2
    assert "key/value head groups" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# -- the math ----------------------------------------------------------------------------------------


def test_group_contribution_is_the_rms_of_each_groups_output():
    g = torch.Generator().manual_seed(0)
    groups, width, hidden, n = 3, 4, 6, 50
    x = torch.randn(n, groups * width, generator=g, dtype=torch.float64)
    out = torch.randn(hidden, groups * width, generator=g, dtype=torch.float64)
    hessian = 2 / n * x.T @ x
    direct = torch.stack([(x[:, j * width : (j + 1) * width] @ out[:, j * width : (j + 1) * width].T).square().sum(1).mean().sqrt() for j in range(groups)])
    torch.testing.assert_close(group_contribution(hessian, out, groups), direct)


def test_channel_contribution_is_the_rms_of_each_channels_output():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 5, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    direct = torch.stack([(a[:, c : c + 1] * w[:, c]).square().sum(1).mean().sqrt() for c in range(5)])
    torch.testing.assert_close(channel_contribution(a.square().sum(0), 40, w), direct)


def test_magnitudes_vanish_with_any_zero_factor_and_bound_the_output():
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(6, 4, generator=g) for _ in range(3))
    down = down.T.contiguous()  # [4, 6]: hidden 4, six channels
    down[:, 2] = 0
    up[4] = 0
    score = mlp_magnitude([gate, up], [down])
    assert score[2] == 0 and score[4] == 0 and (score[[0, 1, 3, 5]] > 0).all()
    x = torch.randn(100, 4, generator=g)
    per_channel = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)  # [tokens, channels]
    bound = score * x.square().sum(1).max()
    contribution = (per_channel[:, :, None] * down.T[None]).norm(dim=2).max(0).values
    assert (contribution <= bound + 1e-5).all()
    value, out = torch.randn(2 * 3, 4, generator=g), torch.randn(4, 2 * 6, generator=g)
    out[:, 6:] = 0
    assert group_magnitude(value, out, 2)[1] == 0 and group_magnitude(value, out, 2)[0] > 0


def test_block_influence_of_identity_and_opposite():
    x = torch.randn(3, 5, 8)
    assert block_influence(x, x)[0] == pytest.approx(0, abs=1e-5) and block_influence(x, x)[1] == 15
    assert block_influence(x, -x)[0] == pytest.approx(30, abs=1e-4)
    assert block_influence(x, 2 * x)[0] == pytest.approx(0, abs=1e-5)


def test_keep_most_and_least_influential():
    scores = torch.tensor([0.5, 0.0, 2.0, 0.5, 1.0])
    assert keep_most(scores, 3).tolist() == [0, 2, 4]  # of the two 0.5s, the lower index
    assert keep_most(scores, 2).tolist() == [2, 4]
    assert least_influential(torch.tensor([0.3, 0.1, 0.1, 0.9]), 2) == [1, 2]
    assert kept_groups(8, 0.3) == 5 and kept_groups(2, 0.5) == 1 and kept_groups(1, 0.25) == 0
    assert group_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert math.isclose(kept_width(1536, 0.25, 32), 1152)


def test_structure_names_real_modules_of_the_right_widths():
    """Every linear the structure table names exists, with rows / columns of the MLP width and the
    head layout the config gives."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from weightsmith.calibrate import get_module

    for model_type, arch in ARCHITECTURES.items():
        st = arch.structure
        config = AutoConfig.for_model(model_type)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        layer = get_module(model, arch.layers)[0]
        values = config.to_dict()
        width = arch.mlp_width(values)
        heads, kv, head_dim = arch.head_layout(values)
        if st.cuts_mlp:
            assert all(get_module(layer, lin).weight.shape[0] == width for lin in st.mlp_rows), model_type
            assert all(get_module(layer, lin).weight.shape[1] == width for lin in st.mlp_cols), model_type
        else:
            assert st.mlp_refusal, model_type
        if st.query:
            assert get_module(layer, st.query).weight.shape[0] == heads * head_dim, model_type
            assert get_module(layer, st.key).weight.shape[0] == get_module(layer, st.value).weight.shape[0] == kv * head_dim, model_type
            assert get_module(layer, st.attn_out).weight.shape[1] == heads * head_dim, model_type
        if not st.cuts_heads:
            assert st.heads_refusal, model_type


# -- the real model ----------------------------------------------------------------------------------


#: Perplexity bound for SmolLM2-135M-Instruct without a quarter of its MLP channels, on the first 4096
#: WikiText-2 test tokens (512-token windows, float32). With these settings the pass measured 49.6
#: against 30.2 for the unpruned model; keeping the same width at random channels gives 774, and
#: magnitude importance (which drops this model's few outlier channels) far more. The bound, 1.5x the
#: measured figure, fails when the activation ranking stops protecting the important channels.
PPL_BOUND = 75.0


@pytest.mark.slow
def test_smollm2_without_a_quarter_of_its_mlp_loads_and_keeps_a_sane_perplexity(smollm2, assets, tmp_path):
    from weightsmith.evaluate import Protocol, evaluate_many

    out = tmp_path / "smol-mlp25"
    report = prune(smollm2, out, "mlp=0.25", calib=None, samples=16, seq_len=512)
    assert config_of(out)["intermediate_size"] == 1152 and report.extra["mlp_width"] == "1536->1152"
    # 30 layers lose 384 channels each: rows of gate and up, columns of down, 576 wide
    assert report.parameters == load(out).num_parameters() == report.extra["parameters_before"] - 30 * 3 * 576 * 384
    base, pruned = evaluate_many([smollm2, out], assets / "text" / "wikitext2-test.raw", Protocol(max_tokens=4096))
    assert math.isfinite(pruned.perplexity)
    assert base.perplexity < pruned.perplexity < PPL_BOUND, (base.perplexity, pruned.perplexity)
