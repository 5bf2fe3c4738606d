"""The exact top-k by magnitude (weightsmith.topk): exactly k kept, ties at the cut to the lower
index (a stable sort's order), whatever the chunking and the order the chunks are processed in."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightsmith.topk import Chunked, Selector, first_true_prefix, keep_largest, keep_smallest, key_bits, magnitude_keys, select


def stable_mask(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[torch.argsort(x.reshape(-1).abs().float(), descending=largest, stable=True)[:k]] = True
    return mask.reshape(x.shape)


def test_keeps_exactly_k_and_breaks_ties_to_the_lower_index():
    x = torch.tensor([0.5, -2.0, 1.0, -1.0, 3.0, 1.0, -0.25, 1.0])
    # magnitudes 3 > 2 > 1 (x3, at 2, 3, 5, 7) > 0.5 > 0.25
    assert keep_largest(x, 4).nonzero().reshape(-1).tolist() == [1, 2, 3, 4]
    assert keep_largest(x, 5).nonzero().reshape(-1).tolist() == [1, 2, 3, 4, 5]
    assert keep_smallest(x, 3).nonzero().reshape(-1).tolist() == [0, 2, 6]
    assert keep_largest(x, 0).sum() == 0 and keep_largest(x, 8).all() and keep_largest(x, 99).all()
    assert keep_smallest(x, 0).sum() == 0


def test_ties_split_across_chunks_go_to_the_earlier_chunks():
    x = torch.ones(10)
    assert keep_largest(x, 4, chunk=3).nonzero().reshape(-1).tolist() == [0, 1, 2, 3]
    assert keep_smallest(-x, 7, chunk=4).nonzero().reshape(-1).tolist() == list(range(7))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-300, 300), min_size=1, max_size=40), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.data())
def test_keep_largest_and_smallest_match_a_stable_sort(values, dtype, data):
    x = torch.tensor(values, dtype=dtype) / 4
    if data.draw(st.booleans()) and dtype == torch.float32:
        x = 1 + x * 2**-20  # equal high 16 bits: the second radix digit decides
    k = data.draw(st.integers(0, len(values)))
    chunk = data.draw(st.sampled_from([4, 7, 1 << 20]))
    top, bottom = keep_largest(x, k, chunk=chunk), keep_smallest(x, k, chunk=chunk)
    assert int(top.sum()) == k == int(bottom.sum())
    assert torch.equal(top, stable_mask(x, k, True))
    assert torch.equal(bottom, stable_mask(x, k, False))


def test_selector_zeroes_all_but_the_largest_in_any_chunk_order():
    gen = torch.Generator().manual_seed(0)
    flat = (torch.randint(-6, 7, (1000,), generator=gen) / 8).to(torch.bfloat16)  # many equal magnitudes
    parts = [slice(s, min(s + 97, 1000)) for s in range(0, 1000, 97)]
    keys = Chunked(len(parts), lambda j: magnitude_keys(flat[parts[j]]))
    with ThreadPoolExecutor(3) as pool:
        selection = select(keys, 1000, 333, key_bits(flat.dtype), largest=True, pmap=lambda fn, r: list(pool.map(fn, r)))
    selector = Selector(selection, flat.dtype)
    kept = torch.cat([selector.keep_largest(j, flat[parts[j]].clone()) for j in reversed(range(len(parts)))][::-1])
    expected = torch.where(stable_mask(flat, 333, True), flat, torch.zeros_like(flat))
    assert torch.equal(kept, expected)
    assert int((kept != 0).sum()) == 333 - int(((flat == 0) & stable_mask(flat, 333, True)).sum())


@pytest.mark.parametrize("block", [1, 3, 16, 1 << 14])
def test_first_true_prefix_is_the_shortest_prefix_with_count_trues(block):
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(3)) < 0.2
    positions = torch.nonzero(mask).reshape(-1).tolist()
    for count in (1, 2, 17, len(positions) - 1, len(positions)):
        assert first_true_prefix(mask, count, block) == positions[count - 1] + 1
