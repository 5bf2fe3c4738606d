"""arcee_fusion, nearswap, ram and ramplus_tl: values on hand-made tensors, the chunked math equal to
the whole-tensor math, the input contracts and parameters, and the same bytes (dtypes included) as
mergekit 0.1.5 on tiny Llamas.

The mergekit digests below were made by running this file as a script with mergekit 0.1.5's
``mergekit-yaml`` (``python -m tests.test_merge_fusion_ram PATH/TO/mergekit-yaml``): it builds the
same models, runs each case through mergekit on CPU with ``--random-seed 0`` and prints the table.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge.arcee_fusion import QUANTILE_SAMPLE, arcee_fusion, arcee_fusion_group, fusion_importance, fusion_threshold
from merge.arith import whole_group
from merge.chunks import CHUNK, thread_map
from merge.nearswap import nearswap, nearswap_group
from merge.ram import ram, ram_group, ramplus_scale, ramplus_tl, ramplus_tl_group
from merge.run import merge_checkpoints
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.errors import WeightsmithError

from .conftest import make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DTYPES = ("bfloat16", "float16", "float32")
#: name -> (method, models, weights, shared parameters, dtype); the weights are ignored by these
#: methods (mergekit ignores them, weightsmith warns), and differ so an accidental use would show.
CASES: dict[str, tuple[str, list[str], list[float], dict, str]] = {}
for _dtype in DTYPES:
    CASES[f"arcee_fusion-{_dtype}"] = ("arcee_fusion", ["a", "base"], [0.6, 0.4], {}, _dtype)
    CASES[f"nearswap-{_dtype}"] = ("nearswap", ["a", "base"], [0.6, 0.4], {"t": 0.05}, _dtype)
    for _method in ("ram", "ramplus_tl"):
        CASES[f"{_method}-{_dtype}"] = (_method, ["a", "b"], [0.6, 0.4], {}, _dtype)
        CASES[f"{_method}-sparse-{_dtype}"] = (_method, ["s0", "s1", "s2"], [0.6, 0.4, 0.3], {}, _dtype)
CASES["ramplus_tl-params-float32"] = ("ramplus_tl", ["s0", "s2"], [0.6, 0.4], {"r": 0.5, "alpha": 0.7, "epsilon": 1e-3}, "float32")
CASES["ram-epsilon-bfloat16"] = ("ram", ["s0", "s1"], [0.6, 0.4], {"epsilon": 1e-2}, "bfloat16")

#: sha256 (first 16 hex digits) of the models the digests were made from, to tell a change of the
#: test models (a new torch drawing other numbers) from a change of the merge.
INPUTS_DIGEST = "361a98c74cd3676a"
#: sha256 (first 16 hex digits) of every output tensor (name, dtype, shape, bytes) mergekit 0.1.5 wrote.
MERGEKIT_DIGESTS: dict[str, str] = {
    "arcee_fusion-bfloat16": "7956c2fc3ddb5a35",
    "arcee_fusion-float16": "e3f8dd0c40a46999",
    "arcee_fusion-float32": "25526aae86a5d79b",
    "nearswap-bfloat16": "bd7cdefed16d3803",
    "nearswap-float16": "8edea478738e39c1",
    "nearswap-float32": "3b45ef954763429e",
    "ram-bfloat16": "bebf06966f992e95",
    "ram-epsilon-bfloat16": "65f99406bda61ed7",
    "ram-float16": "2341ff1d7516c941",
    "ram-float32": "4a4e82accafc7cf1",
    "ram-sparse-bfloat16": "fdf6fb549cbc2880",
    "ram-sparse-float16": "1da168a99c4fb207",
    "ram-sparse-float32": "809addc0cc1e7b27",
    "ramplus_tl-bfloat16": "341d894594677057",
    "ramplus_tl-float16": "ac5e60f6cc8be09f",
    "ramplus_tl-float32": "d7cb24b1f9700c31",
    "ramplus_tl-params-float32": "edaf4d2749c40ba5",
    "ramplus_tl-sparse-bfloat16": "811efa132a6235de",
    "ramplus_tl-sparse-float16": "319e5eb3f18ba772",
    "ramplus_tl-sparse-float32": "85a3d9f5fe06be64",
}


def sparse_finetune(base: Path, dest: Path, seed: int, share: float) -> Path:
    """``base`` with about ``share`` of its entries changed (a fifth of those by under 1e-5, below
    RAM's default epsilon): fine-tunes whose changes overlap only in part, so RAM's unique and
    shared entries and RAM+'s ratios all occur."""
    ckpt = Checkpoint(base)
    gen = torch.Generator().manual_seed(seed)
    with CheckpointWriter(dest, source=base, force=True) as writer:
        for name in ckpt.names():
            x = ckpt.get(name)
            changed = torch.rand(x.shape, generator=gen) < share
            tiny = torch.rand(x.shape, generator=gen) < 0.2
            noise = torch.randn(x.shape, generator=gen) * 0.05
            writer.add(name, x + torch.where(tiny, noise * 1e-4, noise) * changed)
    return dest


def build_models(root: Path) -> dict[str, Path]:
    """Independent random tiny Llamas (``base``, ``a``, ``b``) and sparse fine-tunes of ``base``."""
    models = {name: make_tiny_llama(root / name, seed=seed, hidden=32, layers=2, vocab=64) for seed, name in enumerate(("base", "a", "b"))}
    for k, share in enumerate((0.1, 0.15, 0.5)):
        models[f"s{k}"] = sparse_finetune(models["base"], root / f"s{k}", 100 + k, share)
    return models


def case_config(name: str, models: dict[str, Path]) -> dict:
    method, names, weights, params, dtype = CASES[name]
    config = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "dtype": dtype,
        "models": [{"model": str(models[m]), "parameters": {"weight": w}} for m, w in zip(names, weights)],
    }
    if params:
        config["parameters"] = params
    return config


