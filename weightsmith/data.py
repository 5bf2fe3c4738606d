"""Text -> token blocks for calibration, evaluation and training.

Text is read as UTF-8 and normalized to LF line endings; a folder is read file by file in sorted
path order. Blocks are non-overlapping; sampling is by seed, so the same inputs give the same blocks.
When the model's tokenizer adds a BOS token, the first token of every block is replaced by BOS, as
llama.cpp's perplexity and imatrix tools do: the model sees a sequence start like the ones it was
trained on, and the positions that follow keep their tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weightsmith.errors import WeightsmithError


def normalize(text: str) -> str:
    """CRLF and lone CR -> LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_files(path: str | Path) -> list[Path]:
    """The file itself, or every non-hidden regular file under a folder in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise WeightsmithError(path, "folder holds no text files")
        return files
    raise WeightsmithError(path, "no such file or folder")


def read_text(path: str | Path) -> str:
    """The LF-normalized text of a file, or of a folder's files joined by blank lines."""
    parts = []
    for file in text_files(path):
        try:
            parts.append(normalize(file.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise WeightsmithError(file, f"not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise WeightsmithError(file, f"cannot read: {exc.strerror or exc}") from None
    return "\n\n".join(parts)


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (tokenized whole, no special tokens added), the first ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    """The BOS token id when ``tokenizer`` puts one at the start of what it encodes, else None.

    Decided by what the tokenizer does, not by its flags (``add_bos_token`` lives in different
    places in slow, fast and template-processor tokenizers): a short text is encoded with and without
    special tokens, and the id added in front is the BOS. A tokenizer that only appends (EOS) adds none.
    """
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    if len(special) > len(plain) and special[1 : 1 + len(plain)] == plain:
        return int(special[0])
    return None


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` (..., T) with the first token of each replaced by ``bos``; as is when ``bos`` is None."""
    if bos is None:
        return windows
    out = windows.clone()
    out[..., 0] = bos
    return out


def blocks(
    tokens: torch.Tensor,
    seq_len: int,
    n_samples: int | None = None,
    seed: int = 0,
    where: str | Path | None = None,
    bos: int | None = None,
) -> torch.Tensor:
    """Cut a 1-D token tensor into non-overlapping blocks of ``seq_len`` (a shorter tail is dropped);
    with ``n_samples``, that many blocks drawn without replacement by ``seed``; with ``bos``, each
    block's first token replaced by it. Shape (n, seq_len)."""
    if seq_len < 2:
        raise WeightsmithError(where, f"sequence length must be at least 2, got {seq_len}")
    available = tokens.numel() // seq_len
    all_blocks = tokens[: available * seq_len].view(available, seq_len)
    if n_samples is None:
        return with_bos(all_blocks, bos)
    if n_samples > available:
        raise WeightsmithError(where, f"text gives {available} blocks of {seq_len} tokens, fewer than the {n_samples} asked for")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(available, generator=generator)[:n_samples]
    return with_bos(all_blocks[order], bos)


def text_blocks(tokenizer, path: str | Path, seq_len: int, n_samples: int | None = None, seed: int = 0) -> torch.Tensor:
    """Blocks of ``seq_len`` tokens from a text file or folder, each starting with BOS when the
    tokenizer adds one."""
    return blocks(tokenize(tokenizer, read_text(path)), seq_len, n_samples, seed, where=path, bos=bos_id(tokenizer))
