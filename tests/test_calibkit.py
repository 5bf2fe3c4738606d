"""weightsmith.calibkit on a tiny Llama layer: input statistics, shared inputs, the write-back."""

from __future__ import annotations

import pytest
import torch

from weightsmith.calibkit import (
    accumulate_hessian,
    accumulate_square_sum,
    input_statistics,
    shared_inputs,
    write_layer,
)
from weightsmith.calibrate import LayerwiseRunner, input_hooks
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.data import text_blocks
from weightsmith.models import load_tokenizer

from .conftest import SAMPLE_TEXT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture()
def step(tiny_llama):
    """Layer 0 of the tiny Llama, loaded, with 6 calibration blocks of 24 tokens in 3 batches."""
    src = Checkpoint(tiny_llama)
    tokens = text_blocks(load_tokenizer(src.folder), SAMPLE_TEXT, 24, 6, seed=0)
    runner = LayerwiseRunner(src, tokens, batch_size=2)
    return next(iter(runner))


def _raw_inputs(step) -> dict[str, torch.Tensor]:
    """Every linear's inputs over all batches, [tokens, in], captured directly."""
    seen: dict[str, list[torch.Tensor]] = {}
    with input_hooks(step.module, LLAMA, lambda name, x: seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).clone())), torch.inference_mode():
        for hidden, kwargs in zip(step.inputs.hidden, step.inputs.kwargs):
            step.module(hidden, **kwargs)
    return {name: torch.cat(xs) for name, xs in seen.items()}


def test_accumulate_square_sum_streams() -> None:
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    sums = None
    for part in (x[:3].reshape(1, 3, 7), x[3:3], x[3:]):
        sums = accumulate_square_sum(sums, part)
    assert sums is not None and sums.dtype == torch.float64
    torch.testing.assert_close(sums, x.double().square().sum(0), rtol=1e-6, atol=0)


def test_input_statistics_equal_a_direct_computation(step) -> None:
    raw = _raw_inputs(step)
    wanted = {name: ("hessian", "norms") if name.startswith("mlp") else ("norms",) for name in LLAMA}
    wanted["self_attn.k_proj"] = ("hessian",)  # a sharer asking for more than its input's first reader
    stats = input_statistics(step, wanted)
    for name in LLAMA:
        x = raw[name]
        assert stats[name].tokens == x.shape[0] == 6 * 24
        torch.testing.assert_close(stats[name].norms, torch.linalg.vector_norm(x.double(), dim=0).float(), rtol=1e-5, atol=1e-6)
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        direct = 2.0 / raw[name].shape[0] * raw[name].double().T @ raw[name].double()
        torch.testing.assert_close(stats[name].hessian.double(), direct, rtol=1e-4, atol=1e-5 * float(direct.abs().max()))
    assert stats["self_attn.o_proj"].hessian is None
    with pytest.raises(ValueError, match="unknown statistics"):
        input_statistics(step, {"mlp.up_proj": ("mean",)})


def test_shared_input_detection_groups_qkv_and_gate_up(step) -> None:
    groups = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    assert shared_inputs(step, LLAMA) == groups
    stats = input_statistics(step, {name: ("hessian",) for name in LLAMA})
    assert stats.groups == groups
    assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"] and stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert not torch.allclose(stats["self_attn.o_proj"].hessian, stats["mlp.gate_proj"].hessian)
    # the shared Hessian is each linear's own
    raw = _raw_inputs(step)
    for name in LLAMA:
        alone, _ = accumulate_hessian(None, raw[name], 0)
        torch.testing.assert_close(stats[name].hessian, alone, rtol=1e-5, atol=1e-6)


def test_write_layer_writes_the_changed_module_and_the_custom_writers(step, tiny_llama, tmp_path) -> None:
    src = Checkpoint(tiny_llama)
    norm = step.module.input_layernorm.weight
    norm.data = norm.data * 2
    calls: list[tuple[str, torch.dtype]] = []
    with CheckpointWriter(tmp_path / "out", source=src.folder, force=True) as writer:

        def custom(module: str, dtype: torch.dtype) -> None:
            calls.append((module, dtype))
            writer.add(f"{module}.weight", torch.zeros(src.info(f"{module}.weight").shape, dtype=dtype))

        write_layer(step, src, writer, {"mlp.up_proj": custom})
    out = Checkpoint(tmp_path / "out")
    assert calls == [("model.layers.0.mlp.up_proj", src.info("model.layers.0.mlp.up_proj.weight").dtype)]
    assert sorted(out.names()) == sorted(n for n in src.names() if n.startswith("model.layers.0."))
    assert torch.equal(out.get("model.layers.0.input_layernorm.weight"), src.get("model.layers.0.input_layernorm.weight") * 2)
    assert torch.equal(out.get("model.layers.0.mlp.up_proj.weight"), torch.zeros_like(src.get("model.layers.0.mlp.up_proj.weight")))
    assert torch.equal(out.get("model.layers.0.self_attn.q_proj.weight"), src.get("model.layers.0.self_attn.q_proj.weight"))

