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


def write_tokenizer(gguf: GGUFFile, folder: Path) -> None:
    """Write the tokenizer files of ``gguf`` (``tokenizer.json``, ``tokenizer_config.json``, the chat
    template) into ``folder``."""
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    architecture = gguf.metadata.get("general.architecture")
    spec, config = tokenizer_spec(gguf)
    try:
        backend, extra = convert_gguf_tokenizer(architecture, spec)
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsmithError(gguf.path, f"cannot build the tokenizer: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    tokenizer = TokenizersBackend(tokenizer_object=backend, **config, **extra)
    tokenizer.save_pretrained(folder)
    # transformers leaves the flags out of tokenizer_config.json (they live in the post-processor)
    path = folder / "tokenizer_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    for flag in ("add_bos_token", "add_eos_token"):
        saved[flag] = bool(config.get(flag, False))
    path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("tokenizer of %s: %d tokens, add_bos=%s", gguf.path.name, len(spec["tokens"]), saved["add_bos_token"])
