"""Build the mergekit oracle fixtures: tiny random Llamas and what mergekit makes of them.

Run: .venv/bin/python bench/make_merge_oracle.py   (needs .venv-peers with mergekit-yaml, ../shared/PEERS.md)

Writes tests/fixtures/mergekit/:
  inputs/{base,ft1,ft2}/   fp32 tiny Llamas (hidden 8, 3 layers, vocab 64): a random base and two
                           "fine-tunes" (the base plus independent noise; 1-D tensors get so little
                           noise that SLERP falls back to linear interpolation on them)
  <name>.yml               mergekit configs, model paths relative to this folder
  outputs/<name>/          mergekit's output: model.safetensors and config.json
  README.md                the mergekit version and how the fixtures were made
tests/test_merge_oracle.py runs weightsmith on each config and compares with outputs/<name>.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PEERS_BIN, ROOT  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402
from weightsmith.checkpoint import Checkpoint, CheckpointWriter  # noqa: E402

log = logging.getLogger("make_merge_oracle")

FIXTURES = ROOT / "tests" / "fixtures" / "mergekit"
HIDDEN, LAYERS, VOCAB = 8, 3, 64

#: name -> mergekit config. Parameters exercise scalars, depth gradients (3 layers: t = 0, 0.5, 1)
#: and {filter, value} lists, at the global, per-model and per-slice levels.
CONFIGS: dict[str, dict] = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "inputs/base", "parameters": {"weight": 1.0}},
            {"model": "inputs/ft1", "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.5}]}},
            {"model": "inputs/ft2", "parameters": {"weight": [0.3, 0.9, 0.6]}},
        ],
    },
    "linear_bf16_out": {
        "merge_method": "linear",
        "models": [{"model": "inputs/ft1"}, {"model": "inputs/ft2"}],
        "parameters": {"weight": 0.5, "normalize": False},
        "out_dtype": "bfloat16",
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "inputs/base",
        "models": [{"model": "inputs/base"}, {"model": "inputs/ft1"}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.3, 0.8, 1]},
                {"filter": "mlp", "value": [1, 0.6, 0.2, 0]},
                {"value": 0.45},
            ]
        },
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "inputs/base",
        "models": [
            {"model": "inputs/ft1", "parameters": {"weight": 0.7}},
            {"model": "inputs/ft2", "parameters": {"weight": [0.2, 0.6]}},
        ],
        "parameters": {"lambda": 0.9},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "inputs/base",
        "models": [
            {"model": "inputs/base"},
            {"model": "inputs/ft1", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "inputs/ft2", "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
        ],
        "parameters": {"int8_mask": True},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": "inputs/base",
        "models": [
            {"model": "inputs/ft1", "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.1}},
            {"model": "inputs/ft2", "parameters": {"weight": 0.8, "density": 0.8, "gamma": 0.05}},
        ],
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "inputs/base",
        "models": [{"model": "inputs/ft1"}, {"model": "inputs/ft2"}],
    },
    "passthrough": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "inputs/base", "layer_range": [0, 2]}]},
            {"sources": [{"model": "inputs/ft1", "layer_range": [1, 3], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}]}}]},
            {"sources": [{"model": "inputs/ft2", "layer_range": [2, 3]}]},
        ],
    },
}


def make_inputs(folder: Path) -> None:
    """A random base and two noisy copies of it, fp32, without tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        made = make_tiny_llama(Path(tmp) / "base", seed=0, hidden=HIDDEN, layers=LAYERS, vocab=VOCAB)
        src = Checkpoint(made)
        for seed, name in ((None, "base"), (1, "ft1"), (2, "ft2")):
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            with CheckpointWriter(folder / name, source=made, force=True, header_reserve=0) as writer:
                for tensor_name in src.names():
                    tensor = src.get(tensor_name)
                    if gen is not None:
                        tensor = tensor + torch.randn(tensor.shape, generator=gen) * (0.05 if tensor.dim() > 1 else 1e-3)
                    writer.add(tensor_name, tensor.contiguous())
    for name in ("base", "ft1", "ft2"):
        (folder / name / "weightsmith.json").unlink(missing_ok=True)


def run_mergekit(config_path: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        str(PEERS_BIN / "mergekit-yaml"),
        str(config_path),
        str(out),
        "--random-seed",
        "0",
        "--quiet",
        "--no-copy-tokenizer",
        "--no-write-model-card",
    ]
    proc = subprocess.run(cmd, cwd=FIXTURES, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def keep_output(produced: Path, dest: Path) -> None:
    """mergekit's weights as one model.safetensors, plus its config.json."""
    dest.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(produced)
    with tempfile.TemporaryDirectory() as side:
        shutil.copyfile(produced / "config.json", Path(side) / "config.json")
        tmp = dest.parent / f".{dest.name}-tmp"
        with CheckpointWriter(tmp, source=side, force=True, header_reserve=0) as writer:
            for name in ckpt.names():
                writer.add(name, ckpt.get(name).clone())
    (tmp / "weightsmith.json").unlink(missing_ok=True)
    shutil.rmtree(dest)
    tmp.rename(dest)


def mergekit_version() -> str:
    proc = subprocess.run(
        [str(PEERS_BIN / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    mk, torch_version = proc.stdout.split()
    return f"mergekit {mk} (torch {torch_version})"


README = """# mergekit oracle fixtures

Generated by `bench/make_merge_oracle.py` with {version}, CPU, `--random-seed 0`.

* `inputs/base`: a random fp32 Llama (hidden {hidden}, {layers} layers, 4/2 heads, vocab {vocab},
  untied head) from `tests/conftest.py:make_tiny_llama(seed=0)`; `inputs/ft1`, `inputs/ft2`: the
  base plus independent Gaussian noise (std 0.05 on matrices, 0.001 on 1-D tensors, generator
  seeds 1 and 2). No tokenizer files.
* `<name>.yml`: the mergekit configs, model paths relative to this folder (mergekit ran here).
* `outputs/<name>/`: mergekit's tensors, rewritten unchanged into one `model.safetensors`, and its
  `config.json`.

`tests/test_merge_oracle.py` merges each config with weightsmith and requires max |difference| <=
1e-6 (fp32) or equality (the bf16 output). DARE (`dare_linear`, `dare_ties`) is not here: its
random masks come from torch's global generator in mergekit and from a per-tensor seeded generator
in weightsmith, so the two cannot agree. Breadcrumbs is deterministic in both (it sorts).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="config names to regenerate (default: all, and the inputs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.only or list(CONFIGS)
    if not args.only:
        shutil.rmtree(FIXTURES, ignore_errors=True)
        FIXTURES.mkdir(parents=True)
        make_inputs(FIXTURES / "inputs")
    for name in names:
        config_path = FIXTURES / f"{name}.yml"
        config_path.write_text(yaml.safe_dump(CONFIGS[name], sort_keys=False))
        with tempfile.TemporaryDirectory(prefix="mergekit-oracle-") as tmp:
            produced = Path(tmp) / "out"
            run_mergekit(config_path, produced)
            keep_output(produced, FIXTURES / "outputs" / name)
        log.info("%s: done", name)
    (FIXTURES / "README.md").write_text(README.format(version=mergekit_version(), hidden=HIDDEN, layers=LAYERS, vocab=VOCAB))
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    log.info("fixtures: %s (%.0f KB)", FIXTURES, total / 1024)
    print(json.dumps({"fixtures": str(FIXTURES), "kilobytes": round(total / 1024)}))


if __name__ == "__main__":
    main()
