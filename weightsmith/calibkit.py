"""The calibration kit: what every calibrated pass measures on a loaded layer and writes back.

A calibrated pass (GPTQ, AWQ, SparseGPT, Wanda, structured importance, distillation) runs inside
:class:`weightsmith.calibrate.LayerwiseRunner`'s loop. For each :class:`LayerStep` it asks
:func:`input_statistics` for what it needs about the inputs of the layer's linears, from one pass over
the calibration batches:

* ``"hessian"``: ``H = 2/n X^T X`` (float32 ``[in, in]``), the Optimal-Brain-Surgeon Hessian of GPTQ
  and SparseGPT (https://arxiv.org/abs/2210.17323, https://arxiv.org/abs/2301.00774);
* ``"norms"``: ``||X_j||_2`` over all tokens (float32 ``[in]``), Wanda's input-column norms
  (https://arxiv.org/abs/2306.11695).

Linears that read the very same input tensor (q/k/v after the attention norm, gate/up after the MLP
norm) are detected while the layer runs and share one :class:`InputStats`, computed once; a pass can
then treat them as one stacked weight. :func:`write_layer` writes the layer back, with the weights
the pass changed in the module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from weightsmith.calibrate import LayerStep, input_hooks
from weightsmith.checkpoint import Checkpoint, CheckpointWriter

__all__ = [
    "InputStats",
    "LayerInputs",
    "Stat",
    "accumulate_hessian",
    "accumulate_square_sum",
    "input_statistics",
    "layer_batches",
    "shared_inputs",
    "write_layer",
]

Stat = Literal["hessian", "norms"]
STATS: tuple[Stat, ...] = ("hessian", "norms")


def accumulate_hessian(
    H: Tensor | None, x: Tensor, n_seen: int, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, int]:
    """Fold a batch of layer inputs into the running Hessian ``H = 2/n * sum_i x_i x_i^T``.

    ``x`` is ``[..., in]``; every row of the flattened ``[-1, in]`` view is one sample (one token).
    ``H`` is ``[in, in]`` (``None`` starts a new one in ``dtype``, float32 or float64) and is
    updated in place, so the caller holds a single ``in x in`` buffer while streaming; the updated
    ``H`` and the new sample count are returned.
    """
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"expected inputs [..., in], got shape {tuple(x.shape)}")
    if n_seen < 0:
        raise ValueError(f"n_seen must be non-negative, got {n_seen}")
    inp = x.shape[-1]
    if H is None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        H = torch.zeros((inp, inp), dtype=dtype, device=x.device)
    elif H.shape != (inp, inp):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(inp, inp)}")
    rows = x.reshape(-1, inp).to(H.dtype)
    n_new = rows.shape[0]
    if n_new == 0:
        return H, n_seen
    total = n_seen + n_new
    H.mul_(n_seen / total)
    _add_gram(H, rows, 2.0 / total)
    return H, total


def accumulate_square_sum(sums: Tensor | None, x: Tensor) -> Tensor:
    """``sums + sum_t x_t^2`` per input channel, float64 ``[in]`` (``None`` starts at 0): the
    squared column norms of the inputs, accumulated batch by batch."""
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"expected inputs [..., in], got shape {tuple(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    batch = rows.to(torch.float32).square().sum(dim=0, dtype=torch.float64)
    return batch if sums is None else sums.add_(batch)


def _add_gram(H: Tensor, rows: Tensor, alpha: float) -> None:
    """``H += alpha * rows^T rows``, computing only the block rows on and above the diagonal and
    mirroring the rest (the product is symmetric): 62.5% of the products for four blocks."""
    inp = rows.shape[1]
    block = max(192, min(384, -(-inp // 3)))
    if inp < 2 * block:
        H.addmm_(rows.t(), rows, alpha=alpha)
        return
    edges = list(range(0, inp, block)) + [inp]
    spans = list(zip(edges[:-1], edges[1:]))
    for i, (a0, a1) in enumerate(spans):
        H[a0:a1, a0:inp].addmm_(rows[:, a0:a1].t(), rows[:, a0:inp], alpha=alpha)
        if a1 < inp:
            H[a1:inp, a0:a1] = H[a0:a1, a1:inp].t()


@dataclass
class InputStats:
    """Statistics of one input tensor of a layer, shared by every linear that reads it."""

    linears: list[str]
    tokens: int = 0
    #: ``2/n X^T X``, float32 ``[in, in]``, when requested
    hessian: Tensor | None = None
    #: ``sum_t x_tj^2``, float64 ``[in]``, when requested
    square_sum: Tensor | None = None
    #: the statistics being accumulated
    computed: set[str] = field(default_factory=set)

    @property
    def norms(self) -> Tensor:
        """``||X_j||_2`` over all tokens, float32 ``[in]``."""
        if self.square_sum is None:
            raise ValueError(f"input norms of {self.linears} were not requested")
        return self.square_sum.sqrt().to(torch.float32)


@dataclass
class LayerInputs:
    """The statistics of a layer's inputs: one :class:`InputStats` per distinct input, in the order
    the layer first reads them."""

    inputs: list[InputStats] = field(default_factory=list)

    def __getitem__(self, linear: str) -> InputStats:
        for stats in self.inputs:
            if linear in stats.linears:
                return stats
        raise KeyError(linear)

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """The linears that share an input, one tuple per input."""
        return [tuple(s.linears) for s in self.inputs]


def layer_batches(step: LayerStep, limit: int | None = None) -> Iterator[tuple[Tensor, dict]]:
    """(hidden, kwargs) pairs of the layer's inputs, the batches holding the first ``limit`` samples
    (all when None)."""
    seen = 0
    for hidden, kwargs in zip(step.inputs.hidden, step.inputs.kwargs):
        if limit is not None and seen >= limit:
            return
        yield hidden, kwargs
        seen += hidden.shape[0]


class _LastInputSeen(Exception):
    """Raised by the statistics hooks once the layer's last requested linear has its input."""


