"""The switches of the delta-merging family, shared by both engines (no torch, no numpy)."""

from __future__ import annotations

from enum import Enum

__all__ = ["Consensus", "Sparsification"]


class Sparsification(str, Enum):
    """How a task vector is thinned before merging: by magnitude (TIES), at random (DARE), or by
    dropping the largest and the smallest entries (breadcrumbs); see :mod:`merge.sparsify`."""

    magnitude = "magnitude"
    random = "random"
    outliers = "outliers"


class Consensus(str, Enum):
    """How TIES elects the sign of each entry: by the sign of the summed deltas (``sum``, the
    paper's choice) or by the majority of their signs (``count``)."""

    sum = "sum"
    count = "count"
