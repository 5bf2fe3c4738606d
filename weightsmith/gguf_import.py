"""GGUF file -> safetensors checkpoint folder, tensor by tensor, so that GGUF models can enter every pass.

Tensors are read one at a time from the memory-mapped file (:class:`weightsmith.gguf_read.GGUFFile`),
dequantized to float32 with the ``gguf`` package, turned back into the Hugging Face layout (names,
and the value transforms llama.cpp's ``convert_hf_to_gguf.py`` applied, undone), cast to the asked
dtype and written: peak memory is about one tensor. How llama.cpp wrote each architecture is data
(:data:`GGUF_ARCHS`). config.json comes from the GGUF metadata through transformers' table of
llama.cpp keys (``transformers.integrations.ggml.GGUF_CONFIG_MAPPING``), the tokenizer files from
:mod:`weightsmith.gguf_vocab`.

Architectures transformers reads from GGUF but :data:`GGUF_ARCHS` does not describe are converted
through transformers' loader (the whole model in float32), as a slower path.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weightsmith.checkpoint import CheckpointWriter
from weightsmith.errors import WeightsmithError
from weightsmith.gguf_read import GGUFFile
from weightsmith.provenance import Record

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = ["GGUF_ARCHS", "GGUFArch", "convert_gguf", "hf_config", "hf_name", "unpermute_rows"]

#: Tensors outside the decoder blocks: GGUF name -> Hugging Face module path.
_DECODER_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
#: Tensors of block N (``blk.N.<leaf>``): GGUF leaf -> module path under ``model.layers.N``.
_DECODER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp's converter wrote one architecture, so that it can be undone.

    ``permute_qk``: llama.cpp reorders the rows of q and k within each head (interleaved rotary
    halves, ``LlamaModel.permute``) for the models its "normal" rotary runs; the inverse is applied.
    ``norm_offset``: llama.cpp stored norm weights as ``w + offset`` (Gemma's ``1 + w``).
    ``ignore``: tensors llama.cpp adds that the Hugging Face model computes itself.
    ``config``: metadata keys (after ``<arch>.``) -> config.json keys, beyond transformers' table.
    ``transpose``: leaves whose weight Hugging Face stores as (in, out) (GPT-2's ``Conv1D``) and
    llama.cpp as (out, in).
    """

    model_type: str
    top: Mapping[str, str] = field(default_factory=lambda: _DECODER_TOP)
    layer: Mapping[str, str] = field(default_factory=lambda: _DECODER_LAYER)
    layers_prefix: str = "model.layers"
    permute_qk: bool = False
    norm_offset: float = 0.0
    ignore: tuple[str, ...] = ("rope_freqs",)
    config: Mapping[str, str] = field(default_factory=dict)
    transpose: tuple[str, ...] = ()


#: Gemma 2/3: a norm before and after both attention and MLP.
_GEMMA_LAYER = {
    **_DECODER_LAYER,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
#: Phi-3: q/k/v and gate/up fused in one linear each, as in the Hugging Face checkpoint.
_PHI3_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}

#: GPT-2: learned positions, biased LayerNorms and linears, fused qkv.
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f", "output": "lm_head"}
_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}

#: GGUF ``general.architecture`` -> how to read it. llama.cpp writes Mistral (7B, Nemo) as ``llama``
#: (the metadata has no sliding window), which converts to a Llama checkpoint of the same weights,
#: as transformers' loader does.
GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2"),
    # the head width is not hidden / heads in Qwen3 (e.g. 0.6B: 1024 / 16 heads of 128)
    "qwen3": GGUFArch("qwen3", config={"attention.key_length": "head_dim"}),
    "gemma2": GGUFArch("gemma2", layer=_GEMMA_LAYER, norm_offset=1.0),
    "gemma3": GGUFArch("gemma3_text", layer=_GEMMA_LAYER, norm_offset=1.0),
    # the long-context rotary factors are config in Hugging Face's Phi-3, not tensors
    "phi3": GGUFArch("phi3", layer=_PHI3_LAYER, ignore=("rope_freqs", "rope_factors_long", "rope_factors_short")),
    # transformers' table files the context length as n_ctx and the MLP width under a key GPT-2
    # does not read; the position table and MLP are sized by n_positions and n_inner
    "gpt2": GGUFArch(
        "gpt2",
        top=_GPT2_TOP,
        layer=_GPT2_LAYER,
        layers_prefix="transformer.h",
        config={"context_length": "n_positions", "feed_forward_length": "n_inner"},
        transpose=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
    ),
}

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _arch_of(gguf: GGUFFile) -> tuple[str, str]:
    """``(GGUF architecture, the name transformers' config table files it under)``."""
    arch = gguf.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise WeightsmithError(gguf.path, "no general.architecture in the metadata")
    return arch, arch