@torch.inference_mode()
def input_statistics(step: LayerStep, wanted: Mapping[str, Collection[Stat]], *, limit: int | None = None) -> LayerInputs:
    """The requested statistics of the inputs of ``step``'s linears (``{linear: {"hessian",
    "norms"}}``, linear names relative to the layer), from one pass over the calibration batches
    holding the first ``limit`` samples (all when None).

    Linears fed the very same input tensor share one :class:`InputStats` holding the union of what
    they asked for. A linear may ask for nothing: it is then only grouped. After the first batch, the
    layer stops as soon as the last requested linear has its input (its own matmul and the rest of
    the layer are not needed).
    """
    names = tuple(wanted)
    for name, stats in wanted.items():
        unknown = set(stats) - set(STATS)
        if unknown:
            raise ValueError(f"{name}: unknown statistics {sorted(unknown)} (known: {', '.join(STATS)})")
    result = LayerInputs()
    if not names:
        return result
    owner: dict[str, InputStats] = {}
    # The last input seen and the statistics it went into. Holding the tensor keeps its memory from
    # being reused, so equal storage address, shape and strides mean the very same input.
    last: list = [None, None]
    # The order the linears run in, learnt on the first batch.
    order: list[str] = []
    stop_at: list[str | None] = [None]

    def collect(name: str, x: Tensor) -> None:
        if stop_at[0] is None:
            order.append(name)
        prev = last[0]
        if prev is not None and (prev.data_ptr(), prev.shape, prev.stride()) == (x.data_ptr(), x.shape, x.stride()):
            stats = last[1]
            if owner.setdefault(name, stats) is not stats:
                raise RuntimeError(f"{name} read another input than on the first batch")
            if name not in stats.linears:
                stats.linears.append(name)
            # a sharer found on the first batch may want what its input's first reader did not
            _accumulate(stats, x, set(wanted[name]) - stats.computed, n_seen=stats.tokens - x.reshape(-1, x.shape[-1]).shape[0])
        else:
            stats = owner.get(name)
            if stats is None:
                stats = owner[name] = InputStats([name])
                result.inputs.append(stats)
            last[0], last[1] = x, stats
            n_seen = stats.tokens
            stats.tokens += x.reshape(-1, x.shape[-1]).shape[0]
            _accumulate(stats, x, stats.computed | set(wanted[name]), n_seen=n_seen)
        if name == stop_at[0]:
            raise _LastInputSeen

    with input_hooks(step.module, names, collect):
        for hidden, kwargs in layer_batches(step, limit):
            try:
                step.module(hidden, **kwargs)
            except _LastInputSeen:
                pass
            if stop_at[0] is None and order and order.count(order[-1]) == 1:
                stop_at[0] = order[-1]
            order.clear()
            last[0] = None
    missing = [name for name in names if name not in owner]
    if missing:
        raise ValueError(f"the layer never ran {', '.join(missing)}")
    return result


def _accumulate(stats: InputStats, x: Tensor, which: set[str], n_seen: int) -> None:
    if n_seen and which - stats.computed:
        raise RuntimeError(f"statistics {sorted(which - stats.computed)} of {stats.linears} asked for after the first batch")
    if "hessian" in which:
        stats.hessian, _ = accumulate_hessian(stats.hessian, x, n_seen)
    if "norms" in which:
        stats.square_sum = accumulate_square_sum(stats.square_sum, x)
    stats.computed |= which


def shared_inputs(step: LayerStep, names: Collection[str]) -> list[tuple[str, ...]]:
    """The named linears of ``step`` grouped by the input tensor they read, in the order the layer
    reads them (one batch is run)."""
    return input_statistics(step, {name: () for name in names}, limit=1).groups


def write_layer(
    step: LayerStep,
    ckpt: Checkpoint,
    writer: CheckpointWriter,
    custom: Mapping[str, Callable[[str, torch.dtype], None]] | None = None,
) -> None:
    """Write the tensors of ``step``'s layer in the checkpoint's order: a module named in ``custom``
    (relative name) is written by its function, called with the module's full name and the stored
    dtype of its weight (e.g. a packed quantized format); the other parameters from the module, as
    the pass left them, in their stored dtype; any other stored tensor of the layer unchanged."""
    custom = custom or {}
    params = dict(step.module.named_parameters())
    for name in ckpt.names():
        if not name.startswith(step.prefix):
            continue
        local = name[len(step.prefix) :]
        dtype = ckpt.info(name).dtype
        module = local[: -len(".weight")] if local.endswith(".weight") else None
        if module in custom:
            custom[module](step.prefix + module, dtype)
        elif local in params:
            writer.add(name, step.stored(local, params[local].data).to(dtype))
        else:
            writer.copy_from(ckpt, name)
