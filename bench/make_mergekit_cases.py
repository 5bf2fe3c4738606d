"""Build the mergekit test-case oracle: mergekit's own test and example configs on tiny local models.

Run: .venv/bin/python bench/make_mergekit_cases.py   (needs .venv-peers with mergekit-yaml, ../shared/PEERS.md)

Writes tests/fixtures/mergekit_cases/:
  inputs/<model>/    fp32 tiny random checkpoints made like mergekit's tests/common.py: picollamas
                     llama_a..llama_d, picogranites granite_a/b, and a 12-layer GPT-2 of small width
  <case>.yml         one mergekit config per case, model paths relative to this folder
  outputs/<case>/    mergekit's output (cases it accepts): model.safetensors and config.json
  outputs_stable_sort/<case>/  the same, by mergekit with torch.argsort made stable (ties, breadcrumbs)
  cases.json         the manifest: per case its config, method, origin, whether mergekit accepted it
                     (and its error line when not) and whether the method draws random numbers
  README.md          the mergekit version, how the fixtures were made, what was adapted or left out
tests/test_mergekit_cases.py runs weightsmith on each case and compares with outputs/<case>.
"""

from __future__ import annotations

import argparse
import hashlib
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

from bench.common import PEERS_BIN, ROOT, STABLE_MERGEKIT  # noqa: E402
from bench.make_merge_oracle import keep_output, mergekit_version  # noqa: E402
from weightsmith.checkpoint import Checkpoint  # noqa: E402

log = logging.getLogger("make_mergekit_cases")

FIXTURES = ROOT / "tests" / "fixtures" / "mergekit_cases"

#: Methods whose output depends on random draws (mergekit's global torch generator); arcee_fusion
#: samples only on tensors over 1M elements, which these models do not have.
RANDOM_METHODS = frozenset({"dare_ties", "dare_linear", "della", "della_linear"})
#: methods that rank entries with ``torch.argsort``, whose order among equal values is not stable:
#: their outputs are also made by mergekit with a stable argsort (``outputs_stable_sort/``)
SORTING = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})

#: input name -> (architecture, torch seed). Three picollamas as mergekit's tests use, a fourth for
#: examples/ties.yml (three models and a base), two picogranites and one GPT-2.
INPUTS: dict[str, tuple[str, int]] = {
    "llama_a": ("llama", 1),
    "llama_b": ("llama", 2),
    "llama_c": ("llama", 3),
    "llama_d": ("llama", 4),
    "granite_a": ("granite", 11),
    "granite_b": ("granite", 12),
    "gpt2": ("gpt2", 21),
}


def make_input(folder: Path, arch: str, seed: int) -> None:
    """One tiny model with transformers' own random initialisation (as mergekit's tests/common.py
    makes them), saved as fp32 safetensors and config.json."""
    from transformers import GPT2Config, GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2))
    elif arch == "granite":
        model = GraniteForCausalLM(
            GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2)
        )
    else:
        # mergekit's make_gpt2size is the 124M GPT-2 (768 wide, vocab 50257); the same 12 layers at
        # width 8 keep the fixtures small and exercise the same layer mapping.
        model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_head=2, n_layer=12, n_positions=64, vocab_size=64, bos_token_id=63, eos_token_id=63))
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)


def _two_models(a: str, b: str, method: str, base: str | None = None, params: dict | None = None, dtype: str = "bfloat16") -> dict:
    """mergekit's TestBasicMerges.two_model_config: weights 0.6 and 0.4, bfloat16."""
    config: dict = {
        "merge_method": method,
        "models": [
            {"model": f"inputs/{a}", "parameters": {"weight": 0.6}},
            {"model": f"inputs/{b}", "parameters": {"weight": 0.4}},
        ],
        "dtype": dtype,
    }
    if base is not None:
        config["base_model"] = f"inputs/{base}"
    if params:
        config["parameters"] = params
    return config


