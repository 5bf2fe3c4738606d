"""The merge methods by name: parameters, input contract and the math each calls — data, one entry
per method. The names are mergekit's (plus ``soup``).

Each method has its torch math (imported when first called, so that the registry, the config and
the plan import no torch) and, where one exists, its numpy twin for the CPU engine that never
loads torch (:mod:`merge.npmethods`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from merge import npmethods
from merge.chunks import PMap, serial_map
from merge.flags import Consensus, Sparsification
from merge.params import Kind, ParamSpec, Scope

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["METHODS", "BasePolicy", "Group", "Method", "method_named"]


class BasePolicy(str, Enum):
    required = "required"
    ignored = "ignored"


@dataclass(frozen=True)
class Group:
    """The inputs of one output tensor: tensors in input order, which one is the base, the shared
    parameters and each input's own, (for random methods) one seed per input, and the map that runs
    the chunks of the math (several threads, or one)."""

    tensors: Sequence[Tensor]
    base: int | None
    shared: dict[str, Any]
    per_input: Sequence[dict[str, Any]]
    seeds: Sequence[int] = field(default_factory=tuple)
    pmap: PMap = serial_map

    def others(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base]


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[Group], Tensor]
    params: tuple[ParamSpec, ...] = ()
    base: BasePolicy = BasePolicy.ignored
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    paper: str = ""
    #: the numpy engine's version of ``apply``, when it has one
    numpy: npmethods.NumpyMethod | None = None

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


def _linear(g: Group) -> Tensor:
    from merge.linear import linear

    return linear(g.tensors, [p["weight"] for p in g.per_input], normalize=g.shared["normalize"], pmap=g.pmap)


def _soup(g: Group) -> Tensor:
    from merge.linear import soup

    return soup(g.tensors, pmap=g.pmap)


def _slerp(g: Group) -> Tensor:
    from merge.slerp import slerp

    assert g.base is not None
    (other,) = g.others()
    return slerp(g.shared["t"], g.tensors[g.base], g.tensors[other], pmap=g.pmap)


def _model_stock(g: Group) -> Tensor:
    from merge.model_stock import model_stock

    assert g.base is not None
    return model_stock(g.tensors[g.base], [g.tensors[i] for i in g.others()], filter_wise=g.shared["filter_wise"])


def _passthrough(g: Group) -> Tensor:
    from merge.passthrough import passthrough

    return passthrough(g.tensors[0], g.per_input[0]["scale"])


def _delta(sparsification: Sparsification | None, consensus: Consensus | None) -> Callable[[Group], Tensor]:
    def apply(g: Group) -> Tensor:
        from merge.task_arithmetic import merge_deltas

        assert g.base is not None
        others = g.others()
        return merge_deltas(
            g.tensors[g.base],
            [g.tensors[i] for i in others],
            [g.per_input[i]["weight"] for i in others],
            densities=[g.per_input[i]["density"] for i in others],
            sparsification=sparsification,
            consensus=consensus,
            normalize=g.shared["normalize"],
            rescale=g.shared["rescale"],
            scale=g.shared["lambda"],
            gammas=[g.per_input[i].get("gamma", 0.0) for i in others],
            seeds=[g.seeds[i] for i in others] if g.seeds else None,
            pmap=g.pmap,
        )

    return apply


def _delta_method(
    name: str, paper: str, sparsification: Sparsification | None, consensus: Consensus | None, normalize: bool, rescale: bool
) -> Method:
    params = [
        ParamSpec("weight", Kind.number, Scope.non_base),
        ParamSpec("density", Kind.number, Scope.non_base, 1.0),
        ParamSpec("normalize", Kind.flag, Scope.shared, normalize),
        ParamSpec("rescale", Kind.flag, Scope.shared, rescale),
        ParamSpec("lambda", Kind.number, Scope.shared, 1.0),
        ParamSpec("int8_mask", Kind.flag, Scope.shared, False),
    ]
    if sparsification is Sparsification.outliers:
        params.append(ParamSpec("gamma", Kind.number, Scope.non_base, 0.01))
    return Method(
        name,
        _delta(sparsification, consensus),
        tuple(params),
        base=BasePolicy.required,
        random=sparsification is Sparsification.random,
        paper=paper,
        numpy=npmethods.deltas_method(sparsification, consensus) if sparsification in (None, Sparsification.random) else None,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            _linear,
            (ParamSpec("weight", Kind.number, Scope.input), ParamSpec("normalize", Kind.flag, Scope.shared, True)),
            paper="https://arxiv.org/abs/2203.05482",
            numpy=npmethods.linear,
        ),
        Method("soup", _soup, paper="https://arxiv.org/abs/2203.05482", numpy=npmethods.soup),
        Method(
            "slerp",
            _slerp,
            (ParamSpec("t", Kind.number, Scope.shared),),
            base=BasePolicy.required,
            min_inputs=2,
            max_inputs=2,
            paper="https://en.wikipedia.org/wiki/Slerp",
            numpy=npmethods.slerp,
        ),
        _delta_method("task_arithmetic", "https://arxiv.org/abs/2212.04089", None, None, False, False),
        _delta_method("ties", "https://arxiv.org/abs/2306.01708", Sparsification.magnitude, Consensus.sum, True, False),
        _delta_method("dare_linear", "https://arxiv.org/abs/2311.03099", Sparsification.random, None, False, True),
        _delta_method("dare_ties", "https://arxiv.org/abs/2311.03099", Sparsification.random, Consensus.sum, False, True),
        _delta_method("breadcrumbs", "https://arxiv.org/abs/2312.06795", Sparsification.outliers, None, False, False),
        _delta_method("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", Sparsification.outliers, Consensus.sum, False, False),
        Method(
            "model_stock",
            _model_stock,
            (ParamSpec("filter_wise", Kind.flag, Scope.shared, False),),
            base=BasePolicy.required,
            min_inputs=3,
            paper="https://arxiv.org/abs/2403.19522",
        ),
        Method(
            "passthrough",
            _passthrough,
            (ParamSpec("scale", Kind.number, Scope.input, None),),
            max_inputs=1,
            paper="https://arxiv.org/abs/2312.15166",
        ),
    )
}


def method_named(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r} (supported: {', '.join(METHODS)})") from None
