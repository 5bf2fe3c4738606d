"""Per-architecture facts, as data: where the decoder layers are, which linears they hold and how their
weights are stored, which norm or linear feeds which linears (AWQ scale folding), which tensors sit in
front of the layers, and which config.json keys give the layer count, the head layout and the MLP
width, and which weight slices are an MLP channel or an attention head (structured pruning, GGUF
export).

Adding an architecture is adding an entry to :data:`ARCHITECTURES`; no code branches on model type.
The one table is read by the calibrated passes (:mod:`weightsmith.calibrate`, :mod:`compress.quantize`)
and by the merge layout (:mod:`merge.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from weightsmith.errors import WeightsmithError

__all__ = ["ARCHITECTURES", "Arch", "ConfigIs", "ConfigKeys", "HeadLayout", "ScaleGroup", "Structure", "arch_for", "known_arch"]


@dataclass(frozen=True)
class ConfigIs:
    """A condition on config.json: ``config[key] == value``, with ``default`` standing for a missing key
    (the value transformers assumes)."""

    key: str
    value: object
    default: object

    def holds(self, config: dict) -> bool:
        return config.get(self.key, self.default) == self.value


@dataclass(frozen=True)
class ScaleGroup:
    """AWQ: ``prev`` (a norm or linear inside the layer) produces the input of ``linears``; input-channel
    scales of those linears can be folded into ``prev``'s output. ``block`` is the submodule whose
    output error judges the scales (``""`` = the linears themselves). ``needs_equal_width`` skips the
    group when the input width of ``linears`` differs from the width of the rows of ``prev`` that feed
    them (e.g. v_proj -> o_proj under grouped-query attention).

    ``prev_rows = (k, n)``: when ``prev`` is a fused linear, its output rows split into ``n`` equal
    parts and part ``k`` is what feeds ``linears`` (the up half of Phi-3's gate_up_proj, the value
    third of GPT-2's c_attn); ``(0, 1)`` is all of them. ``requires``: config conditions under which
    the group is exact (a norm feeds the linears only in a pre-norm layer; a scale passes through the
    activation between two linears only when it is ReLU, which is positively homogeneous)."""

    prev: str
    linears: tuple[str, ...]
    block: str = ""
    needs_equal_width: bool = False
    prev_rows: tuple[int, int] = (0, 1)
    requires: tuple[ConfigIs, ...] = ()


@dataclass(frozen=True)
class ConfigKeys:
    """config.json keys of a family. ``kv_heads`` None: every head has its own keys and values.
    ``head_dim`` is read when the config has it, else it is ``hidden // heads``. ``mlp_width_default``:
    the MLP width as a multiple of ``hidden`` when ``mlp_width`` is missing or null (GPT-2's
    ``n_inner``). ``per_layer``: keys whose value is a list with one entry per decoder layer
    (``layer_types``: which layers use sliding-window attention); dropping layers trims them."""

    hidden: str = "hidden_size"
    layers: str = "num_hidden_layers"
    heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"
    head_dim: str = "head_dim"
    mlp_width: str = "intermediate_size"
    mlp_width_default: int | None = None
    per_layer: tuple[str, ...] = ()


@dataclass(frozen=True)
class Structure:
    """Where structured pruning cuts a decoder layer (names relative to the layer, weights ``[out, in]``).

    MLP channel ``c`` is output row ``c`` (and bias entry ``c``) of every linear in ``mlp_rows`` (gate
    and up, or fc1) and input column ``c`` of every linear in ``mlp_cols`` (down, or fc2). Attention
    head ``h`` is the ``head_dim`` output rows (and bias entries) ``h`` of ``query`` and the input
    columns ``h`` of ``attn_out``; key/value head ``k`` is rows ``k`` of ``key`` and ``value``, shared
    by query heads ``k * g .. (k + 1) * g - 1`` (``g`` = heads / kv_heads). ``head_dim_configurable``:
    the family's config takes an explicit head width, so the model can have fewer heads of the same
    width at the same hidden size. An empty name means that axis cannot be cut, and ``mlp_refusal`` /
    ``heads_refusal`` say why (a fused projection, a head width the family derives from the hidden
    size)."""

    mlp_rows: tuple[str, ...] = ()
    mlp_cols: tuple[str, ...] = ()
    query: str = ""
    key: str = ""
    value: str = ""
    attn_out: str = ""
    head_dim_configurable: bool = False
    mlp_refusal: str = ""
    heads_refusal: str = ""

    @property
    def cuts_mlp(self) -> bool:
        return bool(self.mlp_rows and self.mlp_cols)

    @property
    def cuts_heads(self) -> bool:
        return bool(self.query and self.key and self.value and self.attn_out and self.head_dim_configurable)


class HeadLayout(NamedTuple):
    """Query heads, key / value heads and the width of one head."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Arch:
    """Module paths (dotted, as in the checkpoint's tensor names) of one architecture family.

    ``front``: modules in front of the decoder layers whose tensors a stacked (passthrough) model takes
    from its first slice (embeddings, input projections). ``norm_offset``: the family's norms compute
    ``normalize(x) * (norm_offset + weight)`` (Gemma stores its RMSNorm weights as ``weight - 1``).
    ``weights_transposed``: the decoder linears store their weights ``[in, out]`` (GPT-2's Conv1D)
    instead of ``[out, in]``. ``structure``: the slices structured pruning removes.
    """

    layers: str
    linears: tuple[str, ...]
    scale_groups: tuple[ScaleGroup, ...] = field(default_factory=tuple)
    front: tuple[str, ...] = ()
    keys: ConfigKeys = field(default_factory=ConfigKeys)
    norm_offset: float = 0.0
    weights_transposed: bool = False
    structure: Structure = field(default_factory=Structure)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."

    def layer_suffix(self, name: str) -> str | None:
        """``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``; None for a name outside the layers."""
        head = f"{self.layers}."
        if not name.startswith(head):
            return None
        index, _, suffix = name[len(head) :].partition(".")
        return suffix if index.isdigit() and suffix else None

    def stored_transposed(self, module: str) -> bool:
        """Whether the checkpoint stores ``module``'s weight ``[in, out]``: a decoder linear of a family
        with Conv1D weights, named with or without the model's prefix (GPT-2 checkpoints on the Hub
        name their layers ``h.0.`` where transformers writes ``transformer.h.0.``)."""
        if not self.weights_transposed:
            return False
        parts = module.split(".")
        for linear in self.linears:
            n = linear.count(".") + 1  # the linear's own name parts, after the layer index
            if len(parts) > n and parts[-n - 1].isdigit() and ".".join(parts[-n:]) == linear:
                return True
        return False

    def is_front(self, tensor_name: str) -> bool:
        return any(tensor_name.startswith(f"{module}.") for module in self.front)

    def for_config(self, config: dict) -> Arch:
        """These facts with the scale groups that do not hold for ``config`` left out."""
        groups = tuple(g for g in self.scale_groups if all(c.holds(config) for c in g.requires))
        return self if groups == self.scale_groups else replace(self, scale_groups=groups)

    def num_layers(self, config: dict) -> int | None:
        value = config.get(self.keys.layers)
        return value if isinstance(value, int) else None

    def head_layout(self, config: dict) -> HeadLayout:
        k = self.keys
        heads = int(config[k.heads])
        kv = config.get(k.kv_heads) if k.kv_heads else None
        head_dim = config.get(k.head_dim)
        return HeadLayout(heads, int(kv) if kv else heads, int(head_dim) if head_dim else int(config[k.hidden]) // heads)

    def mlp_width(self, config: dict) -> int:
        value = config.get(self.keys.mlp_width)
        if value is None and self.keys.mlp_width_default is not None:
            return self.keys.mlp_width_default * int(config[self.keys.hidden])
        return int(value)


_PRE_NORM = ConfigIs("do_layer_norm_before", True, default=True)

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
    front=("model.embed_tokens",),
    keys=ConfigKeys(per_layer=("layer_types",)),
    structure=Structure(
        mlp_rows=("mlp.gate_proj", "mlp.up_proj"),
        mlp_cols=("mlp.down_proj",),
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attn_out="self_attn.o_proj",
        head_dim_configurable=True,
    ),
)

# Gemma 2 and 3: post_attention_layernorm normalizes the attention output before the residual add;
# pre_feedforward_layernorm is the norm that feeds gate/up. Norm weights are stored as weight - 1.
_GEMMA = replace(
    _LLAMA,
    scale_groups=(
        _LLAMA.scale_groups[0],
        _LLAMA.scale_groups[1],
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        _LLAMA.scale_groups[3],
    ),
    norm_offset=1.0,
)

# Phi-3: q, k, v in one qkv_proj (rows q, k, v), gate and up in one gate_up_proj (rows gate, up); the
# value rows are the last third only without grouped-query attention, which needs_equal_width checks.
_PHI3 = Arch(
    layers="model.layers",
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", needs_equal_width=True, prev_rows=(2, 3)),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_rows=(1, 2)),
    ),
    front=("model.embed_tokens",),
    structure=Structure(mlp_refusal="gate and up are fused in gate_up_proj", heads_refusal="q, k and v are fused in qkv_proj"),
)

