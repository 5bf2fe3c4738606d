"""The spherical methods nuslerp, multislerp and karcher: known answers on hand-made vectors, the
edge cases mergekit handles (colinear and zero vectors, zero-sum weights, a zero weighted mean),
the input contract and parameter errors as one line, and mergekit 0.1.5's exact bytes.

The expected hashes were made with mergekit 0.1.5 (torch 2.13, CPU) on the same inputs:
``merge_methods.get(name)((TensorGroup.from_tensors(inputs, base_index=...),), parameters=...)`` for
the tensor cases, ``mergekit-yaml config out --random-seed 0`` for the checkpoint cases; each hash
is the sha256 (first 16 hex digits) of the output bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge.arith import whole_group
from merge.karcher import karcher_mean
from merge.methods import METHODS, BasePolicy
from merge.multislerp import ZeroMeanError, multislerp
from merge.nuslerp import interpolation_t, nuslerp, nuslerp_merge
from merge.params import Kind, Scope
from merge.run import merge_checkpoints

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
E1, E2, E3 = torch.eye(3, dtype=torch.float64)


def pseudo(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values in [-1, 1) from a linear congruential generator: the same on every machine and torch
    version (float64; cast by the caller)."""
    state = seed * 2654435761 % 2**32
    values = []
    for _ in range(math.prod(shape)):
        state = (1103515245 * state + 12345) % 2**31
        values.append(state / 2**30 - 1.0)
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def run_method(name: str, tensors: list[torch.Tensor], base: int | None = None, **params: Any) -> torch.Tensor:
    """METHODS[name] on whole tensors, as an engine runs it: shared parameters with their
    defaults, per-input weights from ``params["weight"]`` (one per input other than the base)."""
    method = METHODS[name]
    shared = {p.name: params.get(p.name, p.default) for p in method.params if p.scope is Scope.shared}
    weights = iter(params.get("weight", ()))
    per_input = [{} if i == base else {"weight": next(weights)} for i in range(len(tensors))] if "weight" in params else None
    group, result = whole_group(tensors, base=base, shared=shared, per_input=per_input)
    method.apply(group)
    return result()


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


# ---- the registry entries: mergekit 0.1.5's parameters, defaults and contracts ------------------


def test_registry_entries_match_mergekit():
    nu, multi, karcher = METHODS["nuslerp"], METHODS["multislerp"], METHODS["karcher"]
    assert [(p.name, p.kind, p.scope, p.required or p.default) for p in nu.params] == [
        ("weight", Kind.number, Scope.non_base, True),
        ("nuslerp_row_wise", Kind.flag, Scope.shared, False),
        ("nuslerp_flatten", Kind.flag, Scope.shared, True),
    ]
    assert (nu.base, nu.min_non_base, nu.max_non_base) == (BasePolicy.optional, 2, 2)
    assert [(p.name, p.kind, p.scope, p.required or p.default) for p in multi.params] == [
        ("weight", Kind.number, Scope.non_base, True),
        ("normalize_weights", Kind.flag, Scope.shared, True),
        ("eps", Kind.number, Scope.shared, 1e-8),
    ]
    assert (multi.base, multi.min_non_base, multi.max_non_base) == (BasePolicy.optional, 1, None)
    assert [(p.name, p.kind, p.scope, p.default) for p in karcher.params] == [
        ("max_iter", Kind.integer, Scope.shared, 10),
        ("tol", Kind.number, Scope.shared, 1e-5),
    ]
    assert (karcher.base, karcher.min_inputs, karcher.max_inputs) == (BasePolicy.ignored, 1, None)
    assert not any(m.numpy or m.random for m in (nu, multi, karcher))
    assert all(m.paper.startswith("https://") for m in (nu, multi, karcher))


# ---- nuslerp ------------------------------------------------------------------------------------


def test_nuslerp_t_is_the_second_weights_share_and_half_for_zero_sum():
    assert interpolation_t([0.6, 0.4]) == 0.4 / (0.6 + 0.4)
    assert interpolation_t([3.0, 1.0]) == 0.25
    assert interpolation_t([0.5, -0.5]) == 0.5
    assert interpolation_t([1e-7, 0.0]) == 0.5


