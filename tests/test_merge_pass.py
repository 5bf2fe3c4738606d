"""The merge pass end to end on tiny checkpoints: layouts, preflight, determinism, inputs of every
kind (folders, packed compressed-tensors, GGUF), the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from merge.run import merge_checkpoints
from weightsmith.checkpoint import Checkpoint, CheckpointWriter
from weightsmith.errors import WeightsmithError

from .conftest import make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def noisy_copy(src: Path, dest: Path, seed: int, drop: str | None = None) -> Path:
    """``src`` plus Gaussian noise (a stand-in fine-tune), optionally without the tensor ``drop``."""
    ckpt = Checkpoint(src)
    gen = torch.Generator().manual_seed(seed)
    with CheckpointWriter(dest, source=src, force=True) as writer:
        for name in ckpt.names():
            if name != drop:
                tensor = ckpt.get(name)
                writer.add(name, tensor + 0.05 * torch.randn(tensor.shape, generator=gen))
    return dest


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-zoo")
    base = make_tiny_llama(root / "base", seed=0, hidden=32, layers=3, vocab=64)
    return {
        "base": base,
        "ft1": noisy_copy(base, root / "ft1", 1),
        "ft2": noisy_copy(base, root / "ft2", 2),
        "wide": make_tiny_llama(root / "wide", seed=3, hidden=64, layers=3, vocab=64),
        "vocab": make_tiny_llama(root / "vocab", seed=4, hidden=32, layers=3, vocab=80),
        "holed": noisy_copy(base, root / "holed", 5, drop="model.layers.1.mlp.up_proj.weight"),
    }


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "merge.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ties_config(zoo, *others: str) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo[o]), "parameters": {"weight": 1.0, "density": 0.5}} for o in others],
    }


# ---- passthrough ------------------------------------------------------------------------------


def test_passthrough_gives_a_loadable_model_with_layers_in_order(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(zoo["base"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(zoo["ft1"]), "layer_range": [1, 3]}]},
            {"sources": [{"model": str(zoo["ft2"]), "layer_range": [0, 1]}]},
        ],
    }
    report = merge_checkpoints(config, tmp_path / "deep")
    assert report.layers == 5 and report.copied == report.tensors  # unchanged tensors are copied raw
    out = Checkpoint(tmp_path / "deep")
    assert out.config["num_hidden_layers"] == 5
    expected = [("base", 0), ("base", 1), ("ft1", 1), ("ft1", 2), ("ft2", 0)]
    inputs = {k: Checkpoint(v) for k, v in zoo.items()}
    for j, (model, layer) in enumerate(expected):
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out.get(f"model.layers.{j}.{part}"), inputs[model].get(f"model.layers.{layer}.{part}"))
    assert torch.equal(out.get("model.embed_tokens.weight"), inputs["base"].get("model.embed_tokens.weight"))
    assert torch.equal(out.get("lm_head.weight"), inputs["ft2"].get("lm_head.weight"))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "deep", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(model.model.layers) == 5
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight.detach(), inputs["ft1"].get("model.layers.1.self_attn.q_proj.weight"))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()


def test_passthrough_shallower_model(zoo, tmp_path):
    config = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(zoo["base"]), "layer_range": [1, 2]}]}]}
    merge_checkpoints(config, tmp_path / "thin")
    out = Checkpoint(tmp_path / "thin")
    assert out.config["num_hidden_layers"] == 1
    assert sorted({n.split(".")[2] for n in out.names() if n.startswith("model.layers.")}) == ["0"]


# ---- preflight --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        ("wide", ["config hidden_size differs", "model.layers.0.self_attn.q_proj.weight has shape [64, 64]"]),
        ("holed", ["model.layers.1.mlp.up_proj.weight is missing from"]),
        ("vocab", ["config vocab_size differs", "model.embed_tokens.weight has shape [80, 32]"]),
    ],
)
def test_mismatched_inputs_fail_preflight_via_cli(zoo, tmp_path, cli, other, expected):
    config = write_config(tmp_path, ties_config(zoo, "ft1", other))
    out = tmp_path / "out"
    result = cli("merge", config, out)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith(f"error: {config}: preflight found")
    for text in expected:
        assert text in message
    assert "nothing written" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml"]


def test_preflight_lists_every_mismatch_at_once(zoo, tmp_path):
    with pytest.raises(WeightsmithError) as caught:
        merge_checkpoints(ties_config(zoo, "wide", "holed", "vocab"), tmp_path / "out")
    message = caught.value.problem
    for text in ("hidden_size", "vocab_size", "model.layers.1.mlp.up_proj.weight is missing from", "more shape mismatches"):
        assert text in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"merge_method": "ties", "modles": []}, "unknown key 'modles' at the config (allowed: merge_method, models, slices"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": "chatml"}, "mergekit key 'chat_template'"),
        ({"merge_method": "linear", "modules": {}}, "mergekit key 'modules'"),
        (
            {"merge_method": "linear", "models": [{"model": "a", "weight": 1}]},
            "unknown key 'weight' at models.0 (allowed: model, parameters)",
        ),
        ({"merge_method": "frankenstein", "models": [{"model": "a"}]}, "unknown merge method 'frankenstein'"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "int4"}, "unknown dtype 'int4'"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union"}, "tokenizer_source 'union' is not supported"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "slices": []}, "exactly one of `models` or `slices`"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"x": 1}}}]}, "models.0.parameters.weight"),
    ],
)
def test_config_errors_name_the_key(tmp_path, config, expected):
    with pytest.raises(WeightsmithError) as caught:
        merge_checkpoints(config, tmp_path / "out")
    assert expected in caught.value.problem


@pytest.mark.parametrize(
    ("method", "extra", "expected"),
    [
        ("linear", {}, "parameter 'weight' has no value for"),
        ("slerp", {"parameters": {"t": 0.5}}, "slerp takes exactly 2 input models (base included), got 3"),
        ("task_arithmetic", {"base_model": None, "parameters": {"weight": 1}}, "task_arithmetic needs a base_model among its inputs"),
        ("ties", {"parameters": {"weight": "heavy"}}, "parameter 'weight': 'heavy' is not a number"),
    ],
)
def test_method_contract_and_parameters_checked_before_reading(zoo, tmp_path, method, extra, expected):
    config = {"merge_method": method, "base_model": str(zoo["base"]), "models": [{"model": str(zoo[m])} for m in ("base", "ft1", "ft2")]}
    config.update(extra)
    if config["base_model"] is None:
        del config["base_model"]
    with pytest.raises(WeightsmithError) as caught:
        merge_checkpoints(config, tmp_path / "out")
    assert expected in caught.value.problem


def unused_parameter_configs(zoo) -> list[tuple[dict, dict, list[str]]]:
    """(config with parameters its method does not use, the same without them, where each is)."""
    base, ft1, ft2 = (str(zoo[k]) for k in ("base", "ft1", "ft2"))
    stock = {"merge_method": "model_stock", "base_model": base, "models": [{"model": m} for m in (base, ft1, ft2)]}
    noisy_stock = {**stock, "models": [{"model": base}, *({"model": m, "parameters": {"weight": 0.5, "density": 0.7}} for m in (ft1, ft2))]}
    slerp = {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": ft1}], "parameters": {"t": 0.3}}
    noisy_slerp = {**slerp, "models": [{"model": base}, {"model": ft1, "parameters": {"weight": 1.0}}]}
    linear = {"merge_method": "linear", "models": [{"model": ft1, "parameters": {"weight": 0.4}}, {"model": ft2, "parameters": {"weight": 0.6}}]}
    noisy_linear = {**linear, "parameters": {"density": 0.5}}
    return [
        (noisy_stock, stock, [f"'weight' at models[1] ({ft1})", f"'density' at models[1] ({ft1})", f"'weight' at models[2] ({ft2})",
                              f"'density' at models[2] ({ft2})"]),
        (noisy_slerp, slerp, [f"'weight' at models[1] ({ft1})"]),
        (noisy_linear, linear, ["'density' at parameters"]),
    ]


@pytest.mark.parametrize("case", [0, 1, 2])
def test_unused_parameters_are_ignored_with_a_warning_naming_each(zoo, tmp_path, caplog, case):
    noisy, plain, places = unused_parameter_configs(zoo)[case]
    with caplog.at_level("WARNING", logger="merge.plan"):
        merge_checkpoints(noisy, tmp_path / "noisy")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "merge.plan"]
    assert len(warnings) == len(places)
    method = noisy["merge_method"]
    for place, message in zip(places, warnings):
        assert message.startswith(f"ignoring {place}: not a parameter of {method}")
    merge_checkpoints(plain, tmp_path / "plain")
    assert files_of(tmp_path / "noisy") == files_of(tmp_path / "plain") | {"weightsmith.json": files_of(tmp_path / "noisy")["weightsmith.json"]}


def test_strict_refuses_unused_parameters(zoo, tmp_path):
    noisy, _, places = unused_parameter_configs(zoo)[0]
    with pytest.raises(WeightsmithError) as caught:
        merge_checkpoints(noisy, tmp_path / "out", strict=True)
    problem = caught.value.problem
    assert problem.startswith("preflight found 4 problems, nothing written")
    for place in places:
        assert f"{place} is not a parameter of model_stock (its parameters: filter_wise)" in problem
    assert not (tmp_path / "out").exists()
    typo = {**ties_config(zoo, "ft1"), "parameters": {"densty": 0.5}}
    with pytest.raises(WeightsmithError, match=r"'densty' at parameters is not a parameter of ties \(its parameters: density, int8_mask"):
        merge_checkpoints(typo, tmp_path / "out", strict=True)


def test_layer_range_beyond_the_model(zoo, tmp_path):
    config = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(zoo["base"]), "layer_range": [2, 5]}]}]}
    with pytest.raises(WeightsmithError, match=r"layer_range \[2, 5\] is beyond the 3 layers"):
        merge_checkpoints(config, tmp_path / "out")


# ---- determinism, provenance, options ---------------------------------------------------------


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_output(zoo, tmp_path):
    config = {
        "merge_method": "dare_ties",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo[m]), "parameters": {"weight": 0.6, "density": 0.4}} for m in ("ft1", "ft2")],
    }
    merge_checkpoints(config, tmp_path / "a", seed=7, max_shard_size=20_000)
    merge_checkpoints(config, tmp_path / "b", seed=7, max_shard_size=20_000)
    merge_checkpoints(config, tmp_path / "c", seed=8, max_shard_size=20_000)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert len(a) > 3 and "model.safetensors.index.json" in a  # sharded
    assert a == b
    one, other = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "c")
    assert not torch.equal(one.get("model.layers.0.mlp.up_proj.weight"), other.get("model.layers.0.mlp.up_proj.weight"))
    record = json.loads((tmp_path / "a" / "weightsmith.json").read_text())
    assert record["pass"] == "merge" and record["seed"] == 7
    assert [Path(i["path"]).name for i in record["inputs"]] == ["ft1", "ft2", "base"]
    assert all(len(sha) == 64 for i in record["inputs"] for sha in i["files"].values())
    assert record["parameters"]["merge_method"] == "dare_ties"
    assert record["figures"]["tensors"] == len(one.names())


def test_dtype_and_out_dtype(zoo, tmp_path):
    config = {
        "merge_method": "slerp",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["base"])}, {"model": str(zoo["ft1"])}],
        "parameters": {"t": 0.5},
        "dtype": "bfloat16",
        "out_dtype": "float16",
    }
    merge_checkpoints(config, tmp_path / "half")
    out = Checkpoint(tmp_path / "half")
    assert {out.info(n).dtype for n in out.names()} == {torch.float16}
    assert out.config.get("dtype", out.config.get("torch_dtype")) == "float16"


def test_linear_with_one_zero_weight_and_soup(zoo, tmp_path):
    config = {
        "merge_method": "linear",
        "models": [{"model": str(zoo["ft1"]), "parameters": {"weight": 1}}, {"model": str(zoo["ft2"]), "parameters": {"weight": 0}}],
    }
    merge_checkpoints(config, tmp_path / "lin")
    out, ft1 = Checkpoint(tmp_path / "lin"), Checkpoint(zoo["ft1"])
    assert all(torch.equal(out.get(n), ft1.get(n)) for n in ft1.names())
    merge_checkpoints({"merge_method": "soup", "models": [{"model": str(zoo[m])} for m in ("base", "ft1", "ft2")]}, tmp_path / "soup")
    soup = Checkpoint(tmp_path / "soup")
    parts = [Checkpoint(zoo[m]) for m in ("base", "ft1", "ft2")]
    name = "model.layers.2.self_attn.v_proj.weight"
    assert torch.allclose(soup.get(name), sum(p.get(name) for p in parts) / 3, atol=1e-6)


def test_tokenizer_source_base(zoo, tmp_path):
    from .conftest import train_tokenizer

    base = tmp_path / "tok-base"
    shutil.copytree(zoo["base"], base)
    train_tokenizer(base, vocab_size=300)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "tokenizer_source": "base",
        "models": [{"model": str(zoo["ft1"]), "parameters": {"weight": 0.5}}],
    }
    merge_checkpoints(config, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    other = tmp_path / "tok-other"
    shutil.copytree(zoo["ft1"], other)
    train_tokenizer(other, vocab_size=280)
    config["models"] = [{"model": str(other), "parameters": {"weight": 0.5}}]
    with pytest.raises(WeightsmithError, match=r"tokenizer of .* differs from the base.s"):
        merge_checkpoints(config, tmp_path / "out2")


# ---- inputs beyond plain safetensors ----------------------------------------------------------


def test_packed_compressed_tensors_input_is_dequantized(zoo, tmp_path):
    from compress.config import QuantizeConfig
    from compress.quantize import quantize_checkpoint

    src = Checkpoint(zoo["ft1"])
    for fmt in ("packed", "dense"):
        quantize_checkpoint(src, tmp_path / fmt, QuantizeConfig(method="rtn", bits=4, group_size=16, symmetric=False, format=fmt))
    packed = Checkpoint(tmp_path / "packed")
    assert any(n.endswith(".weight_packed") for n in packed.names())
    config = {"merge_method": "passthrough", "models": [{"model": str(tmp_path / "packed")}]}
    report = merge_checkpoints(config, tmp_path / "out")
    out, dense = Checkpoint(tmp_path / "out"), Checkpoint(tmp_path / "dense")
    assert sorted(out.names()) == sorted(dense.names())
    assert all(torch.equal(out.get(n), dense.get(n)) for n in dense.names())
    assert "quantization_config" not in out.config and report.merged > 0
    mixed = {
        "merge_method": "ties",
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(tmp_path / "packed"), "parameters": {"weight": 1, "density": 0.5}},
            {"model": str(zoo["ft2"]), "parameters": {"weight": 1, "density": 0.5}},
        ],
    }
    merge_checkpoints(mixed, tmp_path / "mixed")
    assert sorted(Checkpoint(tmp_path / "mixed").names()) == sorted(dense.names())


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(folder: Path, tokenizer_json: Path, dest: Path) -> Path:
    """A llama.cpp-style F32 GGUF of a tiny Llama checkpoint (q/k rows permuted as llama.cpp's
    converter does, which transformers undoes on load)."""
    import gguf

    ckpt, cfg = Checkpoint(folder), Checkpoint(folder).config
    tok = json.loads(tokenizer_json.read_text())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    writer = gguf.GGUFWriter(str(dest), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for name in ckpt.names():
        x = ckpt.get(name).numpy().copy()
        if name in GGUF_NAMES:
            writer.add_tensor(GGUF_NAMES[name], x)
            continue
        parts = name.split(".")
        module = ".".join(parts[3:-1])
        if module == "self_attn.q_proj":
            x = permute(x, cfg["num_attention_heads"])
        elif module == "self_attn.k_proj":
            x = permute(x, cfg["num_key_value_heads"])
        writer.add_tensor(f"blk.{parts[2]}.{GGUF_LAYER_NAMES[module]}.weight", x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_gguf_input_is_converted_and_merged(tmp_path):
    folder = make_tiny_llama(tmp_path / "src", seed=0, hidden=32, layers=2)
    gguf_file = write_tiny_gguf(folder, tmp_path / ".src-side" / "tokenizer.json", tmp_path / "tiny.gguf")
    twin = noisy_copy(folder, tmp_path / "twin", 3)
    config = {
        "merge_method": "linear",
        "models": [{"model": str(gguf_file), "parameters": {"weight": 1.0}}, {"model": str(twin), "parameters": {"weight": 0.0}}],
    }
    merge_checkpoints(config, tmp_path / "out")
    out, src = Checkpoint(tmp_path / "out"), Checkpoint(folder)
    assert sorted(out.names()) == sorted(src.names())
    assert all(torch.equal(out.get(n), src.get(n)) for n in src.names())
    record = json.loads((tmp_path / "out" / "weightsmith.json").read_text())
    assert record["inputs"][0]["path"] == str(gguf_file.resolve()) and list(record["inputs"][0]["files"]) == ["tiny.gguf"]


def test_cli_merge_writes_and_refuses_to_overwrite(zoo, tmp_path, cli):
    config = write_config(tmp_path, ties_config(zoo, "ft1", "ft2"))
    out = tmp_path / "out"
    result = cli("merge", config, out, "--max-shard-size", "30KB", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "ties merge" in result.stdout and len(Checkpoint(out).files) > 1
    again = cli("merge", config, out)
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr
    assert cli("merge", config, out, "--force").exit_code == 0
    bad_device = cli("merge", config, tmp_path / "other", "--device", "nonsense")
    assert bad_device.exit_code == 2 and "device 'nonsense' is not usable" in bad_device.stderr
    assert not (tmp_path / "other").exists()
