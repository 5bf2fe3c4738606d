"""Where a checkpoint's decoder layers are, from its tensor names and config — headers only.

When the model type is in :data:`weightsmith.arch.ARCHITECTURES` and its tensor names carry that
family's layer prefix, the table says where the layers are, which tensors sit in front of them and
which config key counts them. Otherwise (an unknown architecture, or names the table does not
describe) the layer prefix is the ``<prefix>.<index>.`` pattern that most tensor names share, the
tensors in front are those named like input embeddings (:data:`INPUT_EMBEDDING_MARKERS`) and the count
is the first of :data:`LAYER_COUNT_KEYS` the config has. Tensors outside the layers are "pre" (in
front) or "post" (final norm, head); a stacked (passthrough) model takes its pre tensors from the
first slice and its post tensors from the last, as mergekit does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from weightsmith.arch import Arch, known_arch

__all__ = ["INPUT_EMBEDDING_MARKERS", "LAYER_COUNT_KEYS", "Layout", "layout_of"]

#: Name fragments of tensors that sit before the first decoder layer.
INPUT_EMBEDDING_MARKERS = ("embed_tokens", "embed_in", "wte", "wpe", "word_embeddings", "embed_positions")
#: config.json keys holding the number of decoder layers of an unknown architecture, in the order they
#: are looked up.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

_INDEXED = re.compile(r"^(.+?\.)(\d+)\.(.+)$")


@dataclass(frozen=True)
class Layout:
    """``layers[i]`` holds the names of layer ``i``'s tensors with ``prefix + f"{i}."`` removed,
    in storage order; ``pre`` and ``post`` the full names of the other tensors."""

    prefix: str | None
    layers: tuple[tuple[str, ...], ...]
    pre: tuple[str, ...]
    post: tuple[str, ...]
    count_key: str | None
    declared_layers: int | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int, suffix: str) -> str:
        assert self.prefix is not None
        return f"{self.prefix}{index}.{suffix}"


def _described(names: Sequence[str], config: dict) -> Arch | None:
    """The table's facts for this checkpoint, when its model type is known and its names match them."""
    arch = known_arch(config)
    return arch if arch is not None and any(n.startswith(f"{arch.layers}.") for n in names) else None


def _prefix(names: Sequence[str], arch: Arch | None) -> str | None:
    if arch is not None:
        return f"{arch.layers}."
    counts = Counter(m.group(1) for n in names if (m := _INDEXED.match(n)))
    return counts.most_common(1)[0][0] if counts else None


def _count_key(config: dict, arch: Arch | None) -> str | None:
    keys = (arch.keys.layers,) if arch is not None else LAYER_COUNT_KEYS
    return next((k for k in keys if isinstance(config.get(k), int)), None)


def layout_of(names: Sequence[str], config: dict) -> Layout:
    """The layout of a checkpoint whose tensors are ``names`` (storage order)."""
    arch = _described(names, config)
    prefix = _prefix(names, arch)
    in_front = arch.is_front if arch is not None else (lambda name: any(marker in name for marker in INPUT_EMBEDDING_MARKERS))
    by_layer: dict[int, list[str]] = {}
    pre: list[str] = []
    post: list[str] = []
    for name in names:
        if prefix is not None and name.startswith(prefix):
            index, _, suffix = name[len(prefix) :].partition(".")
            if index.isdigit() and suffix:
                by_layer.setdefault(int(index), []).append(suffix)
                continue
        (pre if in_front(name) else post).append(name)
    count_key = _count_key(config, arch)
    declared = config[count_key] if count_key else None
    n = max(by_layer, default=-1) + 1
    layers = tuple(tuple(by_layer.get(i, ())) for i in range(n))
    return Layout(prefix, layers, tuple(pre), tuple(post), count_key, declared)