def digest(*folders: Path) -> str:
    h = hashlib.sha256()
    for folder in folders:
        ckpt = Checkpoint(folder)
        for name in sorted(ckpt.names()):
            t = ckpt.get(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("fusion-ram"))


# ---- nearswap ---------------------------------------------------------------------------------


def test_nearswap_moves_each_entry_t_toward_the_other():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0])
    other = torch.tensor([0.01, 1.0, -0.5, 1.0, 2.2])
    # distances 0.01, 1, 0.5, 0 (-> 1e-6), 0.2: shares 1 (clamped), 0.1, 0.2, 1, 0.5
    out = nearswap(base, other, 0.1)
    assert torch.allclose(out, torch.tensor([0.01, 0.1, -0.1, 1.0, 2.1]), atol=1e-6)
    assert torch.equal(nearswap(base, other, 0.0), base)
    assert torch.equal(nearswap(base, base.clone(), 0.3), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nearswap_chunked_equals_whole(dtype):
    gen = torch.Generator().manual_seed(0)
    base, other = (torch.randn(3 * CHUNK + 77, generator=gen).to(dtype) for _ in range(2))
    with thread_map(2) as pmap:
        group, result = whole_group([base, other], 0, {"t": 0.3}, pmap=pmap)
        nearswap_group(group)
    out = result()
    assert out.dtype == dtype and torch.equal(out, nearswap(base, other, 0.3))


# ---- ram, ramplus_tl ---------------------------------------------------------------------------


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.zeros(5)
    one = torch.tensor([1.0, 0.0, 2.0, 1e-6, -4.0])
    two = torch.tensor([3.0, 0.0, 0.0, 0.0, 2.0])
    # entry 0 and 4 changed by both (mean), entry 2 by one (kept), entry 3 below epsilon (dropped)
    assert torch.equal(ram(base, [one, two]), torch.tensor([2.0, 0.0, 2.0, 0.0, -1.0]))
    # with epsilon 1.5 model one's 1 no longer counts: entry 0 becomes two's alone
    assert torch.equal(ram(base, [one, two], epsilon=1.5), torch.tensor([3.0, 0.0, 2.0, 0.0, -1.0]))
    assert torch.equal(ram(base + 1, []), base + 1)
    assert torch.equal(ram(base, [one]), torch.tensor([1.0, 0.0, 2.0, 0.0, -4.0]))


def test_ramplus_scales_unique_changes_by_the_shared_to_unique_ratio():
    base = torch.zeros(5)
    one = torch.tensor([1.0, 0.0, 2.0, 1e-6, -4.0])
    two = torch.tensor([3.0, 0.0, 0.0, 0.0, 2.0])
    # model one: 2 shared, 1 unique -> rho 2, clamped to alpha 0.2 -> factor 1.02 on its unique entry
    out = ramplus_tl(base, [one, two])
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([2.0, 0.0, 2.04, 0.0, -1.0]))
    # ten unique changes, one shared: rho 0.1 below alpha -> factor 1 + 0.5 * 0.1
    base = torch.zeros(12)
    one = torch.ones(12)
    one[11] = 0
    two = torch.zeros(12)
    two[0] = 3
    out = ramplus_tl(base, [one, two], r=0.5)
    assert torch.allclose(out[1:11], torch.full((10,), 1.05)) and out[0] == 2 and out[11] == 0
    scale = ramplus_scale(torch.tensor([1, 0]), torch.tensor([10, 0]), 0.5, 0.2, 1e-5)
    assert scale.shape == (2, 1) and torch.allclose(scale.reshape(-1), torch.tensor([1.05, 1.0]))


