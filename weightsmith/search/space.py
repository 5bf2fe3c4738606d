"""The search space: layer groups, the candidate settings a group can take, and the one pure function
that turns a trial's choices into a recipe.

A *group* is the attention or the MLP linears of a band of consecutive decoder layers (``attn.0-7``,
``mlp.8-15``, ...). A *candidate* is what one group gets: a method and an integer grid (``gptq-w4g64``)
or, when the target is a GGUF file, a method and a llama.cpp block type (``gptq-q4_k``). A trial picks
one candidate per group; :func:`recipe_for` writes the recipe that builds that model with the real
passes, so what the search scores is what ``weightsmith run`` rebuilds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from weightsmith.arch import Arch

#: The linear-name fragments that mark an attention linear; every other decoder linear is MLP.
ATTENTION_MARKS = ("attn", "attention")
KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class Candidate:
    """One group's setting: ``method`` with an integer grid (``bits``, ``group_size``, ``symmetric``)
    or with a GGUF block type (``gguf_type``)."""

    method: str
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    gguf_type: str | None = None
    #: Wanda pruning before quantizing: a share (``"0.5"``) or an N:M pattern (``"2:4"``)
    sparsity: str | None = None

    @property
    def name(self) -> str:
        grid = self.gguf_type if self.gguf_type is not None else f"w{self.bits}{'' if self.symmetric else 'a'}g{self.group_size}"
        return f"{self.method}-{grid}{sparsity_suffix(self.sparsity)}"

    @classmethod
    def parse(cls, name: str) -> Candidate:
        """The inverse of :attr:`name`."""
        sparse = re.search(r"-sp(\d+)of(\d+)$|-sp(\d+(?:\.\d+)?)$", name)
        sparsity = None
        if sparse:
            name = name[: sparse.start()]
            sparsity = f"{sparse[1]}:{sparse[2]}" if sparse[1] else f"{float(sparse[3]) / 100:g}"
        method, _, grid = name.partition("-")
        m = re.fullmatch(r"w(\d+)(a?)g(-?\d+)", grid)
        if m:
            return cls(method, bits=int(m[1]), group_size=int(m[3]), symmetric=not m[2], sparsity=sparsity)
        if not grid:
            raise ValueError(f"not a candidate name: {name!r}")
        return cls(method, gguf_type=grid, sparsity=sparsity)

    def prune_override(self) -> dict[str, Any]:
        """This candidate's sparsity as the fields of a prune override."""
        if self.sparsity is None:
            return {"sparsity": 0.0}
        return {"pattern": self.sparsity} if ":" in self.sparsity else {"sparsity": float(self.sparsity)}

    def override(self) -> dict[str, Any]:
        """This candidate as the fields of a quantize override."""
        if self.gguf_type is not None:
            return {"method": self.method, "gguf_type": self.gguf_type}
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def sparsity_suffix(sparsity: str | None) -> str:
    """``-sp2of4`` for an N:M pattern, ``-sp50`` for a share of 0.5, nothing for dense."""
    if sparsity is None:
        return ""
    if ":" in sparsity:
        n, m = sparsity.split(":")
        return f"-sp{n}of{m}"
    return f"-sp{float(sparsity) * 100:g}"


@dataclass(frozen=True)
class Group:
    """The ``kind`` (attn or mlp) linears of decoder layers ``first`` .. ``last`` (inclusive)."""

    kind: str
    first: int
    last: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.first}-{self.last}"

    def layers(self) -> range:
        return range(self.first, self.last + 1)


def linear_kind(linear: str) -> str:
    """``self_attn.q_proj`` -> attn, ``mlp.down_proj`` -> mlp."""
    return "attn" if any(mark in linear for mark in ATTENTION_MARKS) else "mlp"


def depth_bands(n_layers: int, n_bands: int) -> list[tuple[int, int]]:
    """``n_layers`` split into ``n_bands`` contiguous bands as even as possible (earlier bands take the
    remainder), as (first, last) pairs."""
    n_bands = max(1, min(n_bands, n_layers))
    base, extra = divmod(n_layers, n_bands)
    bands, start = [], 0
    for i in range(n_bands):
        size = base + (1 if i < extra else 0)
        bands.append((start, start + size - 1))
        start += size
    return bands


