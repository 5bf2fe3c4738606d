"""The merge methods by name: parameters, input contract and the math each calls — data, one entry
per method. The names are mergekit's (plus ``soup``).

Each method's math is one function of a :class:`merge.arith.Group` (imported when first called, so
that the registry, the config and the plan import neither torch nor the math). Those written
against the array API run in both engines; ``numpy=False`` marks the ones that need torch
(:mod:`weightsmith.topk`'s exact top-k, or whole-tensor math whose reductions must be torch's own
to give mergekit's bits)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from merge.flags import Consensus, Sparsification
from merge.params import Kind, ParamSpec, Scope

if TYPE_CHECKING:
    from merge.arith import Group

__all__ = ["METHODS", "BasePolicy", "Method", "method_named"]


class BasePolicy(str, Enum):
    """What a method does with ``base_model``: needs it (``required``), uses it when given
    (``optional``), or takes it as one more input like the others (``ignored``)."""

    required = "required"
    optional = "optional"
    ignored = "ignored"


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[Group], None]
    params: tuple[ParamSpec, ...] = ()
    base: BasePolicy = BasePolicy.ignored
    min_inputs: int = 1
    max_inputs: int | None = None
    #: bounds on the inputs other than the base (for methods with a base)
    min_non_base: int | None = None
    max_non_base: int | None = None
    random: bool = False
    paper: str = ""
    #: whether the numpy engine runs it (the math uses only the array API and :class:`merge.arith.Arith`)
    numpy: bool = False
    #: whether the math is whole-tensor torch operations run in torch's own threads (the pass's
    #: ``threads``) rather than chunks run in parallel: the last bits of torch's float reductions
    #: depend on its thread count, so these methods give mergekit's bytes when both use as many
    #: threads (torch's default in both tools)
    torch_threads: bool = False
    #: what is wrong with the parameters resolved for one input (a line naming the parameter), or
    #: None; the plan collects these with its other problems
    check: Callable[[dict[str, Any]], str | None] | None = None

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def uses_base(self) -> bool:
        return self.base is not BasePolicy.ignored


def _linear(g: Group) -> None:
    from merge.linear import linear_group

    linear_group(g, [p["weight"] for p in g.per_input], g.shared["normalize"])


def _soup(g: Group) -> None:
    from merge.linear import soup_group

    soup_group(g)


def _slerp(g: Group) -> None:
    from merge.slerp import slerp_group

    slerp_group(g, g.shared["t"])


def _weighted_inputs(g: Group) -> tuple[list[Any], list[float], Any]:
    """The inputs other than the base (whole), their weights, and the base (None without one)."""
    others = g.others()
    return [g.whole(i) for i in others], [g.per_input[i]["weight"] for i in others], None if g.base is None else g.whole(g.base)


def _nuslerp(g: Group) -> None:
    from merge.arith import emit_result
    from merge.nuslerp import nuslerp_merge

    tensors, weights, base = _weighted_inputs(g)
    emit_result(g, nuslerp_merge(tensors, weights, base, row_wise=g.shared["nuslerp_row_wise"], flatten=g.shared["nuslerp_flatten"]))


def _multislerp(g: Group) -> None:
    from merge.arith import emit_result
    from merge.multislerp import ZeroMeanError, multislerp
    from weightsmith.errors import WeightsmithError

    tensors, weights, base = _weighted_inputs(g)
    try:
        merged = multislerp(tensors, weights, base, normalize_weights=g.shared["normalize_weights"], eps=g.shared["eps"])
    except ZeroMeanError as exc:
        # a property of the values, found only when merging: one line for the user (the engine
        # names the tensor), no traceback
        raise WeightsmithError(None, f"multislerp: {exc}") from None
    emit_result(g, merged)


def _karcher(g: Group) -> None:
    from merge.arith import emit_result
    from merge.karcher import karcher_mean

    # every input counts alike, the base (when given) as one more input
    inputs = [g.whole(i) for i in range(g.count)]
    emit_result(g, karcher_mean(inputs, [1.0 / g.count] * g.count, max_iter=g.shared["max_iter"], tol=g.shared["tol"]))


def _model_stock(g: Group) -> None:
    from merge.model_stock import model_stock

    assert g.base is not None
    merged = model_stock(g.whole(g.base), [g.whole(i) for i in g.others()], filter_wise=g.shared["filter_wise"])
    g.emit(slice(0, g.numel), merged.reshape(-1))


def _sce(g: Group) -> None:
    from merge.arith import emit_result
    from merge.sce import sce

    assert g.base is not None
    merged = sce(g.whole(g.base), [g.whole(i) for i in g.others()], select_topk=g.shared["select_topk"], int8_mask=g.shared["int8_mask"])
    emit_result(g, merged)


def _passthrough(g: Group) -> None:
    from merge.passthrough import passthrough

    g.emit(slice(0, g.numel), passthrough(g.values(0, slice(0, g.numel)), g.per_input[0]["scale"]))


def _arcee_fusion(g: Group) -> None:
    from merge.arcee_fusion import arcee_fusion_group

    arcee_fusion_group(g)


def _nearswap(g: Group) -> None:
    from merge.nearswap import nearswap_group

    nearswap_group(g)


def _ram(g: Group) -> None:
    from merge.ram import ram_group

    ram_group(g)


def _ramplus_tl(g: Group) -> None:
    from merge.ram import ramplus_tl_group

    ramplus_tl_group(g)


def _delta(sparsification: Sparsification | None, consensus: Consensus | None) -> Callable[[Group], None]:
    def apply(g: Group) -> None:
        from merge.task_arithmetic import merge_deltas_group

        merge_deltas_group(g, sparsification, consensus, normalize=g.shared["normalize"], rescale=g.shared["rescale"], scale=g.shared["lambda"])

    return apply


def _della_check(params: dict[str, Any]) -> str | None:
    from merge.flags import della_problem

    if params.get("density") is None or params.get("epsilon") is None:
        return None  # the base, or a value the plan already reported
    return della_problem(params["density"], params["epsilon"])


def _delta_method(
    name: str, paper: str, sparsification: Sparsification | None, consensus: Consensus | None, normalize: bool, rescale: bool
) -> Method:
    """A member of the task-vector family (:mod:`merge.task_arithmetic`): its sparsification, sign
    consensus and defaults, and the parameters those take (breadcrumbs' ``gamma``, DELLA's
    ``epsilon``: the spread of the keep probabilities around ``density``)."""
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
    if sparsification is Sparsification.della:
        params.append(ParamSpec("epsilon", Kind.number, Scope.non_base, 0.15))
    random = sparsification in (Sparsification.random, Sparsification.della)
    return Method(
        name,
        _delta(sparsification, consensus),
        tuple(params),
        base=BasePolicy.required,
        random=random,
        paper=paper,
        numpy=sparsification is None or random,
        check=_della_check if sparsification is Sparsification.della else None,
    )


def _spherical(name: str, apply: Callable[[Group], None], extra: tuple[ParamSpec, ...], min_non_base: int, max_non_base: int | None) -> Method:
    """nuslerp or multislerp: a weight per input besides the base, which is optional."""
    return Method(
        name,
        apply,
        (ParamSpec("weight", Kind.number, Scope.non_base), *extra),
        base=BasePolicy.optional,
        min_non_base=min_non_base,
        max_non_base=max_non_base,
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        torch_threads=True,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            _linear,
            (ParamSpec("weight", Kind.number, Scope.input), ParamSpec("normalize", Kind.flag, Scope.shared, True)),
            paper="https://arxiv.org/abs/2203.05482",
            numpy=True,
        ),
        Method("soup", _soup, paper="https://arxiv.org/abs/2203.05482", numpy=True),
        Method(
            "slerp",
            _slerp,
            (ParamSpec("t", Kind.number, Scope.shared),),
            base=BasePolicy.required,
            min_inputs=2,
            max_inputs=2,
            paper="https://en.wikipedia.org/wiki/Slerp",
        ),
        _spherical(
            "nuslerp", _nuslerp, (ParamSpec("nuslerp_row_wise", Kind.flag, Scope.shared, False), ParamSpec("nuslerp_flatten", Kind.flag, Scope.shared, True)), 2, 2
        ),
        _spherical(
            "multislerp", _multislerp, (ParamSpec("normalize_weights", Kind.flag, Scope.shared, True), ParamSpec("eps", Kind.number, Scope.shared, 1e-8)), 1, None
        ),
        Method(
            "karcher",
            _karcher,
            (ParamSpec("max_iter", Kind.integer, Scope.shared, 10), ParamSpec("tol", Kind.number, Scope.shared, 1e-5)),
            paper="https://arxiv.org/abs/2603.04972",
            torch_threads=True,
        ),
        _delta_method("task_arithmetic", "https://arxiv.org/abs/2212.04089", None, None, False, False),
        _delta_method("ties", "https://arxiv.org/abs/2306.01708", Sparsification.magnitude, Consensus.sum, True, False),
        _delta_method("dare_linear", "https://arxiv.org/abs/2311.03099", Sparsification.random, None, False, True),
        _delta_method("dare_ties", "https://arxiv.org/abs/2311.03099", Sparsification.random, Consensus.sum, False, True),
        _delta_method("della", "https://arxiv.org/abs/2406.11617", Sparsification.della, Consensus.sum, True, True),
        _delta_method("della_linear", "https://arxiv.org/abs/2406.11617", Sparsification.della, None, False, True),
        _delta_method("breadcrumbs", "https://arxiv.org/abs/2312.06795", Sparsification.outliers, None, False, False),
        _delta_method("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", Sparsification.outliers, Consensus.sum, False, False),
        Method(
            "sce",
            _sce,
            (ParamSpec("int8_mask", Kind.flag, Scope.shared, False), ParamSpec("select_topk", Kind.number, Scope.shared, 1.0)),
            base=BasePolicy.required,
            paper="https://arxiv.org/abs/2408.07990",
            torch_threads=True,
        ),
        Method("ram", _ram, (ParamSpec("epsilon", Kind.number, Scope.shared, 1e-5),), base=BasePolicy.required, paper="https://arxiv.org/abs/2601.13572"),
        Method(
            "ramplus_tl",
            _ramplus_tl,
            (
                ParamSpec("r", Kind.number, Scope.shared, 0.1),
                ParamSpec("alpha", Kind.number, Scope.shared, 0.2),
                ParamSpec("epsilon", Kind.number, Scope.shared, 1e-5),
            ),
            base=BasePolicy.required,
            paper="https://arxiv.org/abs/2601.13572",
        ),
        Method(
            "model_stock",
            _model_stock,
            (ParamSpec("filter_wise", Kind.flag, Scope.shared, False),),
            base=BasePolicy.required,
            min_inputs=3,
            paper="https://arxiv.org/abs/2403.19522",
            torch_threads=True,
        ),
        # the quantiles of tensors over a million entries come from a seeded sample: random
        Method(
            "arcee_fusion",
            _arcee_fusion,
            base=BasePolicy.required,
            min_inputs=2,
            max_inputs=2,
            random=True,
            paper="https://arcee.ai",
            torch_threads=True,
        ),
        Method(
            "nearswap",
            _nearswap,
            (ParamSpec("t", Kind.number, Scope.shared),),
            base=BasePolicy.required,
            min_inputs=2,
            max_inputs=2,
            paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
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