def test_ram_keeps_the_compute_dtype_and_ramplus_writes_float32():
    base, one, two = (torch.randn(6, 8, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16) for s in range(3))
    assert ram(base, [one, two]).dtype == torch.bfloat16
    assert ramplus_tl(base, [one, two]).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ram_chunked_equals_whole(dtype):
    """Counts per entry are across models, RAM+'s ratios integer sums over chunks: chunks change
    no bit."""
    gen = torch.Generator().manual_seed(1)
    n = 2 * CHUNK + 301
    base = torch.randn(n, generator=gen) * 0.2
    others = [base + torch.randn(n, generator=gen) * 0.05 * (torch.rand(n, generator=gen) < share) for share in (0.1, 0.3, 0.6)]
    base, others = base.to(dtype), [o.to(dtype) for o in others]
    with thread_map(2) as pmap:
        group, result = whole_group([others[0], base, *others[1:]], 1, {"epsilon": 1e-5}, pmap=pmap)
        ram_group(group)
        assert torch.equal(result(), ram(base, others))
        params = {"r": 0.3, "alpha": 0.5, "epsilon": 1e-5}
        group, result = whole_group([base, *others], 0, params, pmap=pmap)
        ramplus_tl_group(group)
    out = result()
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(out, ramplus_tl(base, others, **params))
    assert not torch.equal(out, ram(base, others).to(out.dtype))


# ---- arcee_fusion -------------------------------------------------------------------------------


def test_fusion_threshold_is_median_plus_one_and_a_half_iqr():
    # sorted positions floor(q * 10): q1 = 2, median = 5, q3 = 7 -> 5 + 1.5 * 5
    assert fusion_threshold(torch.arange(11.0)) == 12.5
    assert fusion_threshold(torch.tensor([100.0, *range(10)])) == 12.5
    assert fusion_threshold(torch.full((4, 4), 3.0)) == 3.0


def test_arcee_fusion_takes_the_outlying_changes_of_rows_that_moved():
    base = torch.zeros(2, 11)
    other = torch.zeros(2, 11)
    steps = torch.tensor([0.0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 100]) * 0.01
    other[0] = steps
    # row 1 unchanged: 11 zero importances + row 0's 0; quartiles at 5, 10, 15 of 22 sorted:
    # 0, 0, 0.05 KL -> threshold 0.075 KL: row 0's changes from 0.08 up are taken
    out = arcee_fusion(base, other)
    expected = torch.zeros(2, 11)
    expected[0] = torch.where(steps >= 0.08, steps, 0.0)
    assert torch.equal(out, expected)
    assert torch.equal(arcee_fusion(base, base.clone()), base)


def test_arcee_fusion_importance_is_the_change_times_the_row_divergence():
    base = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    other = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    p = torch.softmax(other[0], 0) + 1e-8
    q = torch.softmax(base[0], 0) + 1e-8
    kl = float((p * (p / q).log()).sum())
    importance = fusion_importance(base, other)
    assert torch.allclose(importance, torch.tensor([[kl, 0.0], [0.0, 0.0]]))
    assert math.isclose(kl, 0.7311 * math.log(0.7311 / 0.5) + 0.2689 * math.log(0.2689 / 0.5), rel_tol=1e-3)


