"""The tokenizer of a GGUF file, rebuilt from its metadata as Hugging Face tokenizer files.

A GGUF carries its tokenizer as metadata under llama.cpp's keys (``tokenizer.ggml.model``, ``.tokens``,
``.merges``, ``.scores``, ``.token_type``, the special token ids, ``.add_bos_token`` /
``.add_eos_token``, ``tokenizer.chat_template``). transformers knows how to turn those into a
``tokenizers`` object (``transformers.integrations.gguf``: byte-level BPE, sentencepiece BPE, unigram,
with each family's pre-tokenizer), but its ``AutoTokenizer`` path first parses the whole file's
metadata again with the ``gguf`` package's per-element reader. Here the metadata comes from
:class:`weightsmith.gguf_read.GGUFFile` (arrays parsed in bulk) and only transformers' builders run.

BOS/EOS: transformers keeps whether a tokenizer adds BOS/EOS in ``tokenizer.json``'s post-processor
(it drops ``add_bos_token`` from ``tokenizer_config.json`` when it saves, and ignores it when a
``tokenizer.json`` is present on load), so the post-processor is built from the GGUF's flags; the
flags are also written to ``tokenizer_config.json`` so that the file says what the template does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith.errors import WeightsmithError
from weightsmith.gguf_read import GGUFFile

log = logging.getLogger(__name__)

#: GGUF ``tokenizer.ggml.<key>`` -> the name transformers' GGUF tokenizer builders read it under.
TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}
#: special token name -> GGUF ``tokenizer.ggml.<key>`` holding its id
SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
#: ``tokenizer.ggml.model`` -> whether BOS is added when the file does not say (llama.cpp adds BOS
#: to sentencepiece vocabularies by default) and whether the file's flag is overridden (Gemma 4's
#: chat template writes ``<bos>`` itself, so its reference tokenizer adds none).
ADD_BOS_DEFAULT = {"llama": True}
ADD_BOS_FORCED = {"gemma4": False}
#: Sentencepiece vocabularies of these architectures list no merges and their scores do not follow the
#: merge order: transformers ranks merges by position in the file instead, after spelling tokens made
#: only of spaces with "\u2581" (``transformers.integrations.gguf.gguf_tokenizer_mapping.gemma_tokenizer``).
MERGES_BY_POSITION = ("gemma", "gemma2", "gemma3")


def tokenizer_spec(gguf: GGUFFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tokenizer_dict, tokenizer_config)`` in the form transformers' GGUF builders take: the
    vocabulary and merges as lists, numeric arrays as lists (converted in bulk), the special tokens
    as strings, ``add_bos_token`` / ``add_eos_token`` and the chat template."""
    meta = gguf.metadata
    spec: dict[str, Any] = {}
    for key, name in TOKENIZER_KEYS.items():
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            spec[name] = value.tolist() if isinstance(value, np.ndarray) else value
    tokens = spec.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise WeightsmithError(gguf.path, "no tokenizer.ggml.tokens in the metadata (no vocabulary to build a tokenizer from)")
    config: dict[str, Any] = {}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    tokenizer_type = spec.get("tokenizer_type")
    for flag in ("add_bos_token", "add_eos_token"):
        if isinstance(meta.get(f"tokenizer.ggml.{flag}"), bool):
            config[flag] = meta[f"tokenizer.ggml.{flag}"]
    if "add_bos_token" not in config and tokenizer_type in ADD_BOS_DEFAULT:
        config["add_bos_token"] = ADD_BOS_DEFAULT[tokenizer_type]
    if tokenizer_type in ADD_BOS_FORCED:
        config["add_bos_token"] = ADD_BOS_FORCED[tokenizer_type]
    for name, key in SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            config[name] = None
        elif not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            raise WeightsmithError(gguf.path, f"tokenizer.ggml.{key} {token_id!r} is not a token id (vocabulary of {len(tokens)})")
        else:
            config[name] = tokens[token_id]
    return spec, config


def merges_from_vocabulary(tokens: list[str], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a sentencepiece vocabulary implies when the file lists none: every split of a
    token into two tokens, best score first, then longer left piece, then longer right piece, ties
    in vocabulary order; the order ``transformers.tokenization_utils_base.generate_merges`` gives,
    with the candidates found in one pass of dictionary lookups and the ranking done by numpy.

    ``scores`` maps each token to its rank key (higher merges first)."""
    vocab = dict(zip(tokens, range(len(tokens))))
    found = [(t, k) for t in scores for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    if not found:
        return []
    left = np.fromiter((k for _, k in found), dtype=np.int64, count=len(found))
    right = np.fromiter((len(t) - k for t, k in found), dtype=np.int64, count=len(found))
    score = np.fromiter((scores[t] for t, _ in found), dtype=np.float64, count=len(found))
    # lexsort is stable and sorts by the last key first: negated keys give descending order with
    # ties kept in the order found, as Python's sort(reverse=True) keeps them
    order = np.lexsort((-right, -left, -score))
    return [(found[i][0][: found[i][1]], found[i][0][found[i][1] :]) for i in order.tolist()]


def _implied_merges(architecture: str | None, spec: dict[str, Any]) -> list[str] | None:
    """Merges for a sentencepiece ``spec`` without any, as "left right" strings; None when a token
    holds a space (the string form cannot carry it; transformers then derives them itself)."""
    tokens = spec["tokens"]
    if architecture in MERGES_BY_POSITION:
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = {t: -float(i) for i, t in enumerate(tokens)}
    elif isinstance(spec.get("scores"), list) and len(spec["scores"]) == len(tokens):
        ranks = dict(zip(tokens, spec["scores"]))
    else:
        return None
    if any(" " in t for t in ranks):
        return None
    return [f"{a} {b}" for a, b in merges_from_vocabulary(tokens, ranks)]


def write_tokenizer(gguf: GGUFFile, folder: Path) -> None:
    """Write the tokenizer files of ``gguf`` (``tokenizer.json``, ``tokenizer_config.json``, the chat
    template) into ``folder``."""
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    architecture = gguf.metadata.get("general.architecture")
    spec, config = tokenizer_spec(gguf)
    if spec.get("tokenizer_type") == "llama" and "merges" not in spec:
        merges = _implied_merges(architecture, spec)
        if merges is not None:
            spec["merges"] = merges
    try:
        backend, extra = convert_gguf_tokenizer(architecture, spec)
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsmithError(gguf.path, f"cannot build the tokenizer: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    # TokenizersBackend(tokenizer_object=...) deep-copies the backend (a JSON round trip of the whole
    # vocabulary); a backend set before __init__ is adopted as it is, as transformers' own
    # tokenizer classes do
    tokenizer = TokenizersBackend.__new__(TokenizersBackend)
    tokenizer._tokenizer = backend
    tokenizer.__init__(**config, **extra)
    tokenizer.save_pretrained(folder)
    # transformers leaves the flags out of tokenizer_config.json (they live in the post-processor)
    path = folder / "tokenizer_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    for flag in ("add_bos_token", "add_eos_token"):
        saved[flag] = bool(config.get(flag, False))
    path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("tokenizer of %s: %d tokens, add_bos=%s", gguf.path.name, len(spec["tokens"]), saved["add_bos_token"])
