"""The pinned evaluation protocol, checked against a computation by hand."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from weightsmith.data import read_text, tokenize
from weightsmith.evaluate import SUM_ROWS, Protocol, evaluate, evaluate_many, window_spans, window_sums
from weightsmith.models import load_model, load_tokenizer

from .conftest import SAMPLE_TEXT, make_tiny_llama


def make_bos_tokenizer(folder: Path) -> int:
    """The byte-level BPE of conftest.train_tokenizer with a ``<bos>`` (id 1) that the tokenizer
    puts in front of what it encodes with special tokens, as Llama and Gemma tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>", "<bos>"])
    tok.train_from_iterator([SAMPLE_TEXT.read_text()], trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>").save_pretrained(folder)
    return tok.get_vocab_size()


def make_packed(src: Path, dest: Path, symmetric: bool = True) -> Path:
    """``src`` quantized with RTN, 4 bits, groups of 32, fp32 scales, in the packed layout."""
    from compress.config import QuantizeConfig
    from compress.quantize import quantize_checkpoint
    from weightsmith.checkpoint import Checkpoint

    quantize_checkpoint(Checkpoint(src), dest, QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=symmetric, format="packed"), force=True)
    return dest


def hand_perplexity(model, ids: list[int], ctx: int, bos: int | None = None) -> tuple[float, int]:
    """The protocol computed position by position: exp(mean NLL) and the scored position count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), ctx):
            window = ids[start : start + ctx]
            if len(window) < 2:
                continue
            inputs = ([bos] + window[1:]) if bos is not None else window
            logits = model(torch.tensor([inputs])).logits[0]
            for pos in range(1, len(window)):
                probs = torch.softmax(logits[pos - 1].double(), -1)
                total -= math.log(float(probs[window[pos]]))
                count += 1
    return math.exp(total / count), count


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
    perplexity, count = hand_perplexity(model, ids, ctx)
    assert report.positions == count == 99 - 6  # 7 windows (6 full + one of 4 tokens), first token of each unscored
    assert report.windows == 7
    assert math.isclose(report.perplexity, perplexity, rel_tol=1e-6)
    assert report.kl is None and report.top1_agreement is None and report.bits_per_weight is None
    assert report.num_parameters == sum(p.numel() for p in model.parameters())
    assert ", no BOS, " in report.protocol  # this tokenizer adds none: windows are the text's own tokens


def test_windows_start_with_bos_when_the_tokenizer_adds_it(tmp_path):
    """llama.cpp's protocol: the first token of each window is replaced by BOS; the same positions
    are scored, on the text's own tokens."""
    folder = make_tiny_llama(tmp_path / "bos-model")
    make_bos_tokenizer(folder)
    ctx, max_tokens = 16, 100
    report = evaluate(folder, SAMPLE_TEXT, Protocol(ctx=ctx, max_tokens=max_tokens))
    tokenizer = load_tokenizer(folder)
    ids = tokenizer(SAMPLE_TEXT.read_text(), add_special_tokens=False)["input_ids"][:max_tokens]
    assert 1 not in ids
    model = load_model(folder)
    with_bos, count = hand_perplexity(model, ids, ctx, bos=1)
    without, _ = hand_perplexity(model, ids, ctx)
    assert report.positions == count and report.windows == math.ceil(max_tokens / ctx)
    assert math.isclose(report.perplexity, with_bos, rel_tol=1e-6)
    assert abs(with_bos - without) > 1e-3 * without  # the replacement changes what the model sees
    assert ", BOS at window start, " in report.protocol


def test_window_sums_in_slices_equal_the_whole_window():
    torch.manual_seed(0)
    n, vocab = 3 * SUM_ROWS + 5, 50
    logits, ref = torch.randn(n, vocab) * 3, torch.randn(n, vocab) * 3
    ids = torch.randint(0, vocab, (n,))
    sums = window_sums(logits, ids, ref)
    logp = torch.log_softmax(logits[:-1].double(), -1)
    ref_logp = torch.log_softmax(ref[:-1].double(), -1)
    assert sums.positions == n - 1 and sums.windows == 1
    assert sums.nll == pytest.approx(float(-logp.gather(1, ids[1:, None]).sum()), rel=1e-12)
    assert sums.kl == pytest.approx(float((ref_logp.exp() * (ref_logp - logp)).sum()), rel=1e-12)
    assert sums.top1 == int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    own = window_sums(logits, ids, logits)  # a model that is its own reference
    assert own.kl == 0.0 and own.top1 == n - 1 and own.nll == sums.nll


def test_a_reference_among_the_models_runs_once_per_window(tiny_llama, tmp_path, monkeypatch):
    import weightsmith.models

    other = make_tiny_llama(tmp_path / "other", seed=2)
    calls: list[str] = []
    real_load = weightsmith.models.load_model

    def counting_load(folder, *args, **kwargs):
        model = real_load(folder, *args, **kwargs)
        forward = model.forward

        def counted(*a, **k):
            calls.append(str(folder))
            return forward(*a, **k)

        model.forward = counted
        return model

    protocol = Protocol(ctx=32, max_tokens=160)
    alone = [evaluate(m, SAMPLE_TEXT, protocol, reference_dir=tiny_llama) for m in (tiny_llama, other)]
    monkeypatch.setattr(weightsmith.models, "load_model", counting_load)
    together = evaluate_many([tiny_llama, other], SAMPLE_TEXT, protocol, reference_dir=tiny_llama)
    assert sorted(calls) == sorted([str(tiny_llama)] * 5 + [str(other)] * 5)  # 5 windows, one forward each
    assert together[0].kl == 0.0 and together[0].top1_agreement == 1.0
    for a, b in zip(together, alone):
        assert a.perplexity == b.perplexity and a.kl == b.kl and a.top1_agreement == b.top1_agreement


@pytest.mark.parametrize(("symmetric", "bits"), [(True, 5.0), (False, 5.125)])
def test_packed_model_reports_logical_parameters_and_bits(tiny_llama, tmp_path, symmetric, bits):
    """A packed linear counts as its out x in weights; 4-bit codes plus one fp32 scale per 32 weights
    is 5 bits per weight, plus 4 bits of zero point per 32 weights when asymmetric."""
    packed = make_packed(tiny_llama, tmp_path / "packed", symmetric)
    report = evaluate(packed, SAMPLE_TEXT, Protocol(ctx=32, max_tokens=96))
    dense = sum(p.numel() for p in load_model(tiny_llama).parameters())
    assert report.num_parameters == dense == 39072
    assert report.bits_per_weight == bits


def test_loading_a_packed_checkpoint_lets_no_warning_escape(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    packed = make_packed(tiny_llama, tmp_path / "packed")
    with pytest.warns(UserWarning, match="quantization_config"):  # what transformers says without our filter
        AutoModelForCausalLM.from_pretrained(packed, quantization_config=CompressedTensorsConfig(dequantize=True))
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(packed)
        warnings.warn("another warning still passes", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning still passes"]
    assert warnings.filters == filters  # no filter left behind


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
    # stderr is no terminal here: progress comes as plain lines, not a live bar that shows nothing
    assert "evaluating (windows): 4/4 done in" in result.stderr


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
