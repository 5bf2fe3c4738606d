"""Merge parameters as mergekit writes them, and how a value is chosen for one tensor.

A setting is a scalar (``0.5``), a list interpolated over layer depth (``[0, 0.5, 1]``), or a list
of conditions ``{filter: <substring of the tensor name>, value: <scalar or list>}`` of which the
first whose filter matches applies (a missing filter or ``"*"`` matches everything). Settings sit
at three levels; for one tensor the first level that yields a value wins: the model's own
``parameters`` (per input, inside ``models`` or a slice's ``sources``), then the slice's, then the
config's global ``parameters``, then the method's default.

``t``, the depth, is ``i / (n - 1)`` for the ``i``-th of the ``n`` layers of a slice (1 for a
one-layer slice) and 0 for tensors outside the layers (embeddings, final norm, head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Condition", "Kind", "ParamSpec", "Scope", "Setting", "evaluate", "resolve", "to_kind"]

Scalar = bool | int | float | str


class Condition(BaseModel):
    """``{filter: substring, value: x}``: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    value: Scalar | list[Scalar]
    filter: str | None = None


Setting = Condition | list[Condition] | Scalar | list[Scalar]


class Kind(str, Enum):
    number = "number"
    integer = "integer"
    flag = "flag"


class Scope(str, Enum):
    """Where a parameter is bound: once per tensor (``shared``), per input model (``input``), or
    per input model except the base (``non_base``)."""

    shared = "shared"
    input = "input"
    non_base = "non_base"


REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: Kind
    scope: Scope
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def to_kind(value: Any, kind: Kind) -> float | int | bool:
    """``value`` as a number, an integer or a flag; ValueError says why not. Numbers may be written
    as strings (YAML reads ``1e-3`` as a string); an integer may be written as a whole float."""
    if kind is Kind.integer:
        number = to_kind(value, Kind.number)
        if not float(number).is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    if kind is Kind.flag:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{value!r} is not true or false")
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a number")


def _gradient(values: list[Any], t: float, kind: Kind) -> float | int | bool:
    typed = [to_kind(v, kind) for v in values]
    if kind in (Kind.flag, Kind.integer):
        return typed[int(t * (len(typed) - 1))]
    scaled = t * (len(typed) - 1)
    low = int(scaled)
    high = min(len(typed) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * typed[low] + frac * typed[high]


def evaluate(setting: Setting | None, tensor_name: str, t: float, kind: Kind) -> float | int | bool | None:
    """The value ``setting`` gives the tensor ``tensor_name`` at depth ``t``, or None when no
    condition matches (or the list is empty)."""
    if setting is None:
        return None
    if isinstance(setting, Condition):
        setting = [setting]
    if not isinstance(setting, list):
        return to_kind(setting, kind)
    if not setting:
        return None
    if all(isinstance(item, Condition) for item in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate(cond.value, tensor_name, t, kind)
        return None
    if any(isinstance(item, Condition) for item in setting):
        raise ValueError("a list mixes conditions ({filter, value}) and plain values")
    return _gradient(setting, t, kind)


def resolve(spec: ParamSpec, levels: Iterable[Mapping[str, Setting] | None], tensor_name: str, t: float) -> Any:
    """The value of ``spec`` from the first of ``levels`` (highest precedence first) that yields
    one; the default otherwise. Raises LookupError when a required parameter has no value."""
    for level in levels:
        if level and spec.name in level:
            value = evaluate(level[spec.name], tensor_name, t, spec.kind)
            if value is not None:
                return value
    if spec.required:
        raise LookupError(spec.name)
    return spec.default
