"""Text -> token blocks: deterministic, seeded, non-overlapping."""

from __future__ import annotations

import pytest
import torch

from weightsmith.data import blocks, bos_id, read_text, text_blocks, text_files, tokenize
from weightsmith.errors import WeightsmithError


def test_blocks_are_disjoint_and_seeded():
    tokens = torch.arange(100)
    all_blocks = blocks(tokens, 8)
    assert all_blocks.shape == (12, 8) and torch.equal(all_blocks.flatten(), torch.arange(96))
    a = blocks(tokens, 8, n_samples=5, seed=3)
    b = blocks(tokens, 8, n_samples=5, seed=3)
    c = blocks(tokens, 8, n_samples=5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({int(row[0]) for row in a}) == 5 and all(int(row[0]) % 8 == 0 for row in a)


def test_too_few_blocks_is_an_error():
    with pytest.raises(WeightsmithError, match="gives 2 blocks of 8 tokens, fewer than the 3 asked for"):
        blocks(torch.arange(20), 8, n_samples=3, where="x.txt")


def test_folder_is_read_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second\r\n")
    (tmp_path / "a.txt").write_text("first\r")
    (tmp_path / ".hidden").write_text("never")
    assert [p.name for p in text_files(tmp_path)] == ["a.txt", "b.txt"]
    assert read_text(tmp_path) == "first\n\n\nsecond\n"


def test_binary_file_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(WeightsmithError, match="not UTF-8 text"):
        read_text(tmp_path / "x.bin")


def test_blocks_start_with_bos_when_given():
    tokens = torch.arange(10, 50)
    plain = blocks(tokens, 8, n_samples=3, seed=1)
    with_bos = blocks(tokens, 8, n_samples=3, seed=1, bos=7)
    assert with_bos[:, 0].tolist() == [7, 7, 7]
    assert torch.equal(with_bos[:, 1:], plain[:, 1:])  # the same blocks, only their first token replaced
    assert blocks(tokens, 8, bos=7)[:, 0].tolist() == [7] * 5
    assert tokens[0] == 10  # the input is not modified


def test_bos_is_detected_from_what_the_tokenizer_does(tmp_path):
    from weightsmith.models import load_tokenizer

    from .conftest import train_tokenizer
    from .test_evaluate import make_bos_tokenizer

    train_tokenizer(tmp_path / "plain")
    assert bos_id(load_tokenizer(tmp_path / "plain")) is None
    make_bos_tokenizer(tmp_path / "bos")
    tokenizer = load_tokenizer(tmp_path / "bos")
    assert bos_id(tokenizer) == tokenizer.convert_tokens_to_ids("<bos>") == 1


def test_calibration_blocks_start_with_bos_only_when_the_tokenizer_adds_it(tmp_path):
    from weightsmith.models import load_tokenizer

    from .conftest import SAMPLE_TEXT, train_tokenizer
    from .test_evaluate import make_bos_tokenizer

    train_tokenizer(tmp_path / "plain")
    make_bos_tokenizer(tmp_path / "bos")
    for name, bos in (("plain", None), ("bos", 1)):
        tokenizer = load_tokenizer(tmp_path / name)
        raw = blocks(tokenize(tokenizer, read_text(SAMPLE_TEXT)), 16, n_samples=6, seed=2)
        got = text_blocks(tokenizer, SAMPLE_TEXT, 16, n_samples=6, seed=2)
        if bos is None:
            assert torch.equal(got, raw)
        else:
            assert got[:, 0].tolist() == [bos] * 6 and torch.equal(got[:, 1:], raw[:, 1:])
            assert (raw[:, 0] != bos).all()  # the text itself holds no BOS: the replacement is ours
