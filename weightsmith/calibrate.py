"""Layer-by-layer activation capture for decoder models (shared by GPTQ, AWQ, Wanda, structured pruning).

The model is built with its parameters on the meta device (no memory), buffers real (rotary tables).
Only the modules in front of the decoder layers are loaded to capture the inputs of layer 0; then each
layer is loaded from the checkpoint alone, run on the calibration samples with hooks on its linears,
changed by the pass, run again to produce the next layer's inputs (so later layers see the errors of
earlier ones), and dropped. Peak memory: one layer plus the calibration activations.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from weightsmith.arch import Arch, arch_for
from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the stand-in of the last layer once every layer's inputs are captured."""


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def build_skeleton(folder: Path):
    """The model with parameters on the meta device and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsmithError(folder / "config.json", f"transformers cannot read it: {str(exc).splitlines()[0]}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def load_params(module: nn.Module, prefix: str, ckpt: Checkpoint, dtype: torch.dtype, device: str = "cpu", transposed: Collection[str] = ()) -> None:
    """Replace ``module``'s parameters with the checkpoint's tensors named ``prefix + name``; the
    parameters named in ``transposed`` are stored as the transpose of the module's weight."""
    for name, param in list(module.named_parameters(recurse=True)):
        full = prefix + name
        if full not in ckpt:
            raise WeightsmithError(ckpt.folder, f"tensor {full!r} is missing from the checkpoint")
        tensor = ckpt.get(full).t().contiguous() if name in transposed else ckpt.get(full)
        if tuple(tensor.shape) != tuple(param.shape):
            raise WeightsmithError(ckpt.folder, f"tensor {full!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
        require_finite(ckpt, full, tensor)
        owner_path, _, leaf = name.rpartition(".")
        owner = get_module(module, owner_path) if owner_path else module
        owner._parameters[leaf] = nn.Parameter(tensor.to(device=device, dtype=dtype, copy=True), requires_grad=False)


def require_finite(ckpt: Checkpoint, name: str, tensor: torch.Tensor) -> None:
    """Refuse a floating-point tensor holding NaN or an infinity: calibration and quantization
    cannot give it a meaning, and it would poison every statistic measured after it."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise WeightsmithError(ckpt.info(name).file, f"tensor {name!r} holds NaN or infinite values")


def unload_params(module: nn.Module) -> None:
    """Send ``module``'s parameters back to the meta device (frees their memory)."""
    module.to("meta")


@dataclass
class Captured:
    """The inputs of one decoder layer: hidden states and keyword arguments, batch by batch.
    ``layer_kwargs[i]`` are the keyword arguments layer ``i`` receives, which differ between layer
    types (a sliding-window layer's mask, Gemma 3's local rotary tables); the runner points ``kwargs``
    at the current layer's."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    layer_kwargs: list[list[dict]]


def _front_modules(root: nn.Module, root_path: str, layers_path: str) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every module under ``root`` that is not on the way to the decoder layers
    (embeddings, input projections, final norm), however deep the layers sit (OPT's
    ``model.decoder.layers``)."""
    for name, child in root.named_children():
        path = root_path + name
        if path == layers_path:
            continue
        if layers_path.startswith(path + "."):
            yield from _front_modules(child, path + ".", layers_path)
        else:
            yield path, child


class _LayerStandIn(nn.Module):
    """Takes a decoder layer's place while the inputs are captured: records the call's arguments by
    name (bound to the layer's own signature, so positional ones such as GPT-2's mask are kept) and
    passes the hidden states through; the last layer's stand-in stops the forward."""

    def __init__(self, layer: nn.Module, calls: list[dict], last: bool) -> None:
        super().__init__()
        self.signature = inspect.signature(layer.forward)
        self.calls = calls
        self.last = last

    def forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs).arguments
        hidden_name = next(iter(self.signature.parameters))
        named = {k: v for k, v in bound.items() if self.signature.parameters[k].kind is not inspect.Parameter.VAR_KEYWORD}
        for k, v in bound.items():
            if self.signature.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(v)
        self.calls.append(named)
        if self.last:
            raise _StopForward
        return named[hidden_name]


