"""Build the sparse-format oracle: compressed-tensors' own compressors and transformers' loader.

compressed-tensors 0.15 removed its sparse compressors (sparse-bitmask, sparse-24-bitmask,
marlin-24), and the transformers releases that go with 0.15+ no longer read ``sparsity_config``. The
last pair that does is compressed-tensors 0.14.0.1 with transformers 5.3.0; they live in their own
folder, in front of weightsmith's venv (the same torch), installed by bench/setup-sparse-oracle.sh.

Run: bash bench/setup-sparse-oracle.sh && PYTHONPATH=bench/cache/ct014:. .venv/bin/python bench/make_sparse_cases.py

Writes tests/fixtures/sparse/cases.json: for every case of tests/sparse_cases.py the hash of its
input, the hashes of the tensors the library's compressor makes of it, whether the library's
decompressor gives the input back from weightsmith's tensors; for the tiny Llama checkpoints written
by weightsmith in each sparse format, the hash of the file, whether transformers 5.3 loads it to
the same logits as the dense checkpoint (bit for bit, bf16), the library's compressed state dict
and config block against weightsmith's. tests/test_prune_sparse.py checks weightsmith against it.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import compressed_tensors  # noqa: E402
import transformers  # noqa: E402
from compressed_tensors.compressors import (  # noqa: E402
    BitmaskCompressor,
    Marlin24Compressor,
    ModelCompressor,
    Sparse24BitMaskCompressor,
)
from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig, SparsityCompressionConfig  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

from compress.prune.sparse import (  # noqa: E402
    bitmask_compress,
    marlin24_compress,
    sparse24_compress,
)
from tests import sparse_cases as cases  # noqa: E402
from weightsmith.checkpoint import Checkpoint  # noqa: E402

log = logging.getLogger("make_sparse_cases")
ORACLE = {"compressed-tensors": "0.14.0.1", "transformers": "5.3.0"}


def _hashes(tensors: dict[str, torch.Tensor], prefix: str = "layer.") -> dict[str, str]:
    return {k.removeprefix(prefix): cases.tensor_hash(v) for k, v in sorted(tensors.items())}


def _library_decodes(compressor, ours: dict[str, torch.Tensor], expected: torch.Tensor) -> bool:
    state = {f"layer.{k}": v for k, v in ours.items()}
    out = dict(compressor.decompress_from_state_dict(state))
    w = out["layer.weight"]
    return w.dtype == expected.dtype and bool(torch.equal(w, expected))


def bitmask_cases() -> dict:
    lib = BitmaskCompressor(config=BitmaskConfig())
    result = {}
    for name, args in cases.BITMASK_CASES.items():
        w = cases.bitmask_input(*args)
        theirs = lib.compress({"layer.weight": w})
        result[name] = {
            "input": cases.tensor_hash(w),
            "library": _hashes(theirs),
            "library_decodes_ours": _library_decodes(lib, bitmask_compress(w), w),
        }
    return result


def s24_cases() -> dict:
    lib = Sparse24BitMaskCompressor(config=Sparse24BitMaskConfig())
    result = {}
    for name, args in cases.S24_CASES.items():
        w = cases.s24_input(*args)
        theirs = lib.compress({"layer.weight": w})
        result[name] = {
            "input": cases.tensor_hash(w),
            "library": _hashes(theirs),
            "library_decodes_ours": _library_decodes(lib, sparse24_compress(w), w),
        }
    return result


def marlin_cases() -> dict:
    result = {}
    for name, (out, inp, bits, gs, seed) in cases.MARLIN_CASES.items():
        q = cases.marlin_input(out, inp, bits, gs, seed)
        args = QuantizationArgs(num_bits=bits, symmetric=True, strategy="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs)
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        state = {"layer.weight": q.dequantize(), "layer.weight_scale": q.scales}
        theirs = Marlin24Compressor().compress(state, names_to_scheme={"layer": scheme})
        ours = marlin24_compress(q)
        result[name] = {
            "input": {"codes": cases.tensor_hash(q.codes), "scales": cases.tensor_hash(q.scales)},
            "library": _hashes(theirs),
            "ours_equal_library": sorted(theirs) == sorted(f"layer.{k}" for k in ours)
            and all(torch.equal(theirs[f"layer.{k}"], v) and theirs[f"layer.{k}"].dtype == v.dtype for k, v in ours.items()),
        }
    return result


def _logits(folder: Path) -> tuple[torch.Tensor, dict]:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    with torch.no_grad():
        logits = model(torch.tensor(cases.PROMPT)).logits
    return logits, {k: sorted(v) if isinstance(v, (set, list)) else str(v) for k, v in info.items() if v}


def _library_decoded_logits(sparse: Path, dense: Path, compressor: ModelCompressor) -> torch.Tensor:
    """Logits of the dense model with its weights replaced by what the library's sparsity
    decompressor reads from the file ``sparse`` (no transformers quantizer involved)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
    state = dict(compressor.sparsity_compressor.decompress(str(sparse)))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(torch.tensor(cases.PROMPT)).logits


