"""Per-architecture facts, as data: where the decoder layers are, which linears they hold, which norm
or linear feeds which linears (AWQ scale folding), and which tensors sit outside the layers.

Adding an architecture is adding an entry to :data:`ARCHITECTURES`; no code branches on model type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from weightsmith.errors import WeightsmithError


@dataclass(frozen=True)
class ScaleGroup:
    """AWQ: ``prev`` (a norm or linear inside the layer) produces the input of ``linears``; input-channel
    scales of those linears can be folded into ``prev``'s output. ``block`` is the submodule whose
    output error judges the scales (``""`` = the linears themselves). ``needs_equal_width`` skips the
    group when ``prev``'s output width differs from the linears' input width (e.g. v_proj -> o_proj
    under grouped-query attention)."""

    prev: str
    linears: tuple[str, ...]
    block: str = ""
    needs_equal_width: bool = False


@dataclass(frozen=True)
class Arch:
    """Module paths (dotted, as in the checkpoint's tensor names) of one architecture family."""

    layers: str
    linears: tuple[str, ...]
    scale_groups: tuple[ScaleGroup, ...] = field(default_factory=tuple)
    num_layers_key: str = "num_hidden_layers"

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."


_LLAMA = Arch(
    layers="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", needs_equal_width=True),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
)

_GPT_NEOX = Arch(
    layers="gpt_neox.layers",
    linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    scale_groups=(
        ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
        ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    ),
)

#: config.json ``model_type`` -> architecture facts. SmolLM is a Llama.
ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt_neox": _GPT_NEOX,
}


def arch_for(config: dict, where: object = None) -> Arch:
    """The facts for a checkpoint's config, or a clear error naming what is supported."""
    model_type = config.get("model_type")
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise WeightsmithError(
            where, f"architecture {model_type!r} is not supported by layer-by-layer passes (supported: {known}); RTN works on any model"
        ) from None