_GPT_NEOX = Arch(
    layers="gpt_neox.layers",
    linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    scale_groups=(
        ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
        ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    ),
    front=("gpt_neox.embed_in",),
    keys=ConfigKeys(kv_heads=None),
    structure=Structure(
        mlp_rows=("mlp.dense_h_to_4h",),
        mlp_cols=("mlp.dense_4h_to_h",),
        heads_refusal="q, k and v are fused in query_key_value, and transformers derives the head width from hidden_size / num_attention_heads",
    ),
)

# GPT-2: Conv1D linears (weights [in, out]); c_attn's output columns are q, k, v in equal thirds.
# GELU sits between c_fc and c_proj, so no scale passes from one to the other.
_GPT2 = Arch(
    layers="transformer.h",
    linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    scale_groups=(
        ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
        ScaleGroup("attn.c_attn", ("attn.c_proj",), "attn.c_proj", needs_equal_width=True, prev_rows=(2, 3)),
        ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
    ),
    front=("transformer.wte", "transformer.wpe"),
    keys=ConfigKeys(hidden="n_embd", layers="n_layer", heads="n_head", kv_heads=None, mlp_width="n_inner", mlp_width_default=4),
    weights_transposed=True,
    structure=Structure(
        mlp_refusal="its linears are Conv1D weights stored [in, out]",
        heads_refusal="q, k and v are fused in c_attn, and transformers derives the head width from n_embd / n_head",
    ),
)

