"""GPTQ on GGUF grids: identity Hessian gives llama.cpp's own rounding; correlated inputs with outlier
channels give a smaller layer-output error than llama.cpp's reference quantizer, with or without
its importance weights."""

from __future__ import annotations

import pytest
import torch

from compress.gguf import quants
from compress.gguf.calibrated import GGUFGrid, gptq_gguf, rows_of

TYPES = ("q8_0", "q6_k", "q5_k", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")


def _layer(seed: int = 0, out: int = 48, inp: int = 512, n: int = 2048):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    x = torch.randn(n, inp, generator=g) @ mix
    x[:, :8] *= 20.0  # outlier input channels
    return w, x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("gtype", ["q4_k", "q6_k", "q3_k", "q2_k", "q5_k"])
def test_identity_hessian_is_the_reference_rounding(gtype, act_order):
    w, _ = _layer(1, inp=256)
    q, _ = gptq_gguf(w, torch.eye(256), GGUFGrid(gtype), damp=1e-6, act_order=act_order)
    ref = quants.quantize(w, gtype)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.d, ref.d)
    assert torch.equal(q.sub_scales, ref.sub_scales)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("gtype", TYPES)
def test_gptq_beats_llama_cpp_rounding_on_outlier_inputs(gtype, act_order):
    w, x = _layer(2)
    H = x.t() @ x
    q, loss = gptq_gguf(w, H, GGUFGrid(gtype), importance=torch.diagonal(H), act_order=act_order)
    assert loss > 0
    err = lambda wq: float((x @ (w - wq).t()).square().sum())  # noqa: E731
    gptq = err(quants.dequantize(q))
    rtn = err(quants.dequantize(quants.quantize(w, gtype)))
    imatrix = err(quants.dequantize(quants.quantize(w, gtype, importance=torch.diagonal(H))))
    assert gptq < 0.8 * min(rtn, imatrix), (gtype, gptq, rtn, imatrix)
    # the bytes hold exactly what GPTQ measured
    back = quants.unpack(quants.pack(q), gtype, q.shape)
    assert torch.equal(quants.dequantize(back), quants.dequantize(q))


def test_rows_of_and_width_check():
    w, x = _layer(3, out=40, inp=256)
    q, _ = gptq_gguf(w, x.t() @ x, GGUFGrid("q4_k"))
    top, bottom = rows_of(q, 0, 16), rows_of(q, 16, 40)
    assert torch.equal(torch.cat([quants.dequantize(top), quants.dequantize(bottom)]), quants.dequantize(q))
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq_gguf(torch.zeros(4, 96), torch.eye(96), GGUFGrid("q4_k"))


@pytest.mark.parametrize("gtype", ["q4_k", "q4_0", "q3_k"])
def test_awq_scales_on_a_gguf_grid_beat_plain_rounding(gtype):
    """AWQ's search with llama.cpp's quantizer in the loop: on inputs with outlier channels the scaled
    weights' output error is below plain rounding's (alpha = 0 is among the candidates, so never above)."""
    from compress.awq import scale_input_channels, search_awq_scales
    from compress.gguf.calibrated import fake_quantize

    w, x = _layer(4, out=64, inp=256, n=512)
    grid = GGUFGrid(gtype)
    s = search_awq_scales(x, [w], lambda inp, ws: inp @ ws[0].t(), grid, n_grid=10)
    awq = (fake_quantize(scale_input_channels(w, s), grid) / s).float()
    rtn = fake_quantize(w, grid)
    err = lambda wq: float((x @ (w - wq).t()).square().sum())  # noqa: E731
    assert err(awq) < 0.9 * err(rtn), (err(awq), err(rtn))
