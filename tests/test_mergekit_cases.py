"""weightsmith on mergekit's own test and example configs: it accepts what mergekit accepts, refuses
what mergekit refuses, and writes mergekit's tensors bit for bit where the method draws no random
numbers (fixtures and manifest from bench/make_mergekit_cases.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merge.run import merge_checkpoints
from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit_cases"
CASES: dict[str, dict] = json.loads((FIXTURES / "cases.json").read_text())
ACCEPTED = sorted(name for name, case in CASES.items() if case["accepted"])
REFUSED = sorted(name for name, case in CASES.items() if not case["accepted"])

#: config.json keys that must agree with mergekit's (those the config has).
CONFIG_KEYS = (
    "architectures",
    "model_type",
    "num_hidden_layers",
    "n_layer",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "n_head",
    "vocab_size",
)

#: a word the one-line refusal must contain: the parameter at fault
REFUSAL_NAMES = {"della_invalid_epsilon": "epsilon"}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: identity means these are equal (a NaN where mergekit writes
    NaN, as multislerp does in float16 on equal inputs, is identical too; -0.0 is not 0.0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.contiguous().view(ints[tensor.element_size()])


def merge_case(name: str, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES)  # the configs name models relative to this folder, as mergekit ran them
    merge_checkpoints(FIXTURES / CASES[name]["config"], dest)


def test_manifest_covers_mergekit_cases():
    methods = {case["method"] for case in CASES.values()}
    assert {"nuslerp", "multislerp", "karcher", "sce", "della", "arcee_fusion", "nearswap", "ram", "ramplus_tl", "model_stock"} <= methods
    assert REFUSED == ["della_invalid_epsilon"] and "epsilon" in CASES["della_invalid_epsilon"]["error"]
    assert {case["method"] for case in CASES.values() if not case["deterministic"]} == {"dare_ties", "dare_linear", "della", "della_linear"}
    assert sum(name.startswith("example_") for name in CASES) == 6
    assert all((FIXTURES / "outputs" / name / "model.safetensors").is_file() for name in ACCEPTED)
    sorting = {name for name, case in CASES.items() if case["method"] in ("ties", "breadcrumbs") and case["accepted"]}
    assert sorting and all(CASES[name]["stable_sort_output"] for name in sorting)
    assert "mergekit 0.1.5" in (FIXTURES / "README.md").read_text()


@pytest.mark.parametrize("name", ACCEPTED)
def test_same_output_as_mergekit(name, tmp_path, monkeypatch):
    merge_case(name, tmp_path / "out", monkeypatch)
    ours, theirs = Checkpoint(tmp_path / "out"), Checkpoint(FIXTURES / "outputs" / name)
    assert sorted(ours.names()) == sorted(theirs.names())
    for tensor in theirs.names():
        assert (ours.info(tensor).st_dtype, ours.info(tensor).shape) == (theirs.info(tensor).st_dtype, theirs.info(tensor).shape), tensor
    for key in CONFIG_KEYS:
        if key in theirs.config:
            assert ours.config.get(key) == theirs.config[key], key
    if CASES[name]["deterministic"] and CASES[name]["stable_sort_output"]:
        check_sort_order_only(ours, theirs, Checkpoint(FIXTURES / "outputs_stable_sort" / name))
    elif CASES[name]["deterministic"]:
        differ = {}
        for tensor in theirs.names():
            a, b = ours.get(tensor), theirs.get(tensor)
            wrong = bits(a) != bits(b)
            if wrong.any():
                gap = (a.double() - b.double()).abs().nan_to_num(nan=float("inf"))[wrong]
                differ[tensor] = (gap.max().item(), wrong.sum().item(), a.numel())
        assert not differ, f"{len(differ)} of {len(theirs.names())} tensors differ (max |diff|, entries, of): " + ", ".join(
            f"{t} {d[0]:.3g} {d[1]}/{d[2]}" for t, d in list(differ.items())[:4]
        )
    else:
        check_random_merge(FIXTURES / CASES[name]["config"], ours, theirs)


def check_sort_order_only(ours: Checkpoint, theirs: Checkpoint, stable: Checkpoint) -> None:
    """For methods ranking entries with mergekit's unstable ``torch.argsort``: ours equals mergekit
    run with a stable argsort bit for bit, and differs from mergekit's own output exactly where that
    run does (only which of several equal magnitudes at the density cut are kept)."""
    for tensor in theirs.names():
        a, b, s = bits(ours.get(tensor)), bits(theirs.get(tensor)), bits(stable.get(tensor))
        assert torch.equal(a, s), tensor
        assert torch.equal(a != b, s != b), tensor


@pytest.mark.parametrize("name", REFUSED)
def test_refused_like_mergekit(name, tmp_path, monkeypatch):
    with pytest.raises(WeightsmithError) as caught:
        merge_case(name, tmp_path / "out", monkeypatch)
    message = str(caught.value)
    assert "\n" not in message and REFUSAL_NAMES[name] in message
    assert not (tmp_path / "out").exists()


def test_gpt2_stack_has_24_layers(tmp_path, monkeypatch):
    """mergekit's test_gpt2_stack: the 12 layers twice over, so layer i + 12 is layer i again."""
    merge_case("gpt2_stack", tmp_path / "out", monkeypatch)
    ours = Checkpoint(tmp_path / "out")
    assert ours.config["n_layer"] == Checkpoint(FIXTURES / "outputs" / "gpt2_stack").config["n_layer"] == 24
    layer_names = [n for n in ours.names() if n.startswith("transformer.h.0.")]
    assert layer_names
    for i in range(12):
        for name in layer_names:
            assert torch.equal(ours.get(name.replace("h.0.", f"h.{i + 12}.")), ours.get(name.replace("h.0.", f"h.{i}.")))


