"""compress.gptq and compress.awq: the math beats round-to-nearest where it should."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from compress.awq import (
    activation_scale,
    awq_clip_ratios,
    awq_scales,
    fold_scales_into_linear,
    fold_scales_into_norm,
    scale_input_channels,
    search_awq_scales,
)
from compress.grid import QuantGrid, fake_quantize, mse_clip_search, quantize
from compress.gptq import accumulate_hessian, gptq_quantize, hessian_clip_search

from .layers import OUTLIERS
from .layers import outlier_inputs as _inputs
from .layers import output_error as _out_err
from .layers import random_weight as _weight


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


# --- Hessian accumulation -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulate_hessian_streams_the_running_mean(dtype: torch.dtype) -> None:
    x = _inputs(96, 1, width=24)
    H, n = None, 0
    for batch in (x[:10].reshape(2, 5, 24), x[10:11], x[11:11], x[11:]):
        H, n = accumulate_hessian(H, batch, n, dtype=dtype)
    assert n == 96 and H is not None and H.dtype == dtype
    expected = 2.0 / 96 * x.double().T @ x.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    atol = tol * float(expected.abs().max())
    torch.testing.assert_close(H.double(), expected, rtol=tol, atol=atol)
    same, _ = accumulate_hessian(H, x[:4], n)
    assert same is H
    with pytest.raises(ValueError, match="shape"):
        accumulate_hessian(H, torch.zeros(3, 7), n)


# --- GPTQ -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid",
    [
        QuantGrid(4, True, 32),
        QuantGrid(3, False, -1),
        QuantGrid(2, False, 32),
        QuantGrid(8, True, 64),
    ],
    ids=str,
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_a_diagonal_hessian_is_rtn(grid: QuantGrid, act_order: bool) -> None:
    # no correlations -> no error to spread; a distinct diagonal also exercises the permutation
    w = _weight(16, 100, seed=2)
    H = torch.diag(torch.linspace(0.5, 3.0, 100).flip(0)[torch.randperm(100)])
    q, loss = gptq_quantize(w, H, grid, act_order=act_order)
    rtn = quantize(w, grid)
    assert q.g_idx is None
    assert torch.equal(q.codes, rtn.codes)
    assert torch.equal(q.scales, rtn.scales) and torch.equal(q.zeros, rtn.zeros)
    hinv_diag = 1.0 / (torch.diagonal(H) + 0.01 * torch.diagonal(H).mean())
    expected = float(((w - rtn.dequantize()) ** 2 / (2 * hinv_diag)).sum())
    assert loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 48])
def test_gptq_beats_rtn_on_outlier_inputs(bits: int, sym: bool, group_size: int) -> None:
    w = _weight()
    x, held_out = _inputs(256, 10), _inputs(512, 11)
    H, _ = accumulate_hessian(None, x, 0)
    grid = QuantGrid(bits, sym, group_size)
    rtn = fake_quantize(w, grid)
    for act_order in (False, True):
        q, loss = gptq_quantize(w, H, grid, act_order=act_order, block_size=32)
        assert q.g_idx is None and math.isfinite(loss) and loss > 0
        w_hat = q.dequantize()
        assert _out_err(x, w, w_hat) < 0.5 * _out_err(x, w, rtn)
        assert _out_err(held_out, w, w_hat) < 0.5 * _out_err(held_out, w, rtn)


def test_gptq_act_order_with_dynamic_groups_records_g_idx() -> None:
    w = _weight()
    x = _inputs(256, 12)
    H, _ = accumulate_hessian(None, x, 0)
    grid = QuantGrid(4, False, 32)
    q, _ = gptq_quantize(w, H, grid, act_order=True, static_groups=False)
    assert q.g_idx is not None
    assert not torch.equal(q.g_idx, grid.group_index(128))
    assert torch.bincount(q.g_idx).tolist() == [32, 32, 32, 32]
    # the heaviest input channels are quantized first, so they share group 0
    assert set(q.g_idx[OUTLIERS].tolist()) == {0}
    assert _out_err(x, w, q.dequantize()) < 0.5 * _out_err(x, w, fake_quantize(w, grid))
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, H, grid, act_order=True, static_groups=False, clip=torch.ones(64, 4))


def test_gptq_block_size_does_not_change_the_result() -> None:
    w = _weight(32, 100)
    x = _inputs(256, 13, width=100)
    H, _ = accumulate_hessian(None, x, 0)
    grid = QuantGrid(4, True, 32)
    reference, _ = gptq_quantize(w, H, grid, block_size=128)
    for block_size in (1, 20, 64):
        q, _ = gptq_quantize(w, H, grid, block_size=block_size)
        mismatch = (q.codes != reference.codes).float().mean().item()
        assert mismatch < 0.01  # float summation order only


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", [QuantGrid(4, True, 32), QuantGrid(3, False, -1)])
def test_gptq_on_stacked_rows_equals_gptq_per_linear(act_order: bool, grid: QuantGrid) -> None:
    """The quantize pass runs q/k/v (and gate/up) as one stacked weight: GPTQ treats rows alike, so
    each linear's rows of the stacked result equal quantizing that linear alone."""
    x = _inputs(256, 21, width=96)
    H, _ = accumulate_hessian(None, x, 0)
    parts = [_weight(40, 96, seed=1), _weight(8, 96, seed=2), _weight(24, 96, seed=3)]
    stacked, loss = gptq_quantize(torch.cat(parts).to(torch.bfloat16), H, grid, act_order=act_order)
    start, total = 0, 0.0
    for part in parts:
        alone, part_loss = gptq_quantize(part.to(torch.bfloat16), H, grid, act_order=act_order)
        rows = stacked.rows(start, start + part.shape[0])
        assert rows.shape == alone.shape
        # equal up to float summation order in the error updates (exactly equal on MKL here)
        assert (rows.codes != alone.codes).float().mean().item() < 0.01
        assert (rows.scales != alone.scales).float().mean().item() < 0.01
        start += part.shape[0]
        total += part_loss
    assert loss == pytest.approx(total, rel=1e-3)


