"""The switches of the delta-merging family, shared by both engines (no torch, no numpy)."""

from __future__ import annotations

from enum import Enum

__all__ = ["Consensus", "Sparsification", "della_problem"]


class Sparsification(str, Enum):
    """How a task vector is thinned before merging: by magnitude (TIES), at random (DARE), by
    dropping the largest and the smallest entries (breadcrumbs), or at random with keep
    probabilities rising with each entry's magnitude rank in its row (DELLA); see
    :mod:`merge.sparsify`."""

    magnitude = "magnitude"
    random = "random"
    outliers = "outliers"
    della = "della"


class Consensus(str, Enum):
    """How TIES elects the sign of each entry: by the sign of the summed deltas (``sum``, the
    paper's choice) or by the majority of their signs (``count``)."""

    sum = "sum"
    count = "count"


def della_problem(density: float, epsilon: float) -> str | None:
    """Why DELLA cannot sparsify with ``density`` and ``epsilon``, or None. Its keep probabilities
    run from ``density - epsilon`` to ``density + epsilon``, which must lie inside (0, 1) whenever
    it sparsifies at all (``0 < density < 1``; mergekit raises then too)."""
    if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        return f"parameter 'epsilon': density {density:g} +/- epsilon {epsilon:g} must stay inside (0, 1)"
    return None
