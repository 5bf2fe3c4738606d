"""Text -> token blocks: deterministic, seeded, non-overlapping."""

from __future__ import annotations

import pytest
import torch

from weightsmith.data import blocks, read_text, text_files
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
