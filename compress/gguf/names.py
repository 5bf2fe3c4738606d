"""Hugging Face tensor names and values -> llama.cpp's GGUF tensor names and layout.

The tables are the ones :mod:`weightsmith.gguf_import` reads GGUF files with
(:data:`weightsmith.gguf_import.GGUF_ARCHS`), inverted, so import and export cannot drift apart. For
each tensor the plan says which transforms llama.cpp's ``convert_hf_to_gguf.py`` applies:

* ``permute``: q and k rows of families whose rotary embedding llama.cpp runs in the "normal"
  (interleaved) order (Llama, Mistral): within each head the two rotary halves are interleaved. It
  moves whole rows, so integer codes and per-row scales of a quantized weight move with them.
* ``norm_offset``: Gemma stores RMSNorm weights as ``w - 1``; llama.cpp wants ``w + 1``.
* ``transpose``: GPT-2's Conv1D weights are ``[in, out]``; llama.cpp wants ``[out, in]``.
* ``qkv_heads``: GPT-NeoX fuses q, k and v per head (``[head][q, k, v][dim]`` rows); llama.cpp wants
  all q rows, then all k, then all v. Again whole rows move.

GPT-NeoX is export-only (:data:`_EXPORT_ONLY`): importing its GGUF files would need the inverse
regrouping and config keys transformers does not map, so ``weightsmith convert`` does not claim it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from weightsmith.gguf_import import GGUF_ARCHS, GGUFArch

__all__ = ["EXPORT_ARCHS", "SKIPPED", "TensorRoute", "gguf_arch_of", "permute_rows", "regroup_qkv_rows", "route", "row_order"]

#: architectures written but not read back (see the module docstring)
_EXPORT_ONLY: dict[str, GGUFArch] = {
    "gptneox": GGUFArch(
        "gpt_neox",
        top={"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm", "output": "embed_out"},
        layer={
            "attn_norm": "input_layernorm",
            "attn_qkv": "attention.query_key_value",
            "attn_output": "attention.dense",
            "ffn_norm": "post_attention_layernorm",
            "ffn_up": "mlp.dense_h_to_4h",
            "ffn_down": "mlp.dense_4h_to_h",
        },
        layers_prefix="gpt_neox.layers",
    ),
}


#: config.json ``model_type`` -> the GGUF architecture llama.cpp runs it as. llama.cpp writes Mistral
#: as ``llama``; Gemma 3's text model is ``gemma3``.
EXPORT_ARCHS: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gptneox",
}


#: checkpoint tensors that are buffers the runtime recomputes (GPT-2's causal mask, rotary frequencies):
#: llama.cpp's converter drops them too
SKIPPED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

#: GGUF architecture -> module names some checkpoints use for a module the table names otherwise
#: (transformers 5 saves GPT-NeoX's head as ``lm_head`` where Pythia's checkpoints say ``embed_out``)
_ALIASES = {"gptneox": {"lm_head": "embed_out"}}

#: GGUF architecture -> the prefix that checkpoints saved from the bare model lack (GPT-2 checkpoints on
#: the Hub name their blocks ``h.0.`` where transformers writes ``transformer.h.0.``)
_BARE_PREFIX = {"gpt2": "transformer."}


@dataclass(frozen=True)
class TensorRoute:
    """Where one Hugging Face tensor goes: its GGUF name, its leaf (``attn_q``, ``ffn_down``,
    ``token_embd``...), its block index (None outside the blocks) and the transforms it needs."""

    gguf_name: str
    leaf: str
    block: int | None
    #: query or key heads to interleave the rotary halves of (0: no permutation)
    permute_heads: int = 0
    #: heads of a per-head fused q/k/v to regroup as all q, all k, all v (0: none)
    qkv_heads: int = 0
    norm_offset: float = 0.0
    transpose: bool = False


def gguf_arch_of(model_type: str | None) -> tuple[str, GGUFArch] | None:
    """``(GGUF architecture name, its table)`` for a config's ``model_type``; None when llama.cpp export
    is not supported for it."""
    name = EXPORT_ARCHS.get(model_type or "")
    if name is None:
        return None
    return name, _table(name)


def _table(gguf_arch: str) -> GGUFArch:
    return _EXPORT_ONLY.get(gguf_arch) or GGUF_ARCHS[gguf_arch]


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {hf: gguf for gguf, hf in table.items()}


def route(hf_name: str, gguf_arch: str, heads: Mapping[str, int]) -> TensorRoute | None:
    """The route of tensor ``hf_name`` (``model.layers.3.self_attn.q_proj.weight``), or None for a
    tensor llama.cpp has no place for. ``heads`` gives the query and key/value head counts
    (``{"attn_q": 9, "attn_k": 3}``) for the rotary permutation."""
    arch = _table(gguf_arch)
    bare = _BARE_PREFIX.get(gguf_arch)
    if bare and not hf_name.startswith(bare) and hf_name != "lm_head.weight":
        hf_name = bare + hf_name
    module, dot, suffix = hf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    module = _ALIASES.get(gguf_arch, {}).get(module, module)
    top = _inverse(arch.top)
    if module in top:
        leaf = top[module]
        return TensorRoute(f"{leaf}.{suffix}", leaf, None, norm_offset=_offset(arch, leaf, suffix))
    head = f"{arch.layers_prefix}."
    if not module.startswith(head):
        return None
    index, _, rest = module[len(head) :].partition(".")
    leaf = _inverse(arch.layer).get(rest)
    if not index.isdigit() or leaf is None:
        return None
    return TensorRoute(
        f"blk.{int(index)}.{leaf}.{suffix}",
        leaf,
        int(index),
        permute_heads=int(heads.get(leaf, 0)) if arch.permute_qk else 0,
        qkv_heads=int(heads.get("attn_q", 0)) if gguf_arch in _QKV_BY_HEAD and leaf == "attn_qkv" else 0,
        norm_offset=_offset(arch, leaf, suffix),
        transpose=leaf in arch.transpose and suffix == "weight",
    )


#: architectures whose checkpoints fuse q/k/v per head
_QKV_BY_HEAD = ("gptneox",)


def row_order(r: TensorRoute, rows: int) -> list[int] | None:
    """The source row of each row llama.cpp stores, or None when the rows stay as they are."""
    if r.permute_heads:
        return permute_rows(rows, r.permute_heads)
    if r.qkv_heads:
        return regroup_qkv_rows(rows, r.qkv_heads)
    return None


def regroup_qkv_rows(rows: int, heads: int) -> list[int]:
    """Rows ``[head][q, k, v][dim]`` -> all q rows, all k rows, all v rows (head order kept)."""
    if heads <= 0 or rows % (3 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of q, k and v")
    dim = rows // heads // 3
    return [h * 3 * dim + part * dim + i for part in range(3) for h in range(heads) for i in range(dim)]


def _offset(arch: GGUFArch, leaf: str, suffix: str) -> float:
    return arch.norm_offset if leaf.endswith("norm") and suffix == "weight" else 0.0


def permute_rows(rows: int, heads: int) -> list[int]:
    """The source row of every output row when llama.cpp interleaves the rotary halves of ``heads``
    heads (the inverse of :func:`weightsmith.gguf_import.unpermute_rows`): within a head of width
    ``2h``, output row ``2i`` is source row ``i`` and output row ``2i + 1`` is source row ``h + i``."""
    if heads <= 0 or rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of two rotary halves")
    half = rows // heads // 2
    order: list[int] = []
    for h in range(heads):
        base = h * 2 * half
        for i in range(half):
            order += [base + i, base + half + i]
    return order