def test_passthrough_scale_zeroes_o_proj(tmp_path, monkeypatch):
    """mergekit's test_passthrough_scale: scale 0 on o_proj, 1 elsewhere."""
    merge_case("passthrough_scale", tmp_path / "out", monkeypatch)
    ours = Checkpoint(tmp_path / "out")
    o_proj = [n for n in ours.names() if "o_proj" in n]
    assert o_proj and all((ours.get(n) == 0).all() for n in o_proj)
    assert ours.get("lm_head.weight").count_nonzero() > 0


def test_stacked_example_has_3_layers(tmp_path, monkeypatch):
    """examples/orcamini-platy-44layer.yml adapted: llama_a's layers 0-1, then llama_b's layer 1."""
    merge_case("example_orcamini_platy_44layer", tmp_path / "out", monkeypatch)
    ours = Checkpoint(tmp_path / "out")
    assert ours.config["num_hidden_layers"] == 3
    b = Checkpoint(FIXTURES / "inputs" / "llama_b")
    name = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(ours.get(name.format(2)), b.get(name.format(1)).to(torch.float16))


# The random methods: mergekit draws its masks from torch's global generator, so no other program
# gives its values; instead every entry must be something the method can produce, and the statistics
# of the draw must agree with mergekit's.

#: merge_method -> (sign consensus, default normalize), as mergekit 0.1.5 defines them (all rescale)
RANDOM_METHODS = {"dare_ties": (True, False), "dare_linear": (False, False), "della": (True, True), "della_linear": (False, False)}


def check_random_merge(config_path: Path, ours: Checkpoint, theirs: Checkpoint) -> None:
    """Each input i contributes 0 or ``weight_i * s_i * delta_i`` to an entry (dropped or kept,
    ``s_i`` the rescale that restores the delta's L1 norm, about 1/keep-probability), with the sign
    consensus only terms of the winning sign, and the sum is scaled by ``lambda`` and divided by the
    weights when normalized. So: entries where no input differs from the base are the base; where
    all weighted deltas share a sign, a changed entry moves the same way; no entry moves further
    than every input kept with twice the expected rescale; and the share of entries changed and the
    total change agree with mergekit's draw within a few standard deviations."""
    config = yaml.safe_load(config_path.read_text())
    consensus, normalize_default = RANDOM_METHODS[config["merge_method"]]
    params = config.get("parameters") or {}
    normalize = params.get("normalize", normalize_default)
    scale = params.get("lambda", 1.0)
    keep_low = params["density"] - params.get("epsilon", 0.0)
    weights = [float(m["parameters"]["weight"]) for m in config["models"]]
    divisor = (min(weights) if consensus else sum(weights)) if normalize else 1.0
    base = Checkpoint(FIXTURES / config["base_model"])
    models = [Checkpoint(FIXTURES / m["model"]) for m in config["models"]]
    changed = {"ours": 0, "theirs": 0, "of": 0}
    moved = {"ours": 0.0, "theirs": 0.0}
    for tensor in theirs.names():
        dtype = theirs.get(tensor).dtype
        b = base.get(tensor).to(dtype).double()
        o, k = ours.get(tensor).double(), theirs.get(tensor).double()
        assert torch.isfinite(o).all(), tensor
        terms = torch.stack([w * (m.get(tensor).to(dtype).double() - b) for w, m in zip(weights, models, strict=True)])
        still = (terms == 0).all(dim=0)
        assert torch.equal(o[still], b[still]), f"{tensor}: entries no input changes are not the base"
        rounding = torch.finfo(dtype).eps * (b.abs() + o.abs())
        reach = scale * terms.abs().sum(dim=0) * 2 / keep_low / divisor
        assert ((o - b).abs() <= reach + rounding).all(), f"{tensor}: entries moved further than the inputs reach"
        for sign in (1, -1):
            same = (terms * sign > 0).all(dim=0) & (o != b)
            assert ((o - b)[same] * sign > 0).all(), f"{tensor}: entries moved against every input's delta"
        if still.all():
            continue
        changed["ours"] += (o != b)[~still].sum().item()
        changed["theirs"] += (k != b)[~still].sum().item()
        changed["of"] += (~still).sum().item()
        moved["ours"] += (o - b).abs().sum().item()
        moved["theirs"] += (k - b).abs().sum().item()
    assert changed["of"] > 10_000
    ours_share, theirs_share = changed["ours"] / changed["of"], changed["theirs"] / changed["of"]
    assert abs(ours_share - theirs_share) < 0.01, f"changed share {ours_share:.3f}, mergekit's {theirs_share:.3f}"
    assert 0.97 < moved["ours"] / moved["theirs"] < 1.03, f"total change {moved['ours']:.4g}, mergekit's {moved['theirs']:.4g}"
