"""The pinned evaluation protocol, checked against a computation by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from weightsmith.data import read_text, tokenize
from weightsmith.evaluate import Protocol, evaluate, window_spans
from weightsmith.models import load_model, load_tokenizer

from .conftest import SAMPLE_TEXT, make_tiny_llama


def test_window_spans_follow_the_protocol():
    assert window_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert window_spans(9, 4) == [(0, 4), (4, 8)]  # a one-token tail scores nothing and is dropped
    assert window_spans(8, 4) == [(0, 4), (4, 8)]


def test_perplexity_equals_hand_computation(tiny_llama, tmp_path):
    ctx, max_tokens = 16, 100
    report = evaluate(tiny_llama, SAMPLE_TEXT, Protocol(ctx=ctx, max_tokens=max_tokens))
    tokenizer = load_tokenizer(tiny_llama)
    ids = tokenizer(SAMPLE_TEXT.read_text(), add_special_tokens=False)["input_ids"][:max_tokens]
    model = load_model(tiny_llama)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), ctx):
            window = ids[start : start + ctx]
            if len(window) < 2:
                continue
            logits = model(torch.tensor([window])).logits[0]
            for pos in range(1, len(window)):
                probs = torch.softmax(logits[pos - 1].double(), -1)
                total -= math.log(float(probs[window[pos]]))
                count += 1
    assert report.positions == count == 99 - 6  # 7 windows (6 full + one of 4 tokens), first token of each unscored
    assert report.windows == 7
    assert math.isclose(report.perplexity, math.exp(total / count), rel_tol=1e-6)
    assert report.kl is None and report.top1_agreement is None
    assert report.num_parameters == sum(p.numel() for p in model.parameters())


def test_kl_to_itself_is_zero_and_to_another_positive(tiny_llama, tmp_path):
    protocol = Protocol(ctx=32, max_tokens=200)
    self_report = evaluate(tiny_llama, SAMPLE_TEXT, protocol, reference_dir=tiny_llama)
    assert abs(self_report.kl) < 1e-9
    assert self_report.top1_agreement == 1.0
    other = make_tiny_llama(tmp_path / "other", seed=1)
    cross = evaluate(other, SAMPLE_TEXT, protocol, reference_dir=tiny_llama)
    assert cross.kl > 0.01 and cross.top1_agreement < 1.0


def test_text_is_lf_normalized(tiny_llama, tmp_path):
    lf = tmp_path / "lf.txt"
    crlf = tmp_path / "crlf.txt"
    lf.write_text("one line\nanother line\nthird\n" * 20, newline="")
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    assert read_text(crlf) == read_text(lf)
    protocol = Protocol(ctx=16, max_tokens=80)
    assert evaluate(tiny_llama, crlf, protocol).perplexity == evaluate(tiny_llama, lf, protocol).perplexity


def test_eval_cli_writes_json(tiny_llama, tmp_path, cli):
    out = tmp_path / "report.json"
    result = cli("eval", tiny_llama, "--text", SAMPLE_TEXT, "--ctx", "32", "--max-tokens", "128", "--reference", tiny_llama, "--json", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["positions"] == 4 * 31 and doc["windows"] == 4
    assert doc["top1_agreement"] == 1.0 and abs(doc["kl"]) < 1e-9
    assert "first 128 tokens, non-overlapping 32-token windows" in doc["protocol"]
    assert f"{doc['perplexity']:.3f}" in result.stdout


def test_eval_missing_text_is_one_line(tiny_llama, tmp_path, cli):
    result = cli("eval", tiny_llama, "--text", tmp_path / "absent.txt")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'absent.txt'}: no such file or folder"


def test_tokenize_adds_no_special_tokens(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    ids = tokenize(tokenizer, "the harbour town", max_tokens=3)
    assert ids.dtype == torch.long and ids.numel() <= 3
    assert tokenizer.decode(tokenize(tokenizer, "the harbour town")) == "the harbour town"


def test_several_models_at_once_equal_one_at_a_time(tiny_llama, tmp_path, cli):
    other = make_tiny_llama(tmp_path / "other", seed=3)
    protocol = Protocol(ctx=32, max_tokens=160)
    from weightsmith.evaluate import evaluate_many

    together = evaluate_many([tiny_llama, other], SAMPLE_TEXT, protocol, reference_dir=tiny_llama)
    alone = [evaluate(m, SAMPLE_TEXT, protocol, reference_dir=tiny_llama) for m in (tiny_llama, other)]
    for a, b in zip(together, alone):
        assert a.perplexity == b.perplexity and a.kl == b.kl and a.top1_agreement == b.top1_agreement
    out = tmp_path / "r.json"
    result = cli("eval", tiny_llama, other, "--text", SAMPLE_TEXT, "--ctx", "32", "--max-tokens", "160", "--json", out)
    assert result.exit_code == 0, result.output
    docs = json.loads(out.read_text())
    assert [d["model"] for d in docs] == [str(tiny_llama), str(other)]
    assert docs[1]["perplexity"] == pytest.approx(alone[1].perplexity)
