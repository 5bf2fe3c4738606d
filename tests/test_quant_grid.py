"""compress.grid: the integer grid, round-to-nearest quantization and the MSE clip search."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.grid import (
    QuantGrid,
    QuantizedTensor,
    compute_scale_zero,
    dequantize,
    fake_quantize,
    mse_clip_search,
    quantize,
)

GRIDS = [
    (bits, sym, gs, width)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for gs, width in ((32, 128), (64, 128), (-1, 128), (32, 100))
]


def _random_weight(seed: int, out: int, inp: int, kind: str, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(out, inp, generator=g)
    elif kind == "positive":
        w = torch.rand(out, inp, generator=g) + 0.5
    elif kind == "negative":
        w = -torch.rand(out, inp, generator=g)
    elif kind == "heavy":
        w = torch.randn(out, inp, generator=g) / torch.rand(out, inp, generator=g).clamp(min=0.05)
    elif kind == "sparse":
        w = torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < 0.2)
    elif kind == "constant":
        w = torch.full((out, inp), 0.37)
    else:
        raise AssertionError(kind)
    return w * magnitude


def _group_bounds(w: torch.Tensor, group_size: int) -> list[tuple[int, int]]:
    gs = w.shape[1] if group_size == -1 else group_size
    return [(a, min(a + gs, w.shape[1])) for a in range(0, w.shape[1], gs)]


def _assert_half_step_error(
    w: torch.Tensor, q: QuantizedTensor, clip: torch.Tensor | None = None, rel_tol: float = 1e-5
) -> None:
    """Every element inside its group's (clipped, 0-including) range is within scale/2."""
    w_hat = q.dequantize().to(torch.float64)
    wd = w.to(torch.float64)
    for g, (a, b) in enumerate(_group_bounds(w, q.grid.group_size)):
        cols = wd[:, a:b]
        lo = cols.amin(dim=1, keepdim=True).clamp(max=0)
        hi = cols.amax(dim=1, keepdim=True).clamp(min=0)
        if clip is not None:
            r = clip[:, g : g + 1].to(torch.float64)
            lo, hi = lo * r, hi * r
        inside = (cols >= lo) & (cols <= hi)
        s = q.scales[:, g : g + 1].to(torch.float64)
        err = (cols - w_hat[:, a:b]).abs()
        bound = s / 2 * (1 + rel_tol) + rel_tol * cols.abs()
        assert bool((err <= bound)[inside].all()), float((err - bound)[inside].max())