def basic_cases() -> dict[str, tuple[str, dict]]:
    """name -> (origin, config): every non-VLM case of mergekit's tests/test_basic_merges.py."""
    origin = "tests/test_basic_merges.py::"
    cases: dict[str, tuple[str, dict]] = {
        "granite_copy": (
            origin + "TestGraniteMerges::test_granite_copy",
            {"merge_method": "passthrough", "models": [{"model": "inputs/granite_a"}], "dtype": "bfloat16"},
        ),
        "granite_linear": (
            origin + "TestGraniteMerges::test_granite_linear_merge",
            _two_models("granite_a", "granite_b", "linear"),
        ),
        "granite_slerp": (
            origin + "TestGraniteMerges::test_granite_slerp",
            {
                "merge_method": "slerp",
                "base_model": "inputs/granite_a",
                "models": [{"model": "inputs/granite_a"}, {"model": "inputs/granite_b"}],
                "parameters": {"t": 0.5},
                "dtype": "bfloat16",
            },
        ),
        "gpt2_copy": (
            origin + "TestBasicMerges::test_gpt2_copy",
            {"merge_method": "passthrough", "models": [{"model": "inputs/gpt2"}], "dtype": "bfloat16"},
        ),
        "gpt2_stack": (
            origin + "TestBasicMerges::test_gpt2_stack",
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "inputs/gpt2", "layer_range": [0, 12]}]} for _ in range(2)],
                "dtype": "bfloat16",
            },
        ),
        "passthrough_scale": (
            origin + "TestBasicMerges::test_passthrough_scale",
            {
                "merge_method": "passthrough",
                "models": [{"model": "inputs/llama_a", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}],
            },
        ),
        "linear": (origin + "TestBasicMerges::test_linear_merge", _two_models("llama_a", "llama_b", "linear")),
        "slerp": (
            origin + "TestBasicMerges::test_slerp_merge",
            {**_two_models("llama_a", "llama_b", "slerp", base="llama_a"), "parameters": {"t": 0.35}},
        ),
    }
    for base in (None, "llama_c"):
        for row_wise in (False, True):
            for flatten in (False, True):
                name = "nuslerp" + ("_base" if base else "") + ("_row_wise" if row_wise else "") + ("_flatten" if flatten else "")
                params = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
                cases[name] = (origin + "TestBasicMerges::test_nuslerp_merges", _two_models("llama_a", "llama_b", "nuslerp", base, params))
    zero_sum = _two_models("llama_a", "llama_b", "nuslerp", "llama_c", {"nuslerp_row_wise": False, "nuslerp_flatten": False})
    zero_sum["models"][0]["parameters"]["weight"] = -0.5
    zero_sum["models"][1]["parameters"]["weight"] = 0.5
    cases["nuslerp_zero_sum"] = (origin + "TestBasicMerges::test_nuslerp_merges (weights that sum to zero)", zero_sum)
    with_base_c = {
        "task_arithmetic": None,
        "breadcrumbs": None,
        "ties": {"density": 0.3},
        "sce": {"select_topk": 0.5},
        "ram": None,
        "ramplus_tl": {"r": 0.05, "alpha": 1.0},
        "multislerp": None,
        "dare_ties": {"density": 0.66},
    }
    for method, params in with_base_c.items():
        cases[method] = (origin + f"TestBasicMerges::test_{method}_merge", _two_models("llama_a", "llama_b", method, "llama_c", params))
    cases["model_stock"] = (
        origin + "TestBasicMerges::test_model_stock_merge",
        _two_models("llama_b", "llama_c", "model_stock", "llama_a"),
    )
    cases["model_stock_filter_wise"] = (
        origin + "TestBasicMerges::test_model_stock_filterwise_merge",
        _two_models("llama_b", "llama_c", "model_stock", "llama_a", {"filter_wise": True}),
    )
    cases["arcee_fusion"] = (origin + "TestBasicMerges::test_arcee_fusion_merge", _two_models("llama_a", "llama_b", "arcee_fusion", "llama_a"))
    cases["nearswap"] = (
        origin + "TestBasicMerges::test_nearswap_merge",
        _two_models("llama_a", "llama_b", "nearswap", "llama_a", {"t": 0.0001}),
    )
    cases["della"] = (
        origin + "TestBasicMerges::test_della_merge",
        _two_models("llama_a", "llama_b", "della", "llama_c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    )
    cases["della_invalid_epsilon"] = (
        origin + "TestBasicMerges::test_della_invalid_epsilon",
        _two_models("llama_a", "llama_b", "della", "llama_c", {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
    )
    cases["karcher"] = (
        origin + "TestBasicMerges::test_karcher_merge",
        _two_models("llama_a", "llama_b", "karcher", "llama_c", {"max_iter": 5, "tol": 1e-5}),
    )
    return cases


def extra_cases() -> dict[str, tuple[str, dict]]:
    """Cases mergekit's tests do not run: the linear variants of the random methods (della's and
    dare_ties' parameters without the sign consensus), linear with its two models listed the
    other way round (mergekit sums in list order, so the rounding, hence the bits, follow it), and
    breadcrumbs (with and without sign consensus) at a density below 1 (its test config keeps
    every entry)."""
    swapped = _two_models("llama_b", "llama_a", "linear")
    swapped["models"][0]["parameters"]["weight"], swapped["models"][1]["parameters"]["weight"] = 0.4, 0.6
    return {
        "linear_swapped": ("added: linear's test config with the models in the other order", swapped),
        "della_linear": (
            "added: della's test config with merge_method della_linear",
            _two_models("llama_a", "llama_b", "della_linear", "llama_c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
        ),
        "dare_linear": (
            "added: dare_ties' test config with merge_method dare_linear",
            _two_models("llama_a", "llama_b", "dare_linear", "llama_c", {"density": 0.66}),
        ),
        "breadcrumbs_sparse": (
            "added: breadcrumbs' test config with density 0.7 and gamma 0.05",
            _two_models("llama_a", "llama_b", "breadcrumbs", "llama_c", {"density": 0.7, "gamma": 0.05}),
        ),
        "breadcrumbs_ties_sparse": (
            "added: breadcrumbs' test config with merge_method breadcrumbs_ties, density 0.7 and gamma 0.05",
            _two_models("llama_a", "llama_b", "breadcrumbs_ties", "llama_c", {"density": 0.7, "gamma": 0.05}),
        ),
    }


def example_cases() -> dict[str, tuple[str, dict]]:
    """mergekit's examples/*.yml with the 7B/13B models replaced by the picollamas and layer ranges
    scaled from 40 layers to 2 (the README lists each replacement)."""
    return {
        "example_arcee_fusion": (
            "examples/arcee_fusion.yml",
            {
                "models": [{"model": "inputs/llama_a"}, {"model": "inputs/llama_b"}],
                "merge_method": "arcee_fusion",
                "base_model": "inputs/llama_a",
                "dtype": "bfloat16",
            },
        ),
        "example_bio_merge": (
            "examples/bio-merge.yml",
            {
                "models": [
                    {"model": "inputs/llama_a", "parameters": {"density": 0.5, "weight": 0.5}},
                    {"model": "inputs/llama_b", "parameters": {"density": 0.5, "weight": 0.5}},
                ],
                "merge_method": "ties",
                "base_model": "inputs/llama_c",
                "parameters": {"normalize": False, "int8_mask": True},
                "dtype": "float16",
            },
        ),
        "example_gradient_slerp": (
            "examples/gradient-slerp.yml",
            {
                "slices": [
                    {
                        "sources": [
                            {"model": "inputs/llama_a", "layer_range": [0, 2]},
                            {"model": "inputs/llama_b", "layer_range": [0, 2]},
                        ]
                    }
                ],
                "merge_method": "slerp",
                "base_model": "inputs/llama_a",
                "parameters": {
                    "t": [
                        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                        {"value": 0.5},
                    ]
                },
                "dtype": "float16",
            },
        ),
        "example_linear": (
            "examples/linear.yml",
            {
                "models": [
                    {"model": "inputs/llama_a", "parameters": {"weight": 1.0}},
                    {"model": "inputs/llama_b", "parameters": {"weight": 0.3}},
                    {"model": "inputs/llama_c", "parameters": {"weight": 0.5}},
                ],
                "merge_method": "linear",
                "dtype": "float16",
            },
        ),
        "example_orcamini_platy_44layer": (
            "examples/orcamini-platy-44layer.yml",
            {
                "slices": [
                    {"sources": [{"model": "inputs/llama_a", "layer_range": [0, 2]}]},
                    {"sources": [{"model": "inputs/llama_b", "layer_range": [1, 2]}]},
                ],
                "merge_method": "passthrough",
                "dtype": "float16",
            },
        ),
        "example_ties": (
            "examples/ties.yml",
            {
                "models": [
                    {"model": "inputs/llama_a", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                    {"model": "inputs/llama_b", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                    {
                        "model": "inputs/llama_c",
                        "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
                    },
                ],
                "merge_method": "ties",
                "base_model": "inputs/llama_d",
                "parameters": {"normalize": True, "int8_mask": True},
                "dtype": "float16",
            },
        ),
    }


#: The deterministic cases also written in float16 and float32 (the tests use bfloat16).
DTYPE_VARIANTS = (
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "task_arithmetic",
    "ties",
    "breadcrumbs",
    "model_stock",
    "sce",
    "arcee_fusion",
    "nearswap",
    "ram",
    "ramplus_tl",
)


def all_cases() -> dict[str, tuple[str, dict]]:
    cases = {**basic_cases(), **extra_cases()}
    for name in DTYPE_VARIANTS:
        origin, config = cases[name]
        for suffix, dtype in (("fp16", "float16"), ("fp32", "float32")):
            cases[f"{name}_{suffix}"] = (f"{origin}, dtype {dtype}", {**config, "dtype": dtype})
    cases.update(example_cases())
    return cases


def run_mergekit(config_path: Path, out: Path, stable_sort: bool = False) -> str | None:
    """Run mergekit-yaml in the fixture folder (with ``stable_sort``, with ``torch.argsort`` made
    stable); None when it merged, else its error line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    flags = ("--random-seed", "0", "--quiet", "--no-copy-tokenizer", "--no-write-model-card")
    command: list = [PEERS_BIN / "mergekit-yaml"]
    if stable_sort:
        script = out.parent / "mergekit_stable_argsort.py"
        script.write_text(STABLE_MERGEKIT)
        command = [PEERS_BIN / "python", script]
    proc = subprocess.run([*command, config_path, out, *flags], cwd=FIXTURES, env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    # the exception's own line: the last line naming an error (tracebacks end with it)
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    return (errors or lines or [f"exit {proc.returncode}"])[-1]


def describe_output(folder: Path) -> dict:
    """What a reader of the manifest wants to know of mergekit's output without opening it: its
    dtypes, how many entries are not finite, and a digest of the tensors (equal digests, equal outputs)."""
    ckpt = Checkpoint(folder)
    nonfinite = sum((~torch.isfinite(ckpt.get(name))).sum().item() for name in ckpt.names())
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:16]
    return {"out_dtypes": sorted({ckpt.info(name).st_dtype for name in ckpt.names()}), "nonfinite": nonfinite, "sha256": digest}


def observations(manifest: dict[str, dict], cases: dict[str, tuple[str, dict]]) -> str:
    """README lines on what mergekit did that a reader might not expect, from the manifest."""
    lines = []
    for name, case in manifest.items():
        if not case["accepted"]:
            lines.append(f"  - `{name}`: refused: `{case['error']}`")
            continue
        wanted = ST_NAMES.get(cases[name][1].get("dtype"))
        if wanted and case["out_dtypes"] != [wanted]:
            lines.append(f"  - `{name}`: `dtype: {cases[name][1]['dtype']}`, but mergekit wrote {', '.join(case['out_dtypes'])}")
        if case["nonfinite"]:
            lines.append(f"  - `{name}`: mergekit's output has {case['nonfinite']} non-finite entries")
    same: dict[str, list[str]] = {}
    for name, case in manifest.items():
        if case["accepted"]:
            same.setdefault(case["sha256"], []).append(name)
    lines += [f"  - identical outputs: {', '.join(f'`{n}`' for n in group)}" for group in same.values() if len(group) > 1]
    return "\n".join(lines)


ST_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


README = """# mergekit test-case oracle

Generated by `bench/make_mergekit_cases.py` with {version}, CPU, `--random-seed 0`,
`HF_HUB_OFFLINE=1`. `cases.json` lists every case: its config, method, origin in mergekit's
sources, whether mergekit accepted it (with its error line when not) and whether the method is
random. `tests/test_mergekit_cases.py` runs weightsmith on each.

## Inputs (`inputs/`, fp32 safetensors as transformers' `save_pretrained` writes them)

Made like mergekit's `tests/common.py`, with transformers' own random initialisation (normal
std 0.02 matrices, norms all ones, so every model has the same 1-D tensors) under fixed torch seeds:

* `llama_a`, `llama_b`, `llama_c` (seeds 1, 2, 3): `make_picollama`, vocab 64, hidden 32,
  intermediate 48, 16 heads, 2 layers, untied head. `llama_d` (seed 4) is the same, added for
  `examples/ties.yml`, which merges three models onto a fourth.
* `granite_a`, `granite_b` (seeds 11, 12): `make_picogranite`, the same sizes, 2 heads, 2 kv heads.
* `gpt2` (seed 21): mergekit's `make_gpt2size` is the 124M GPT-2; here the same 12 layers at width
  8 (2 heads, vocab 64, 64 positions, tied head, bos/eos 63) to keep the fixtures small.

## Cases

* Every non-VLM case of mergekit's `tests/test_basic_merges.py` (`TestGraniteMerges`,
  `TestBasicMerges`) with its parameters (weights 0.6/0.4, `dtype: bfloat16`), `model_a/b/c` being
  `llama_a/b/c`; the nuslerp loop is one case per combination (`nuslerp[_base][_row_wise][_flatten]`,
  `_base` = `base_model: llama_c`) plus `nuslerp_zero_sum`. `della_invalid_epsilon` is the one
  mergekit refuses, as its test expects.
* `della_linear` and `dare_linear` (added): the della and dare_ties test configs with the linear
  variant of the method. `linear_swapped` (added): linear's test config with the models listed
  the other way round (llama_b 0.4, llama_a 0.6).
* `<case>_fp16`, `<case>_fp32`: the deterministic cases {variants} with `dtype: float16` or
  `float32` instead of bfloat16.
* `example_*`: mergekit's `examples/*.yml`, adapted:
  - `arcee_fusion.yml`: model_a, model_b -> llama_a, llama_b.
  - `bio-merge.yml`: Mistral-7B-Instruct-v0.2, BioMistral-7B -> llama_a, llama_b; base
    Mistral-7B-v0.1 -> llama_c.
  - `gradient-slerp.yml`: orca_mini_v3_13b, Platypus2-13B -> llama_a, llama_b; layer_range
    [0, 40] -> [0, 2] (the t gradients stay as they are, mergekit spreads them over the layers).
  - `linear.yml`: orca_mini_v3_13b, WizardLM-13B-V1.2, Platypus2-13B -> llama_a, llama_b, llama_c.
  - `orcamini-platy-44layer.yml`: orca_mini [0, 24] + Platypus2 [20, 40] (44 layers from 40) ->
    llama_a [0, 2] + llama_b [1, 2] (3 layers from 2, overlapping by one layer as the original does).
  - `ties.yml`: orca_mini, Platypus2, WizardMath -> llama_a, llama_b, llama_c; base Llama-2-13B ->
    llama_d (density and weight gradients unchanged).
  The YAML comments are dropped; parameters, methods and dtypes are unchanged.

## Outputs (`outputs/<case>/`)

mergekit's tensors, rewritten unchanged (same names, dtypes, values) into one `model.safetensors`,
and its `config.json`; nothing for refused cases.

`outputs_stable_sort/<case>/`, for the methods that rank entries by magnitude (ties, breadcrumbs):
the same run with `torch.argsort` made stable. mergekit's own argsort is not stable, and among
equal magnitudes at the density cut (frequent in bf16 and fp16) it keeps entries in an order only
its sort algorithm decides; weightsmith keeps the lower index, as the stable sort does. The test
requires weightsmith's output to equal the stable-sort output exactly, and to differ from
mergekit's own exactly where the stable-sort output does.

## Left out

The VLM cases (`test_*_VLM_merge*`), which need LLaVA checkpoints (a vision tower and projector
beside the language model); the issue lets them out.

## What mergekit did that one might not expect

* Input order counts: mergekit accumulates linear's weighted sum in the order the models are
  listed, so `linear_swapped` differs from `linear` in the last bit of some entries.
* `ties` trims with `torch.argsort(descending=True)`, which is not a stable sort: where equal
  magnitudes straddle the density threshold (common in bfloat16 and float16 deltas, rare in
  float32) it keeps other entries than a stable sort by position would.
* `karcher` takes the base model as one more input: with `base_model: llama_c` it is the equally
  weighted Karcher mean of llama_a, llama_b and llama_c (the same bytes as listing the three
  without a base); the models' `weight` is not used.
* `nuslerp` with weights summing to zero (`nuslerp_zero_sum`) interpolates at t = 0.5; with
  `nuslerp_flatten: true`, `nuslerp_row_wise` changes nothing.
* `breadcrumbs` with the test's parameters (density left at 1) sparsifies nothing, so it writes
  task_arithmetic's bytes.
* Every model's norm weights are ones, so 1-D tensors are equal across inputs (zero deltas,
  parallel vectors). `multislerp` in float16 turns them into NaN: its eps of 1e-8 underflows to 0
  in float16 and 0/0 follows; bfloat16 and float32 fall back to the linear average (ones).
* Found in the manifest:
{observations}

## Random methods

{random}: mergekit draws their masks from torch's global generator, weightsmith from per-tensor
seeded generators, so the values cannot match; the test checks them for structure and statistics
instead. arcee_fusion samples only on tensors over 1M elements, so it is deterministic here.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="case names to regenerate (default: all, and the inputs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cases = all_cases()
    names = args.only or list(cases)
    manifest_path = FIXTURES / "cases.json"
    if args.only:
        manifest = json.loads(manifest_path.read_text())
    else:
        shutil.rmtree(FIXTURES, ignore_errors=True)
        FIXTURES.mkdir(parents=True)
        for name, (arch, seed) in INPUTS.items():
            make_input(FIXTURES / "inputs" / name, arch, seed)
        manifest = {}
    for name in names:
        origin, config = cases[name]
        config_path = FIXTURES / f"{name}.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.rmtree(FIXTURES / "outputs" / name, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="mergekit-cases-") as tmp:
            produced = Path(tmp) / "out"
            error = run_mergekit(config_path, produced)
            if error is None:
                keep_output(produced, FIXTURES / "outputs" / name)
        method = config["merge_method"]
        shutil.rmtree(FIXTURES / "outputs_stable_sort" / name, ignore_errors=True)
        if error is None and method in SORTING:
            with tempfile.TemporaryDirectory(prefix="mergekit-cases-") as tmp:
                produced = Path(tmp) / "out"
                if run_mergekit(config_path, produced, stable_sort=True) is None:
                    keep_output(produced, FIXTURES / "outputs_stable_sort" / name)
        manifest[name] = {
            "config": config_path.name,
            "method": method,
            "origin": origin,
            "accepted": error is None,
            "deterministic": method not in RANDOM_METHODS,
            "stable_sort_output": (FIXTURES / "outputs_stable_sort" / name).is_dir(),
            "error": error,
            **(describe_output(FIXTURES / "outputs" / name) if error is None else {}),
        }
        log.info("%s: %s", name, "merged" if error is None else f"refused: {error}")
    manifest_path.write_text(json.dumps({name: manifest[name] for name in sorted(manifest)}, indent=1) + "\n")
    variants = ", ".join(f"`{name}`" for name in DTYPE_VARIANTS)
    random = ", ".join(f"`{name}`" for name in sorted(RANDOM_METHODS))
    (FIXTURES / "README.md").write_text(README.format(version=mergekit_version(), variants=variants, random=random, observations=observations(manifest, cases)))
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    log.info("fixtures: %s (%.0f KB)", FIXTURES, total / 1024)
    print(json.dumps({"fixtures": str(FIXTURES), "cases": len(manifest), "kilobytes": round(total / 1024)}))


if __name__ == "__main__":
    main()