def capture_first_layer_inputs(model, arch: Arch, ckpt: Checkpoint, samples: torch.Tensor, batch_size: int, dtype: torch.dtype, device: str) -> Captured:
    """Run the modules in front of the decoder layers on ``samples``: catch what layer 0 receives and
    the keyword arguments of every layer. The layers do not run: stand-ins pass the hidden states on."""
    layers = get_module(model, arch.layers)
    base = model.base_model
    front = list(_front_modules(base, model.base_model_prefix + ".", arch.layers))
    for path, child in front:
        load_params_if_present(child, path + ".", ckpt, dtype, device)
    originals = list(layers)
    calls: list[list[dict]] = [[] for _ in originals]
    for i, layer in enumerate(originals):
        layers[i] = _LayerStandIn(layer, calls[i], last=i == len(originals) - 1)
    hidden_name = next(iter(inspect.signature(originals[0].forward).parameters))
    hidden = []
    try:
        for batch in samples.split(batch_size):
            try:
                base(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            hidden.append(calls[0][-1][hidden_name])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for _, child in front:
            unload_params(child)
    layer_kwargs = [[{k: v for k, v in call.items() if k != hidden_name} for call in layer_calls] for layer_calls in calls]
    return Captured(_one_block(hidden), layer_kwargs[0], layer_kwargs)


def as_linears(layer: nn.Module, names: tuple[str, ...]) -> None:
    """Replace the named submodules, whose weights are stored ``[in, out]`` (GPT-2's Conv1D), with
    ``nn.Linear`` modules on the meta device, so that a pass sees every linear's weight as
    ``[out, in]``; :func:`load_params` with ``transposed`` fills them."""
    for name in names:
        owner_path, _, leaf = name.rpartition(".")
        owner = get_module(layer, owner_path) if owner_path else layer
        stored = getattr(owner, leaf)
        n_in, n_out = stored.weight.shape
        setattr(owner, leaf, nn.Linear(n_in, n_out, bias=getattr(stored, "bias", None) is not None, device="meta"))


def _one_block(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batches as views into one contiguous buffer. The activations every layer keeps then sit
    in one large allocation (mmapped by the C allocator) instead of among the layer's temporaries
    in the heap, where freed gaps between kept batches fragment it (measured on SmolLM2 GPTQ: peak
    RSS 1083 MiB with the batches kept separately; see the README)."""
    if not batches:
        return batches
    return list(torch.cat(batches).split([b.shape[0] for b in batches]))


def load_params_if_present(module: nn.Module, prefix: str, ckpt: Checkpoint, dtype: torch.dtype, device: str) -> None:
    """:func:`load_params` for a module in front of the layers, skipped when the checkpoint stores
    none of its parameters (a final norm or head that calibration never runs, e.g. a tied head)."""
    if any(prefix + name in ckpt for name, _ in module.named_parameters()):
        load_params(module, prefix, ckpt, dtype, device)


def layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def advance(layer: nn.Module, inputs: Captured) -> None:
    """Overwrite each captured batch with the layer's output for it, batch by batch, in the same
    buffer (no second copy of the activations, no new allocation that outlives the batch)."""
    for hidden, kw in zip(inputs.hidden, inputs.kwargs):
        hidden.copy_(layer_output(layer(hidden, **kw)))


@contextmanager
def input_hooks(layer: nn.Module, names: tuple[str, ...], callback: Callable[[str, torch.Tensor], None]):
    """Call ``callback(name, x)`` with the input of each named linear while the block runs."""
    handles = []
    for name in names:
        linear = get_module(layer, name)
        handles.append(linear.register_forward_pre_hook(lambda _m, args, name=name: callback(name, args[0].detach())))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerStep:
    """One decoder layer, loaded, with the inputs the (already processed) earlier layers produce."""

    index: int
    prefix: str
    module: nn.Module
    inputs: Captured
    #: parameters (relative names) the checkpoint stores as the transpose of the module's (Conv1D)
    transposed: frozenset[str] = frozenset()

    def stored(self, local: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, the value of the layer's parameter ``local``, in the orientation the checkpoint
        stores it."""
        return tensor.t() if local in self.transposed else tensor


class LayerwiseRunner:
    """Drives a calibrated pass over the decoder layers one at a time.

    ``for step in runner: ...`` yields each loaded layer with its inputs; the pass changes
    ``step.module``'s weights; the runner then recomputes the layer's outputs with the changed weights,
    which replace its inputs (in place: ``step.inputs`` is spent once the loop moves on), and unloads
    the layer.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        samples: torch.Tensor,
        *,
        batch_size: int = 8,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> None:
        self.ckpt = ckpt
        self.arch = arch_for(ckpt.config, ckpt.folder / "config.json")
        self.samples = samples
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.model = build_skeleton(ckpt.folder)
        self.layers = get_module(self.model, self.arch.layers)
        # names (relative to a layer) of the parameters stored as the transpose of the module's weight
        self.transposed = frozenset(f"{lin}.weight" for lin in self.arch.linears) if self.arch.weights_transposed else frozenset()
        if self.transposed:
            for layer in self.layers:
                as_linears(layer, self.arch.linears)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerStep]:
        inputs = capture_first_layer_inputs(self.model, self.arch, self.ckpt, self.samples, self.batch_size, self.dtype, self.device)
        for index, layer in enumerate(self.layers):
            prefix = self.arch.layer_prefix(index)
            inputs.kwargs = inputs.layer_kwargs[index]
            load_params(layer, prefix, self.ckpt, self.dtype, self.device, self.transposed)
            step = LayerStep(index, prefix, layer, inputs, self.transposed)
            yield step
            advance(layer, inputs)
            unload_params(layer)