def make_groups(n_layers: int, n_bands: int) -> list[Group]:
    """Attention and MLP groups for each depth band, band by band."""
    return [Group(kind, a, b) for a, b in depth_bands(n_layers, n_bands) for kind in KINDS]


def group_modules(group: Group, arch: Arch) -> list[str]:
    """The module names (``model.layers.3.mlp.up_proj``) a group holds."""
    return [f"{arch.layer_prefix(i)}{lin}" for i in group.layers() for lin in arch.linears if linear_kind(lin) == group.kind]


def group_pattern(group: Group, arch: Arch, layers: Sequence[int] | None = None) -> str:
    """A ``re:`` target pattern matching exactly the group's modules (in ``layers``, the group's layers
    as numbered after some were dropped, when given)."""
    lins = "|".join(re.escape(lin) for lin in arch.linears if linear_kind(lin) == group.kind)
    indices = "|".join(str(i) for i in (group.layers() if layers is None else layers))
    return f"re:{re.escape(arch.layers)}\\.({indices})\\.({lins})"


def renumbered(group: Group, dropped: Sequence[int]) -> list[int]:
    """The group's layers that remain after ``dropped`` are removed, by their new indices."""
    gone = set(dropped)
    return [i - sum(1 for d in gone if d < i) for i in group.layers() if i not in gone]


def recipe_for(
    assignment: Mapping[str, Candidate],
    groups: Sequence[Group],
    arch: Arch,
    quantize: Mapping[str, Any],
    gguf: str | None = None,
    name: str | None = None,
    dropped: Sequence[int] = (),
    prune: Mapping[str, Any] | None = None,
    mlp: float = 0.0,
) -> list[dict[str, Any]]:
    """The recipe steps that build the model a trial describes: one quantize step whose overrides give
    each group its candidate (``quantize`` holds the shared settings: calibration, damp, ...), packed
    so that the bits show in the file, and with
    ``gguf`` (a llama.cpp mix for the tensors outside the groups, e.g. ``q4_k_m``) the quantize step
    chooses codes on the GGUF grids and a last step exports the file, ``name`` its ``general.name`` (so
    the file does not depend on the folder the quantize step wrote). ``dropped`` decoder layers are
    removed first by a structured prune step (with ``mlp``, that share of every layer's MLP channels
    too, chosen by weight magnitude), and the groups' overrides name the layers that remain by their
    new indices. Candidates with a sparsity get a Wanda step before quantizing (``prune``: its
    calibration settings), whose overrides give each group its share or N:M pattern; the quantize
    step then keeps those zeros. Pure: same inputs, same steps."""
    first = assignment[groups[0].name]
    step: dict[str, Any] = {"pass": "quantize", **quantize, "method": first.method}
    if gguf is not None:
        step["format"] = f"gguf:{gguf}"
    else:
        step.update(bits=first.bits, group_size=first.group_size, symmetric=first.symmetric, format="packed")
    kept = [(g, renumbered(g, dropped)) for g in groups]
    step["overrides"] = [{"match": group_pattern(g, arch, layers), **assignment[g.name].override()} for g, layers in kept if layers]
    steps = [step]
    sparse = [(g, layers) for g, layers in kept if layers and assignment[g.name].sparsity is not None]
    if sparse:
        overrides = [{"match": group_pattern(g, arch, layers), **assignment[g.name].prune_override()} for g, layers in sparse]
        steps.insert(0, {"pass": "prune", **(prune or {}), "method": "wanda", "sparsity": 0.0, "overrides": overrides})
    if dropped or mlp:
        structured: dict[str, Any] = {"layers": sorted(dropped)} if dropped else {}
        if mlp:
            structured["mlp"] = mlp
        steps.insert(0, {"pass": "prune", "structured": structured, **({"importance": "magnitude"} if mlp else {})})
    if gguf is not None:
        steps.append({"pass": "gguf", "type": gguf, **({"name": name} if name else {})})
    return steps