def test_gptq_dead_input_columns() -> None:
    w = _weight()
    x = _inputs(256, 14)
    dead = [0, 5, 77]
    x[:, dead] = 0.0
    H, _ = accumulate_hessian(None, x, 0)
    grid = QuantGrid(4, False, 32)
    for act_order in (False, True):
        q, loss = gptq_quantize(w, H, grid, act_order=act_order)
        w_hat = q.dequantize()
        assert bool(torch.isfinite(w_hat).all()) and math.isfinite(loss)
        assert bool((w_hat[:, dead] == 0).all())
        assert _out_err(x, w, w_hat) < _out_err(x, w, fake_quantize(w, grid))


def test_gptq_raises_damp_on_a_singular_hessian(caplog: pytest.LogCaptureFixture) -> None:
    # rank 8 out of 64, plus a slightly negative direction as float accumulation can leave
    g = torch.Generator().manual_seed(15)
    basis, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    eigen = torch.zeros(64)
    eigen[:8] = torch.linspace(1.0, 50.0, 8)
    eigen[8] = -0.05
    H = basis @ torch.diag(eigen) @ basis.T
    w = _weight(16, 64)
    with caplog.at_level(logging.WARNING, logger="compress.obs"):
        q, loss = gptq_quantize(w, H, QuantGrid(4, True, 32), damp=1e-4)
    retries = [r for r in caplog.records if "Cholesky failed" in r.getMessage()]
    assert len(retries) >= 1
    assert bool(torch.isfinite(q.dequantize()).all()) and math.isfinite(loss)
    # exactly singular (rank 8, PSD) with a vanishing damp: finite either way
    psd = basis @ torch.diag(eigen.clamp(min=0)) @ basis.T
    q, loss = gptq_quantize(w, psd, QuantGrid(4, True, 32), damp=1e-8)
    assert bool(torch.isfinite(q.dequantize()).all()) and math.isfinite(loss)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, H, QuantGrid(4, True, 32), damp=1e-4, max_damp=1e-3)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, torch.full((64, 64), math.nan), QuantGrid(4, True, 32))


