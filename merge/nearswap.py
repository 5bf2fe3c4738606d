"""NearSwap: keep the base where it and the other model differ much, take the other model where they
are close — each entry moves toward the other model by ``t / |base - other|``, at most all the way.

Defined by alchemonaut for QuartetAnemoi-70B,
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (mergekit's ``nearswap``).

Elementwise, so it streams chunk by chunk: every operation is computed in the compute dtype in
mergekit 0.1.5's order, and an entry's result does not depend on the chunk it is in, so the output
has mergekit's bits in bf16, fp16 and fp32.
"""

from __future__ import annotations

from torch import Tensor

from merge.arith import Group, emit_chunks

__all__ = ["MIN_DISTANCE", "nearswap", "nearswap_group"]

#: Distances below this count as this, so equal entries give a finite step (then clamped to 1).
MIN_DISTANCE = 1e-6


def nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    """``w * other + (1 - w) * base`` with ``w = clamp(t / max(|base - other|, 1e-6), 0, 1)``, in
    the inputs' dtype: entries closer than ``t`` become ``other``'s, farther ones move ``t``
    toward it."""
    distance = (base - other).abs().clamp(min=MIN_DISTANCE)
    # ``t / x`` on a tensor is torch's reciprocal-then-multiply; spelled that way for the same rounding
    share = (distance.reciprocal() * t).clamp(min=0, max=1)
    return share * other + (1 - share) * base


def nearswap_group(g: Group) -> None:
    """:func:`nearswap` of ``g``'s base and its one other input, chunk by chunk (``t`` shared)."""
    assert g.base is not None
    (other,) = g.others()
    t = g.shared["t"]
    emit_chunks(g, lambda _j, part: nearswap(g.values(g.base, part), g.values(other, part), t))
