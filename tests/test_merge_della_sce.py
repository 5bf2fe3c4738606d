"""DELLA (``della``, ``della_linear``) and SCE (``sce``): keep probabilities by magnitude rank per row,
L1 rescaling, determinism over seeds, threads, chunks and engines, the preflight's refusal of an
epsilon out of range; SCE's selection, weights and erasure on hand-made tensors, and mergekit
0.1.5's bits."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from merge.methods import METHODS
from merge.npmath import DRAW_LEVELS
from merge.run import merge_checkpoints, prepare
from merge.sce import agreement, sce, sce_weights, selection_mask
from merge.sparsify import della_chunk_size, della_lines, della_thresholds
from merge.task_arithmetic import Consensus, Sparsification, merge_deltas
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.errors import WeightsmithError

from .conftest import make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def della(delta, density, epsilon, *, rescale=False, seed=1):
    """One task vector over a zero base: DELLA's sparsified (and rescaled) delta itself."""
    zero = torch.zeros_like(delta) if isinstance(delta, torch.Tensor) else np.zeros_like(delta)
    return merge_deltas(
        zero, [delta], [1.0], densities=[density], epsilons=[epsilon], sparsification=Sparsification.della, rescale=rescale, seeds=[seed]
    )


def line_ranks(x: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank (0 = smallest) along axis 1, the whole tensor for 1-D."""
    axis = 0 if x.dim() == 1 else 1
    return torch.argsort(torch.argsort(x.abs(), dim=axis, stable=True), dim=axis)


def keep_rates(kept: torch.Tensor, ranks: torch.Tensor, length: int) -> torch.Tensor:
    return torch.stack([kept[ranks == r].float().mean() for r in range(length)])


# ---- DELLA: keep probabilities -----------------------------------------------------------------


def test_della_thresholds_run_evenly_from_density_minus_to_plus_epsilon():
    assert della_thresholds(5, 0.5, 0.2).tolist() == [round(p * DRAW_LEVELS) for p in (0.3, 0.4, 0.5, 0.6, 0.7)]
    assert della_thresholds(1, 0.4, 0.1).tolist() == [round(0.4 * DRAW_LEVELS)]  # one entry: the density
    assert della_thresholds(3, 0.5, -0.1).tolist() == [round(p * DRAW_LEVELS) for p in (0.6, 0.5, 0.4)]


def test_della_keeps_each_rank_of_a_row_at_its_probability():
    """Rows of very different scales: the probabilities follow the rank within the row, not in the
    whole tensor (which would keep the large rows at density + epsilon)."""
    rows, length, density, epsilon = 4000, 16, 0.4, 0.2
    scales = torch.tensor([100.0, 1.0, 0.01, 1e-4]).repeat(rows // 4)[:, None]
    delta = rand(rows, length, seed=3) * scales
    kept = della(delta, density, epsilon) != 0
    expected = torch.tensor([density - epsilon + 2 * epsilon * r / (length - 1) for r in range(length)])
    assert torch.allclose(keep_rates(kept, line_ranks(delta), length), expected, atol=0.035)
    for group in range(4):  # every scale keeps density on average
        assert abs(kept[group::4].float().mean().item() - density) < 0.02
    # the kept entries are the delta's own values
    assert torch.equal(della(delta, density, epsilon)[kept], delta[kept])


def test_della_ranks_lines_along_axis_one_and_a_vector_as_one_row():
    """mergekit ranks along dim 1: for a 3-D tensor, the lines ``x[i, :, k]``; a 1-D tensor is one row."""
    cube = rand(60, 8, 25, seed=4)
    kept = della(cube, 0.5, 0.3) != 0
    expected = torch.tensor([0.2 + 0.6 * r / 7 for r in range(8)])
    assert torch.allclose(keep_rates(kept, line_ranks(cube), 8), expected, atol=0.05)

    vector = rand(20_000, seed=5)
    kept = della(vector, 0.5, 0.3) != 0
    deciles = line_ranks(vector) // 2000
    rates = torch.stack([kept[deciles == d].float().mean() for d in range(10)])
    assert torch.allclose(rates, torch.tensor([0.2 + 0.6 * (2000 * d + 999.5) / 19_999 for d in range(10)]), atol=0.04)


def test_della_chunks_hold_whole_rows(monkeypatch):
    monkeypatch.setattr("merge.chunks.CHUNK", 1000)
    assert della_lines((7, 300)) == (300, 1) and della_chunk_size((7, 300)) == 900
    assert della_lines((5000,)) == (5000, 1) and della_chunk_size((5000,)) == 5000  # a row longer than a chunk: one chunk
    assert della_lines((4, 6, 50)) == (6, 50) and della_chunk_size((4, 6, 50)) == 900
    assert della_lines((4, 3000)) == (3000, 1) and della_chunk_size((4, 3000)) == 3000


def test_della_rescale_keeps_the_l1_norm():
    delta = rand(300, 64, seed=6)
    plain = della(delta, 0.3, 0.1)
    rescaled = della(delta, 0.3, 0.1, rescale=True)
    assert torch.equal(plain != 0, rescaled != 0)
    assert rescaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    # unrescaled, the kept L1 is sum(p_i |d_i|) on average: larger magnitudes are kept more often
    probs = 0.2 + 0.2 * line_ranks(delta) / 63
    assert plain.abs().sum().item() == pytest.approx((probs * delta.abs()).sum().item(), rel=0.03)
    assert plain.abs().sum().item() > 0.3 * delta.abs().sum().item() * 1.05


def test_della_density_one_is_task_arithmetic_and_zero_keeps_the_base():
    base, a, b = rand(20, 30, seed=1), rand(20, 30, seed=2), rand(20, 30, seed=3)
    for method in ("della", "della_linear"):
        kwargs = _flags(method)
        full = merge_deltas(base, [a, b], [0.6, 0.4], densities=[1.0, 1.0], epsilons=[0.15, 0.15], seeds=[1, 2], **kwargs)
        plain = merge_deltas(base, [a, b], [0.6, 0.4], consensus=kwargs["consensus"], normalize=kwargs["normalize"])
        assert torch.equal(full, plain)
        empty = merge_deltas(base, [a, b], [0.6, 0.4], densities=[0.0, 0.0], epsilons=[0.15, 0.15], seeds=[1, 2], **kwargs)
        assert torch.equal(empty, base)


def _flags(method: str) -> dict:
    """merge_deltas' flags for a registry method, from its defaults."""
    spec = METHODS[method]
    return {
        "sparsification": Sparsification.della,
        "consensus": Consensus.sum if method == "della" else None,
        "normalize": spec.param("normalize").default,
        "rescale": spec.param("rescale").default,
    }


def test_della_registry_entries_have_mergekits_parameters():
    for name, normalize in (("della", True), ("della_linear", False)):
        m = METHODS[name]
        assert {p.name: p.default for p in m.params if not p.required} == {
            "density": 1.0, "normalize": normalize, "rescale": True, "lambda": 1.0, "int8_mask": False, "epsilon": 0.15
        }
        assert m.param("weight").required and m.random and m.numpy and m.paper == "https://arxiv.org/abs/2406.11617"
    assert {p.name: p.default for p in METHODS["sce"].params} == {"int8_mask": False, "select_topk": 1.0}
    assert not METHODS["sce"].random


def test_della_merges_the_sparsified_deltas_by_sign_consensus():
    """della = each delta sparsified and rescaled on its own (its seed), then TIES' sum election
    and the mean of the agreeing weighted deltas; della_linear = their weighted sum."""
    base = rand(40, 32, seed=1)
    tensors = [base + rand(40, 32, seed=s) for s in (2, 3, 4)]
    weights, densities, epsilons, seeds = [0.6, 0.4, 0.3], [0.5, 0.7, 0.4], [0.15, 0.2, 0.1], [11, 12, 13]
    sparse = [della(t - base, d, e, rescale=True, seed=s) for t, d, e, s in zip(tensors, densities, epsilons, seeds)]
    weighted = torch.stack([w * d for w, d in zip(weights, sparse)])
    agree = (weighted.sign() == torch.where(weighted.sum(0) >= 0, 1.0, -1.0)).float()
    w = torch.tensor(weights)[:, None, None]
    expected = base + (weighted * agree).sum(0) / torch.where((w * agree).sum(0) == 0, 1.0, (w * agree).sum(0))
    common = dict(densities=densities, epsilons=epsilons, seeds=seeds)
    ours = merge_deltas(base, tensors, weights, **common, **_flags("della"))
    assert torch.allclose(ours, expected, atol=1e-5)
    linear = merge_deltas(base, tensors, weights, **common, **_flags("della_linear"))
    assert torch.allclose(linear, base + weighted.sum(0), atol=1e-5)


def test_della_is_deterministic_given_the_seed_whatever_the_threads_and_chunk_order(monkeypatch):
    monkeypatch.setattr("merge.chunks.CHUNK", 256)  # rows of 50: 5 rows a chunk, 13 chunks
    base = rand(64, 50, seed=1).to(torch.bfloat16)
    # coarse deltas: many equal magnitudes, ranked by position
    tensors = [(base.float() + torch.randint(-4, 5, (64, 50), generator=torch.Generator().manual_seed(s)) / 64).to(torch.bfloat16) for s in (2, 3)]
    kwargs = dict(densities=[0.4, 0.6], epsilons=[0.2, 0.1], **_flags("della"))

    def run(seeds, pmap=None):
        return merge_deltas(base, tensors, [0.6, 0.4], seeds=seeds, **kwargs, **({"pmap": pmap} if pmap else {}))

    def backwards(fn, indices):
        return list(reversed([fn(i) for i in reversed(indices)]))

    serial = run([5, 6])
    with ThreadPoolExecutor(3) as pool:
        threaded = run([5, 6], lambda fn, r: list(pool.map(fn, r)))
    assert torch.equal(serial, run([5, 6])) and torch.equal(serial, run([5, 6], backwards)) and torch.equal(serial, threaded)
    assert not torch.equal(serial, run([5, 7]))


def test_della_on_numpy_arrays_writes_torchs_bits(monkeypatch):
    monkeypatch.setattr("merge.chunks.CHUNK", 1000)
    base, a, b = (rand(37, 61, seed=s) for s in (1, 2, 3))
    for method in ("della", "della_linear"):
        kwargs = dict(densities=[0.5, 0.3], epsilons=[0.15, 0.1], seeds=[4, 5], scale=0.8, **_flags(method))
        theirs = merge_deltas(base, [a, b], [0.6, 0.4], **kwargs)
        ours = merge_deltas(base.numpy().copy(), [a.numpy().copy(), b.numpy().copy()], [0.6, 0.4], **kwargs)
        assert isinstance(ours, np.ndarray) and np.array_equal(ours.view(np.uint32), theirs.numpy().view(np.uint32))


# ---- DELLA: the merge pass ---------------------------------------------------------------------


def _stored(src: Path, dest: Path, dtype: torch.dtype) -> Path:
    with CheckpointWriter(dest, source=src, force=True) as writer:
        for name, tensor in Checkpoint(src).iter_tensors():
            writer.add(name, tensor.to(dtype))
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Independent random tiny Llamas (not fine-tunes of one base), stored in fp32 and bf16."""
    root = tmp_path_factory.mktemp("della-sce")
    out = {}
    for i, name in enumerate(("base", "a", "b")):
        out[name] = make_tiny_llama(root / name, seed=100 + i, hidden=64, layers=2, vocab=96)
        out[f"{name}-bf16"] = _stored(out[name], root / f"{name}-bf16", torch.bfloat16)
    return out


def _config(models: dict[str, Path], method: str, own: dict | None = None, suffix: str = "", **extra) -> dict:
    """base, a (weight 0.6) and b (weight 0.4), each with ``own`` parameters too; ``extra`` at the top."""
    config = {
        "merge_method": method,
        "base_model": str(models[f"base{suffix}"]),
        "models": [
            {"model": str(models[f"a{suffix}"]), "parameters": {"weight": 0.6, **(own or {})}},
            {"model": str(models[f"b{suffix}"]), "parameters": {"weight": 0.4, **(own or {})}},
        ],
    }
    config.update(extra)
    return config


def _tensors(folder: Path) -> dict[str, tuple[str, bytes]]:
    return {name: (str(t.dtype), t.contiguous().view(torch.uint8).numpy().tobytes()) for name, t in Checkpoint(folder).iter_tensors()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_both_engines_and_any_thread_count_write_the_same_bits(models, tmp_path, monkeypatch, method, dtype):
    monkeypatch.setattr("merge.chunks.CHUNK", 1000)  # several chunks of whole rows per tensor
    config = _config(models, method, {"density": 0.5, "epsilon": 0.1}, dtype=dtype)
    runs = {}
    for engine, threads in (("numpy", 1), ("numpy", 3), ("torch", 2)):
        report = merge_checkpoints(config, tmp_path / f"{engine}-{threads}", engine=engine, threads=threads, seed=9)
        assert report.engine == engine
        runs[engine, threads] = _tensors(tmp_path / f"{engine}-{threads}")
    first = runs["numpy", 1]
    assert all(run == first for run in runs.values())
    assert {d for d, _ in first.values()} == {f"torch.{dtype}"}
    other_seed = merge_checkpoints(config, tmp_path / "seed", engine="numpy", seed=10)
    assert other_seed.engine == "numpy" and _tensors(tmp_path / "seed") != first


def test_della_epsilon_outside_the_unit_interval_is_refused_in_preflight(models, tmp_path, cli):
    config = _config(models, "della", {"density": 0.9})  # 0.9 + the default 0.15 >= 1
    with pytest.raises(WeightsmithError) as caught:
        prepare(config)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "nothing written" in message
    assert f"parameter 'epsilon': density 0.9 +/- epsilon 0.15 must stay inside (0, 1) for {models['a']}" in message

    path = tmp_path / "della.yml"
    path.write_text(yaml.safe_dump(_config(models, "della_linear", {"density": 0.3, "epsilon": 0.3})))
    result = cli("merge", path, tmp_path / "out")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "parameter 'epsilon': density 0.3 +/- epsilon 0.3" in result.stderr
    assert not (tmp_path / "out").exists()
    # density 1 (nothing sparsified) takes any epsilon, as mergekit does
    prepare(_config(models, "della", {"density": 1.0, "epsilon": 0.5}))
    with pytest.raises(ValueError, match="epsilon"):
        della(rand(4, 4), 0.1, 0.1)


# ---- SCE ---------------------------------------------------------------------------------------


def test_sce_on_a_hand_made_tensor():
    """Weights from the mean squares: a 3.5, b 1.5 -> 0.7, 0.3. Elected signs all + (sums 2, 0, 2,
    0); a disagrees at entry 1, b at entry 2, both are zero at entry 3 (nothing kept: 0 / 1e-6)."""
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([1.0, 2.0, -1.0, 0.0])
    assert sce_weights(torch.stack([a, b])).tolist() == pytest.approx([0.7, 0.3])
    assert agreement(torch.stack([a, b]), torch.float32).tolist() == [[True, False, True, False], [True, True, False, False]]
    assert sce(base, [a, b]).tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0])
    assert torch.equal(sce(base + 5, [a + 5, b + 5]), sce(base, [a, b]) + 5)
    assert torch.equal(sce(base, []), base)


def test_sce_selects_the_entries_of_largest_variance():
    tvs = torch.tensor([[1.0, 0.0, 4.0, 2.0, 5.0], [1.0, 2.0, -4.0, 2.5, 5.0]])  # variances 0, 1, 16, 0.0625, 0
    # 3 entries vary: k = int(3 * share)
    assert selection_mask(tvs, 0.5, torch.float32).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert selection_mask(tvs, 0.7, torch.int8).tolist() == [0, 1, 1, 0, 0]
    assert selection_mask(tvs, 0.3, torch.float32).tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert selection_mask(tvs, 1.0, torch.float32).tolist() == [1.0] * 5
    assert selection_mask(tvs, 0.0, torch.float32).tolist() == [0.0] * 5
    # selected: a = [0, 0, 4, 0, 0], b = [0, 2, -4, 0, 0]; entry 1 only b agrees, entry 2 (sum 0: +) only a
    merged = sce(torch.zeros(5), list(tvs), select_topk=0.7)
    assert merged.tolist() == pytest.approx([0.0, 2.0, 4.0, 0.0, 0.0])


def test_sce_zero_task_vectors_weigh_alike_and_int8_masks_change_nothing():
    base = rand(6, 5, seed=1)
    assert torch.equal(sce(base, [base.clone(), base.clone()]), base)
    assert sce_weights(torch.zeros(3, 4)).tolist() == pytest.approx([1 / 3] * 3)
    tensors = [base + rand(6, 5, seed=s) for s in (2, 3, 4)]
    for topk in (1.0, 0.4):
        assert torch.equal(sce(base, tensors, select_topk=topk, int8_mask=True), sce(base, tensors, select_topk=topk))


def _synthetic(shape: tuple[int, ...], dtype: torch.dtype, coarse: bool, count: int = 3) -> list[torch.Tensor]:
    """A base and ``count`` models around it; coarse noise makes many equal variances (top-k ties)."""
    gen = torch.Generator().manual_seed(1234)
    base = torch.randn(shape, generator=gen)
    out = [base]
    for _ in range(count):
        out.append(base + (torch.randint(-3, 4, shape, generator=gen) / 32 if coarse else torch.randn(shape, generator=gen) * 0.1))
    return [t.to(dtype) for t in out]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


#: sha256 (first 16 hex digits) of mergekit 0.1.5's sce (``merge_methods.get("sce")`` on
#: ``TensorGroup.from_tensors(inputs, base_index=0)``) on :func:`_synthetic`'s inputs, torch 2.13 CPU
MERGEKIT_SCE = {
    ("bfloat16", (48, 40), False, 1.0): "b337df5b1d037df7",
    ("bfloat16", (48, 40), False, 0.5): "d6e1b97b87083010",
    ("bfloat16", (48, 40), True, 0.3): "62d5fc14fd9f1845",
    ("bfloat16", (40,), True, 0.6): "b002c1f4ded50250",
    ("float16", (48, 40), False, 1.0): "d8e83deca41b6e04",
    ("float16", (48, 40), False, 0.5): "8d05ead93c048441",
    ("float16", (48, 40), True, 0.3): "f7e76390263193b1",
    ("float16", (40,), True, 0.6): "9126614dd1159830",
    ("float32", (48, 40), False, 1.0): "87078a80ff0d25b3",
    ("float32", (48, 40), False, 0.5): "0d05b7010720a4ea",
    ("float32", (48, 40), True, 0.3): "36c24476d7fe8767",
    ("float32", (40,), True, 0.6): "0d7e8f7a5e987f22",
}


@pytest.mark.parametrize("case", list(MERGEKIT_SCE))
def test_sce_writes_mergekits_bits(case):
    dtype, shape, coarse, topk = case
    tensors = _synthetic(shape, getattr(torch, dtype), coarse)
    merged = sce(tensors[0], tensors[1:], select_topk=topk)
    assert merged.dtype == getattr(torch, dtype) and _digest(merged) == MERGEKIT_SCE[case]


def _folder_digest(folder: Path) -> str:
    """sha256 (first 16 hex digits) over a checkpoint's tensors by name: name, dtype, bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(Checkpoint(folder).iter_tensors(), key=lambda item: item[0]):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


#: :func:`_folder_digest` of ``mergekit-yaml`` 0.1.5's output (``--random-seed 0``, CPU, torch 2.13) on
#: the ``models`` fixture's checkpoints: base, a (weight 0.6), b (weight 0.4), the config's dtype
#: (None: the inputs' own, here bf16) and ``select_topk``
MERGEKIT_SCE_RUNS = {
    ("bfloat16", "", 0.5): "8b9ffbddd635bde3",
    ("float16", "", 0.5): "da5911a1c10801f0",
    ("float32", "", 0.5): "3cd77b6efa21169b",
    (None, "-bf16", 0.7): "579c956b11568e69",
}


@pytest.mark.parametrize("case", list(MERGEKIT_SCE_RUNS))
def test_sce_merge_equals_mergekits_run_and_warns_of_the_unused_weight(models, tmp_path, caplog, case):
    dtype, suffix, topk = case
    config = _config(models, "sce", suffix=suffix, parameters={"select_topk": topk}, **({"dtype": dtype} if dtype else {}))
    with caplog.at_level(logging.WARNING, logger="merge.plan"):
        report = merge_checkpoints(config, tmp_path / "out", threads=2)
    assert report.engine == "torch"
    assert any("ignoring 'weight'" in r.getMessage() and "not a parameter of sce" in r.getMessage() for r in caplog.records)
    assert _folder_digest(tmp_path / "out") == MERGEKIT_SCE_RUNS[case]