def test_nuslerp_of_orthogonal_unit_vectors_walks_the_circle():
    for weights, angle in (([1.0, 1.0], math.pi / 4), ([2.0, 1.0], math.pi / 6), ([1.0, 3.0], 3 * math.pi / 8)):
        out = nuslerp_merge([E1, E2], weights)
        assert torch.allclose(out, math.cos(angle) * E1 + math.sin(angle) * E2, atol=1e-12)
    # zero-sum weights: the midpoint
    assert torch.allclose(nuslerp_merge([E1, E2], [0.5, -0.5]), (E1 + E2) / math.sqrt(2), atol=1e-12)


def test_nuslerp_endpoints_and_colinear_inputs():
    a, b = pseudo((6, 4), 1), pseudo((6, 4), 2)
    assert torch.allclose(nuslerp(0.0, a, b), a, atol=1e-12)
    assert torch.allclose(nuslerp(1.0, a, b), b, atol=1e-12)
    # colinear (parallel or antiparallel): linear interpolation, exactly
    assert torch.equal(nuslerp(0.25, a, 3 * a), 0.75 * a + 0.25 * (3 * a))
    assert torch.equal(nuslerp(0.25, a, -a), 0.75 * a + 0.25 * (-a))


def test_nuslerp_zero_vectors_stay_finite():
    zero = torch.zeros(4, dtype=torch.float64)
    v = torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    # a zero vector has no direction: cos = 0, so the result is sin(t pi/2) v
    assert torch.allclose(nuslerp(0.5, zero, v), math.sin(math.pi / 4) * v, atol=1e-12)
    assert torch.equal(nuslerp(0.5, zero, zero), zero)


def slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Textbook slerp of two float64 vectors."""
    theta = math.acos(float(v0 @ v1 / (v0.norm() * v1.norm())))
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def test_nuslerp_slices_rows_columns_or_the_whole_tensor():
    a, b = pseudo((5, 3), 1), pseudo((5, 3), 2)
    t = 0.3
    whole = slerp_reference(t, a.reshape(-1), b.reshape(-1)).reshape(5, 3)
    assert torch.allclose(nuslerp(t, a, b), whole, atol=1e-12)
    last_dim = torch.stack([slerp_reference(t, a[i], b[i]) for i in range(5)])
    assert torch.allclose(nuslerp(t, a, b, flatten=False), last_dim, atol=1e-12)
    # "row-wise" is mergekit's dim 0: each slice along the first dimension, i.e. each column here
    along_first = torch.stack([slerp_reference(t, a[:, j], b[:, j]) for j in range(3)], dim=1)
    assert torch.allclose(nuslerp(t, a, b, flatten=False, row_wise=True), along_first, atol=1e-12)
    # flatten wins over row_wise, as in mergekit
    assert torch.equal(nuslerp(t, a, b, row_wise=True), nuslerp(t, a, b))


def test_nuslerp_with_a_base_interpolates_the_task_vectors():
    base = pseudo((3,), 3)
    out = nuslerp_merge([base + E1, base + E2], [1.0, 1.0], base)
    assert torch.allclose(out, base + (E1 + E2) / math.sqrt(2), atol=1e-12)


# ---- multislerp ---------------------------------------------------------------------------------


def test_multislerp_direction_of_the_weighted_unit_mean_and_mean_norm():
    # unit inputs e1 and 2 e2 with weights 0.6 / 0.4: direction (0.6, 0.4), length 0.6 * 1 + 0.4 * 2
    out = multislerp([E1, 2 * E2], [0.6, 0.4])
    assert torch.allclose(out, 1.4 * (0.6 * E1 + 0.4 * E2) / math.sqrt(0.52), atol=1e-7)
    # three orthonormal vectors, equal weights: the centre of the octant, unit length
    assert torch.allclose(multislerp([E1, E2, E3], [1.0, 1.0, 1.0]), (E1 + E2 + E3) / math.sqrt(3), atol=1e-7)


def test_multislerp_weights_unnormalized_scale_the_length():
    assert torch.allclose(multislerp([E1, E1.clone()], [1.0, 1.0], normalize_weights=False), 2 * E1, atol=1e-7)
    assert torch.allclose(multislerp([E1, E1.clone()], [1.0, 1.0]), E1, atol=1e-7)


def test_multislerp_one_input_base_and_eps():
    a = pseudo((3, 2), 1)
    assert multislerp([a], [0.3]) is a
    base = pseudo((3,), 2)
    out = multislerp([base + E1, base + 2 * E2], [0.6, 0.4], base)
    assert torch.allclose(out, base + 1.4 * (0.6 * E1 + 0.4 * E2) / math.sqrt(0.52), atol=1e-7)
    # eps is added to the tangent's length (the exp map then scales the mean by cos(eps)) and is the
    # length under which the weighted mean counts as zero (two inputs: their weighted sum)
    assert torch.allclose(multislerp([E1, E2], [1.0, 1.0], eps=0.1), math.cos(0.1) * (E1 + E2) / math.sqrt(2), atol=1e-12)
    assert torch.equal(multislerp([E1, E2], [1.0, 1.0], eps=1.0), (E1 + E2) / 2)


def test_multislerp_zero_weighted_mean():
    a = pseudo((5,), 1)
    # two inputs fall back to their weighted sum: here zero
    assert torch.equal(multislerp([a, -a], [0.5, 0.5]), torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(multislerp([a, -a], [2.0, 2.0], normalize_weights=False), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ZeroMeanError, match="weighted mean of the inputs' directions is zero"):
        multislerp([a, -a, 2 * a], [0.5, 0.5, 0.0])


# ---- karcher ------------------------------------------------------------------------------------


def test_karcher_mean_of_orthonormal_vectors_is_their_centre():
    assert torch.allclose(karcher_mean([E1, E2], [0.5, 0.5]), (E1 + E2) / math.sqrt(2), atol=1e-12)
    thirds = [1 / 3] * 3
    assert torch.allclose(karcher_mean([E1, E2, E3], thirds), (E1 + E2 + E3) / math.sqrt(3), atol=1e-12)
    # the direction from the unit vectors, the length the weighted mean of the norms
    assert torch.allclose(karcher_mean([E1, 3 * E2], [0.5, 0.5]), 2 * (E1 + E2) / math.sqrt(2), atol=1e-12)


def test_karcher_weighted_mean_on_a_circle_is_the_weighted_mean_angle():
    # on a circle the Fréchet mean of points within a half circle is at their weighted mean angle
    out = karcher_mean([E1, E2], [0.75, 0.25])
    angle = 0.25 * math.pi / 2
    assert torch.allclose(out, math.cos(angle) * E1 + math.sin(angle) * E2, atol=1e-9)
    # no iteration: the first guess, the normalized weighted sum of the unit vectors
    start = karcher_mean([E1, E2], [0.75, 0.25], max_iter=0)
    assert torch.allclose(start, (0.75 * E1 + 0.25 * E2) / math.sqrt(0.75**2 + 0.25**2), atol=1e-12)


def test_karcher_zero_inputs():
    zero = torch.zeros(3, dtype=torch.float64)
    # a zero input takes no part in the direction but counts in the length with its weight
    assert torch.allclose(karcher_mean([zero, E1, E2], [1 / 3] * 3), (2 / 3) * (E1 + E2) / math.sqrt(2), atol=1e-12)
    out = karcher_mean([zero, 1e-6 * E1], [0.5, 0.5])
    assert torch.equal(out, zero)
    a = pseudo((2, 2), 1)
    assert karcher_mean([a], [1.0]) is a


def test_karcher_base_is_one_more_input():
    a, b, c = (pseudo((4, 3), s).float() for s in (1, 2, 3))
    assert torch.equal(run_method("karcher", [a, b, c], base=2), karcher_mean([a, b, c], [1 / 3] * 3))


# ---- mergekit's bytes on tensors ----------------------------------------------------------------

SHAPE = (16, 12)
#: name: (method, seeds of the inputs, base index, parameters)
TENSOR_CASES: dict[str, tuple[str, tuple[int, ...], int | None, dict]] = {
    "nuslerp": ("nuslerp", (1, 2), None, {"weight": [0.6, 0.4]}),
    "nuslerp_base_rows": ("nuslerp", (1, 2, 3), 2, {"weight": [0.6, 0.4], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp_last_dim": ("nuslerp", (1, 2), None, {"weight": [0.6, 0.4], "nuslerp_flatten": False}),
    "nuslerp_zero_sum": ("nuslerp", (1, 2), None, {"weight": [0.5, -0.5]}),
    "multislerp": ("multislerp", (1, 2), None, {"weight": [0.6, 0.4]}),
    "multislerp_base": ("multislerp", (3, 1, 2), 0, {"weight": [0.6, 0.4]}),
    "multislerp_three": ("multislerp", (1, 2, 3), None, {"weight": [0.6, 0.4, 0.3], "normalize_weights": False, "eps": 1e-3}),
    "karcher": ("karcher", (1, 2), None, {}),
    "karcher_three": ("karcher", (1, 2, 3), None, {"max_iter": 3, "tol": 1e-3}),
}
#: mergekit 0.1.5's output per case and dtype (bf16, fp16, fp32): the first 16 hex digits of its sha256
TENSOR_HASHES = {
    "nuslerp": ("8e6e8a21a266b525", "23b747baf3436f84", "33510e1931dd3a2e"),
    "nuslerp_base_rows": ("f5969c190eaf2f3d", "fa5af3642d962175", "675fae14646beefb"),
    "nuslerp_last_dim": ("f294766d8fb8faf6", "d317692c8f1ccf37", "c6ae3f38807dc5ea"),
    "nuslerp_zero_sum": ("5188df49d8840960", "51d0e21d45d89348", "5fd69946f1e8e0a3"),
    "multislerp": ("0812c3e33e6a79a4", "e329dfa5a910ee54", "221edfb12677d1f8"),
    "multislerp_base": ("1cc2cac1fb92af9d", "6fda312f629ead8b", "7547d7c952e19ca4"),
    "multislerp_three": ("da8c0ffbbf7bff34", "82698ea52e8206cc", "9992ef737b00420d"),
    "karcher": ("919a880287881d52", "b36aed72c453684c", "2d29b06a4aa72851"),
    "karcher_three": ("9b5f52c181efba48", "dc9241833c7ec232", "bc28cf64b3ee9f06"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_tensor_bytes_match_mergekit(case):
    method, seeds, base, params = TENSOR_CASES[case]
    for dtype, expected in zip(DTYPES, TENSOR_HASHES[case]):
        out = run_method(method, [pseudo(SHAPE, s).to(dtype) for s in seeds], base, **params)
        assert out.dtype == dtype and out.shape == SHAPE
        assert digest(out) == expected, (case, dtype)


# ---- checkpoints: the merge pass end to end -----------------------------------------------------

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 32,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
LAYER_SHAPES = {
    "input_layernorm.weight": (16,),
    "self_attn.q_proj.weight": (16, 16),
    "self_attn.k_proj.weight": (8, 16),
    "self_attn.v_proj.weight": (8, 16),
    "self_attn.o_proj.weight": (16, 16),
    "post_attention_layernorm.weight": (16,),
    "mlp.gate_proj.weight": (32, 16),
    "mlp.up_proj.weight": (32, 16),
    "mlp.down_proj.weight": (16, 32),
}


def write_llama(folder: Path, seed: int, scale: float = 1.0) -> Path:
    """A tiny Llama checkpoint (float32) whose tensors are :func:`pseudo` values times ``scale``:
    independent directions for different seeds."""
    shapes = {"model.embed_tokens.weight": (32, 16), "model.norm.weight": (16,), "lm_head.weight": (32, 16)}
    for layer in range(2):
        shapes.update({f"model.layers.{layer}.{k}": v for k, v in LAYER_SHAPES.items()})
    tensors = {name: (scale * pseudo(shape, seed * 1000 + k)).float().contiguous() for k, (name, shape) in enumerate(sorted(shapes.items()))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def folder_digest(folder: Path) -> str:
    """sha256 (16 hex digits) over the output tensors: names in order, dtype and bytes of each."""
    h = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    for name in sorted(tensors):
        h.update(f"{name}\0{tensors[name].dtype}\0".encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_configs(models: dict[str, Path]) -> dict[str, dict]:
    """The checkpoint cases (``dtype`` added per run): inputs in the config's order, the base
    appended by both tools when not listed."""
    a, b, c = (str(models[k]) for k in ("a", "b", "c"))
    weighted = [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}]
    return {
        "nuslerp": {"merge_method": "nuslerp", "models": weighted},
        "nuslerp_base_rows": {"merge_method": "nuslerp", "base_model": c, "models": weighted, "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "multislerp_base": {"merge_method": "multislerp", "base_model": c, "models": weighted},
        "multislerp_three": {"merge_method": "multislerp", "models": [*weighted, {"model": c, "parameters": {"weight": 0.3}}], "parameters": {"normalize_weights": False}},
        "karcher_base": {"merge_method": "karcher", "base_model": c, "models": [{"model": a}, {"model": b}]},
        "karcher_iterations": {"merge_method": "karcher", "models": [{"model": b}, {"model": c}, {"model": a}], "parameters": {"max_iter": 3, "tol": 1e-3}},
    }


#: mergekit-yaml's output per case and config dtype (bfloat16, float16, float32), see folder_digest
CHECKPOINT_HASHES: dict[str, tuple[str, str, str]] = {
    "nuslerp": ("e97a852c87309803", "c923c67eb6129176", "87cee0fcc58ad4b4"),
    "nuslerp_base_rows": ("e4f5b552d17cbe03", "64fe05be22a8ea4d", "12dba2dc70a2574d"),
    "multislerp_base": ("5620cfa339b2be2a", "e62829befe7bf63b", "7a5880486905410c"),
    "multislerp_three": ("858c7dab557a741e", "7177cf0eb01f12cc", "137f7ab9f936c348"),
    "karcher_base": ("0c566e16f7c37ffe", "4d2f78df57c48a37", "68451a3a955d95a6"),
    "karcher_iterations": ("2237c0d463c4db46", "d144ba6faf5fd355", "a6dd9d800518d682"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spherical")
    return {"a": write_llama(root / "a", 1), "b": write_llama(root / "b", 2, 0.5), "c": write_llama(root / "c", 3, 2.0)}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_HASHES))
def test_checkpoint_bytes_match_mergekit(models, tmp_path, case):
    for dtype, expected in zip(("bfloat16", "float16", "float32"), CHECKPOINT_HASHES[case]):
        out = tmp_path / dtype
        merge_checkpoints({**checkpoint_configs(models)[case], "dtype": dtype}, out, engine="auto")
        assert folder_digest(out) == expected, (case, dtype)


# ---- errors: one line, before anything is written where the config shows them -----------------


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "merge.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"merge_method": "nuslerp", "models": ["a", "b", "c"], "parameters": {"weight": 1.0}}, "nuslerp takes exactly 2 models (besides the base), got 3"),
        ({"merge_method": "nuslerp", "base_model": "c", "models": ["a"], "parameters": {"weight": 1.0}}, "nuslerp takes exactly 2 models (besides the base), got 1"),
        ({"merge_method": "nuslerp", "models": ["a", "b"]}, "parameter 'weight' has no value for"),
        ({"merge_method": "multislerp", "base_model": "a", "models": ["a"], "parameters": {"weight": 1.0}}, "multislerp takes at least 1 model"),
        ({"merge_method": "multislerp", "models": ["a", "b"], "parameters": {"weight": 1.0, "normalize_weights": "maybe"}}, "parameter 'normalize_weights': 'maybe' is not true or false"),
        ({"merge_method": "karcher", "models": ["a", "b"], "parameters": {"max_iter": 2.5}}, "parameter 'max_iter': 2.5 is not an integer"),
    ],
)
def test_contract_and_parameter_errors_are_one_line(models, tmp_path, cli, config, expected):
    config = dict(config)
    config["models"] = [{"model": str(models[m])} for m in config["models"]]
    if "base_model" in config:
        config["base_model"] = str(models[config["base_model"]])
    result = cli("merge", write_config(tmp_path, config), tmp_path / "out")
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "preflight found" in message and expected in message, message
    assert not (tmp_path / "out").exists()


def test_multislerp_zero_weighted_mean_is_one_line(models, tmp_path, cli):
    tensors = load_file(models["a"] / "model.safetensors")
    negated = tmp_path / "negated"
    negated.mkdir()
    (negated / "config.json").write_text(json.dumps(LLAMA))
    save_file({k: -v for k, v in tensors.items()}, negated / "model.safetensors", metadata={"format": "pt"})
    # a and -a with equal weights, a third input with weight 0: the unit vectors' weighted mean is 0
    weighted = [(models["a"], 0.5), (negated, 0.5), (models["b"], 0.0)]
    config = {"merge_method": "multislerp", "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in weighted]}
    result = cli("merge", write_config(tmp_path, config), tmp_path / "out")
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "weighted mean of the inputs' directions is zero" in message, message
    assert "error: tensor model.embed_tokens.weight: multislerp: " in message, message  # the first tensor merged
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    # two antipodal inputs fall back to their weighted sum (zero), as mergekit does
    two = {"merge_method": "multislerp", "models": config["models"][:2], "parameters": {"weight": 0.5}}
    merge_checkpoints(two, tmp_path / "two")
    assert all(not t.any() for t in load_file(tmp_path / "two" / "model.safetensors").values())
