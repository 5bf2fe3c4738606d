"""The architecture table (weightsmith/arch.py) and the calibrated passes on every family it names
beyond Llama and GPT-NeoX (tests/test_quantize.py): Gemma 2, Gemma 3 (text), Phi-3, GPT-2, OPT."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress.awq import fold_scales_into_norm
from compress.config import QuantizeConfig
from compress.quantize import quantize_checkpoint
from merge.layout import layout_of
from weightsmith.arch import ARCHITECTURES, ConfigIs, arch_for, known_arch
from weightsmith.calibrate import LayerwiseRunner, get_module
from weightsmith.checkpoint import Checkpoint
from weightsmith.data import text_blocks
from weightsmith.errors import WeightsmithError
from weightsmith.models import load_model, load_tokenizer

from .conftest import FAMILY_CONFIGS, SAMPLE_TEXT, make_tiny_family

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAMILIES = sorted(FAMILY_CONFIGS)
#: families whose linears compressed-tensors can pack (GPT-2's Conv1D it cannot)
PACKABLE = [f for f in FAMILIES if not ARCHITECTURES[f].weights_transposed]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny_family(root / family, family) for family in FAMILIES}


def calib(folder, n: int = 8, seq: int = 24) -> torch.Tensor:
    return text_blocks(load_tokenizer(folder), SAMPLE_TEXT, seq, n, seed=0)


def logits(folder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder)(ids).logits


# --- the table --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_module_the_table_names_exists_in_the_model(tmp_path, model_type):
    """Layers, linears, scale-group norms / linears / blocks and front modules are real module paths
    of the transformers model built from a config of that type."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(model_type)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    layer = get_module(model, arch.layers)[0]
    for name in arch.linears:
        assert hasattr(get_module(layer, name), "weight"), name
    for group in arch.scale_groups:
        get_module(layer, group.prev)
        for name in (*group.linears, *([group.block] if group.block else [])):
            get_module(layer, name)
        assert set(group.linears) <= set(arch.linears)
    params = {n for n, _ in model.named_parameters()}
    for module in arch.front:
        if module.endswith("project_in") and config.word_embed_proj_dim == config.hidden_size:
            continue  # OPT builds project_in only when the embedding width differs
        assert f"{module}.weight" in params, module
    heads = arch.head_layout(config.to_dict())
    assert heads.heads % heads.kv_heads == 0 and heads.head_dim > 0
    assert arch.mlp_width(config.to_dict()) > 0 and arch.num_layers(config.to_dict()) == len(get_module(model, arch.layers))


def test_conv1d_weights_are_known_with_or_without_the_model_prefix():
    gpt2 = ARCHITECTURES["gpt2"]
    assert gpt2.stored_transposed("transformer.h.3.attn.c_attn") and gpt2.stored_transposed("h.0.mlp.c_proj")
    assert not gpt2.stored_transposed("lm_head") and not gpt2.stored_transposed("transformer.wte")
    assert not gpt2.stored_transposed("h.0.mlp.c_proj_extra") and not ARCHITECTURES["llama"].stored_transposed("model.layers.0.mlp.up_proj")


