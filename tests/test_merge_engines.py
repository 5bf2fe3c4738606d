"""The numpy merge engine against the torch engine: the same bits for every method it runs, in
every dtype it takes; torch never imported on its path; the cases it declines go to torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from merge.arith import NumpyArith, TorchArith
from merge.npmath import bf16_bits, round_to
from merge.run import merge_checkpoints
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.errors import WeightsmithError

from .conftest import make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fine_tune(src: Path, dest: Path, seed: int, dtype: torch.dtype, noise: float = 0.05) -> Path:
    """``src`` plus Gaussian noise, stored in ``dtype`` (a stand-in fine-tune)."""
    ckpt = Checkpoint(src)
    gen = torch.Generator().manual_seed(seed)
    with CheckpointWriter(dest, source=src, force=True) as writer:
        for name in ckpt.names():
            tensor = ckpt.get(name).float()
            writer.add(name, (tensor + noise * torch.randn(tensor.shape, generator=gen)).to(dtype))
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    tiny = make_tiny_llama(root / "tiny", seed=0, hidden=64, layers=3, vocab=96)
    out = {}
    for tag, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16), ("f32", torch.float32)):
        out[f"base-{tag}"] = fine_tune(tiny, root / f"base-{tag}", 10, dtype, noise=0.0)
        out[f"a-{tag}"] = fine_tune(tiny, root / f"a-{tag}", 11, dtype)
        out[f"b-{tag}"] = fine_tune(tiny, root / f"b-{tag}", 12, dtype)
        out[f"c-{tag}"] = fine_tune(tiny, root / f"c-{tag}", 13, dtype, noise=0.02)
    return out


def configs(m: dict[str, Path], tag: str) -> dict[str, dict]:
    base, a, b, c = (str(m[f"{k}-{tag}"]) for k in ("base", "a", "b", "c"))
    deltas = lambda params: [{"model": x, "parameters": dict(params)} for x in (a, b, c)]  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}},
                                                       {"model": c, "parameters": {"weight": [0.1, 0.9]}}]},
        "linear_raw": {"merge_method": "linear", "parameters": {"normalize": False},
                       "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.55}}]},
        "soup": {"merge_method": "soup", "models": [{"model": a}, {"model": b}, {"model": c}]},
        "slerp": {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.4, 1.0]}, {"value": 0.35}]}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": deltas({"weight": 0.45}),
                            "parameters": {"lambda": 0.8}},
        "task_arithmetic_norm": {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"normalize": True},
                                 "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 0.3}}]},
        "dare_linear": {"merge_method": "dare_linear", "base_model": base, "models": deltas({"weight": 0.5, "density": 0.4})},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "parameters": {"normalize": True},
                      "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                                 {"model": b, "parameters": {"weight": 0.7, "density": 0.3}},
                                 {"model": c, "parameters": {"weight": 1.0, "density": 1.0}}]},
        "dare_ties_2": {"merge_method": "dare_ties", "base_model": base, "parameters": {"rescale": False},
                        "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                                   {"model": b, "parameters": {"weight": 1.0, "density": 0.5}}]},
    }


def raw_tensors(folder: Path) -> dict[str, tuple[str, bytes]]:
    ckpt = Checkpoint(folder)
    return {name: (str(t.dtype), t.contiguous().view(torch.uint8).numpy().tobytes()) for name, t in ckpt.iter_tensors()}


def both_engines(tmp_path: Path, config: dict, tag: str, threads: int = 2) -> tuple[dict, dict]:
    out = {}
    for engine in ("numpy", "torch"):
        report = merge_checkpoints(config, tmp_path / f"{tag}-{engine}", engine=engine, seed=7, threads=threads)
        assert report.engine == engine
        out[engine] = raw_tensors(tmp_path / f"{tag}-{engine}")
    return out["numpy"], out["torch"]


@pytest.mark.parametrize("tag", ["bf16", "f16", "f32"])
@pytest.mark.parametrize(
    "method", ["linear", "linear_raw", "soup", "task_arithmetic", "task_arithmetic_norm", "dare_linear", "dare_ties", "dare_ties_2"]
)
def test_numpy_engine_writes_the_torch_engines_bits(models, tmp_path, method, tag):
    ours, theirs = both_engines(tmp_path, configs(models, tag)[method], f"{method}-{tag}")
    assert ours.keys() == theirs.keys() and len(ours) > 20
    differing = [name for name in ours if ours[name] != theirs[name]]
    assert differing == []


@pytest.mark.parametrize("dtype,out_dtype", [("bfloat16", None), ("float16", "bfloat16"), ("float32", "float16"), (None, "float32")])
def test_numpy_engine_casts_like_torch(models, tmp_path, dtype, out_dtype):
    """Mixed input dtypes (bf16 + fp16 promote to fp32), a config dtype and an out_dtype."""
    config = {"merge_method": "dare_ties", "base_model": str(models["base-f32"]),
              "models": [{"model": str(models["a-bf16"]), "parameters": {"weight": 0.8, "density": 0.6}},
                         {"model": str(models["b-f16"]), "parameters": {"weight": 0.6, "density": 0.6}}]}
    if dtype:
        config["dtype"] = dtype
    if out_dtype:
        config["out_dtype"] = out_dtype
    ours, theirs = both_engines(tmp_path, config, "cast")
    assert [n for n in ours if ours[n] != theirs[n]] == []
    expected = {"bfloat16": "torch.bfloat16", "float16": "torch.float16", "float32": "torch.float32"}[out_dtype or dtype or "float32"]
    assert {d for d, _ in ours.values()} == {expected}


def test_numpy_engine_output_does_not_depend_on_threads(models, tmp_path):
    config = configs(models, "bf16")["dare_ties"]
    one = merge_checkpoints(config, tmp_path / "one", engine="numpy", threads=1, seed=3)
    three = merge_checkpoints(config, tmp_path / "three", engine="numpy", threads=3, seed=3)
    assert one.engine == three.engine == "numpy"
    assert raw_tensors(tmp_path / "one") == raw_tensors(tmp_path / "three")


def test_auto_picks_numpy_where_it_applies_and_torch_elsewhere(models, tmp_path):
    cfg = configs(models, "bf16")
    assert merge_checkpoints(cfg["linear"], tmp_path / "lin").engine == "numpy"
    ties = {"merge_method": "ties", "base_model": str(models["base-bf16"]),
            "models": [{"model": str(models["a-bf16"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    assert merge_checkpoints(ties, tmp_path / "ties").engine == "torch"
    record = json.loads((tmp_path / "ties" / "weightsmith.json").read_text())
    assert record["figures"]["engine"] == "torch"
    with pytest.raises(WeightsmithError, match="numpy engine cannot run this merge: no numpy version of ties"):
        merge_checkpoints(ties, tmp_path / "ties-np", engine="numpy")
    assert not (tmp_path / "ties-np").exists()
    with pytest.raises(WeightsmithError, match="unknown engine"):
        merge_checkpoints(ties, tmp_path / "x", engine="jax")


def test_numpy_engine_path_imports_no_torch(models, tmp_path):
    config = configs(models, "bf16")["dare_ties"]
    script = (
        "import sys, json\n"
        "from merge.run import merge_checkpoints\n"
        f"report = merge_checkpoints(json.loads({json.dumps(json.dumps(config))}), {str(tmp_path / 'out')!r}, seed=1)\n"
        "print(report.engine, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert done.stdout.split() == ["numpy", "False"]
    assert len(Checkpoint(tmp_path / "out").names()) > 20


def test_bf16_rounding_is_torchs():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFFFFFFF, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0x80000000, 0], dtype=np.uint32)
    x = np.concatenate([bits, special]).view(np.float32)
    expected = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = bf16_bits(x)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], expected[~nan])
    assert np.all(ours[nan] == 0x7FC0)
    half = torch.from_numpy(x[~nan].copy()).to(torch.float16).float().numpy()
    assert np.array_equal(round_to(x[~nan], "F16"), half)


@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7, 1e-7, 123456.789, 1.00390625])
def test_scalars_are_torch_scalars(value):
    """Both engines' parameters (weights, L1 norms, factors) hold the values torch stores."""
    for name, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        expected = float(torch.tensor(value, dtype=dtype))
        assert float(NumpyArith(name).scalars([value])[0]) == expected
        assert float(TorchArith(dtype, "cpu").scalars([value])[0]) == expected
