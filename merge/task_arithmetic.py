"""Merging task vectors — the differences between fine-tuned models and their common base.

One function, :func:`merge_deltas_group`, does every method of the family; the methods
(:data:`merge.methods.METHODS`) only choose its flags:

================  ==================  =================  =========  =======
method            sparsification      sign consensus     normalize  rescale
================  ==================  =================  =========  =======
task_arithmetic   none                none               no         no
ties              magnitude           sum                yes        no
dare_linear       random              none               no         yes
dare_ties         random              sum                no         yes
breadcrumbs       outliers            none               no         no
breadcrumbs_ties  outliers            sum                no         no
della             della               sum                yes        yes
della_linear      della               none               no         yes
================  ==================  =================  =========  =======

Papers: task arithmetic, Ilharco et al. 2023, https://arxiv.org/abs/2212.04089; TIES-Merging,
Yadav et al. 2023, https://arxiv.org/abs/2306.01708; DARE, Yu et al. 2024,
https://arxiv.org/abs/2311.03099; Model Breadcrumbs, Davari & Belilovsky 2024,
https://arxiv.org/abs/2312.06795; DELLA-Merging, Deep et al. 2024, https://arxiv.org/abs/2406.11617.

DELLA ranks magnitudes within rows, so its chunks hold whole rows
(:func:`merge.sparsify.della_chunk_size`); the other methods cut tensors at fixed offsets.

The arithmetic runs in the compute dtype (the config's ``dtype``, else the inputs' promoted dtype),
rounding wherever torch's arithmetic in that dtype rounds, and follows mergekit 0.1.5's order of
operations, so outputs agree with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from merge.arith import Array, Group, accumulate, vote_sum, whole_group
from merge.chunks import PMap, chunks, serial_map
from merge.flags import Consensus, Sparsification
from merge.sparsify import Sparsifier, della_chunk_size, della_sparsifier, random_sparsifier, ranked_sparsifier

__all__ = ["Consensus", "Sparsification", "merge_deltas", "merge_deltas_group", "sign_agreement"]

#: A task vector whose L1 norm (before or after sparsifying) is below this is not rescaled.
L1_EPS = 1e-7
#: A total weight below this in magnitude is taken as 1 when normalizing.
WEIGHT_EPS = 1e-8


def _agreement(g: Group, deltas: Sequence[Array], consensus: Consensus) -> list[Array]:
    """Per delta, a mask (1 or 0) of where its sign equals the sign elected by the vote (the deltas'
    sum, or the sum of their signs): + where the vote is >= +0, else -; zero deltas never agree."""
    a = g.arith
    votes = deltas if consensus is Consensus.sum else [a.xp.sign(d) for d in deltas]
    elected = a.elect(vote_sum(a, votes))
    return [a.agree(d, elected) for d in deltas]


def merge_deltas_group(
    g: Group, sparsification: Sparsification | None, consensus: Consensus | None, *, normalize: bool, rescale: bool, scale: float
) -> None:
    """``base + scale * combine(weight_i * sparsify(x_i - base))`` over the inputs other than the
    base, for every chunk of ``g``.

    ``combine`` sums the weighted deltas; with ``consensus`` it sums only those agreeing with the
    elected sign. With ``normalize`` the sum is divided by the sum of the weights that took part
    (per entry under consensus). Per input: ``weight``, ``density`` (default 1: nothing dropped),
    ``gamma`` (breadcrumbs, default 0), ``epsilon`` (DELLA, default 0) and, for random drops, the
    group's seed. ``rescale`` keeps each sparsified task vector's L1 norm (measured in a first pass
    over the chunks, whose sparsified chunks the merge pass then takes).
    """
    a = g.arith
    xp = a.xp
    base = g.base
    assert base is not None
    others = g.others()
    n = len(others)
    parts = chunks(g.numel, della_chunk_size(g.shape) if sparsification is Sparsification.della else None)
    weights = a.scalars([g.per_input[i]["weight"] for i in others])
    unit = [float(w) == 1.0 for w in weights]  # a weight of exactly 1 multiplies nothing
    densities = [g.per_input[i].get("density", 1.0) for i in others]

    def delta(k: int, p: slice, b: Array) -> Array:
        return a.round(g.values(others[k], p) - b)

    sparsifiers: list[Sparsifier | None] = [None] * n
    for k, i in enumerate(others):
        if sparsification is None or densities[k] >= 1:
            continue
        if sparsification in (Sparsification.random, Sparsification.della) and not g.seeds:
            raise ValueError("random sparsification needs a seed")
        if sparsification is Sparsification.random:
            sparsifiers[k] = random_sparsifier(a, g.seeds[i], densities[k])
        elif sparsification is Sparsification.della:
            sparsifiers[k] = della_sparsifier(a, g.seeds[i], densities[k], g.per_input[i].get("epsilon", 0.0), g.shape)
        else:
            from weightsmith.topk import Chunked

            chunked = Chunked(len(parts), lambda j, k=k: delta(k, parts[j], g.values(base, parts[j])))
            sparsifiers[k] = ranked_sparsifier(sparsification, chunked, g.numel, a.dtype, densities[k], g.per_input[i].get("gamma", 0.0), g.pmap)

    #: the sparsified chunks of the L1 pass, taken (and freed) by the merge pass
    kept: dict[tuple[int, int], Array] = {}
    measured = [k for k in range(n) if sparsifiers[k] is not None] if rescale else []

    def measure(j: int) -> list[tuple[float, float]]:
        """Both L1 norms (float64 sums) of chunk ``j`` of every measured task vector, the base read once."""
        b = g.values(base, parts[j])
        norms = []
        for k in measured:
            whole = delta(k, parts[j], b)
            sparse = sparsifiers[k](j, whole)  # type: ignore[misc]
            kept[(k, j)] = sparse
            norms.append((float(xp.sum(xp.abs(whole), dtype=xp.float64)), float(xp.sum(xp.abs(sparse), dtype=xp.float64))))
        return norms

    factors: list[Array | None] = [None] * n
    if measured:
        before, after = [0.0] * len(measured), [0.0] * len(measured)
        for pieces in g.pmap(measure, range(len(parts))):  # added in chunk order
            for m, (x, y) in enumerate(pieces):
                before[m] += x
                after[m] += y
        for m, k in enumerate(measured):
            # the norms rounded to the compute dtype, as a torch scalar of that dtype holds them
            norms = a.scalars([before[m], after[m], L1_EPS])
            if not (norms[0] < norms[2] or norms[1] < norms[2]):
                factors[k] = a.round(norms[0:1] / norms[1:2])[0]

    total_weight = accumulate(a, [weights[k : k + 1] for k in range(n)])[0] if n else a.scalars([1.0])[0]
    if xp.abs(total_weight) < WEIGHT_EPS:
        total_weight = a.scalars([1.0])[0]

    def chunk(j: int, p: slice) -> Array:
        b = g.values(base, p)
        weighted = []
        for k in range(n):
            d = kept.pop((k, j), None)
            if d is None:
                d = delta(k, p, b)
                if sparsifiers[k] is not None:
                    d = sparsifiers[k](j, d)  # type: ignore[misc]
            if factors[k] is not None:
                d = a.round(d * factors[k])
            weighted.append(d if unit[k] else a.round(d * weights[k]))
        if consensus is None:
            mixed = accumulate(a, weighted)
            if normalize:
                mixed = a.round(mixed / total_weight)
        else:
            agree = _agreement(g, weighted, consensus)
            mixed = accumulate(a, [d * m for d, m in zip(weighted, agree)])
            if normalize:
                mixed = a.round(mixed / a.divisor(agree, None if all(unit) else weights))
        if scale != 1:
            mixed = a.round(mixed * scale)
        return b + mixed

    def emit(j: int) -> None:
        """Chunk ``j`` of the output (the base itself when no input other than it)."""
        g.emit(parts[j], chunk(j, parts[j]) if n else g.values(base, parts[j]))

    g.pmap(emit, range(len(parts)))


def merge_deltas(
    base: Array,
    tensors: Sequence[Array],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsification: Sparsification | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    rescale: bool = False,
    scale: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    pmap: PMap = serial_map,
) -> Array:
    """:func:`merge_deltas_group` on whole arrays of one dtype (``base`` and the fine-tuned
    ``tensors``; ``weights``, ``densities``, ``gammas``, ``epsilons`` and ``seeds`` per tensor);
    the result in that dtype."""
    n = len(tensors)
    if len(weights) != n:
        raise ValueError(f"{n} tensors but {len(weights)} weights")
    per_input: list[dict] = [{}]
    for k in range(n):
        per_input.append(
            {
                "weight": weights[k],
                "density": densities[k] if densities is not None else 1.0,
                "gamma": gammas[k] if gammas is not None else 0.0,
                "epsilon": epsilons[k] if epsilons is not None else 0.0,
            }
        )
    group, result = whole_group([base, *tensors], 0, {}, per_input, [0, *seeds] if seeds is not None else (), pmap)
    merge_deltas_group(group, sparsification, consensus, normalize=normalize, rescale=rescale, scale=scale)
    return result()


def sign_agreement(deltas: Sequence[Array], consensus: Consensus = Consensus.sum) -> list[Array]:
    """Per delta (whole arrays of one dtype), 1 where its sign equals the elected sign of the entry,
    else 0: the masks :func:`merge_deltas_group` uses."""
    group, _ = whole_group(deltas)
    masks = _agreement(group, [group.values(i, slice(None)) for i in range(len(deltas))], consensus)
    return [group.arith.xp.reshape(m, group.shape) for m in masks]