def hf_name(gguf_name: str, arch: GGUFArch) -> tuple[str, str] | None:
    """``(Hugging Face tensor name, GGUF leaf)`` of a GGUF tensor name, ``None`` for an ignored one;
    KeyError for a name the table does not know."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        stem, suffix = gguf_name, ""
    tail = f".{suffix}" if suffix else ""
    block = _BLOCK.fullmatch(stem)
    leaf = block.group(2) if block else stem
    if leaf in arch.ignore:
        return None
    if block:
        return f"{arch.layers_prefix}.{block.group(1)}.{arch.layer[leaf]}{tail}", leaf
    return f"{arch.top[leaf]}{tail}", leaf


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order of a q or k projection (weight or bias): within each of
    ``heads`` heads, llama.cpp interleaves the two rotary halves; rows go back to half, half."""
    rows = weight.shape[0]
    if heads <= 0 or rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of two rotary halves")
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _mapped(gguf: GGUFFile, arch: GGUFArch, gguf_name: str) -> tuple[str, str] | None:
    try:
        return hf_name(gguf_name, arch)
    except KeyError:
        raise WeightsmithError(gguf.path, f"tensor {gguf_name!r} has no Hugging Face counterpart for architecture {arch.model_type}") from None


def hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The config dict transformers builds from this file's metadata (its table of llama.cpp keys),
    with ``tie_word_embeddings`` from whether an ``output.weight`` is stored."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch, name = _arch_of(gguf)
    sections = {name: {**GGUF_CONFIG_MAPPING[name], **GGUF_ARCHS[name].config}, "general": GGUF_CONFIG_MAPPING["general"], "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"]}
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in gguf.tensors}
    for key, value in gguf.metadata.items():
        prefix, _, rest = key.partition(".")
        section = sections.get(name if prefix == arch else prefix)
        target = section.get(rest) if section else None
        if target is None or target == -1:
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, name)
        config[target] = value
    config["model_type"] = GGUF_ARCHS[name].model_type
    if "vocab_size" not in config and isinstance(gguf.metadata.get("tokenizer.ggml.tokens"), list):
        config["vocab_size"] = len(gguf.metadata["tokenizer.ggml.tokens"])
    return config


def convert_gguf(
    gguf_path: str | Path,
    dest: str | Path,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: int | None = None,
) -> Path:
    """Convert ``gguf_path`` into the checkpoint folder ``dest`` (weights cast to ``dtype``,
    default bfloat16), one tensor at a time."""
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    gguf_path = Path(gguf_path)
    gguf = GGUFFile(gguf_path)
    arch, name = _arch_of(gguf)
    if name not in GGUF_ARCHS:
        return _convert_with_transformers(gguf_path, arch, dest, dtype=dtype, force=force, max_shard_size=max_shard_size)

    from weightsmith.gguf_vocab import write_tokenizer

    record = Record("convert", {"source": gguf_path.name, "dtype": str(dtype).removeprefix("torch.")})
    record.add_input(gguf_path.parent, [gguf_path], None)
    writer_args = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with tempfile.TemporaryDirectory(prefix="weightsmith-gguf-") as side:
        side_dir = Path(side)
        config, expected, model_class = _config_and_names(gguf, side_dir, dtype)
        write_tokenizer(gguf, side_dir)
        config_doc = json.loads((side_dir / "config.json").read_text())
        config_doc["architectures"] = [model_class]
        found = _check_names(gguf, config, expected)
        with CheckpointWriter(dest, force=force, source=side_dir, config=config_doc, record=record, **writer_args) as writer:
            # the Hugging Face model's own order, so that the file matches what transformers writes
            for hf, (gguf_name, shape) in ((n, found[n]) for n in expected if n in found):
                values = _one_tensor(gguf, config, gguf_name)
                if tuple(values.shape) != shape:
                    raise WeightsmithError(gguf_path, f"tensor {gguf_name!r} has shape {tuple(values.shape)}, the model expects {shape} for {hf}")
                if not values.flags.writeable or not values.flags.c_contiguous:  # a view of the mapped file
                    values = np.array(values, dtype=np.float32, order="C")
                writer.add(hf, torch.from_numpy(values).to(dtype))
                del values
    log.info("converted %s -> %s", gguf_path, dest)
    return Path(dest)