def test_gptq_clip_shrinks_the_range() -> None:
    w = _weight(16, 64)
    H = torch.eye(64)
    grid = QuantGrid(4, True, -1)
    plain, _ = gptq_quantize(w, H, grid)
    clipped, _ = gptq_quantize(w, H, grid, clip=torch.full((16, 1), 0.5))
    torch.testing.assert_close(clipped.scales, plain.scales * 0.5, rtol=1e-6, atol=0)
    clip = mse_clip_search(w, grid)
    searched, _ = gptq_quantize(w, H, grid, clip=clip)
    assert torch.equal(searched.codes, quantize(w, grid, clip).codes)


@pytest.mark.parametrize("grid", [QuantGrid(4, True, -1), QuantGrid(3, False, 32), QuantGrid(4, True, 48)])
def test_hessian_clip_search_with_a_diagonal_hessian_is_the_weighted_mse_search(grid: QuantGrid) -> None:
    # a diagonal H makes e H e^T the importance-weighted squared error, block by block
    w = _weight(32, 128, seed=3)
    importance = torch.rand(128, generator=torch.Generator().manual_seed(5)) + 0.1
    assert torch.equal(hessian_clip_search(w, torch.diag(importance), grid), mse_clip_search(w, grid, importance=importance))
    assert torch.equal(hessian_clip_search(w, torch.eye(128), grid), mse_clip_search(w, grid))


def _hessian_error(w: torch.Tensor, H: torch.Tensor, grid: QuantGrid, clip: torch.Tensor | None) -> torch.Tensor:
    """Per-row output error e H e^T of round-to-nearest at ``clip`` (per-channel grids)."""
    e = w - fake_quantize(w, grid, clip)
    return ((e @ H) * e).sum(1)


def test_hessian_clip_search_never_raises_the_output_error_and_beats_the_weight_error_search() -> None:
    w = _weight(64, 128, seed=7)
    x = _inputs(1024, 12)
    H, _ = accumulate_hessian(None, x, 0)
    grid = QuantGrid(4, True, -1)
    searched = hessian_clip_search(w, H, grid)
    assert searched.shape == (64, 1) and bool(((searched > 0.49) & (searched <= 1)).all())
    assert bool((searched < 1).any())
    plain = _hessian_error(w, H, grid, None)
    best = _hessian_error(w, H, grid, searched)
    assert bool((best <= plain).all()) and float(best.sum()) < 0.9 * float(plain.sum())
    by_weight_error = _hessian_error(w, H, grid, mse_clip_search(w, grid))
    assert float(best.sum()) < float(by_weight_error.sum())


def test_hessian_clip_search_rejects_a_mismatched_hessian() -> None:
    with pytest.raises(ValueError, match="expected"):
        hessian_clip_search(_weight(8, 64), torch.eye(32), QuantGrid(4, True, -1))


# --- AWQ --------------------------------------------------------------------------------


def test_activation_scale_and_normalized_scales() -> None:
    x = torch.tensor([[[1.0, -2.0, 0.0]], [[-3.0, 2.0, 0.0]]])
    assert activation_scale(x).tolist() == [2.0, 2.0, 0.0]
    a = torch.tensor([1.0, 4.0, 16.0])
    assert torch.equal(awq_scales(a, 0.0), torch.ones(3))
    s = awq_scales(a, 0.5)
    torch.testing.assert_close(s, torch.tensor([0.5, 1.0, 2.0]))
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert float(awq_scales(torch.tensor([0.0, 1.0]), 1.0).min()) > 0


