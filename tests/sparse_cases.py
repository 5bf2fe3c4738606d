"""The sparse-format cases, shared by tests/test_prune_sparse.py and bench/make_sparse_cases.py.

The inputs are made from seeded generators, so the oracle script (compressed-tensors 0.14.0.1 and
transformers 5.3, in bench/cache/ct014) and the tests build the same tensors; the manifest stores
their hashes next to the hashes of what the library made of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from compress.grid import QuantGrid, QuantizedTensor
from compress.prune.config import NM
from compress.prune.sparse import (
    SPARSE_24_BITMASK,
    model_format,
    sparse_linear,
    sparse_quantization_config,
    sparsity_config,
)
from weightsmith.arch import arch_for
from weightsmith.checkpoint import Checkpoint, CheckpointWriter, config_with_dtype

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sparse"
MANIFEST = FIXTURES / "cases.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: name -> (rows, cols, dtype, seed): unstructured weights, about half zeros, one row all zero
BITMASK_CASES = {f"{dt}_{rows}x{cols}": (rows, cols, dt, seed) for seed, (dt, rows, cols) in enumerate(
    [(dt, rows, cols) for dt in DTYPES for rows, cols in ((24, 70), (7, 8), (16, 128))]
)}
#: name -> (rows, cols, dtype, seed): 2:4 weights with groups of 0, 1 and 2 non-zeros
S24_CASES = {f"{dt}_{rows}x{cols}": (rows, cols, dt, 100 + seed) for seed, (dt, rows, cols) in enumerate(
    [(dt, rows, cols) for dt in DTYPES for rows, cols in ((24, 64), (5, 12), (16, 256))]
)}
#: name -> (out, in, bits, group_size, seed): 2:4 codes with float16 scales
MARLIN_CASES = {
    f"w{bits}_g{gs}_{out}x{inp}": (out, inp, bits, gs, 200 + i)
    for i, (bits, gs, out, inp) in enumerate(
        [(bits, gs, out, inp) for bits in (4, 8) for gs in (128, -1) for out, inp in ((128, 256), (256, 512))]
    )
}
#: name -> (pruning, sparse format): tiny Llama checkpoints in bf16
MODEL_CASES = {
    "two_four_24bitmask": ("2:4", SPARSE_24_BITMASK),
    "two_four_bitmask": ("2:4", "sparse-bitmask"),
    "half_bitmask": ("0.5", "sparse-bitmask"),
}
MODEL_SEED = 7
MODEL_HIDDEN = 64
MODEL_VOCAB = 96
PROMPT = [[1, 5, 9, 33, 2, 71, 40, 8, 8, 60, 11, 90]]


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw bytes."""
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8) if t.numel() else t
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(bytes(raw.numpy().tobytes()) if t.numel() else b"")
    return h.hexdigest()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bitmask_input(rows: int, cols: int, dtype: str, seed: int) -> torch.Tensor:
    g = _gen(seed)
    w = torch.randn(rows, cols, generator=g) * 0.1
    w[torch.rand(rows, cols, generator=g) < 0.5] = 0
    w[rows // 2] = 0
    return w.to(DTYPES[dtype])


def s24_input(rows: int, cols: int, dtype: str, seed: int) -> torch.Tensor:
    g = _gen(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.1).view(rows, cols // 4, 4)
    kept = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1) < 2
    # about one group in four keeps one weight, one in eight none: placeholders must match
    drop_one = torch.rand(rows, cols // 4, 1, generator=g) < 0.25
    first = kept.int().argmax(-1, keepdim=True)
    kept = kept & ~(drop_one & (torch.arange(4) == first))
    kept = kept & ~(torch.rand(rows, cols // 4, 1, generator=g) < 0.125)
    return (w * kept).view(rows, cols).to(DTYPES[dtype])


def marlin_input(out: int, inp: int, bits: int, group_size: int, seed: int) -> QuantizedTensor:
    g = _gen(seed)
    grid = QuantGrid(bits, True, group_size)
    mid = grid.midpoint
    signed = torch.randint(-mid, mid, (out, inp // 4, 4), generator=g)
    kept = torch.rand(out, inp // 4, 4, generator=g).argsort(-1) < 2
    kept = kept & ~(torch.rand(out, inp // 4, 1, generator=g) < 0.125)
    codes = (signed * kept).view(out, inp) + mid
    n_groups = grid.n_groups(inp)
    scales = (torch.rand(out, n_groups, generator=g) * 0.02 + 0.001).to(torch.float16)
    zeros = torch.full((out, n_groups), mid, dtype=torch.uint8)
    return QuantizedTensor(codes=codes.to(torch.uint8), scales=scales, zeros=zeros, grid=grid, shape=(out, inp))


# ---- tiny Llama checkpoints --------------------------------------------------------------------


def prune_two_four(w: torch.Tensor) -> torch.Tensor:
    """Zero the two smallest magnitudes of every four consecutive weights of a row."""
    groups = w.view(w.shape[0], -1, 4)
    order = groups.abs().float().argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return (groups * keep).view_as(w)


def prune_share(w: torch.Tensor, share: float) -> torch.Tensor:
    """Zero the ``share`` smallest magnitudes of every row."""
    n = int(w.shape[1] * share)
    order = w.abs().float().argsort(dim=-1, stable=True)
    keep = torch.ones_like(w, dtype=torch.bool).scatter_(-1, order[:, :n], False)
    return w * keep


def linear_modules(ckpt: Checkpoint) -> list[str]:
    arch = arch_for(ckpt.config)
    layers = arch.num_layers(ckpt.config) or 0
    return [f"{arch.layer_prefix(i)}{linear}" for i in range(layers) for linear in arch.linears]


def pruned_llama(folder: Path, pruning: str) -> Path:
    """The tiny Llama of conftest in bf16, its decoder linears pruned 2:4 or to a share of zeros."""
    from tests.conftest import make_tiny_llama

    raw = make_tiny_llama(folder.parent / f"{folder.name}-raw", seed=MODEL_SEED, hidden=MODEL_HIDDEN, vocab=MODEL_VOCAB)
    src = Checkpoint(raw)
    linears = {f"{m}.weight" for m in linear_modules(src)}
    with CheckpointWriter(folder, source=raw, config=config_with_dtype(src.config, "BF16"), force=True) as writer:
        for name in src.names():
            t = src.get(name).to(torch.bfloat16)
            if name in linears:
                t = prune_two_four(t) if pruning == "2:4" else prune_share(t, float(pruning))
            writer.add(name, t.contiguous())
    return folder


def write_sparse(dense: Path, dest: Path, pruning: str, fmt: str) -> tuple[Path, int]:
    """``dense`` rewritten with its decoder linears in ``fmt`` (what the prune pass does); returns
    the folder and the bytes the linears saved."""
    src = Checkpoint(dense)
    modules = linear_modules(src)
    pattern = NM(2, 4) if pruning == "2:4" else None
    assert model_format([pattern] * len(modules)) == SPARSE_24_BITMASK or fmt != SPARSE_24_BITMASK
    zeros = total = 0
    for m in modules:
        w = src.get(f"{m}.weight")
        zeros += int((w == 0).sum())
        total += w.numel()
    block = sparse_quantization_config(
        sparsity_config(fmt, modules, ["lm_head"], global_sparsity=zeros / total, structure=pattern)
    )
    saved = 0
    weights = {f"{m}.weight": m for m in modules}
    with CheckpointWriter(dest, source=dense, config={**src.config, "quantization_config": block}, force=True) as writer:
        for name in src.names():
            if name in weights:
                linear = sparse_linear(weights[name], src.get(name), pattern, fmt)
                saved += linear.bytes_saved
                for key, tensor in linear.tensors.items():
                    writer.add(key, tensor)
            else:
                writer.copy_from(src, name)
    return dest, saved


def file_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())