def test_arcee_fusion_writes_float32_from_16_bit_inputs():
    gen = torch.Generator().manual_seed(2)
    base, other = (torch.randn(8, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    group, result = whole_group([other, base], 1, {}, seeds=[5, 6])
    arcee_fusion_group(group)
    out = result()
    assert out.dtype == torch.float32 and torch.equal(out, arcee_fusion(base, other))
    taken = out != base.float()
    # where taken: the base plus the change as computed in bfloat16, added in float32 (as mergekit)
    assert 0 < int(taken.sum()) < out.numel() and torch.equal(out[taken], (base.float() + (other - base).float())[taken])


def test_arcee_fusion_samples_large_tensors_with_the_seed():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(QUANTILE_SAMPLE // 1000 + 1, 1000, generator=gen)
    other = base + torch.randn(base.shape, generator=gen) * 0.1
    with pytest.raises(ValueError, match="needs a seed"):
        arcee_fusion(base, other)
    first, again, other_seed = (arcee_fusion(base, other, seed) for seed in (7, 7, 8))
    assert torch.equal(first, again)
    # the sampled threshold estimates the exact one: the share of taken entries stays close
    importance = fusion_importance(base, other)
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel() - 1
    exact = ordered[int(0.5 * n)] + 1.5 * (ordered[int(0.75 * n)] - ordered[int(0.25 * n)])
    share = float((importance >= exact).float().mean())
    for out in (first, other_seed):
        assert abs(float((out != base).float().mean()) - share) < 0.002


# ---- contracts and parameters through the plan and the CLI ------------------------------------


@pytest.mark.parametrize(
    ("method", "names", "params", "expected"),
    [
        ("nearswap", ["a", "base"], {}, "parameter 't' has no value"),
        ("nearswap", ["a", "b", "base"], {"t": 0.1}, "nearswap takes exactly 2 input models (base included), got 3"),
        ("arcee_fusion", ["a", "b", "base"], {}, "arcee_fusion takes exactly 2 input models (base included), got 3"),
        ("ram", ["a", "b"], {"epsilon": "small"}, "parameter 'epsilon': 'small' is not a number"),
        ("ramplus_tl", ["a", "b"], {"alpha": [True]}, "parameter 'alpha'"),
    ],
)
def test_contracts_and_parameters_checked_before_reading(models, tmp_path, method, names, params, expected):
    config = {"merge_method": method, "base_model": str(models["base"]), "models": [{"model": str(models[m])} for m in names]}
    if params:
        config["parameters"] = params
    with pytest.raises(WeightsmithError) as caught:
        merge_checkpoints(config, tmp_path / "out")
    assert expected in caught.value.problem
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["arcee_fusion", "nearswap", "ram", "ramplus_tl"])
def test_base_model_required_one_line_via_cli(models, tmp_path, cli, method):
    config = {"merge_method": method, "models": [{"model": str(models["a"])}, {"model": str(models["b"])}]}
    if method == "nearswap":
        config["parameters"] = {"t": 0.1}
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    result = cli("merge", path, tmp_path / "out")
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and f"{method} needs a base_model among its inputs" in message


def test_ram_of_the_base_alone_is_the_base(models, tmp_path):
    config = {"merge_method": "ram", "base_model": str(models["base"]), "models": [{"model": str(models["base"])}], "dtype": "bfloat16"}
    merge_checkpoints(config, tmp_path / "out")
    ours, base = Checkpoint(tmp_path / "out"), Checkpoint(models["base"])
    assert all(torch.equal(ours.get(n), base.get(n).to(torch.bfloat16)) for n in base.names())


def test_weights_are_ignored_with_a_warning(models, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="merge.plan"):
        merge_checkpoints(case_config("ram-float32", models), tmp_path / "weighted")
    warnings = [r.getMessage() for r in caplog.records if r.name == "merge.plan"]
    assert len(warnings) == 2 and all(w.startswith("ignoring 'weight' at models[") and "not a parameter of ram" in w for w in warnings)
    plain = case_config("ram-float32", models)
    for entry in plain["models"]:
        del entry["parameters"]
    merge_checkpoints(plain, tmp_path / "plain")
    assert digest(tmp_path / "weighted") == digest(tmp_path / "plain")


# ---- the same bytes as mergekit 0.1.5 -----------------------------------------------------------


def test_inputs_are_those_mergekit_ran_on(models):
    assert digest(*(models[k] for k in sorted(models))) == INPUTS_DIGEST, "the test models changed: regenerate the digests (see the module notes)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_mergekit(models, tmp_path, name):
    merge_checkpoints(case_config(name, models), tmp_path / "out")
    method, _, _, _, dtype = CASES[name]
    written = {Checkpoint(tmp_path / "out").get(n).dtype for n in Checkpoint(tmp_path / "out").names()}
    # mergekit writes the method's result as it is: the float32 mask / scale makes it float32
    assert written == {torch.float32 if method in ("arcee_fusion", "ramplus_tl") else getattr(torch, dtype)}
    assert digest(tmp_path / "out") == MERGEKIT_DIGESTS[name]


def _mergekit_digests(mergekit_yaml: str) -> None:
    """Print the digest table from mergekit runs on the test models (see the module notes)."""
    import os
    import subprocess
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="fusion-ram-"))
    models = build_models(root / "models")
    print(f'INPUTS_DIGEST = "{digest(*(models[k] for k in sorted(models)))}"')
    print("MERGEKIT_DIGESTS: dict[str, str] = {")
    for name in sorted(CASES):
        config = root / f"{name}.yml"
        config.write_text(yaml.safe_dump(case_config(name, models), sort_keys=False))
        out = root / "out" / name
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([mergekit_yaml, str(config), str(out), "--random-seed", "0"], check=True, env=env, capture_output=True)
        print(f'    "{name}": "{digest(out)}",')
    print("}")


if __name__ == "__main__":
    _mergekit_digests(sys.argv[1])
