"""Which weights a compression pass touches, and with which settings.

A pattern is a module name (``model.layers.0.mlp.down_proj``), a name suffix after a dot
(``down_proj`` matches every ``*.down_proj``), or a regular expression written ``re:<regex>`` that must
match the whole module name. Overrides are tried in order; the first whose pattern matches gives the
module's settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: Left alone unless a target names them explicitly: embeddings and output heads.
DEFAULT_IGNORE = ("lm_head", "embed_out", "re:.*embed.*", "re:.*\\.wte", "re:.*\\.wpe")


def matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module) is not None
    return module == pattern or module.endswith("." + pattern)


def any_match(patterns: Iterable[str], module: str) -> bool:
    return any(matches(p, module) for p in patterns)


@dataclass(frozen=True)
class Selection:
    """``targets`` (None = the architecture's decoder linears, or every 2-D weight for an unknown
    architecture) minus ``ignore``."""

    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def selects(self, module: str, default_linears: Iterable[str] | None) -> bool:
        if self.targets is not None:
            chosen = any_match(self.targets, module)
            return chosen and not (any_match(self.ignore, module) and not _explicit(self.targets, module))
        if any_match(self.ignore, module):
            return False
        return default_linears is None or any_match(default_linears, module)


def _explicit(targets: Iterable[str], module: str) -> bool:
    """A target that names the module exactly overrides the ignore list (e.g. quantizing lm_head)."""
    return any(t == module for t in targets)


def module_of(tensor_name: str) -> str | None:
    """``x.y.weight`` -> ``x.y``; None for tensors that are not a weight."""
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else None


def select_weights(ckpt: Any, selection: Selection, setting_of: Callable[[str], T | None], default_linears: Iterable[str] | None) -> dict[str, T]:
    """Module name -> its setting for every 2-D floating-point weight of the checkpoint ``ckpt`` that
    ``selection`` picks (``default_linears``: the architecture's decoder linears, None for an unknown
    architecture) and ``setting_of`` does not skip (returns None for)."""
    defaults = tuple(default_linears) if default_linears is not None else None
    chosen: dict[str, T] = {}
    for name in ckpt.names():
        module, info = module_of(name), ckpt.info(name)
        if module is None or len(info.shape) != 2 or not info.dtype.is_floating_point:
            continue
        if not selection.selects(module, defaults):
            continue
        setting = setting_of(module)
        if setting is not None:
            chosen[module] = setting
    return chosen