def test_config_facts_per_family():
    assert ARCHITECTURES["gpt2"].head_layout({"n_embd": 768, "n_head": 12}) == (12, 12, 64)
    assert ARCHITECTURES["gpt2"].mlp_width({"n_embd": 768, "n_inner": None}) == 3072
    assert ARCHITECTURES["opt"].mlp_width({"ffn_dim": 3072}) == 3072
    gemma = {"hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256}
    assert ARCHITECTURES["gemma3_text"].head_layout(gemma) == (4, 1, 256)
    assert ARCHITECTURES["llama"].head_layout({"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}) == (9, 3, 64)
    assert ARCHITECTURES["llama"].num_layers({"num_hidden_layers": 30}) == 30 and ARCHITECTURES["gpt2"].num_layers({"n_layer": 12}) == 12


def test_opt_post_norm_and_non_relu_drop_the_groups_that_do_not_hold():
    pre = arch_for({"model_type": "opt", "do_layer_norm_before": True, "activation_function": "relu"})
    assert [g.prev for g in pre.scale_groups] == ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"]
    post = arch_for({"model_type": "opt", "do_layer_norm_before": False, "activation_function": "gelu"})
    assert [g.prev for g in post.scale_groups] == ["self_attn.v_proj"]
    assert [g.prev for g in arch_for({"model_type": "opt"}).scale_groups] == [g.prev for g in pre.scale_groups]  # transformers' defaults
    assert ConfigIs("k", 1, default=1).holds({}) and not ConfigIs("k", 1, default=1).holds({"k": 2})
    assert known_arch({"model_type": "bloom"}) is None
    with pytest.raises(WeightsmithError, match="'bloom' is not supported"):
        arch_for({"model_type": "bloom"})


def test_gemma_norm_fold_uses_one_plus_weight():
    """Folding 1/s into a Gemma RMSNorm (output normalize(x) * (1 + w)) divides its output by s."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    torch.manual_seed(0)
    norm = Gemma2RMSNorm(16)
    norm.weight.data = torch.randn(16) * 0.1
    x = torch.randn(5, 16)
    s = torch.rand(16) + 0.5
    with torch.no_grad():
        want = norm(x) / s
        norm.weight.data, _ = fold_scales_into_norm(norm.weight.data, s, offset=ARCHITECTURES["gemma2"].norm_offset)
        assert torch.allclose(norm(x), want, atol=1e-6, rtol=1e-5)
        norm.weight.data, _ = fold_scales_into_norm(torch.zeros(16), s)  # the plain rule on a Gemma norm is wrong
        assert not torch.allclose(norm(x), want, atol=1e-2)


def test_merge_layout_reads_the_table(family_models):
    opt = Checkpoint(family_models["opt"])
    layout = layout_of(opt.names(), opt.config)
    assert layout.prefix == "model.decoder.layers." and layout.num_layers == 2
    assert "model.decoder.project_in.weight" in layout.pre and "model.decoder.embed_positions.weight" in layout.pre
    assert "model.decoder.project_out.weight" in layout.post and "model.decoder.final_layer_norm.weight" in layout.post
    gpt2 = Checkpoint(family_models["gpt2"])
    layout = layout_of(gpt2.names(), gpt2.config)
    assert layout.count_key == "n_layer" and layout.declared_layers == 2 and layout.prefix == "transformer.h."
    assert set(layout.pre) == {"transformer.wte.weight", "transformer.wpe.weight"}
    # an unknown architecture: prefix by the names' pattern, front tensors by their names, count by the usual keys
    names = ["emb.word_embeddings.weight", "blocks.0.w.weight", "blocks.1.w.weight", "head.weight"]
    layout = layout_of(names, {"model_type": "unknown", "num_layers": 2})
    assert (layout.prefix, layout.pre, layout.post, layout.count_key) == ("blocks.", ("emb.word_embeddings.weight",), ("head.weight",), "num_layers")


# --- the layer runner -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_feeds_every_layer_what_the_model_does(tmp_path, family):
    """The inputs the runner gives each layer equal the model's own hidden states: the scaled Gemma
    embeddings, OPT's project_in, GPT-2's positional mask argument, and each layer type's own mask and
    rotary tables (three layers: a sliding-window layer after a global one runs with its own kwargs;
    the sequences are longer than the window)."""
    extra = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]} if family.startswith("gemma") else {}
    folder = make_tiny_family(tmp_path / family, family, **{ARCHITECTURES[family].keys.layers: 3, **extra})
    tokens = calib(folder, n=4, seq=24)
    with torch.no_grad():
        reference = load_model(folder)(tokens, output_hidden_states=True).hidden_states
    seen = []
    for step in LayerwiseRunner(Checkpoint(folder), tokens, batch_size=3):
        got = torch.cat(step.inputs.hidden)
        assert torch.allclose(got, reference[step.index], atol=1e-5, rtol=1e-5), (family, step.index, float((got - reference[step.index]).abs().max()))
        seen.append(step.index)
    assert seen == [0, 1, 2]


def test_gpt2_linears_run_as_linears_with_the_stored_weights_transposed(family_models):
    src = Checkpoint(family_models["gpt2"])
    step = next(iter(LayerwiseRunner(src, calib(src.folder, n=2), batch_size=2)))
    c_fc = get_module(step.module, "mlp.c_fc")
    assert isinstance(c_fc, nn.Linear) and c_fc.weight.shape == (256, 64)
    assert torch.equal(c_fc.weight, src.get("transformer.h.0.mlp.c_fc.weight").t())
    assert torch.equal(step.stored("mlp.c_fc.weight", c_fc.weight), src.get("transformer.h.0.mlp.c_fc.weight"))


# --- AWQ folding is exact ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_folding_leaves_every_layer_function_unchanged(family_models, monkeypatch, family):
    """With random positive scales in place of the searched ones, scaling each group's linears and
    folding 1/s into the norm or linear the table names as their producer leaves every layer's output
    unchanged up to float32 rounding: the table names the module that really feeds each linear, the
    fused rows (Phi-3's up half, GPT-2's value third) are the right ones, and Gemma's norms fold as
    1 + weight."""
    import compress.quantize as quantize_module

    gen = torch.Generator().manual_seed(0)

    def random_scales(x, weights, block_fn, grid, n_grid):
        return torch.exp(0.5 * torch.randn(x.shape[-1], generator=gen))

    monkeypatch.setattr(quantize_module, "search_awq_scales", random_scales)
    src = Checkpoint(family_models[family])
    config = QuantizeConfig(method="awq", bits=4, group_size=32, awq_samples=4)
    runner = LayerwiseRunner(src, calib(src.folder, n=4), batch_size=2)
    folded_groups = 0
    for step in runner:
        mine = {lin: config.settings_for(step.prefix + lin) for lin in runner.arch.linears}
        with torch.no_grad():
            before = [step.module(h, **kw) for h, kw in zip(step.inputs.hidden, step.inputs.kwargs)]
            params = {n: p.detach().clone() for n, p in step.module.named_parameters()}
            scaled = quantize_module._apply_awq(step, runner.arch, config, mine)
            after = [step.module(h, **kw) for h, kw in zip(step.inputs.hidden, step.inputs.kwargs)]
        for b, a in zip(before, after):
            scale = b.abs().max()
            assert torch.allclose(a, b, atol=1e-4 * float(scale), rtol=0), (family, step.index, float((a - b).abs().max()))
        changed = {n for n, p in step.module.named_parameters() if not torch.equal(p, params[n])}
        folded_groups += sum(1 for g in runner.arch.scale_groups if f"{g.prev}.weight" in changed)
        assert set(scaled) <= set(runner.arch.linears)
    # every scale group of the family was applied in both layers (none skipped for its width)
    assert folded_groups == 2 * len(runner.arch.scale_groups)


# --- the quantize pass end to end --------------------------------------------------------------------


def _on_grid(w: torch.Tensor, bits: int, group: int) -> bool:
    """``w`` ``[out, in]``: every group of ``group`` input weights of a row holds at most 2**bits values."""
    return all(len(torch.unique(g)) <= 2**bits for row in w for g in row.split(group))


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_gptq_awq_quantize_each_family_along_its_input_dimension(family_models, tmp_path, family):
    src = Checkpoint(family_models[family])
    arch = ARCHITECTURES[family]
    tokens = calib(src.folder, n=8)
    base = logits(src.folder, tokens)
    err = {}
    for method in ("rtn", "gptq", "awq"):
        config = QuantizeConfig(method=method, bits=3, group_size=32, samples=8, seq_len=24, awq_samples=4)
        report = quantize_checkpoint(src, tmp_path / method, config, calib_tokens=tokens)
        assert report.quantized == 2 * len(arch.linears)
        out = Checkpoint(tmp_path / method)
        assert sorted(out.names()) == sorted(src.names())
        for lin in arch.linears:
            name = f"{arch.layer_prefix(1)}{lin}.weight"
            stored = out.get(name)
            assert stored.shape == src.info(name).shape
            assert _on_grid(stored.t() if arch.weights_transposed else stored, 3, 32), (method, name)
        q = logits(tmp_path / method, tokens)
        assert torch.isfinite(q).all()
        err[method] = float((q - base).pow(2).mean())
    assert 0 < err["gptq"] < err["rtn"], err
    assert 0 < err["awq"] < err["rtn"], err
    assert err["rtn"] < float(base.var()), err  # the quantized model still predicts like the original


@pytest.mark.parametrize("family", PACKABLE)
def test_packed_format_loads_back_and_equals_dense(family_models, tmp_path, family):
    src = Checkpoint(family_models[family])
    tokens = calib(src.folder, n=4)
    outs = {}
    for fmt in ("dense", "packed"):
        config = QuantizeConfig(method="gptq", bits=4, group_size=32, format=fmt, samples=4, seq_len=24)
        quantize_checkpoint(src, tmp_path / fmt, config, calib_tokens=tokens)
        outs[fmt] = logits(tmp_path / fmt, tokens)
    assert torch.allclose(outs["dense"], outs["packed"], atol=1e-5, rtol=0)
    qc = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert len(targets) == 2 * len(ARCHITECTURES[family].linears)
    assert any(n.endswith(".weight_packed") for n in Checkpoint(tmp_path / "packed").names())


def test_gpt2_packed_is_refused_with_one_line_and_dense_is_written(family_models, tmp_path):
    src = Checkpoint(family_models["gpt2"])
    with pytest.raises(WeightsmithError, match=r"packed cannot hold transformer\.h\.0\.attn\.c_attn: gpt2 stores its linears as Conv1D"):
        quantize_checkpoint(src, tmp_path / "p", QuantizeConfig(method="rtn", bits=4, group_size=32, format="packed"))
    assert not (tmp_path / "p").exists()


def test_gpt2_rtn_equals_rtn_of_the_transposed_weight(family_models, tmp_path):
    """The stored [in, out] weight is quantized as the [out, in] linear it is, and written back [in, out]."""
    from compress.grid import quantize

    src = Checkpoint(family_models["gpt2"])
    quantize_checkpoint(src, tmp_path / "r", QuantizeConfig(method="rtn", bits=4, group_size=32))
    name = "transformer.h.1.mlp.c_proj.weight"
    grid = QuantizeConfig(method="rtn", bits=4, group_size=32).settings_for(name[: -len(".weight")]).grid
    want = quantize(src.get(name).t().contiguous(), grid).dequantize().t()
    assert torch.equal(Checkpoint(tmp_path / "r").get(name), want)
