"""llama.cpp itself runs our GGUF files: for each exported family, the logits llama.cpp computes (through
llama-cpp-python, built by bench/setup-llamacpp.sh into the peers' venv) match transformers' logits of
the source checkpoint. Skipped where the peers' venv has no llama-cpp-python."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_family, make_tiny_hf, make_tiny_llama

PEERS_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peers" / "bin" / "python"

_RUN = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False, n_threads=2)
llm.eval(ids)
np.save(sys.argv[3], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""


def _has_llama_cpp() -> bool:
    if not PEERS_PYTHON.exists():
        return False
    return subprocess.run([str(PEERS_PYTHON), "-c", "import llama_cpp"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python not in .venv-peers (run bench/setup-llamacpp.sh)")


def llama_cpp_logits(path: Path, ids: list[int], tmp: Path) -> np.ndarray:
    out = tmp / "logits.npy"
    done = subprocess.run([str(PEERS_PYTHON), "-c", _RUN, str(path), json.dumps(ids), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(out)


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """transformers' float32 logits of the checkpoint ``folder`` on ``ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama(tmp: Path) -> Path:
    return make_tiny_llama(tmp / "llama", hidden=64)


def _gpt2(tmp: Path) -> Path:
    return make_tiny_family(tmp / "gpt2", "gpt2")


def _gemma2(tmp: Path) -> Path:
    return make_tiny_family(tmp / "gemma2", "gemma2", head_dim=256, query_pre_attn_scalar=256)


def _gemma3(tmp: Path) -> Path:
    """One sliding-window layer (window 8, shorter than the sequence) and one global layer: llama.cpp
    must take the pattern from the file, not its default of five sliding layers to one global."""
    return make_tiny_family(tmp / "gemma3", "gemma3_text")


def _phi3(tmp: Path) -> Path:
    # not named "phi3": llama.cpp gives a model whose general.name says phi-3 the special-token
    # attributes of Phi-3's own vocabulary, which the test tokenizer lacks
    return make_tiny_family(tmp / "tiny-p", "phi3")


def _phi3_long(tmp: Path) -> Path:
    """Long-context rotary scaling (longrope): per-frequency factors as tensors, the attention factor
    as a key; the sequence is shorter than the original context, so the short factors apply."""
    factors = [1.0 + 0.1 * i for i in range(8)]
    return make_tiny_family(
        tmp / "tiny-p-long", "phi3", max_position_embeddings=1024, original_max_position_embeddings=256,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [2 * f for f in factors], "short_factor": factors,
                         "original_max_position_embeddings": 256},
    )


def _qwen3(tmp: Path) -> Path:
    return make_tiny_hf(tmp / "qwen3", "Qwen3Config", num_key_value_heads=2, head_dim=24)


def _gptneox(tmp: Path) -> Path:
    return make_tiny_hf(tmp / "neox", "GPTNeoXConfig", rotary_pct=0.5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma2", "gemma3", "phi3", "phi3_long", "gptneox"])
def test_llama_cpp_runs_our_f32_files_to_the_source_logits(family, cli, tmp_path):
    folder = {"llama": _llama, "gpt2": _gpt2, "qwen3": _qwen3, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3, "phi3_long": _phi3_long, "gptneox": _gptneox}[family](tmp_path)
    out = tmp_path / f"{family}.gguf"
    result = cli("export", "gguf", folder, out, "--type", "f32")
    assert result.exit_code == 0, result.output
    ids = [int(i) for i in torch.arange(3, 51).remainder(300)]
    got = llama_cpp_logits(out, ids, tmp_path)
    want = hf_logits(folder, ids)
    assert got.shape == want.shape
    # float32 on both sides; the random test models amplify summation-order differences
    assert float(np.abs(got - want).max()) <= 5e-3 * float(np.abs(want).max()), family


def test_llama_cpp_runs_gptq_blocks_as_we_measured_them(cli, tmp_path):
    """GPTQ on the Q4_K grid (hidden 256): llama.cpp's logits are those of our dense checkpoint (whose
    linears are the blocks' values) with the embedding and output head the file rounds (Q4_K, Q6_K)
    put in; llama.cpp rounds activations to 8 bits in its quantized dot products, hence the bound."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import SAMPLE_TEXT

    folder = _calm(make_tiny_llama(tmp_path / "llama256", hidden=256))
    q_dir = tmp_path / "q"
    result = cli("quantize", folder, q_dir, "--method", "gptq", "--format", "gguf:q4_k_m", "--calib", SAMPLE_TEXT, "--samples", "4", "--seq-len", "64")
    assert result.exit_code == 0, result.output
    out = tmp_path / "q.gguf"
    assert cli("export", "gguf", q_dir, out, "--type", "q4_k_m").exit_code == 0
    ids = [int(i) for i in torch.arange(3, 51).remainder(300)]
    got = llama_cpp_logits(out, ids, tmp_path)
    import gguf
    from gguf.quants import dequantize

    model = AutoModelForCausalLM.from_pretrained(q_dir, dtype=torch.float32).eval()
    reader = gguf.GGUFReader(str(out))
    heads = {name: next(t for t in reader.tensors if t.name == name) for name in ("token_embd.weight", "output.weight")}
    state = model.state_dict()
    for name, hf in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        t = heads[name]
        state[hf] = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(state[hf].shape).copy())
    model.load_state_dict(state)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    rel = float(np.abs(got - want).max()) / float(np.abs(want).max())
    assert rel < 0.05, rel
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) > 0.95


def _calm(folder: Path) -> Path:
    """The tiny model with its matrices scaled to a real model's spread (N(0, 0.05)): the test models'
    N(0, 0.2) weights amplify every rounding fourfold per matmul, which would drown llama.cpp's 8-bit
    activation rounding in chaos."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = {k: (v * 0.25 if v.dim() == 2 else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def test_llama_cpp_runs_a_head_and_mlp_pruned_model(cli, tmp_path):
    """Structured pruning leaves uniform widths and an explicit head width (fewer heads of the same
    width at the same hidden size): the export carries both, and llama.cpp runs it to transformers'
    logits of the pruned checkpoint."""
    folder = make_tiny_llama(tmp_path / "llama", hidden=64)
    pruned = tmp_path / "pruned"
    result = cli("prune", folder, pruned, "--structured", "mlp=0.5,heads=0.5", "--importance", "magnitude", "--align", "16")
    assert result.exit_code == 0, result.output
    out = tmp_path / "pruned.gguf"
    assert cli("export", "gguf", pruned, out, "--type", "f32").exit_code == 0
    ids = [int(i) for i in torch.arange(3, 51).remainder(300)]
    got = llama_cpp_logits(out, ids, tmp_path)
    config = json.loads((pruned / "config.json").read_text())
    assert config["num_attention_heads"] == 2 and config["intermediate_size"] == 64
    want = hf_logits(pruned, ids)
    assert float(np.abs(got - want).max()) <= 2e-3 * float(np.abs(want).max())
