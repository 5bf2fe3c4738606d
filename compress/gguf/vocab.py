"""A checkpoint folder's tokenizer as GGUF metadata (``tokenizer.ggml.*``), so llama.cpp needs nothing else.

Read from ``tokenizer.json`` (the ``tokenizers`` serialization transformers writes), without building
a tokenizer: the vocabulary by id (holes filled with ``[PAD<id>]`` tokens of type *unused*, as
llama.cpp's converter does), the BPE merges as ``"left right"`` strings, token types (special added
tokens are *control*, other added tokens *user-defined*), the special-token ids (from
``tokenizer_config.json``'s token strings, else config.json's ids), whether BOS/EOS are added (the
post-processor's template, else the config flags), and the chat template.

llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name
(``tokenizer.ggml.pre``). The name is found from the pre-tokenizer's structure in
:data:`PRE_TOKENIZERS`; an unknown structure is written as ``default`` with a warning (llama.cpp then
splits with its default regex, which may tokenize some text differently).

Only byte-level BPE vocabularies (``tokenizer.ggml.model = gpt2``: GPT-2, Llama 3, Qwen, SmolLM,
Mistral's Tekken) are written; sentencepiece vocabularies stop with a clear error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.errors import WeightsmithError

log = logging.getLogger(__name__)

__all__ = ["PRE_TOKENIZERS", "TokenType", "Vocab", "pre_tokenizer_name", "read_vocab"]


class TokenType:
    """llama.cpp's token types (``llama_token_type``)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

#: pre-tokenizer structure (see :func:`_signature`) -> llama.cpp's ``tokenizer.ggml.pre`` name.
PRE_TOKENIZERS: dict[tuple[tuple[str, str], ...], str] = {
    (("ByteLevel", "regex"),): "gpt-2",
    (("Digits", "individual"), ("ByteLevel", "regex")): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", "")): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", "")): "qwen2",
}


def _signature(pre: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """The parts of a ``tokenizers`` pre-tokenizer that decide how text is split: each step's type
    and its pattern (a Split's regex, Digits' individual flag, ByteLevel's own regex or none)."""
    if not pre:
        return ()
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    out = []
    for step in steps or []:
        kind = str(step.get("type"))
        if kind == "Split":
            pattern = step.get("pattern") or {}
            detail = str(pattern.get("Regex", pattern.get("String", "")))
        elif kind == "Digits":
            detail = "individual" if step.get("individual_digits") else "grouped"
        elif kind == "ByteLevel":
            detail = "regex" if step.get("use_regex", True) else ""
        else:
            detail = json.dumps(step, sort_keys=True)
        out.append((kind, detail))
    return tuple(out)


def pre_tokenizer_name(tokenizer: Mapping[str, Any]) -> str | None:
    """llama.cpp's name of this tokenizer's pre-tokenizer, None when the structure is unknown."""
    return PRE_TOKENIZERS.get(_signature(tokenizer.get("pre_tokenizer")))


@dataclass
class Vocab:
    """The tokenizer metadata of one checkpoint."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def items(self) -> list[tuple[str, str, Any]]:
        """``(key, kind, value)`` in the order llama.cpp's converter writes them."""
        out: list[tuple[str, str, Any]] = [
            ("tokenizer.ggml.model", "str", self.model),
            ("tokenizer.ggml.pre", "str", self.pre),
            ("tokenizer.ggml.tokens", "str[]", self.tokens),
            ("tokenizer.ggml.token_type", "i32[]", self.token_types),
            ("tokenizer.ggml.merges", "str[]", self.merges),
        ]
        for key in ("bos", "eos", "unknown", "padding"):
            if key in self.special_ids:
                out.append((f"tokenizer.ggml.{key}_token_id", "u32", self.special_ids[key]))
        out.append(("tokenizer.ggml.add_bos_token", "bool", self.add_bos))
        out.append(("tokenizer.ggml.add_eos_token", "bool", self.add_eos))
        if self.chat_template:
            out.append(("tokenizer.chat_template", "str", self.chat_template))
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsmithError(path, f"unreadable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise WeightsmithError(path, "expected a JSON object")
    return doc


def _template_adds(post: Mapping[str, Any] | None) -> tuple[bool | None, bool | None]:
    """Whether the post-processor puts a special token before / after a single sequence (None: it
    does not say)."""
    if not post:
        return None, None
    if post.get("type") == "Sequence":
        found = [_template_adds(p) for p in post.get("processors") or []]
        bos = next((b for b, _ in found if b is not None), None)
        eos = next((e for _, e in found if e is not None), None)
        return bos, eos
    if post.get("type") != "TemplateProcessing":
        return None, None
    single = post.get("single") or []
    return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]


def read_vocab(folder: Path, config: Mapping[str, Any]) -> Vocab:
    """The tokenizer of checkpoint ``folder`` as GGUF metadata."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise WeightsmithError(folder, "no tokenizer.json: GGUF export writes the tokenizer into the file and needs the fast tokenizer's tokenizer.json")
    doc = _read_json(path)
    model = doc.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if model.get("type") != "BPE" else "BPE with byte fallback (sentencepiece style)"
        raise WeightsmithError(path, f"tokenizer model {kind} is not supported for GGUF export (only byte-level BPE)")
    vocab: dict[str, int] = model.get("vocab") or {}
    added = [t for t in doc.get("added_tokens") or [] if isinstance(t, dict)]
    by_id: dict[int, tuple[str, int]] = {int(i): (t, TokenType.NORMAL) for t, i in vocab.items()}
    for t in added:
        by_id[int(t["id"])] = (str(t["content"]), TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    size = max(int(config.get("vocab_size") or 0), max(by_id, default=-1) + 1)
    tokens, types = [], []
    for i in range(size):
        token, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(token)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    tok_config_path = folder / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    index = {t: i for i, t in enumerate(tokens)}
    special: dict[str, int] = {}
    for key, name, id_key in (("bos", "bos_token", "bos_token_id"), ("eos", "eos_token", "eos_token_id"), ("unknown", "unk_token", "unk_token_id"), ("padding", "pad_token", "pad_token_id")):
        value = tok_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in index:
            special[key] = index[value]
        elif isinstance(config.get(id_key), int) and 0 <= config[id_key] < size:
            special[key] = int(config[id_key])

    bos, eos = _template_adds(doc.get("post_processor"))
    add_bos = bool(tok_config.get("add_bos_token", False)) if bos is None else bos
    add_eos = bool(tok_config.get("add_eos_token", False)) if eos is None else eos

    template = None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    elif isinstance(tok_config.get("chat_template"), str):
        template = tok_config["chat_template"]

    pre = pre_tokenizer_name(doc)
    if pre is None:
        log.warning("%s: pre-tokenizer %s has no llama.cpp name here; written as 'default' (llama.cpp may split some text differently)", path, _signature(doc.get("pre_tokenizer")))
        pre = "default"
    return Vocab("gpt2", pre, tokens, types, merges, special, add_bos, add_eos, template)