# OPT: the norms feed q/k/v and fc1 only in pre-norm models (do_layer_norm_before; OPT-350m is
# post-norm); fc1 -> fc2 passes a scale only through ReLU. project_in (when the embedding width differs
# from the hidden width) runs in front of the layers.
_OPT = Arch(
    layers="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    scale_groups=(
        ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", requires=(_PRE_NORM,)),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", needs_equal_width=True),
        ScaleGroup("final_layer_norm", ("fc1",), requires=(_PRE_NORM,)),
        ScaleGroup("fc1", ("fc2",), requires=(ConfigIs("activation_function", "relu", default="relu"),)),
    ),
    front=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    keys=ConfigKeys(kv_heads=None, mlp_width="ffn_dim"),
    structure=Structure(
        mlp_rows=("fc1",),
        mlp_cols=("fc2",),
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attn_out="self_attn.out_proj",
        heads_refusal="transformers derives OPT's head width from hidden_size / num_attention_heads, so fewer heads would change the hidden size",
    ),
)

#: config.json ``model_type`` -> architecture facts. SmolLM is a Llama. Gemma 3's multimodal ``gemma3``
#: is not here: its checkpoints name the text layers ``language_model.model.layers.N.`` where the
#: transformers module tree has ``model.language_model.layers.N.`` (transformers renames them when it
#: loads and saves), and the layer runner loads tensors by module path.
ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": _PHI3,
    "gpt_neox": _GPT_NEOX,
    "gpt2": _GPT2,
    "opt": _OPT,
}


def known_arch(config: dict) -> Arch | None:
    """The facts for a checkpoint's config (scale groups that hold for it), or None for an unknown
    architecture."""
    arch = ARCHITECTURES.get(config.get("model_type"))
    return arch.for_config(config) if arch is not None else None


def arch_for(config: dict, where: object = None) -> Arch:
    """The facts for a checkpoint's config, or a clear error naming what is supported."""
    arch = known_arch(config)
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise WeightsmithError(
            where,
            f"architecture {config.get('model_type')!r} is not supported by layer-by-layer passes (supported: {known}); RTN works on any model",
        )
    return arch