def test_grid_validation() -> None:
    for bad in (1, 5, 16, True, 4.0):
        with pytest.raises(ValueError, match="bits"):
            QuantGrid(bad, True, 32)  # type: ignore[arg-type]
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="group_size"):
            QuantGrid(4, True, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="symmetric"):
        QuantGrid(4, 1, 32)  # type: ignore[arg-type]
    grid = QuantGrid(3, False, 32)
    assert (grid.maxq, grid.midpoint) == (7, 4)
    assert grid.n_groups(100) == 4 and grid.is_ragged(100)
    assert grid.n_groups(128) == 4 and not grid.is_ragged(128)
    assert QuantGrid(4, True, -1).n_groups(100) == 1
    assert grid.group_index(100).tolist() == [j // 32 for j in range(100)]


@pytest.mark.parametrize(("bits", "sym", "gs", "width"), GRIDS)
def test_roundtrip_error_within_half_step(bits: int, sym: bool, gs: int, width: int) -> None:
    w = _random_weight(bits * 100 + gs + width, 24, width, "heavy", 0.02)
    grid = QuantGrid(bits, sym, gs)
    q = quantize(w, grid)
    n_groups = math.ceil(width / (width if gs == -1 else gs))
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (24, width)
    assert q.scales.shape == (24, n_groups) and q.scales.dtype == w.dtype
    assert q.zeros.shape == (24, n_groups) and q.n_groups == n_groups
    assert int(q.codes.max()) <= 2**bits - 1
    _assert_half_step_error(w, q)
    assert torch.equal(fake_quantize(w, grid), q.dequantize())
    assert torch.equal(dequantize(q), q.dequantize())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    out=st.integers(1, 6),
    inp=st.integers(1, 140),
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    gs=st.sampled_from([-1, 1, 7, 32, 64, 200]),
    kind=st.sampled_from(["normal", "positive", "negative", "heavy", "sparse", "constant"]),
    magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]),
)
def test_roundtrip_error_property(
    seed: int, out: int, inp: int, bits: int, sym: bool, gs: int, kind: str, magnitude: float
) -> None:
    w = _random_weight(seed, out, inp, kind, magnitude)
    grid = QuantGrid(bits, sym, gs)
    q = quantize(w, grid)
    assert bool((q.scales > 0).all())
    if sym:
        assert bool((q.zeros == 2 ** (bits - 1)).all())
    _assert_half_step_error(w, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
def test_half_precision_scales_cover_the_range(dtype: torch.dtype, sym: bool) -> None:
    w = _random_weight(7, 16, 96, "heavy", 0.03).to(dtype)
    q = quantize(w, QuantGrid(4, sym, 32))
    assert q.scales.dtype == dtype and q.dequantize().dtype == dtype
    ulp = 2.0 ** -(10 if dtype == torch.float16 else 7)
    _assert_half_step_error(w, q, rel_tol=ulp)


def test_symmetric_scale_is_sign_aware_and_never_clips() -> None:
    # row 0: the negative side is larger, -1.5 lands on -8 steps (code 0): scale 1.5 / 8
    # row 1: the positive side is larger, 0.4 lands on +7 steps (code 15): scale 0.4 / 7
    w = torch.tensor([[-1.5, 0.25, 0.75, 1.0], [0.2, -0.1, 0.05, 0.4]])
    q = quantize(w, QuantGrid(4, True, -1))
    assert q.scales[0, 0].item() == 1.5 / 8
    assert q.scales[1, 0].item() == pytest.approx(0.4 / 7, rel=1e-7) and q.scales[1, 0].item() >= 0.4 / 7 * (1 - 1e-7)
    assert q.codes[0].tolist() == [0, 9, 12, 13]  # -8, 1.33, 4, 5.33 steps
    assert q.dequantize()[0, 0].item() == -1.5 and q.dequantize()[0, 2].item() == 0.75
    assert q.codes[1, 3].item() == 15
    assert q.dequantize()[1, 3].item() == pytest.approx(0.4, rel=1e-6)
    # both extremes are represented: no element is further than half a step from its value
    assert bool(((q.dequantize() - w).abs() <= q.scales / 2 + 1e-7).all())


def test_asymmetric_zero_point_makes_zero_exact() -> None:
    w = torch.tensor([[0.5, 1.0, 2.0, 3.5], [-3.0, -1.0, 0.0, 1.0]])
    q = quantize(w, QuantGrid(2, False, -1))
    # row 0: range widened to [0, 3.5] -> scale 3.5/3, zero 0; row 1: scale 4/3, zero round(2.25)=2
    torch.testing.assert_close(q.scales.squeeze(1), torch.tensor([3.5 / 3, 4.0 / 3]))
    assert q.zeros.squeeze(1).tolist() == [0, 2]
    assert q.dequantize()[1, 2].item() == 0.0


def test_zero_range_group_gets_nonzero_scale() -> None:
    w = torch.zeros(3, 64)
    w[0, 40:] = 0.5
    for sym in (True, False):
        q = quantize(w, QuantGrid(4, sym, 32))
        assert bool((q.scales > 0).all())
        assert q.scales[1, 0].item() == 1.0
        assert torch.equal(q.dequantize()[1:], torch.zeros(2, 64))


def test_scales_are_rounded_up_into_the_storage_dtype() -> None:
    lo = torch.tensor([-0.3, -1e-9, 0.0])
    hi = torch.tensor([0.7, 1e-9, 0.0])
    for dtype in (torch.float16, torch.bfloat16):
        s, z = compute_scale_zero(lo, hi, QuantGrid(3, False, -1), dtype)
        exact = (hi - lo) / 7
        assert bool((s.float()[:2] >= exact[:2]).all())
        assert s[2].item() == 1.0 and bool((s > 0).all())
        assert z.dtype == torch.uint8


def test_clip_error_bound_and_saturation() -> None:
    w = _random_weight(3, 8, 100, "heavy", 1.0)
    grid = QuantGrid(3, False, 32)
    clip = torch.full((8, 4), 0.6)
    q = quantize(w, grid, clip)
    _assert_half_step_error(w, q, clip)
    # elements beyond the clipped range saturate at an end code
    beyond = w > 0.6 * w.amax(dim=1, keepdim=True) + q.scales.amax()
    assert bool(beyond.any())
    assert bool((q.codes[beyond] == grid.maxq).all())
    with pytest.raises(ValueError, match="clip"):
        quantize(w, grid, torch.zeros(8, 4))
    with pytest.raises(ValueError, match="clip"):
        quantize(w, grid, torch.ones(8, 3))


def test_quantize_rejects_non_finite_and_malformed_weights() -> None:
    grid = QuantGrid(4, True, 32)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[1.0, math.nan]]), grid)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(4), grid)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(2, 2, dtype=torch.int32), grid)


