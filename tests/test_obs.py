"""compress.obs: the Optimal-Brain-Surgeon column sweep with GPTQ's, SparseGPT's and joint steps."""

from __future__ import annotations

import pytest
import torch

from compress.grid import QuantGrid, compute_scale_zero, fake_quantize
from compress.gptq import gptq_quantize
from compress.obs import INNER, inner_block, inverse_cholesky, joint_step, obs_sweep, prune_step, zero_dead_inputs
from weightsmith.calibkit import accumulate_hessian

from .layers import outlier_inputs as _inputs
from .layers import output_error as _out_err
from .layers import random_weight as _weight


def _textbook_gptq(w: torch.Tensor, H: torch.Tensor, grid: QuantGrid, damp: float = 0.01) -> torch.Tensor:
    """GPTQ as the paper writes it, one column at a time with immediate updates (no lazy blocks):
    each group's scale from its columns as updated when the sweep reaches it. Returns the codes."""
    out, inp = w.shape
    gs = grid.effective_group_size(inp)
    U = inverse_cholesky(H, damp, 1.0)
    W = w.clone()
    codes = torch.empty((out, inp), dtype=torch.uint8)
    for j in range(inp):
        if j % gs == 0:
            cols = W[:, j : j + gs]
            scale, zero = compute_scale_zero(cols.amin(1, keepdim=True), cols.amax(1, keepdim=True), grid)
            s, z = scale[:, 0], zero[:, 0].to(torch.float32)
        q = torch.round(W[:, j] / s).add_(z).clamp_(0, grid.maxq)
        codes[:, j] = q
        err = (W[:, j] - (q - z) * s) / float(U[j, j])
        W[:, j + 1 :] -= torch.outer(err, U[j, j + 1 :])
    return codes


@pytest.mark.parametrize("grid", [QuantGrid(4, True, 32), QuantGrid(3, False, 32), QuantGrid(4, False, 48)], ids=str)
def test_sweep_with_the_grid_step_is_textbook_gptq(grid: QuantGrid) -> None:
    # one block: the sweep's updates are the textbook's, operation for operation
    w = _weight(32, 96, seed=4)
    H, _ = accumulate_hessian(None, _inputs(256, 3, width=96), 0)
    q, _ = gptq_quantize(w, H, grid, block_size=96)
    reference = _textbook_gptq(w, H, grid)
    assert torch.equal(q.codes, reference)
    lazy, _ = gptq_quantize(w, H, grid, block_size=32)  # lazy blocks: equal up to summation order
    assert (lazy.codes != reference).float().mean().item() < 0.01


def test_obs_sweep_returns_the_steps_columns_and_the_obs_loss() -> None:
    w = _weight(8, 40, seed=5)
    H, _ = accumulate_hessian(None, _inputs(128, 6, width=40), 0)
    U = inverse_cholesky(H, 0.01, 1.0)
    halve = lambda block, i, k: block[:, i] * 0.5  # noqa: E731
    swept, losses = obs_sweep(w, U, halve, block_size=16)
    # the first column is halved before any update reaches it; the loss is the OBS error of each column
    assert torch.equal(swept[:, 0], w[:, 0] * 0.5)
    expected0 = (w[:, 0] * 0.5) ** 2 / (2 * U[0, 0] ** 2)
    assert bool((losses >= expected0.double() * (1 - 1e-5)).all())
    keep = lambda block, i, k: block[:, i].clone()  # noqa: E731
    same, zero_loss = obs_sweep(w, U, keep, block_size=16)
    assert torch.equal(same, w) and float(zero_loss.abs().max()) == 0.0


@pytest.mark.parametrize("grid", [QuantGrid(4, True, 32), QuantGrid(3, False, -1)], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_masked_weights_at_zero_and_still_beats_rtn(grid: QuantGrid, act_order: bool) -> None:
    w = _weight()
    x, held_out = _inputs(256, 10), _inputs(512, 11)
    H, _ = accumulate_hessian(None, x, 0)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(9)) < 0.3
    pruned = w.masked_fill(mask, 0.0)
    q, _ = gptq_quantize(pruned, H, grid, act_order=act_order, mask=mask)
    w_hat = q.dequantize()
    assert bool((w_hat[mask] == 0).all())
    assert float((w_hat[~mask] != 0).float().mean()) > 0.5  # the unmasked weights are not wiped out
    rtn = fake_quantize(pruned, grid)
    for data in (x, held_out):
        assert _out_err(data, pruned, w_hat) < _out_err(data, pruned, rtn)


def _magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    n = int(sparsity * w.shape[1])
    idx = torch.topk(w.abs(), n, dim=1, largest=False).indices
    return w.scatter(1, idx, 0.0)


def test_prune_step_is_exactly_half_sparse_per_row_block_and_beats_magnitude_pruning() -> None:
    w = _weight()
    x, held_out = _inputs(256, 20), _inputs(512, 21)
    H, _ = accumulate_hessian(None, x, 0)
    U = inverse_cholesky(H, 0.01, 1.0)
    pruned, loss = obs_sweep(w, U, prune_step(torch.diagonal(U), 0.5), block_size=32)
    zeros_per_row_block = (pruned == 0).reshape(64, 4, 32).sum(-1)
    assert bool((zeros_per_row_block == 16).all())
    assert float(loss.sum()) > 0
    magnitude = _magnitude_prune(w, 0.5)
    assert int((magnitude == 0).sum()) == int((pruned == 0).sum())
    for data in (x, held_out):
        assert _out_err(data, w, pruned) < 0.8 * _out_err(data, w, magnitude)


