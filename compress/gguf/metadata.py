"""config.json -> the GGUF hyper-parameter keys llama.cpp reads (``<arch>.block_count`` ...), as data.

Each exported family lists its keys as :class:`HParam` rows: the GGUF key (after ``<arch>.``), the
config.json keys it may come from (first present wins), the value type and an optional fallback
computed from the config. Rotary scaling (``rope_parameters`` or the older ``rope_scaling``) is read
once by :func:`rope_settings`; Llama 3's frequency-dependent scaling is not a key but a tensor
(``rope_freqs.weight``, :func:`llama3_rope_factors`), as llama.cpp's converter writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from weightsmith.errors import WeightsmithError

__all__ = ["FAMILY_HPARAMS", "HParam", "RopeSettings", "hparams", "llama3_rope_factors", "longrope_attn_factor", "rope_settings"]

ValueType = Literal["u32", "f32", "bool", "str", "bool[]"]


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


@dataclass(frozen=True)
class HParam:
    """One metadata key: ``<arch>.<key>`` from the first config key present in ``sources``, else from
    ``fallback(config)``; ``required`` keys missing from both stop the export."""

    key: str
    sources: tuple[str, ...]
    kind: ValueType
    fallback: Callable[[Mapping[str, Any]], Any] | None = None
    required: bool = True


_LLAMA_HPARAMS: tuple[HParam, ...] = (
    HParam("context_length", ("max_position_embeddings",), "u32"),
    HParam("embedding_length", ("hidden_size",), "u32"),
    HParam("block_count", ("num_hidden_layers",), "u32"),
    HParam("feed_forward_length", ("intermediate_size",), "u32"),
    HParam("attention.head_count", ("num_attention_heads",), "u32"),
    HParam("attention.head_count_kv", ("num_key_value_heads",), "u32", fallback=lambda c: c["num_attention_heads"]),
    HParam("attention.layer_norm_rms_epsilon", ("rms_norm_eps",), "f32"),
    # the head width is given explicitly: pruned heads and Qwen3 have head_dim != hidden / heads
    HParam("attention.key_length", (), "u32", fallback=_head_dim),
    HParam("attention.value_length", (), "u32", fallback=_head_dim),
    HParam("rope.dimension_count", (), "u32", fallback=lambda c: int(_head_dim(c) * float(c.get("partial_rotary_factor", 1.0)))),
    HParam("vocab_size", ("vocab_size",), "u32"),
)

# Gemma 2: no rotary base key (llama.cpp's converter writes none; both default to 10000), soft-capping
# of attention logits and final logits, the sliding window of its alternate local layers
_GEMMA2_HPARAMS: tuple[HParam, ...] = (
    *(p for p in _LLAMA_HPARAMS if p.key not in ("rope.dimension_count", "vocab_size")),
    HParam("attn_logit_softcapping", ("attn_logit_softcapping",), "f32", required=False),
    HParam("final_logit_softcapping", ("final_logit_softcapping",), "f32", required=False),
    HParam("attention.sliding_window", ("sliding_window",), "u32", required=False),
)

# Phi-3: fused q/k/v and gate/up, partial rotary width, the original context of its long-context
# rotary scaling, a sliding window (0 for none, as llama.cpp's converter writes for Phi-4)
_PHI3_HPARAMS: tuple[HParam, ...] = (
    HParam("context_length", ("max_position_embeddings",), "u32"),
    HParam("rope.scaling.original_context_length", ("original_max_position_embeddings", "max_position_embeddings"), "u32"),
    HParam("embedding_length", ("hidden_size",), "u32"),
    HParam("feed_forward_length", ("intermediate_size",), "u32"),
    HParam("block_count", ("num_hidden_layers",), "u32"),
    HParam("attention.head_count", ("num_attention_heads",), "u32"),
    HParam("attention.head_count_kv", ("num_key_value_heads",), "u32", fallback=lambda c: c["num_attention_heads"]),
    HParam("attention.layer_norm_rms_epsilon", ("rms_norm_eps",), "f32"),
    HParam("rope.dimension_count", (), "u32", fallback=lambda c: int(float(c.get("partial_rotary_factor", 1.0)) * int(c["hidden_size"])) // int(c["num_attention_heads"])),
    HParam("attention.sliding_window", ("sliding_window",), "u32", fallback=lambda c: 0),
)

def _neox_rotary(c: Mapping[str, Any]) -> int:
    share = c.get("rotary_pct") or (c.get("rope_parameters") or {}).get("partial_rotary_factor") or c.get("partial_rotary_factor") or 1.0
    return int(float(share) * (int(c["hidden_size"]) // int(c["num_attention_heads"])))


_GPTNEOX_HPARAMS: tuple[HParam, ...] = (
    HParam("context_length", ("max_position_embeddings",), "u32"),
    HParam("embedding_length", ("hidden_size",), "u32"),
    HParam("block_count", ("num_hidden_layers",), "u32"),
    HParam("feed_forward_length", ("intermediate_size",), "u32"),
    HParam("rope.dimension_count", (), "u32", fallback=_neox_rotary),
    HParam("attention.head_count", ("num_attention_heads",), "u32"),
    HParam("use_parallel_residual", ("use_parallel_residual",), "bool", fallback=lambda c: True),
    HParam("attention.layer_norm_epsilon", ("layer_norm_eps",), "f32"),
)

_GPT2_HPARAMS: tuple[HParam, ...] = (
    HParam("context_length", ("n_positions", "n_ctx"), "u32"),
    HParam("embedding_length", ("n_embd",), "u32"),
    HParam("block_count", ("n_layer",), "u32"),
    HParam("feed_forward_length", ("n_inner",), "u32", fallback=lambda c: 4 * int(c["n_embd"])),
    HParam("attention.head_count", ("n_head",), "u32"),
    HParam("attention.layer_norm_epsilon", ("layer_norm_epsilon",), "f32"),
    HParam("vocab_size", ("vocab_size",), "u32"),
)

# Gemma 3: the rotary base of the global layers as the main key and that of the sliding-window
# layers as ``rope.freq_base_swa``; which layers slide, one bool per layer (llama.cpp otherwise
# assumes its default of five sliding layers to one global)
_GEMMA3_HPARAMS: tuple[HParam, ...] = (
    *(p for p in _LLAMA_HPARAMS if p.key not in ("rope.dimension_count", "vocab_size")),
    HParam("final_logit_softcapping", ("final_logit_softcapping",), "f32", required=False),
    HParam("attention.sliding_window", ("sliding_window",), "u32", required=False),
    HParam(
        "attention.sliding_window_pattern", (), "bool[]", required=False,
        fallback=lambda c: [t == "sliding_attention" for t in c["layer_types"]] if c.get("layer_types") else None,
    ),
    HParam(
        "rope.freq_base_swa", (), "f32", required=False,
        fallback=lambda c: (c.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta") or c.get("rope_local_base_freq"),
    ),
)

#: GGUF architecture -> its hyper-parameter keys, and whether it has rotary embeddings.
FAMILY_HPARAMS: dict[str, tuple[tuple[HParam, ...], bool]] = {
    "llama": (_LLAMA_HPARAMS, True),
    "qwen2": (_LLAMA_HPARAMS, True),
    "qwen3": (_LLAMA_HPARAMS, True),
    "gemma2": (_GEMMA2_HPARAMS, False),
    "gemma3": (_GEMMA3_HPARAMS, True),
    "phi3": (_PHI3_HPARAMS, True),
    "gptneox": (_GPTNEOX_HPARAMS, True),
    "gpt2": (_GPT2_HPARAMS, False),
}


@dataclass(frozen=True)
class RopeSettings:
    """Rotary settings of a config: base frequency and scaling (``kind`` none, linear, yarn, llama3 or
    longrope; longrope's per-frequency factors in ``long`` and ``short``)."""

    theta: float
    kind: str = "none"
    factor: float = 1.0
    original_context: int | None = None
    extra: Mapping[str, float] = field(default_factory=dict)
    long: tuple[float, ...] = ()
    short: tuple[float, ...] = ()


def rope_settings(config: Mapping[str, Any], where: object = None) -> RopeSettings:
    """The rotary base and scaling of ``config`` (transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling``)."""
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per layer type (Gemma 3): the global layers' settings
    scaling = config.get("rope_scaling") or {}
    merged = {**scaling, **params} if isinstance(params, dict) and isinstance(scaling, dict) else {}
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return RopeSettings(float(theta))
    if kind == "su":
        kind = "longrope"
    if kind not in ("linear", "yarn", "llama3", "longrope"):
        raise WeightsmithError(where, f"rotary scaling {kind!r} has no GGUF equivalent here (supported: linear, yarn, llama3, longrope)")
    original = merged.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if kind == "longrope":
        long, short = merged.get("long_factor") or [], merged.get("short_factor") or []
        if not long or len(long) != len(short):
            raise WeightsmithError(where, "longrope scaling needs long_factor and short_factor lists of one length")
        return RopeSettings(float(theta), kind, 1.0, int(original) if original else None, long=tuple(map(float, long)), short=tuple(map(float, short)))
    extra = {k: float(merged[k]) for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow") if k in merged}
    return RopeSettings(float(theta), kind, float(merged.get("factor", 1.0)), int(original) if original else None, extra)


def llama3_rope_factors(head_dim: int, rope: RopeSettings) -> list[float]:
    """Llama 3's per-frequency rotary divisors (``rope_freqs.weight``, one per rotary pair): high
    frequencies keep 1, low frequencies are divided by ``factor``, the band between blends the two
    (https://github.com/meta-llama/llama-models, ``apply_scaling``)."""
    low = rope.extra.get("low_freq_factor", 1.0)
    high = rope.extra.get("high_freq_factor", 4.0)
    old_context = rope.original_context or 8192
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / rope.theta ** (i / head_dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope.factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / rope.factor + smooth))
    return factors


def hparams(gguf_arch: str, config: Mapping[str, Any], where: object = None) -> list[tuple[str, ValueType, Any]]:
    """``(key, type, value)`` for every hyper-parameter of ``config`` llama.cpp reads for ``gguf_arch``."""
    table, has_rope = FAMILY_HPARAMS[gguf_arch]
    out: list[tuple[str, ValueType, Any]] = []
    for p in table:
        value = next((config[s] for s in p.sources if config.get(s) is not None), None)
        if value is None and p.fallback is not None:
            try:
                value = p.fallback(config)
            except (KeyError, TypeError, ValueError):
                value = None
        if value is None:
            if p.required:
                raise WeightsmithError(where, f"config.json has no {' or '.join(p.sources) or p.key} (needed for {gguf_arch}.{p.key})")
            continue
        out.append((f"{gguf_arch}.{p.key}", p.kind, value))
    if has_rope:
        rope = rope_settings(config, where)
        out.append((f"{gguf_arch}.rope.freq_base", "f32", rope.theta))
        if rope.kind in ("linear", "yarn"):
            out.append((f"{gguf_arch}.rope.scaling.type", "str", rope.kind))
            out.append((f"{gguf_arch}.rope.scaling.factor", "f32", rope.factor))
            if rope.original_context:
                out.append((f"{gguf_arch}.rope.scaling.original_context_length", "u32", rope.original_context))
        if rope.kind == "longrope":
            out.append((f"{gguf_arch}.rope.scaling.attn_factor", "f32", longrope_attn_factor(config, rope)))
    return out


def longrope_attn_factor(config: Mapping[str, Any], rope: RopeSettings) -> float:
    """Phi-3's attention factor for its long-context rotary scaling: ``sqrt(1 + ln(s) / ln(original))``
    for the context scale ``s`` (https://arxiv.org/abs/2402.13753), 1 without extension."""
    original = rope.original_context or int(config["max_position_embeddings"])
    scale = int(config["max_position_embeddings"]) / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
