"""Test helper: is a written weight the round-to-nearest quantization of a source weight?"""

from __future__ import annotations

import torch

from compress.grid import QuantGrid, quantize


def assert_rtn_on_grid(w: torch.Tensor, src: torch.Tensor, grid: QuantGrid) -> None:
    """Assert that ``w`` ``[out, in]`` is ``src`` rounded to nearest on ``grid``.

    Each group's grid is the ``2**bits`` points ``(code - zero) * scale``, ``code = 0 .. 2**bits - 1``,
    with the scale and zero point round-to-nearest takes from the group's range in ``src``. Every
    value of ``w`` must be exactly one of its group's points (so a group holds at most ``2**bits``
    values, and a weight written unquantized, or on another grid, fails), and the point nearest to
    ``src``'s value (so the source really is ``src``: a weight quantized from other values fails).
    """
    assert w.shape == src.shape and w.ndim == 2
    q = quantize(src, grid)
    gidx = grid.group_index(src.shape[1])
    codes = torch.arange(grid.maxq + 1, dtype=q.scales.dtype)
    scales = q.scales[:, gidx, None]
    levels = (codes - q.zeros[:, gidx, None].to(q.scales.dtype)) * scales  # [out, in, 2**bits]
    assert levels.shape[-1] == 2**grid.bits
    on_grid = (w.to(levels.dtype)[..., None] == levels).any(-1)
    assert on_grid.all(), f"{int((~on_grid).sum())} of {w.numel()} values are not on their group's {2**grid.bits}-point grid"
    # nearest point: no grid point lies closer to the source value than the written one (up to the
    # rounding of ``src / scale`` in float32, far below half a step)
    x = src.to(levels.dtype)
    nearest = (levels - x[..., None]).abs().amin(-1)
    slack = 1e-5 * scales[..., 0]
    off = (w.to(levels.dtype) - x).abs() > nearest + slack
    assert not off.any(), f"{int(off.sum())} of {w.numel()} values are not the grid point nearest to the source"