def test_prune_step_n_m_and_its_checks() -> None:
    w = _weight(16, 64)
    H, _ = accumulate_hessian(None, _inputs(256, 22, width=64), 0)
    U = inverse_cholesky(H, 0.01, 1.0)
    pruned, _ = obs_sweep(w, U, prune_step(torch.diagonal(U), n_m=(2, 4)), block_size=32)
    assert bool(((pruned == 0).reshape(16, 16, 4).sum(-1) == 2).all())
    with pytest.raises(ValueError, match="multiple of 4"):
        obs_sweep(w, U, prune_step(torch.diagonal(U), n_m=(2, 4)), block_size=30)
    with pytest.raises(ValueError, match="sparsity"):
        prune_step(torch.diagonal(U), 1.0)
    assert torch.equal(obs_sweep(w, U, prune_step(torch.diagonal(U), 0.0))[0], w)


@pytest.mark.parametrize("grid", [QuantGrid(4, True, 32), QuantGrid(4, False, 32)], ids=str)
def test_joint_sparse_and_quantized_gptq(grid: QuantGrid) -> None:
    w = _weight()
    x = _inputs(256, 30)
    H, _ = accumulate_hessian(None, x, 0)
    q, _ = gptq_quantize(w, H, grid, block_size=32, prune=lambda d: prune_step(d, 0.5))
    w_hat = q.dequantize()
    assert bool(((w_hat == 0).reshape(64, 4, 32).sum(-1) >= 16).all())
    assert float((w_hat == 0).float().mean()) < 0.6  # the grid adds few zeros of its own
    magnitude_then_rtn = fake_quantize(_magnitude_prune(w, 0.5), grid)
    assert _out_err(x, w, w_hat) < _out_err(x, w, magnitude_then_rtn)


def test_joint_step_restores_the_block() -> None:
    block = torch.arange(12.0).reshape(3, 4)
    seen: list[torch.Tensor] = []

    def then(b: torch.Tensor, i: int, k: int) -> torch.Tensor:
        seen.append(b[:, i].clone())
        return b[:, i] + 1

    step = joint_step(lambda b, i, k: torch.zeros(3), then)
    assert torch.equal(step(block, 1, 1), torch.ones(3))
    assert torch.equal(seen[0], torch.zeros(3)) and torch.equal(block, torch.arange(12.0).reshape(3, 4))


def test_obs_sweep_checks_its_arguments() -> None:
    w = _weight(4, 8)
    with pytest.raises(ValueError, match="U has shape"):
        obs_sweep(w, torch.eye(7), lambda b, i, k: b[:, i])
    with pytest.raises(ValueError, match="mask has shape"):
        obs_sweep(w, torch.eye(8), lambda b, i, k: b[:, i], mask=torch.zeros(4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        gptq_quantize(w, torch.eye(8), QuantGrid(4, True, -1), mask=torch.zeros(4, 8))


def test_zero_dead_inputs_and_gptq_leave_their_inputs_alone() -> None:
    w = _weight(8, 16)
    x = _inputs(64, 40, width=16)
    x[:, [2, 9]] = 0.0
    H, _ = accumulate_hessian(None, x, 0)
    w0, H0 = w.clone(), H.clone()
    W, H1 = zero_dead_inputs(w, H)
    assert bool((W[:, [2, 9]] == 0).all()) and H1[2, 2] == 1 and H1[9, 9] == 1
    assert torch.equal(W[:, :2], w[:, :2]) and torch.equal(w, w0) and torch.equal(H, H0)
    live = H + torch.eye(16)
    assert all(a is b for a, b in zip(zero_dead_inputs(w, live), (w, live)))
    q, _ = gptq_quantize(w, H, QuantGrid(4, True, -1), act_order=True)
    assert bool((q.dequantize()[:, [2, 9]] == 0).all())
    assert torch.equal(w, w0) and torch.equal(H, H0)


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8)])
def test_inner_blocks_reorder_the_same_sweep(pattern):
    """Sweeping columns in inner groups (rank-1 updates inside a group, one product per group for
    the rest of the block) is the same algebra: the same masks, weights equal to float rounding."""
    x = _inputs(1024, seed=5, width=200)
    w = _weight(out=48, inp=200, seed=5)
    H, _ = accumulate_hessian(None, x, 0)
    U = inverse_cholesky(H, 0.01, 1.0)
    d = torch.diagonal(U)
    make = (lambda: prune_step(d, 0.5)) if pattern is None else (lambda: prune_step(d, n_m=pattern))
    plain, plain_loss = obs_sweep(w, U, make(), block_size=64)
    inner = inner_block(*(() if pattern is None else (pattern[1],)))
    assert inner == 16
    grouped, grouped_loss = obs_sweep(w, U, make(), block_size=64, inner=inner)
    assert torch.equal(plain == 0, grouped == 0)
    assert torch.allclose(plain, grouped, atol=1e-5, rtol=1e-5)
    assert torch.allclose(plain_loss, grouped_loss, rtol=1e-5)


def test_inner_block_falls_back_to_columns_for_spans_that_straddle_groups():
    assert inner_block() == INNER
    assert inner_block(64, 4) == INNER
    assert inner_block(24) == 1
    assert inner_block(64, 6) == 1