def model_cases(work: Path) -> dict:
    result = {}
    dense_by_pruning = {}
    for pruning in sorted({p for p, _ in cases.MODEL_CASES.values()}):
        folder = cases.pruned_llama(work / f"dense-{pruning.replace(':', '-')}", pruning)
        dense_by_pruning[pruning] = (folder, *_logits(folder))
    for name, (pruning, fmt) in cases.MODEL_CASES.items():
        dense, dense_logits, _ = dense_by_pruning[pruning]
        sparse, saved = cases.write_sparse(dense, work / name, pruning, fmt)
        try:
            logits, info = _logits(sparse)
            load_error = None
        except Exception as exc:  # noqa: BLE001 - the loader's failure is what is recorded
            logits, info, load_error = None, {}, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        ours = Checkpoint(sparse)
        config = json.loads((sparse / "config.json").read_text())["quantization_config"]
        # the library compresses the dense model with the same sparsity config
        lib_config = SparsityCompressionConfig.load_from_registry(fmt, **config["sparsity_config"])
        compressor = ModelCompressor(sparsity_config=lib_config)
        model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
        theirs = compressor.compress(model)
        same_tensors = set(theirs) == set(ours.names()) and all(
            cases.tensor_hash(theirs[k]) == cases.tensor_hash(ours.get(k)) for k in theirs
        )
        decoded = _library_decoded_logits(sparse, dense, compressor)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text("{}")
            compressor.update_config(tmp)
            lib_block = json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]
        result[name] = {
            "pruning": pruning,
            "format": fmt,
            "dense_file": cases.file_hash(dense),
            "dense_bytes": (dense / "model.safetensors").stat().st_size,
            "sparse_file": cases.file_hash(sparse),
            "sparse_bytes": (sparse / "model.safetensors").stat().st_size,
            "linear_bytes_saved": saved,
            "logits_equal_dense": logits is not None and bool(torch.equal(logits, dense_logits)),
            "load_error": load_error,
            "loading_info": info,
            "library_state_dict_equal": same_tensors,
            "library_decoded_logits_equal_dense": bool(torch.equal(decoded, dense_logits)),
            "library_config_block": lib_block,
        }
        log.info("%s: logits equal %s (%s), library state dict equal %s", name, result[name]["logits_equal_dense"], load_error, same_tensors)
    return result


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = {"compressed-tensors": compressed_tensors.__version__, "transformers": transformers.__version__}
    if found != ORACLE:
        raise SystemExit(f"needs {ORACLE}, found {found}: run bench/setup-sparse-oracle.sh and put bench/cache/ct014 first on PYTHONPATH")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = {
            "oracle": {**found, "torch": torch.__version__},
            "bitmask": bitmask_cases(),
            "sparse24": s24_cases(),
            "marlin24": marlin_cases(),
            "models": model_cases(Path(tmp)),
        }
    cases.FIXTURES.mkdir(parents=True, exist_ok=True)
    cases.MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("wrote %s", cases.MANIFEST)


if __name__ == "__main__":
    main()