def _group_errors(
    w: torch.Tensor, q: QuantizedTensor, importance: torch.Tensor | None
) -> torch.Tensor:
    err = (w.double() - q.dequantize().double()) ** 2
    if importance is not None:
        err = err * importance.double()
    gidx = q.column_groups()
    return torch.zeros(w.shape[0], q.n_groups, dtype=torch.float64).index_add_(1, gidx, err)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    inp=st.integers(8, 130),
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    gs=st.sampled_from([-1, 16, 32]),
    kind=st.sampled_from(["normal", "heavy", "sparse", "positive"]),
    weighted=st.booleans(),
)
def test_mse_clip_search_never_worse_than_no_clip(
    seed: int, inp: int, bits: int, sym: bool, gs: int, kind: str, weighted: bool
) -> None:
    w = _random_weight(seed, 6, inp, kind, 0.1)
    grid = QuantGrid(bits, sym, gs)
    importance = None
    if weighted:
        importance = torch.rand(inp, generator=torch.Generator().manual_seed(seed)) ** 4
    clip = mse_clip_search(w, grid, grid_points=10, max_shrink=0.6, importance=importance)
    assert clip.shape == (6, grid.n_groups(inp))
    assert bool(((clip > 0.39) & (clip <= 1.0)).all())
    clipped = _group_errors(w, quantize(w, grid, clip), importance)
    plain = _group_errors(w, quantize(w, grid), importance)
    assert bool((clipped <= plain).all())


def test_mse_clip_search_helps_heavy_tails() -> None:
    w = _random_weight(11, 32, 256, "heavy", 0.01)
    grid = QuantGrid(3, True, 64)
    clip = mse_clip_search(w, grid, grid_points=20, max_shrink=0.5)
    assert float(clip.min()) < 1.0
    clipped = float(_group_errors(w, quantize(w, grid, clip), None).sum())
    plain = float(_group_errors(w, quantize(w, grid), None).sum())
    assert clipped < 0.9 * plain


def test_mse_clip_search_importance_changes_the_choice() -> None:
    # with all importance on one column, the error that matters is that column's only
    w = _random_weight(5, 16, 32, "heavy", 1.0)
    grid = QuantGrid(2, False, -1)
    importance = torch.zeros(32)
    importance[0] = 1.0
    clip = mse_clip_search(w, grid, grid_points=20, max_shrink=0.9, importance=importance)
    focused = _group_errors(w, quantize(w, grid, clip), importance)
    for r in torch.linspace(1.0, 0.1, 20).tolist():
        other = _group_errors(w, quantize(w, grid, torch.full((16, 1), r)), importance)
        assert bool((focused <= other + 1e-12).all())


def test_quantized_tensor_validation() -> None:
    grid = QuantGrid(4, False, 32)
    q = quantize(torch.randn(4, 64), grid)
    with pytest.raises(ValueError, match="codes exceed"):
        QuantizedTensor(q.codes + 16, q.scales, q.zeros, grid, (4, 64))
    with pytest.raises(ValueError, match="scales have shape"):
        QuantizedTensor(q.codes, q.scales[:, :1], q.zeros, grid, (4, 64))
    with pytest.raises(ValueError, match="uint8"):
        QuantizedTensor(q.codes.to(torch.int32), q.scales, q.zeros, grid, (4, 64))
    with pytest.raises(ValueError, match="symmetric"):
        QuantizedTensor(q.codes, q.scales, q.zeros, QuantGrid(4, True, 32), (4, 64))
    with pytest.raises(ValueError, match="g_idx"):
        QuantizedTensor(q.codes, q.scales, q.zeros, grid, (4, 64), torch.full((64,), 2))


def test_g_idx_selects_the_group_of_each_column() -> None:
    grid = QuantGrid(4, True, 2)
    codes = torch.tensor([[9, 9, 9, 9]], dtype=torch.uint8)
    scales = torch.tensor([[1.0, 10.0]])
    zeros = torch.full((1, 2), 8, dtype=torch.uint8)
    q = QuantizedTensor(codes, scales, zeros, grid, (1, 4), torch.tensor([1, 0, 0, 1]))
    assert q.dequantize().tolist() == [[10.0, 1.0, 1.0, 10.0]]


def test_bits_per_weight_counts_packed_storage() -> None:
    w = torch.randn(256, 1024).to(torch.float16)
    assert quantize(w, QuantGrid(4, True, 128)).bits_per_weight == pytest.approx(4 + 16 / 128)
    # asymmetric: + 4-bit zero points packed along the output dimension
    asym = quantize(w, QuantGrid(4, False, 128)).bits_per_weight
    assert asym == pytest.approx(4 + 16 / 128 + 4 / 128)
    # 3 bits on width 100: each row padded to whole int32 words (ceil(300/32) = 10 words)
    w3 = torch.randn(8, 100)
    assert quantize(w3, QuantGrid(3, True, -1)).bits_per_weight == pytest.approx(
        (10 * 32 + 32) / 100
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("grid", [QuantGrid(4, True, 64), QuantGrid(3, False, 32), QuantGrid(2, True, -1), QuantGrid(4, True, 40)])
def test_fake_quantize_fast_path_is_bit_equal_to_quantize(dtype, grid):
    w = (torch.randn(48, 160, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    assert torch.equal(fake_quantize(w, grid), quantize(w, grid).dequantize().to(dtype))
