"""A checkpoint folder's tokenizer as GGUF metadata (``tokenizer.ggml.*``), so llama.cpp needs nothing else.

Read from ``tokenizer.json`` (the ``tokenizers`` serialization transformers writes), without building
a tokenizer. Two kinds of vocabulary are written; anything else stops with a clear error.

**Byte-level BPE** (``tokenizer.ggml.model = gpt2``: GPT-2, Llama 3, Qwen, SmolLM, Mistral's Tekken):
the vocabulary by id (holes filled with ``[PAD<id>]`` tokens of type *unused*, as llama.cpp's
converter does), the BPE merges as ``"left right"`` strings, token types (special added tokens are
*control*, other added tokens *user-defined*), the special-token ids (from ``tokenizer_config.json``'s
token strings, else config.json's ids), whether BOS/EOS are added (the post-processor's template, else
the config flags), and the chat template. llama.cpp picks its pre-tokenizer (the regex that splits
text before BPE) by name (``tokenizer.ggml.pre``). The name is found from the pre-tokenizer's
structure in :data:`PRE_TOKENIZERS`; an unknown structure is written as ``default`` with a warning
(llama.cpp then splits with its default regex, which may tokenize some text differently).

**Sentencepiece-style BPE** (a BPE model with ``byte_fallback``, spaces written as ``▁``: Llama 2,
Mistral 7B, TinyLlama, Gemma, Phi-3): ``tokenizer.ggml.model = llama``, ``tokenizer.ggml.pre =
default``, tokens, per-token scores and types, no merges (llama.cpp's sentencepiece tokenizer merges
by score, not by a merge list), the same special ids, BOS/EOS flags and chat template as above, plus
``add_space_prefix`` and ``add_sep_token``. See :func:`read_vocab` for where each value comes from
and where it differs from llama.cpp's converter (``convert_hf_to_gguf.py``, llama.cpp@0c1e57098).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from weightsmith.checkpoint import read_json_object
from weightsmith.errors import WeightsmithError

log = logging.getLogger(__name__)

__all__ = [
    "PRE_TOKENIZERS",
    "SpmPiece",
    "TokenType",
    "Vocab",
    "is_sentencepiece_style",
    "merge_scores",
    "parse_sentencepiece_model",
    "pre_tokenizer_name",
    "read_vocab",
    "space_prefix",
]


class TokenType:
    """llama.cpp's token types (``llama_token_type``; the numbers of sentencepiece's ``Type`` enum)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


#: the score llama.cpp's converter gives an added token, and a hole in the vocabulary it pads
ADDED_SCORE = -1000.0
HOLE_SCORE = -10000.0
#: sentencepiece's whitespace mark
SPACE_MARK = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

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
    """The tokenizer metadata of one checkpoint. ``scores``, ``add_sep`` and ``add_space_prefix``
    are None where the key is not written (byte-level vocabularies)."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    scores: list[float] | None = None
    add_sep: bool | None = None
    add_space_prefix: bool | None = None

    def items(self) -> list[tuple[str, str, Any]]:
        """``(key, kind, value)`` in the order llama.cpp's converter writes them."""
        out: list[tuple[str, str, Any]] = [
            ("tokenizer.ggml.model", "str", self.model),
            ("tokenizer.ggml.pre", "str", self.pre),
            ("tokenizer.ggml.tokens", "str[]", self.tokens),
        ]
        if self.scores is not None:
            out.append(("tokenizer.ggml.scores", "f32[]", self.scores))
        out.append(("tokenizer.ggml.token_type", "i32[]", self.token_types))
        if self.merges:
            out.append(("tokenizer.ggml.merges", "str[]", self.merges))
        for key in ("bos", "eos", "unknown", "padding"):
            if key in self.special_ids:
                out.append((f"tokenizer.ggml.{key}_token_id", "u32", self.special_ids[key]))
        out.append(("tokenizer.ggml.add_bos_token", "bool", self.add_bos))
        out.append(("tokenizer.ggml.add_eos_token", "bool", self.add_eos))
        if self.add_sep is not None:
            out.append(("tokenizer.ggml.add_sep_token", "bool", self.add_sep))
        if self.add_space_prefix is not None:
            out.append(("tokenizer.ggml.add_space_prefix", "bool", self.add_space_prefix))
        if self.chat_template:
            out.append(("tokenizer.chat_template", "str", self.chat_template))
        return out


