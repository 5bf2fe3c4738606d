"""Merge math on hand-made tensors: endpoints, identities, masks, expectations over random draws."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import torch

from merge.chunks import CHUNK
from merge.linear import linear, soup
from merge.model_stock import model_stock
from merge.npmath import fused_multiply_add
from merge.params import Condition, Kind, ParamSpec, Scope, evaluate, resolve
from merge.passthrough import stack_layers, stacked_config
from merge.run import tensor_seed
from merge.slerp import slerp
from merge.task_arithmetic import Consensus, Sparsification, merge_deltas, sign_agreement


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def task_arithmetic(base, tensors, weights, *, normalize=False):
    return merge_deltas(base, tensors, weights, normalize=normalize)


def ties(base, tensors, weights, densities):
    """The flags of METHODS["ties"]."""
    return merge_deltas(base, tensors, weights, densities=densities, sparsification=Sparsification.magnitude, consensus=Consensus.sum, normalize=True)


def sparsify(delta, density, method, *, rescale=False, gamma=0.0, seed=None):
    """One task vector over a zero base: the sparsified (and rescaled) delta itself."""
    return merge_deltas(
        torch.zeros_like(delta), [delta], [1.0], densities=[density], sparsification=method, rescale=rescale, gammas=[gamma],
        seeds=None if seed is None else [seed],
    )


# ---- linear / soup ----------------------------------------------------------------------------


def test_linear_weights_one_zero_returns_the_first():
    a, b = rand(16, 8, seed=1), rand(16, 8, seed=2)
    assert torch.equal(linear([a, b], [1.0, 0.0]), a)
    assert torch.equal(linear([a, b], [1.0, 0.0], normalize=False), a)


def test_linear_normalizes_and_keeps_dtype():
    a, b = rand(4, 4, seed=1, dtype=torch.bfloat16), rand(4, 4, seed=2, dtype=torch.bfloat16)
    out = linear([a, b], [3.0, 1.0])
    assert out.dtype == torch.bfloat16
    expected = (0.75 * a.float() + 0.25 * b.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)
    assert torch.allclose(linear([a.float(), b.float()], [3.0, 1.0], normalize=False), 3 * a.float() + b.float())


def test_soup_is_the_plain_mean():
    xs = [rand(5, 3, seed=s) for s in range(4)]
    assert torch.allclose(soup(xs), torch.stack(xs).mean(0), atol=1e-7)


# ---- slerp ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_slerp_endpoints_return_the_inputs(dtype):
    a, b = rand(32, 16, seed=1, dtype=dtype), rand(32, 16, seed=2, dtype=dtype)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.equal(slerp(1.0, a, b), b)


def test_slerp_midpoint_of_orthogonal_vectors_stays_on_the_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(0.5, a, b)
    assert torch.allclose(mid, torch.tensor([2**-0.5, 2**-0.5]), atol=1e-6)
    assert torch.allclose(slerp(1 / 3, a, b), torch.tensor([0.8660254, 0.5]), atol=1e-6)


def test_slerp_falls_back_to_linear_for_colinear_vectors():
    a = rand(64, seed=3)
    b = 2.5 * a
    assert torch.allclose(slerp(0.3, a, b), 0.7 * a + 0.3 * b, atol=1e-6)
    assert torch.allclose(slerp(0.3, a, -a), 0.7 * a - 0.3 * a, atol=1e-6)


def test_slerp_chunked_reductions_match_the_whole_tensor_formula():
    a, b = rand(CHUNK + 12345, seed=4).double(), rand(CHUNK + 12345, seed=5).double()
    theta = torch.acos((a / a.norm()) @ (b / b.norm()))
    t = 0.37
    expected = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    assert torch.allclose(slerp(t, a.float(), b.float()).double(), expected, atol=1e-5)


# ---- task arithmetic family -------------------------------------------------------------------


def test_ties_with_one_model_and_density_one_equals_task_arithmetic():
    base, ft = rand(24, 8, seed=1), rand(24, 8, seed=2)
    for weight in (1.0, 0.4):
        expected = task_arithmetic(base, [ft], [weight], normalize=True)
        assert torch.equal(ties(base, [ft], [weight], [1.0]), expected)
    assert torch.allclose(task_arithmetic(base, [ft], [0.4]), base + 0.4 * (ft - base), atol=1e-6)


def test_ties_sign_election_on_a_hand_made_tensor():
    deltas = torch.tensor(
        [
            [1.0, -2.0, 3.0, 0.0],
            [2.0, 1.0, -1.0, 0.0],
            [-4.0, 1.0, -1.0, 1.0],
        ]
    )
    # column sums -1, 0, 1, 1 -> elected signs -, + (ties go to +), +, +
    agree = torch.stack(sign_agreement(list(deltas))).bool()
    assert agree.tolist() == [
        [False, False, True, False],
        [False, True, False, False],
        [True, True, False, True],
    ]
    by_count = torch.stack(sign_agreement(list(deltas), Consensus.count)).bool()  # sign counts: -1, 1, -1, 1
    assert by_count[:, 2].tolist() == [False, True, True]
    base = torch.zeros(4)
    merged = ties(base, list(base + deltas), [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    # agreeing deltas averaged: -4 / 1, (1 + 1) / 2, 3 / 1, 1 / 1
    assert merged.tolist() == [-4.0, 1.0, 3.0, 1.0]
    unnormalized = merge_deltas(base, list(deltas), [1.0, 1.0, 1.0], consensus=Consensus.sum)
    assert unnormalized.tolist() == [-4.0, 2.0, 3.0, 1.0]


def test_ties_trims_to_the_largest_magnitudes():
    base = torch.zeros(10)
    ft = torch.tensor([0.1, -5.0, 0.2, 4.0, -0.3, 0.0, 3.0, 0.05, -0.01, 2.0])
    merged = ties(base, [ft], [1.0], [0.3])
    assert merged.tolist() == pytest.approx([0, -5.0, 0, 4.0, 0, 0, 3.0, 0, 0, 0])


def test_dare_keeps_density_and_preserves_l1_norm_over_draws():
    delta = rand(100_000, seed=7)
    l1 = delta.abs().sum().item()
    density = 0.3
    kept, norms_rescaled, norms_plain = [], [], []
    for draw in range(1000, 1010):  # mask seeds unrelated to the data's seed (same seed, same stream)
        rescaled = sparsify(delta, density, Sparsification.random, rescale=True, seed=draw)
        plain = sparsify(delta, density, Sparsification.random, rescale=False, seed=draw)
        kept.append((plain != 0).float().mean().item())
        norms_rescaled.append(rescaled.abs().sum().item())
        norms_plain.append(plain.abs().sum().item())
        assert torch.equal(rescaled != 0, plain != 0)
    assert all(abs(k - density) <= 0.01 for k in kept)
    assert sum(norms_rescaled) / len(norms_rescaled) == pytest.approx(l1, rel=1e-3)
    assert sum(norms_plain) / len(norms_plain) == pytest.approx(density * l1, rel=0.01)


def test_dare_is_seeded_per_tensor():
    base, ft = torch.zeros(1000), rand(1000, seed=1)

    def draw(seed, name):
        return merge_deltas(base, [ft], [1.0], densities=[0.5], sparsification=Sparsification.random, seeds=[tensor_seed(seed, name, 1)])

    assert torch.equal(draw(0, "a.weight"), draw(0, "a.weight"))
    assert not torch.equal(draw(0, "a.weight"), draw(1, "a.weight"))
    assert not torch.equal(draw(0, "a.weight"), draw(0, "b.weight"))
    assert tensor_seed(0, "a.weight", 1) == tensor_seed(0, "a.weight", 1) != tensor_seed(0, "a.weight", 2)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
def test_delta_merges_do_not_depend_on_chunk_order_or_threads(method):
    """Chunks are computed independently (ties at the cut split by position, random draws seeded
    per chunk): a parallel map running them out of order gives the same tensor as the serial one."""
    shape = (64, 50)
    base = rand(*shape, seed=1, dtype=torch.bfloat16)
    # coarse deltas: many equal magnitudes, so the top-k cut has ties spread over several chunks
    tensors = [(base.float() + torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(s)) / 64).to(torch.bfloat16) for s in (2, 3)]
    kwargs = {
        "ties": dict(sparsification=Sparsification.magnitude, consensus=Consensus.sum, normalize=True),
        "dare_ties": dict(sparsification=Sparsification.random, consensus=Consensus.sum, rescale=True, seeds=[5, 6]),
        "breadcrumbs": dict(sparsification=Sparsification.outliers, gammas=[0.05, 0.05]),
    }[method]

    def backwards(fn, indices):
        return list(reversed([fn(i) for i in reversed(indices)]))

    with mock.patch("merge.chunks.CHUNK", 97):
        serial = merge_deltas(base, tensors, [1.0, 0.7], densities=[0.4, 0.6], **kwargs)
        shuffled = merge_deltas(base, tensors, [1.0, 0.7], densities=[0.4, 0.6], pmap=backwards, **kwargs)
        with ThreadPoolExecutor(3) as pool:
            threaded = merge_deltas(base, tensors, [1.0, 0.7], densities=[0.4, 0.6], pmap=lambda fn, r: list(pool.map(fn, r)), **kwargs)
    assert torch.equal(serial, shuffled) and torch.equal(serial, threaded)
    assert not torch.equal(serial, base)


def test_breadcrumbs_drops_largest_and_smallest():
    delta = torch.arange(1, 21, dtype=torch.float32)  # magnitudes 1..20
    out = sparsify(delta, 0.5, Sparsification.outliers, gamma=0.1)
    # drop the 2 largest (19, 20) and the 8 smallest (1..8): keep 9..18
    assert (out != 0).nonzero().reshape(-1).tolist() == list(range(8, 18))
    assert torch.equal(sparsify(delta, 1.0, Sparsification.outliers, gamma=0.1), delta)


# ---- model stock ------------------------------------------------------------------------------


def test_model_stock_ratio_from_the_angle():
    base = torch.zeros(4)
    e1, e2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    assert torch.equal(model_stock(base, [e1, e2]), base)  # orthogonal: t = 0
    assert torch.allclose(model_stock(base, [e1, e1.clone()]), e1)  # identical: t = 1
    # cos = 0.5 for two task vectors at 60 degrees: t = 2 * 0.5 / 1.5 = 2/3
    f = torch.tensor([0.5, 3**0.5 / 2, 0, 0])
    assert torch.allclose(model_stock(base, [e1, f]), (2 / 3) * (e1 + f) / 2, atol=1e-6)


def test_model_stock_filter_wise_works_per_row():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = model_stock(base, [a, b], filter_wise=True)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


# ---- passthrough ------------------------------------------------------------------------------


def test_stack_layers_and_config():
    assert stack_layers([(0, 2), (1, 3), (2, 3)]) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]
    a = {"num_hidden_layers": 3, "layer_types": ["x0", "x1", "x2"]}
    b = {"num_hidden_layers": 3, "layer_types": ["y0", "y1", "y2"]}
    out = stacked_config(a, "num_hidden_layers", [(a, 0), (b, 2), (b, 1)])
    assert out == {"num_hidden_layers": 3, "layer_types": ["x0", "y2", "y1"]}
    assert a["layer_types"] == ["x0", "x1", "x2"]


# ---- parameters -------------------------------------------------------------------------------


def test_parameter_settings_like_mergekit():
    gradient = [0, 0.3, 0.8, 1]
    assert evaluate(gradient, "x", 0.0, Kind.number) == 0
    assert evaluate(gradient, "x", 0.5, Kind.number) == pytest.approx(0.55)
    assert evaluate(gradient, "x", 1.0, Kind.number) == 1
    conds = [Condition(filter="self_attn", value=[0, 1]), Condition(filter="mlp", value=0.2)]
    assert evaluate(conds, "model.layers.0.self_attn.q_proj.weight", 0.25, Kind.number) == pytest.approx(0.25)
    assert evaluate(conds, "model.layers.0.mlp.up_proj.weight", 0.25, Kind.number) == pytest.approx(0.2)
    assert evaluate(conds, "model.norm.weight", 0.25, Kind.number) is None
    assert evaluate("1e-3", "x", 0, Kind.number) == pytest.approx(1e-3)
    assert evaluate([True, False], "x", 0.9, Kind.flag) is True
    with pytest.raises(ValueError):
        evaluate("many", "x", 0, Kind.number)
    spec = ParamSpec("weight", Kind.number, Scope.input)
    assert resolve(spec, [{"weight": conds}, {"weight": 0.7}], "model.norm.weight", 0) == 0.7
    assert resolve(spec, [None, {"weight": conds}], "model.layers.1.mlp.x", 0) == 0.2
    with pytest.raises(LookupError):
        resolve(spec, [None, {}], "x", 0)
    assert resolve(ParamSpec("density", Kind.number, Scope.non_base, 1.0), [{}], "x", 0) == 1.0


# ---- the chunked delta merge against the plain whole-tensor formulation -----------------------


def reference_merge(base, tensors, weights, densities, method, consensus, normalize, gammas):
    """Task-vector merging written plainly over whole tensors (stacked deltas, stable sorts) — the
    formulation mergekit uses, with a stable tie order."""
    n, numel = len(tensors), base.numel()
    deltas = torch.stack([t - base for t in tensors])
    for i in range(n):
        d = deltas[i].reshape(-1)
        order = torch.argsort(d.abs().float(), descending=method == "magnitude", stable=True)
        mask = torch.zeros(numel, dtype=base.dtype)
        if method == "magnitude":
            mask[order[: max(1, int(densities[i] * numel))]] = 1
        else:
            target = int(densities[i] * numel)
            bottom = max(0, numel - target - int(gammas[i] * numel))
            mask[order[bottom : bottom + target]] = 1
        deltas[i] = (d * mask).reshape(base.shape)
    w = torch.tensor(weights, dtype=base.dtype).reshape((n,) + (1,) * base.dim())
    deltas = deltas * w
    if consensus:
        agree = deltas.sign() == ((deltas.sum(0) >= 0).to(base.dtype) * 2 - 1)
        mixed, divisor = (deltas * agree).sum(0), (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0)
    if normalize:
        mixed = mixed / divisor
    return (base + mixed).to(base.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("method", "consensus"), [("magnitude", True), ("magnitude", False), ("outliers", False), ("outliers", True)])
def test_chunked_delta_merge_equals_the_whole_tensor_formula(dtype, method, consensus, monkeypatch):
    monkeypatch.setattr("merge.chunks.CHUNK", 4096)
    gen = torch.Generator().manual_seed(11)
    shape = (37, 512)  # several chunks, the last one short
    base = torch.randn(shape, generator=gen).to(dtype)
    # Coarse deltas: many equal magnitudes, so ties at the cut are common.
    tensors = [(base.float() + torch.randint(-20, 21, shape, generator=gen) / 256).to(dtype) for _ in range(3)]
    weights, densities, gammas = [1.0, 0.7, 0.45], [0.5, 0.3, 0.8], [0.02, 0.1, 0.0]
    ours = merge_deltas(
        base,
        tensors,
        weights,
        densities=densities,
        sparsification=Sparsification(method),
        consensus=Consensus.sum if consensus else None,
        normalize=True,
        gammas=gammas,
    )
    expected = reference_merge(base, tensors, weights, densities, method, consensus, True, gammas)
    assert ours.dtype == dtype
    assert bool((ours == expected).all())  # equal up to the sign of zero


# ---- one function for numpy arrays and torch tensors -------------------------------------------


def test_the_same_functions_run_on_numpy_arrays_with_torchs_bits(monkeypatch):
    monkeypatch.setattr("merge.chunks.CHUNK", 1000)
    base, a, b = (rand(37, 61, seed=s) for s in (1, 2, 3))
    as_np = lambda t: t.numpy().copy()  # noqa: E731
    cases = [
        (lambda *xs: linear(list(xs), [0.3, 0.9]), (a, b)),
        (
            lambda x, y, z: merge_deltas(
                x, [y, z], [1.0, 0.6], densities=[0.5, 0.7], sparsification=Sparsification.random, consensus=Consensus.sum,
                normalize=True, rescale=True, scale=0.8, seeds=[4, 5],
            ),
            (base, a, b),
        ),
    ]
    for fn, inputs in cases:
        ours = fn(*(as_np(t) for t in inputs))
        assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == (37, 61)
        assert np.array_equal(ours.view(np.uint32), fn(*inputs).numpy().view(np.uint32))


# ---- fused multiply-add (linear's accumulation, as torch's addcmul_) ---------------------------


def test_fused_multiply_add_rounds_once_like_addcmul():
    rng = np.random.default_rng(0)
    n = 1 << 16
    # magnitudes far apart make the float64 sum inexact in many entries
    acc = (rng.standard_normal(n) * rng.choice([1e-7, 1.0, 1e7], n)).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32)
    for c in (0.4, -0.6000001, 3.0):
        c32 = np.float32(c)
        expected = torch.from_numpy(acc.copy()).addcmul_(torch.from_numpy(x), torch.tensor([float(c32)])).numpy()
        assert np.array_equal(fused_multiply_add(acc, x, c32).view(np.uint32), expected.view(np.uint32))
        # rounding the product first (what numpy's a + x * c does) differs somewhere: the test can fail
        assert not np.array_equal((acc + x * c32).view(np.uint32), expected.view(np.uint32))


def test_fused_multiply_add_is_exact_where_two_roundings_would_meet_at_a_midpoint():
    # exact: 1 + 2^-23 + 2^-24 - 2^-70, just below the float32 midpoint; the float64 sum lands on it
    acc = np.array([1 + 2**-23], dtype=np.float32)
    x = np.array([2**-24 * (1 + 2**-23)], dtype=np.float32)
    c = np.float32(1 - 2**-23)
    twice = (acc.astype(np.float64) + x.astype(np.float64) * np.float64(c)).astype(np.float32)
    once = fused_multiply_add(acc, x, c)
    assert twice[0] == np.float32(1 + 2**-22)
    assert once[0] == np.float32(1 + 2**-23)
    assert torch.from_numpy(acc.copy()).addcmul_(torch.from_numpy(x), torch.tensor([float(c)]))[0].item() == once[0]


def test_ranks_invert_the_sort_order_in_both_libraries():
    from merge.arith import NumpyArith, TorchArith

    rng = np.random.default_rng(0)
    for shape in [(3, 7, 1), (2, 5, 4), (1, 1000, 1)]:
        x = rng.standard_normal(shape).astype(np.float32)
        x[:, ::3] = 0.5  # equal values: ranks by position
        order = np.argsort(x, axis=1, kind="stable")
        expected = np.argsort(order, axis=1, kind="stable")
        assert np.array_equal(NumpyArith("F32").ranks(order), expected)
        assert np.array_equal(TorchArith(torch.float32, "cpu").ranks(torch.from_numpy(order)).numpy(), expected)