def test_folding_preserves_the_float_function() -> None:
    g = torch.Generator().manual_seed(20)
    x = _inputs(32, 20)
    norm_w, norm_b = torch.rand(128, generator=g) + 0.5, torch.randn(128, generator=g)
    w = _weight()
    s = awq_scales(activation_scale(x), 0.5)
    new_norm_w, new_norm_b = fold_scales_into_norm(norm_w, s, norm_b)
    assert new_norm_b is not None
    before = (_rms_norm(x, norm_w) + norm_b) @ w.T
    after = (_rms_norm(x, new_norm_w) + new_norm_b) @ scale_input_channels(w, s).T
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    prev = torch.randn(128, 48, generator=g)
    prev_b = torch.randn(128, generator=g)
    new_prev, new_prev_b = fold_scales_into_linear(prev, s, prev_b)
    assert new_prev_b is not None
    h = torch.randn(32, 48, generator=g)
    before = (h @ prev.T + prev_b) @ w.T
    after = (h @ new_prev.T + new_prev_b) @ scale_input_channels(w, s).T
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        scale_input_channels(w, torch.zeros(128))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_awq_beats_rtn_on_the_block_output(bits: int, group_size: int) -> None:
    """RMSNorm -> linear; AWQ's scales folded into the norm, compared on the block output."""
    g = torch.Generator().manual_seed(30 + bits)
    norm_w = torch.rand(128, generator=g) + 0.5
    w = _weight(seed=bits)
    x, held_out = _inputs(256, 31), _inputs(512, 32)
    grid = QuantGrid(bits, False, group_size)

    def block(inputs: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        return _rms_norm(inputs, norm_w) @ ws[0].T

    normed = _rms_norm(x, norm_w)
    s = search_awq_scales(normed, [w], lambda h, ws: h @ ws[0].T, grid)
    assert not torch.equal(s, torch.ones(128))
    assert bool((s[OUTLIERS] > s.median()).all())
    new_norm_w, _ = fold_scales_into_norm(norm_w, s)
    w_scaled = scale_input_channels(w, s)
    clip = awq_clip_ratios(w_scaled, normed / s, grid)
    w_awq = quantize(w_scaled, grid, clip).dequantize()

    def awq_block(inputs: torch.Tensor) -> torch.Tensor:
        return _rms_norm(inputs, new_norm_w) @ w_awq.T

    w_rtn = fake_quantize(w, grid)
    for data in (x, held_out):
        reference = block(data, [w])
        rtn_err = float(torch.linalg.norm(reference - block(data, [w_rtn])))
        awq_err = float(torch.linalg.norm(reference - awq_block(data)))
        assert awq_err < 0.75 * rtn_err


def test_awq_search_over_several_weights() -> None:
    """An MLP (gate, up share the input): the search scores the whole block output."""
    x = _inputs(256, 40)
    gate, up = _weight(96, 128, seed=41), _weight(96, 128, seed=42)
    grid = QuantGrid(3, True, 32)

    def mlp(inputs: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.silu(inputs @ ws[0].T) * (inputs @ ws[1].T)

    s = search_awq_scales(x, [gate, up], mlp, grid, n_grid=10)
    reference = mlp(x, [gate, up])
    rtn = mlp(x, [fake_quantize(gate, grid), fake_quantize(up, grid)])
    awq_ws = [fake_quantize(scale_input_channels(w, s), grid) for w in (gate, up)]
    awq = mlp(x / s, awq_ws)
    assert float(torch.linalg.norm(reference - awq)) < float(torch.linalg.norm(reference - rtn))


def test_awq_clip_never_worse_than_no_clip_on_weighted_error() -> None:
    x = _inputs(256, 50)
    w = _weight(seed=50)
    grid = QuantGrid(3, False, 32)
    importance = x.pow(2).mean(0)
    clip = awq_clip_ratios(w, x, grid)
    assert float(clip.min()) < 1.0

    def weighted(w_hat: torch.Tensor) -> float:
        return float(((w - w_hat) ** 2 * importance).sum())

    assert weighted(quantize(w, grid, clip).dequantize()) <= weighted(fake_quantize(w, grid))