def _templates(post: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The TemplateProcessing steps of a post-processor (itself, or inside a Sequence)."""
    if not post:
        return []
    if post.get("type") == "Sequence":
        return [t for p in post.get("processors") or [] for t in _templates(p)]
    return [post] if post.get("type") == "TemplateProcessing" else []


def _template_adds(post: Mapping[str, Any] | None) -> tuple[bool | None, bool | None]:
    """Whether the post-processor puts a special token before / after a single sequence (None: it
    does not say)."""
    templates = _templates(post)
    if not templates:
        return None, None
    single = templates[0].get("single") or []
    return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]


def _special_id(entry: Mapping[str, Any]) -> str | None:
    """The token a template entry names when it is a special token."""
    special = entry.get("SpecialToken")
    return special.get("id") if isinstance(special, Mapping) else None


def _pair_adds_sep(post: Mapping[str, Any] | None, separators: set[str]) -> bool | None:
    """Whether the pair template puts a separator (``separators``: the sep and eos token strings)
    between its two sequences, read as llama.cpp's ``SpecialVocab`` does: the pair template less the
    single template's leading/trailing special tokens, then ``A [sep [sep]] B``; None when it does
    not say (no template, or nothing between A and B)."""
    templates = _templates(post)
    if not templates:
        return None
    single, pair = templates[0].get("single") or [], list(templates[0].get("pair") or [])
    first = _special_id(single[0]) if len(single) > 1 else None
    last = _special_id(single[-1]) if len(single) > 1 else None
    if pair and first and _special_id(pair[0]) == first:
        pair = pair[1:]
    if pair and last and _special_id(pair[-1]) == last:
        pair = pair[:-1]
    if len(pair) < 3 or (pair[0].get("Sequence") or {}).get("id") != "A" or (pair[-1].get("Sequence") or {}).get("id") != "B":
        return None
    middle = pair[1:-1]
    add_sep = _special_id(middle[0]) in separators and not last
    if len(middle) == 2 and _special_id(middle[1]) in separators:
        add_sep = True
    return add_sep


def _token_string(value: Any) -> str | None:
    """A tokenizer_config.json token entry (a string or an AddedToken dict) as its text."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_ids(tokens: Sequence[str], tok_config: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, int]:
    """bos/eos/unknown/padding ids: tokenizer_config.json's token strings, else config.json's ids."""
    index = {t: i for i, t in enumerate(tokens)}
    special: dict[str, int] = {}
    for key, name, id_key in (("bos", "bos_token", "bos_token_id"), ("eos", "eos_token", "eos_token_id"), ("unknown", "unk_token", "unk_token_id"), ("padding", "pad_token", "pad_token_id")):
        value = _token_string(tok_config.get(name))
        if value is not None and value in index:
            special[key] = index[value]
        elif isinstance(config.get(id_key), int) and 0 <= config[id_key] < len(tokens):
            special[key] = int(config[id_key])
    return special


def _chat_template(folder: Path, tok_config: Mapping[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if isinstance(tok_config.get("chat_template"), str):
        return str(tok_config["chat_template"])
    return None


def is_sentencepiece_style(tokenizer: Mapping[str, Any]) -> bool:
    """A ``tokenizer.json`` whose model is BPE with byte fallback (unknown characters as ``<0xXX>``
    tokens): a sentencepiece BPE vocabulary converted to ``tokenizers``."""
    model = tokenizer.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def read_vocab(folder: Path, config: Mapping[str, Any]) -> Vocab:
    """The tokenizer of checkpoint ``folder`` as GGUF metadata.

    A sentencepiece-style ``tokenizer.json`` (:func:`is_sentencepiece_style`) is written the way
    llama.cpp's converter writes a Llama/Mistral folder (``LlamaModel.set_vocab``): from
    ``tokenizer.model`` when the folder has one (``_set_vocab_sentencepiece``), else from
    ``tokenizer.json`` (``_set_vocab_llama_hf`` with gguf-py's ``LlamaHfVocab``). The values:

    * tokens, scores, types from **tokenizer.model** (the sentencepiece protobuf, parsed here by
      :func:`parse_sentencepiece_model`): each piece with its sentencepiece score and type (normal,
      unknown, control, user-defined, unused, byte: the same numbers); then the added tokens of
      ``added_tokens.json`` (*user-defined*) and of tokenizer_config.json's ``added_tokens_decoder``
      (*control* when special or named like one, e.g. ``<|...|>``, else *user-defined* with ``▁``
      written as a space), score -1000; ids past the pieces up to config.json's ``vocab_size`` are
      ``[PAD<id>]`` holes, score -10000, *unused*. Two differences from llama.cpp's converter: it
      makes a user-defined piece *normal*, and llama.cpp then spells it out of characters and bytes
      instead of matching it whole as sentencepiece and transformers do (``<tool>`` became
      ``▁ <0x3C> to o l <0x3E>``), so here it stays *user-defined*; and a hole that tokenizer.json
      lists as an added token gets that token (a folder saved without ``added_tokens_decoder`` would
      lose it). The file is used only when its pieces are tokenizer.json's vocabulary id for id;
      otherwise, or when it does not parse, it is skipped with a warning and tokenizer.json is read.
    * tokens, types from **tokenizer.json**: the model vocabulary by id, ``<0xXX>`` tokens *byte*,
      added special tokens and the tokens tokenizer_config.json names as special (bos, eos, unk, pad,
      sep, cls, mask, additional/extra) *control* (the unk token too, as ``LlamaHfVocab`` writes it),
      other added tokens *user-defined*, holes up to ``vocab_size`` ``[PAD<id>]`` *unused*
      (``LlamaHfVocab`` fills no holes and does not pad to ``vocab_size``, so a model whose embedding
      is larger than its tokenizer would not load in llama.cpp).
    * scores from **tokenizer.json** (:func:`merge_scores`), where we differ from llama.cpp's
      converter on purpose: it writes -1000 for every token. llama.cpp's sentencepiece tokenizer
      joins the adjacent pair whose concatenation has the highest score, the leftmost among equals,
      so with equal scores it joins left to right instead of in the BPE merge order and splits common
      words unlike transformers (``market``: ``m ar ke t`` for ``m ar k et``). Here a token made by
      the BPE merges scores minus the rank of the first merge that makes it, other normal tokens
      (single characters) rank after every merge, byte tokens and named special tokens score 0 (as in
      sentencepiece files), added tokens -1000 and holes -10000 (as llama.cpp's converter). For a
      tokenizer.json transformers converted from a sentencepiece BPE model these are the model's own
      scores for every merged piece (sentencepiece scores a piece by minus its merge order); the
      characters, which sentencepiece scores one by one after the merges, share one score here, which
      changes nothing in llama.cpp (it starts from characters and never joins into one).
    * ``add_space_prefix``: tokenizer_config.json's ``add_prefix_space`` when set (the only source
      llama.cpp's converter reads; without it llama.cpp assumes true), else true when tokenizer.json
      prepends ``▁`` (a ``Prepend("▁")`` normalizer or a ``Metaspace`` pre-tokenizer whose
      prepend scheme is ``first`` or ``always``; Gemma's plain ``Replace`` gives false). llama.cpp
      prepends the space at the start of the text and after every special token, as ``Prepend``
      does; a ``Metaspace`` with scheme ``first`` prepends only at the start and not before a
      leading space, so text beginning with a space or following a special token can differ.
    * ``add_bos_token``: the post-processor's template, else tokenizer_config.json's flag, else true
      (sentencepiece models add BOS); ``add_eos_token`` the same with false. Always written: a
      template with no special token (transformers 5 converts a sentencepiece model so) gives false,
      where llama.cpp's converter writes no flag and llama.cpp then adds BOS. ``add_sep_token`` from
      the pair template as gguf-py's ``SpecialVocab`` reads it; the special ids, chat template and
      ``pre = default`` as llama.cpp writes them.

    llama.cpp's converters for Gemma and Phi-3 also read tokenizer.model and force
    ``add_space_prefix`` false (Gemma's tokenizer.json prepends nothing, so the structure gives false
    too); CodeGemma's fill-in-the-middle token ids are not written here.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise WeightsmithError(folder, "no tokenizer.json: GGUF export writes the tokenizer into the file and needs the fast tokenizer's tokenizer.json")
    doc = read_json_object(path)
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = read_json_object(tok_config_path) if tok_config_path.is_file() else {}
    model = doc.get("model") or {}
    if is_sentencepiece_style(doc):
        return _sentencepiece_vocab(folder, doc, tok_config, config)
    if model.get("type") != "BPE":
        raise WeightsmithError(path, f"tokenizer model {model.get('type')} is not supported for GGUF export (only BPE: byte-level, or sentencepiece-style with byte fallback)")
    return _byte_level_vocab(folder, doc, tok_config, config)


def _byte_level_vocab(folder: Path, doc: Mapping[str, Any], tok_config: Mapping[str, Any], config: Mapping[str, Any]) -> Vocab:
    """``tokenizer.ggml.model = gpt2``: the byte-level BPE vocabulary, its merges and pre-tokenizer name."""
    model = doc.get("model") or {}
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
    special = _special_ids(tokens, tok_config, config)
    bos, eos = _template_adds(doc.get("post_processor"))
    add_bos = bool(tok_config.get("add_bos_token", False)) if bos is None else bos
    add_eos = bool(tok_config.get("add_eos_token", False)) if eos is None else eos
    pre = pre_tokenizer_name(doc)
    if pre is None:
        log.warning("%s: pre-tokenizer %s has no llama.cpp name here; written as 'default' (llama.cpp may split some text differently)", folder / "tokenizer.json", _signature(doc.get("pre_tokenizer")))
        pre = "default"
    return Vocab("gpt2", pre, tokens, types, merges, special, add_bos, add_eos, _chat_template(folder, tok_config))


def _merge_pairs(merges: Iterable[Any]) -> Iterator[tuple[str, str]]:
    """tokenizer.json merges (``"a b"`` strings, or ``[a, b]`` pairs since tokenizers 0.20) as pairs."""
    for m in merges:
        if isinstance(m, str):
            left, _, right = m.partition(" ")
            yield left, right
        else:
            yield str(m[0]), str(m[1])


def merge_scores(tokens: Sequence[str], merges: Iterable[tuple[str, str]]) -> list[float]:
    """Scores under which llama.cpp's sentencepiece tokenizer merges in the order of a BPE merge list.

    llama.cpp's ``llm_tokenizer_spm`` (the sentencepiece BPE algorithm,
    https://github.com/google/sentencepiece/blob/master/src/bpe_model.cc) repeatedly joins the
    adjacent pair whose concatenation is the vocabulary token with the highest score, leftmost
    first among equals. A token gets minus the dense rank of the first merge producing it (the k-th
    distinct merge result scores -k), so joins happen in merge-list order; tokens no merge produces
    (single characters, which the tokenizer starts from) score below every merge result. For a
    vocabulary converted from sentencepiece (merges listed for every split of every piece, in piece
    order) the two algorithms agree; for a BPE trained by ``tokenizers`` they agree except where a
    token can also be spelled as a pair of tokens that is not one of its merges.
    """
    rank: dict[str, int] = {}
    for left, right in merges:
        rank.setdefault(left + right, len(rank))
    last = -float(len(rank))
    return [-float(rank[t]) if t in rank else last for t in tokens]


def space_prefix(tokenizer: Mapping[str, Any], tok_config: Mapping[str, Any]) -> bool:
    """Whether sentencepiece-style text gets a leading ``▁`` (llama.cpp's ``add_space_prefix``):
    tokenizer_config.json's ``add_prefix_space`` when set, else whether tokenizer.json's normalizer
    or pre-tokenizer prepends one."""
    flag = tok_config.get("add_prefix_space")
    if isinstance(flag, bool):
        return flag
    return _prepends(tokenizer.get("normalizer")) or _prepends(tokenizer.get("pre_tokenizer"))


def _prepends(step: Mapping[str, Any] | None) -> bool:
    """Whether a normalizer / pre-tokenizer (or one inside its Sequence) prepends ``▁``."""
    if not step:
        return False
    kind = step.get("type")
    if kind == "Sequence":
        return any(_prepends(s) for s in step.get("normalizers") or step.get("pretokenizers") or [])
    if kind == "Prepend":
        return step.get("prepend") == SPACE_MARK
    if kind == "Metaspace":
        scheme = step.get("prepend_scheme")
        if scheme is None:  # tokenizers before 0.19: a boolean
            return bool(step.get("add_prefix_space", True))
        return scheme in ("always", "first")
    return False


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter makes *control* though not marked special
    (``does_token_look_special``)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _sentencepiece_vocab(folder: Path, doc: Mapping[str, Any], tok_config: Mapping[str, Any], config: Mapping[str, Any]) -> Vocab:
    """``tokenizer.ggml.model = llama`` (see :func:`read_vocab`)."""
    pieces = _model_file_pieces(folder, doc)
    if pieces is not None:
        tokens, scores, types = _pieces_vocab(folder, pieces, doc, tok_config, config)
    else:
        tokens, scores, types = _json_vocab(doc, tok_config, config)
    special = _special_ids(tokens, tok_config, config)
    post = doc.get("post_processor")
    bos, eos = _template_adds(post)
    add_bos = bool(tok_config.get("add_bos_token", True)) if bos is None else bos
    add_eos = bool(tok_config.get("add_eos_token", False)) if eos is None else eos
    separators = {s for s in (_token_string(tok_config.get("sep_token")), _token_string(tok_config.get("eos_token"))) if s}
    return Vocab("llama", "default", tokens, types, [], special, add_bos, add_eos, _chat_template(folder, tok_config),
                 scores=scores, add_sep=_pair_adds_sep(post, separators), add_space_prefix=space_prefix(doc, tok_config))


def _named_specials(tok_config: Mapping[str, Any]) -> set[str]:
    """The token strings tokenizer_config.json names as special (bos, eos, unk, pad, sep, cls, mask
    and the additional / extra special tokens)."""
    names = {_token_string(tok_config.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = tok_config.get(key)
        values = extra.values() if isinstance(extra, dict) else extra if isinstance(extra, list) else []
        names.update(_token_string(v) for v in values)
    return {n for n in names if n}


def _json_vocab(doc: Mapping[str, Any], tok_config: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of a sentencepiece-style vocabulary from tokenizer.json alone."""
    model = doc.get("model") or {}
    vocab: dict[str, int] = model.get("vocab") or {}
    by_id: dict[int, str] = {int(i): t for t, i in vocab.items()}
    added = {int(t["id"]): t for t in doc.get("added_tokens") or [] if isinstance(t, dict)}
    size = max(int(config.get("vocab_size") or 0), max([*by_id, *added], default=-1) + 1)
    named = _named_specials(tok_config)
    order = merge_scores([by_id.get(i, "") for i in range(size)], _merge_pairs(model.get("merges") or []))
    tokens, scores, types = [], [], []
    for i in range(size):
        if i in added:
            token = str(added[i]["content"])
            kind = TokenType.CONTROL if added[i].get("special") or token in named else TokenType.USER_DEFINED
            score = ADDED_SCORE
        elif i in by_id:
            token = by_id[i]
            if _BYTE_TOKEN.fullmatch(token):
                kind, score = TokenType.BYTE, 0.0
            elif token in named:
                kind, score = TokenType.CONTROL, 0.0
            else:
                kind, score = TokenType.NORMAL, order[i]
        else:
            token, kind, score = f"[PAD{i}]", TokenType.UNUSED, HOLE_SCORE
        tokens.append(token)
        scores.append(score)
        types.append(kind)
    return tokens, scores, types


class SpmPiece(NamedTuple):
    """One entry of a sentencepiece model: its text, score and sentencepiece type."""

    piece: str
    score: float
    type: int


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A protobuf base-128 varint at ``pos``: (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """The fields of one protobuf message as (number, wire type, value): varints as integers,
    length-delimited and fixed-width fields as their bytes (https://protobuf.dev/programming-guides/encoding/)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + width], pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        if pos > len(buf):
            raise ValueError(f"field {number} runs past the end of the message")
        yield number, wire, value


def parse_sentencepiece_model(data: bytes) -> list[SpmPiece]:
    """The pieces of a sentencepiece model file (``tokenizer.model``, a ``ModelProto`` protobuf:
    https://github.com/google/sentencepiece/blob/master/src/sentencepiece_model.proto), in id order.

    Only ``ModelProto.pieces`` (field 1, repeated) is read: each ``SentencePiece`` holds ``piece``
    (field 1, string), ``score`` (field 2, float, default 0) and ``type`` (field 3, enum, default
    NORMAL = 1). The trainer and normalizer specs are skipped. Raises ValueError on a malformed file."""
    pieces = []
    for number, wire, value in _fields(data):
        if number != 1:
            continue
        if wire != 2 or not isinstance(value, bytes):
            raise ValueError(f"ModelProto.pieces has wire type {wire}")
        text, score, kind = None, 0.0, TokenType.NORMAL
        for sub, sub_wire, sub_value in _fields(value):
            if sub == 1 and sub_wire == 2 and isinstance(sub_value, bytes):
                text = sub_value.decode("utf-8")
            elif sub == 2 and sub_wire == 5 and isinstance(sub_value, bytes):
                score = struct.unpack("<f", sub_value)[0]
            elif sub == 3 and sub_wire == 0 and isinstance(sub_value, int):
                kind = sub_value
        if text is None:
            raise ValueError(f"piece {len(pieces)} has no text")
        pieces.append(SpmPiece(text, score, kind))
    if not pieces:
        raise ValueError("no pieces")
    return pieces


def _model_file_pieces(folder: Path, doc: Mapping[str, Any]) -> list[SpmPiece] | None:
    """The folder's tokenizer.model pieces when it has one that parses and agrees with tokenizer.json's
    vocabulary id for id; None otherwise (with a warning when a file is there but not used)."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        return None
    try:
        pieces = parse_sentencepiece_model(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.warning("%s: not a sentencepiece model (%s); the vocabulary is read from tokenizer.json", path, exc)
        return None
    vocab: dict[str, int] = (doc.get("model") or {}).get("vocab") or {}
    differ = [i for i, p in enumerate(pieces) if vocab.get(p.piece, i) != i]
    if differ:
        log.warning("%s: %d pieces sit at other ids in tokenizer.json (first: id %d %r); the vocabulary is read from tokenizer.json",
                    path, len(differ), differ[0], pieces[differ[0]].piece)
        return None
    return pieces


#: sentencepiece piece types kept as llama.cpp token types (the same numbers); any other type is normal
_PIECE_TYPES = frozenset({TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNUSED, TokenType.BYTE})


def _pieces_vocab(folder: Path, pieces: Sequence[SpmPiece], doc: Mapping[str, Any], tok_config: Mapping[str, Any],
                  config: Mapping[str, Any]) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types from tokenizer.model's pieces and the folder's added tokens, as
    llama.cpp's ``_create_vocab_sentencepiece`` builds them (see :func:`read_vocab`)."""
    size = int(config.get("vocab_size") or 0) or len(pieces)
    if len(pieces) > size:
        log.warning("%s: %d pieces, vocab_size %d; pieces from id %d are left out", folder / "tokenizer.model", len(pieces), size, size)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [HOLE_SCORE] * size
    types = [TokenType.UNUSED] * size
    for i, p in enumerate(pieces[:size]):
        tokens[i], scores[i], types[i] = p.piece, p.score, p.type if p.type in _PIECE_TYPES else TokenType.NORMAL

    overlaid: set[int] = set()

    def add(i: int, token: str, kind: int | None) -> None:
        """Token ``i`` as an added token (``kind`` None: control or user-defined by its name)."""
        if not 0 <= i < size:
            log.warning("added token %r has id %d, past vocab_size %d; left out", token, i, size)
            return
        if kind is None:
            kind = TokenType.CONTROL if _looks_special(token) else TokenType.USER_DEFINED
        if kind == TokenType.USER_DEFINED:
            token = token.replace(SPACE_MARK, " ")
        tokens[i], scores[i], types[i] = token, ADDED_SCORE, kind
        overlaid.add(i)

    added_json = folder / "added_tokens.json"
    if added_json.is_file():
        for token, i in read_json_object(added_json).items():
            if 0 <= int(i) < size:
                tokens[int(i)], scores[int(i)], types[int(i)] = str(token), ADDED_SCORE, TokenType.USER_DEFINED
                overlaid.add(int(i))
    for key, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            add(int(key), entry["content"], TokenType.CONTROL if entry.get("special") else None)
    for entry in doc.get("added_tokens") or []:
        i = int(entry["id"]) if isinstance(entry, dict) else -1
        if len(pieces) <= i < size and i not in overlaid:
            add(i, str(entry["content"]), TokenType.CONTROL if entry.get("special") else None)
    return tokens, scores, types