def _one_tensor(gguf: GGUFFile, config: Mapping[str, Any], gguf_name: str) -> np.ndarray:
    """The float32 values of GGUF tensor ``gguf_name`` in the Hugging Face layout: dequantized, q/k
    rows in Hugging Face's rotary order, norm offsets removed."""
    _, name = _arch_of(gguf)
    arch = GGUF_ARCHS[name]
    leaf = (_mapped(gguf, arch, gguf_name) or ("", ""))[1]
    values = gguf.dequantize(gguf_name)
    heads = {"attn_q": config.get("num_attention_heads"), "attn_k": config.get("num_key_value_heads")}
    if arch.permute_qk and leaf in heads:
        try:
            values = unpermute_rows(values, int(heads[leaf]))
        except (TypeError, ValueError) as exc:
            raise WeightsmithError(gguf.path, f"tensor {gguf_name!r}: {exc}") from None
    if arch.norm_offset and leaf.endswith("norm"):
        values = values - np.float32(arch.norm_offset)
    if leaf in arch.transpose and values.ndim == 2:
        values = np.ascontiguousarray(values.T)
    return values


def _config_and_names(gguf: GGUFFile, side_dir: Path, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], str]:
    """Write config.json into ``side_dir``; return the config dict, the model's tensor names and
    shapes in its state-dict order (from a model built on the meta device: no memory) and the
    model's class name."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_dict = hf_config(gguf)
    try:
        config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - config classes check their values with many kinds of errors
        raise WeightsmithError(gguf.path, f"cannot build a model config from the metadata: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    config.dtype = dtype
    config.save_pretrained(side_dir)
    names = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        names.pop("lm_head.weight", None)
    return config_dict, names, type(model).__name__


def _check_names(gguf: GGUFFile, config: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF name -> (GGUF name, expected shape) for every stored tensor; an error for a GGUF tensor the
    model has no place for and for a model tensor the file lacks."""
    _, name = _arch_of(gguf)
    arch = GGUF_ARCHS[name]
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for gguf_name in gguf.tensors:
        target = _mapped(gguf, arch, gguf_name)
        if target is None:
            continue
        hf = target[0]
        if hf not in expected:
            raise WeightsmithError(gguf.path, f"tensor {gguf_name!r} ({hf}) is not part of a {arch.model_type} model with this config")
        found[hf] = (gguf_name, expected[hf])
    missing = [n for n in expected if n not in found]
    if missing:
        raise WeightsmithError(gguf.path, f"no tensor for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return found


def _convert_with_transformers(
    gguf_path: Path, arch: str, dest: str | Path, *, dtype: torch.dtype, force: bool, max_shard_size: int | None
) -> Path:
    """The slower path for architectures :data:`GGUF_ARCHS` does not describe: transformers builds
    the whole model in float32 from the file; the weights are then written in ``dtype``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = sorted(set(GGUF_ARCHS) | set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
        raise WeightsmithError(gguf_path, f"GGUF architecture {arch!r} is not supported (supported: {', '.join(supported)})")
    log.warning("%s: architecture %s is converted through transformers (whole model in float32)", gguf_path, arch)
    folder, name = gguf_path.parent, gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - the GGUF parser raises many kinds of errors
        raise WeightsmithError(gguf_path, f"cannot read as a GGUF model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    record = Record("convert", {"source": gguf_path.name, "dtype": str(dtype).removeprefix("torch.")})
    record.add_input(gguf_path.parent, [gguf_path], None)
    writer_args = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with tempfile.TemporaryDirectory(prefix="weightsmith-gguf-") as side:
        side_dir = Path(side)
        config.dtype = dtype
        config.save_pretrained(side_dir)
        tokenizer.save_pretrained(side_dir)
        config_doc = json.loads((side_dir / "config.json").read_text())
        config_doc["architectures"] = [type(model).__name__]
        with CheckpointWriter(dest, force=force, source=side_dir, config=config_doc, record=record, **writer_args) as writer:
            for tensor_name, tensor in state.items():
                writer.add(tensor_name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    return Path(dest)
