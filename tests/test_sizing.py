"""The size estimate equals, byte for byte, what the passes really write: every format and option,
run for real on tiny checkpoints (and on SmolLM2 in the slow tests) and compared with the files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from weightsmith.checkpoint import DEFAULT_MAX_SHARD_SIZE, Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.passes import run_pass, settings_from
from weightsmith.runtime import Runtime
from weightsmith.recipe import load_recipe, run_recipe
from weightsmith.sizing import HEADER_RESERVE, Sizer, estimate

from .conftest import SAMPLE_TEXT, make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: small calibration: the layout does not depend on it, only the order calibrated passes write in
CALIB = {"calib": str(SAMPLE_TEXT), "samples": 4, "seq_len": 32}
SHARD = 30_000


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """``llama``: hidden 64 (K-quant widths fall back to legacy types); ``ragged``: hidden 48, so a
    group of 32 leaves a shorter last group in every linear but down_proj; ``wide``: hidden 256 (one
    layer), where the K-quants fit; ``deep``: 30 layers, so a packed checkpoint's header outgrows the
    reserved room."""
    root = tmp_path_factory.mktemp("sizing")
    return {
        "llama": make_tiny_llama(root / "llama", hidden=64),
        "ragged": make_tiny_llama(root / "ragged", hidden=48),
        "wide": make_tiny_llama(root / "wide", hidden=256, layers=1),
        "deep": make_tiny_llama(root / "deep", hidden=32, layers=30),
    }


def on_disk(path: Path) -> dict[str, int]:
    """File name -> bytes of a pass's output: a folder's safetensors files, or the GGUF file."""
    if path.is_dir():
        return {f.name: f.stat().st_size for f in path.glob("*.safetensors")}
    return {"model.gguf": path.stat().st_size}


def run_and_compare(model: Path, steps: list[tuple[str, dict]], tmp_path: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, threads: int | None = 1):
    """Run ``steps`` with the real passes (intermediate folders named like the model, which a GGUF
    export records as ``weightsmith run`` does), estimate them from ``model``'s headers, and assert
    every step's files and the last report's figures match;
    the last step is also estimated from the folder the step before it wrote (a packed checkpoint's
    shape tensors, GGUF blocks read back as a layout). Returns the estimate and the last report."""
    parsed = [(name, settings_from(name, values)) for name, values in steps]
    runtime = Runtime(max_shard_size=max_shard_size, threads=threads)  # a tiny model's matmuls run fastest on one thread
    result = estimate(model, parsed, max_shard_size=max_shard_size)
    current = model
    for i, (name, settings) in enumerate(parsed, start=1):
        out = tmp_path / f"step-{i}" / model.name if i < len(parsed) else tmp_path / ("out.gguf" if name == "gguf" else "out")
        out.parent.mkdir(exist_ok=True)
        report = run_pass(name, [current], out, settings, runtime)
        assert result.steps[i - 1].files == on_disk(out), f"step {i} ({name})"
        if i > 1:
            assert estimate(current, [(name, settings)], max_shard_size=max_shard_size).steps[-1] == result.steps[i - 1]
        current = out
    assert result.bytes == sum(on_disk(current).values())
    assert result.parameters == report.parameters
    if report.bits_per_weight is None:
        assert result.steps[-1].bits_per_weight is None
    else:
        assert result.steps[-1].bits_per_weight == pytest.approx(report.bits_per_weight, rel=1e-12)
    return result, report


def header_lengths(folder: Path) -> list[int]:
    """The JSON header length each shard of ``folder`` declares in its first 8 bytes."""
    lengths = []
    for f in sorted(folder.glob("model*.safetensors")):
        with open(f, "rb") as fh:
            lengths.append(struct.unpack("<Q", fh.read(8))[0])
    return lengths


@pytest.mark.parametrize(
    ("model", "steps", "shard"),
    [
        ("llama", [("copy", {})], DEFAULT_MAX_SHARD_SIZE),
        ("llama", [("copy", {"dtype": "fp16"})], SHARD),
        ("llama", [("copy", {"dtype": "bf16"})], DEFAULT_MAX_SHARD_SIZE),
    ],
    ids=["copy", "copy-fp16-sharded", "copy-bf16"],
)
def test_copy(models, tmp_path, model, steps, shard):
    run_and_compare(models[model], steps, tmp_path, shard)


RTN = {"method": "rtn"}


@pytest.mark.parametrize(
    ("model", "settings", "shard"),
    [
        ("llama", {"bits": 4, "group_size": 32, "format": "dense"}, DEFAULT_MAX_SHARD_SIZE),
        ("llama", {"bits": 4, "group_size": 32, "format": "packed"}, SHARD),
        ("llama", {"bits": 3, "group_size": -1, "symmetric": False, "format": "packed"}, DEFAULT_MAX_SHARD_SIZE),
        ("llama", {"bits": 8, "group_size": 64, "symmetric": False, "format": "packed"}, DEFAULT_MAX_SHARD_SIZE),
        ("llama", {"bits": 2, "group_size": 16, "format": "packed", "targets": ["q_proj", "down_proj", "lm_head"]}, DEFAULT_MAX_SHARD_SIZE),
        (
            "llama",
            {
                "bits": 2,
                "group_size": 16,
                "format": "packed",
                "overrides": ["down_proj:bits=8", "q_proj:group_size=-1", "o_proj:symmetric=false", "re:.*\\.0\\.self_attn\\.k_proj:skip"],
            },
            SHARD,
        ),
        ("ragged", {"bits": 4, "group_size": 32, "format": "packed"}, DEFAULT_MAX_SHARD_SIZE),
        ("ragged", {"bits": 4, "group_size": 32, "symmetric": False, "format": "dense"}, DEFAULT_MAX_SHARD_SIZE),
        ("llama", {"format": "gguf:q4_0"}, DEFAULT_MAX_SHARD_SIZE),
        ("llama", {"format": "gguf:q4_k_m", "overrides": ["down_proj:gguf_type=q8_0", "re:.*\\.1\\.self_attn\\.v_proj:skip"]}, SHARD),
        ("wide", {"format": "gguf:q3_k_m"}, DEFAULT_MAX_SHARD_SIZE),
        ("ragged", {"format": "gguf:q4_0"}, DEFAULT_MAX_SHARD_SIZE),
        ("deep", {"bits": 4, "group_size": 16, "format": "packed"}, DEFAULT_MAX_SHARD_SIZE),
    ],
    ids=[
        "dense", "packed-sharded", "packed-w3-channel-asym", "packed-w8-asym", "packed-lm-head", "overrides",
        "ragged-packed", "ragged-dense-asym", "gguf-q4_0", "gguf-q4_k_m-overrides", "gguf-q3_k_m-wide", "gguf-ragged", "deep-packed",
    ],
)
def test_quantize_rtn(models, tmp_path, model, settings, shard):
    result, _ = run_and_compare(models[model], [("quantize", {**RTN, **settings})], tmp_path, shard)
    out = tmp_path / "out"
    if model == "ragged" and settings["format"] == "packed":
        stored = Checkpoint(out)
        assert "model.layers.0.mlp.down_proj.weight_packed" in stored and "model.layers.0.mlp.up_proj.weight" in stored
        assert result.bits_per_weight > 16 * 6 / 7  # six of seven linears kept in float32 (32 bits)
    if model == "deep":
        assert max(header_lengths(out)) > HEADER_RESERVE  # the header outgrew its room: offsets count


@pytest.mark.parametrize(
    ("model", "settings", "shard"),
    [
        ("llama", {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "format": "packed"}, SHARD),
        ("llama", {"method": "awq", "bits": 4, "group_size": 32, "symmetric": False, "format": "packed"}, DEFAULT_MAX_SHARD_SIZE),
        ("llama", {"method": "rtn", "bits": 4, "group_size": 32, "format": "dense", "overrides": ["down_proj:method=gptq"]}, SHARD),
        ("llama", {"method": "gptq", "format": "gguf:q4_0"}, SHARD),
        ("wide", {"method": "gptq", "format": "gguf:q4_k_m"}, SHARD),
        ("deep", {"method": "gptq", "bits": 4, "group_size": 16, "format": "packed"}, DEFAULT_MAX_SHARD_SIZE),
    ],
    ids=["gptq-act-order-sharded", "awq-asym", "rtn-with-gptq-override", "gptq-gguf-q4_0", "gptq-gguf-q4_k_m", "deep-gptq"],
)
def test_quantize_calibrated_writes_layer_by_layer(models, tmp_path, model, settings, shard):
    result, _ = run_and_compare(models[model], [("quantize", {**settings, **CALIB})], tmp_path, shard)
    if model == "deep":
        # the header outgrew its room, and the layer-by-layer order is not the storage order
        assert max(header_lengths(tmp_path / "out")) > HEADER_RESERVE
        streaming = estimate(models[model], [("quantize", settings_from("quantize", {**settings, "method": "rtn"}))])
        assert streaming.bytes != result.bytes


@pytest.mark.parametrize(
    ("model", "settings", "shard"),
    [
        ("llama", {"method": "magnitude", "sparsity": 0.5}, SHARD),
        ("llama", {"method": "magnitude", "sparsity": 0.3, "scope": "global"}, DEFAULT_MAX_SHARD_SIZE),
        ("llama", {"method": "wanda", "pattern": "2:4", "targets": ["q_proj", "lm_head"], **CALIB}, SHARD),
        ("llama", {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32, "format": "packed", **CALIB}, SHARD),
        ("ragged", {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32, "format": "packed", **CALIB}, DEFAULT_MAX_SHARD_SIZE),
        ("llama", {"method": "sparsegpt", "pattern": "2:4", "bits": 3, "group_size": -1, "symmetric": False, **CALIB}, DEFAULT_MAX_SHARD_SIZE),
    ],
    ids=["magnitude-sharded", "magnitude-global", "wanda-2of4-lm-head", "sparsegpt-w4-packed", "sparsegpt-ragged-packed", "sparsegpt-w3-dense"],
)
def test_unstructured_prune(models, tmp_path, model, settings, shard):
    run_and_compare(models[model], [("prune", settings)], tmp_path, shard)


@pytest.mark.parametrize(
    "settings",
    [
        {"structured": "mlp=0.25,heads=0.5", "importance": "magnitude", "align": 16},
        {"structured": "mlp=0.5", "align": 32, **CALIB},
        {"structured": "layers=[0]", "importance": "magnitude"},
        {"structured": "heads=0.5,layers=1", **CALIB},
    ],
    ids=["mlp-heads-magnitude", "mlp-activation", "layer-listed", "heads-layer-by-influence"],
)
def test_structured_prune(models, tmp_path, settings):
    run_and_compare(models["llama"], [("prune", settings)], tmp_path, SHARD)


GGUF_TYPES = ["auto", "f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


@pytest.mark.parametrize("gtype", GGUF_TYPES)
def test_gguf_export_every_type(models, tmp_path, gtype):
    run_and_compare(models["wide"], [("gguf", {"type": gtype})], tmp_path)


@pytest.mark.parametrize(
    ("model", "settings"),
    [
        ("llama", {"type": "q4_k_m"}),
        ("ragged", {"type": "q4_0"}),
        ("wide", {"type": "q4_k_m", "tensor_type": ["attn_v=q8_0", "ffn_up=q5_0"], "name": "a longer general.name than the folder's"}),
        ("wide", {"type": "q3_k_m", "pure": True}),
    ],
    ids=["fallbacks", "ragged", "tensor-types-and-name", "pure"],
)
def test_gguf_export_options(models, tmp_path, model, settings):
    run_and_compare(models[model], [("gguf", settings)], tmp_path)


@pytest.mark.parametrize(
    ("model", "steps", "kept"),
    [
        ("llama", [("prune", {"structured": "mlp=0.25,heads=0.5", "importance": "magnitude", "align": 16}), ("quantize", {**RTN, "bits": 4, "group_size": 16, "format": "packed"})], False),
        ("wide", [("quantize", {**RTN, "format": "gguf:q4_k_m"}), ("gguf", {"type": "q4_k_m"})], True),
        ("llama", [("copy", {"dtype": "fp16"}), ("quantize", {**RTN, "bits": 4, "group_size": 32, "format": "packed"}), ("gguf", {})], True),
        ("llama", [("quantize", {**RTN, "bits": 8, "group_size": -1, "format": "packed"}), ("gguf", {"type": "q4_0"})], False),
        ("llama", [("copy", {"dtype": "bf16"}), ("prune", {"structured": "layers=[1]", "importance": "magnitude"}), ("gguf", {"type": "q8_0"})], False),
    ],
    ids=["structured-then-packed", "gguf-grid-then-export", "fp16-packed-then-export-auto", "packed-w8-then-q4_0", "copy-prune-export"],
)
def test_chains(models, tmp_path, model, steps, kept):
    _, report = run_and_compare(models[model], steps, tmp_path, SHARD)
    if kept:  # the export wrote the packed codes (or the GGUF blocks) as they are
        assert report.extra["kept_codes"] > 0


def test_a_recipe_run_writes_what_was_estimated(models, tmp_path):
    """``weightsmith run``'s runner (step cache folders, the export named after the input model)
    writes the bytes the estimate of the same recipe file gives."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "steps:\n"
        "  - {pass: prune, structured: 'mlp=0.25', importance: magnitude, align: 16}\n"
        "  - {pass: quantize, method: rtn, format: 'gguf:q4_k_m'}\n"
        "  - {pass: gguf, type: q4_k_m}\n"
    )
    steps = load_recipe(recipe)
    out = tmp_path / "out.gguf"
    run_recipe(steps, models["wide"], out, Runtime(workdir=tmp_path / "work", threads=1))
    assert estimate(models["wide"], steps).bytes == out.stat().st_size


def test_reads_headers_only(models, monkeypatch):
    """No tensor data is read for an unquantized input, whatever the steps."""

    def refuse(self, name):
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(Checkpoint, "get", refuse)
    monkeypatch.setattr(Checkpoint, "array", refuse)
    steps = [
        ("prune", settings_from("prune", {"structured": "mlp=0.25", "importance": "magnitude", "align": 16})),
        ("quantize", settings_from("quantize", {"method": "gptq", "format": "gguf:q4_0"})),
        ("gguf", settings_from("gguf", {"type": "q4_0"})),
    ]
    sizer = Sizer(models["llama"])
    first, second = sizer.estimate(steps), sizer.estimate(steps)
    assert first == second and first.bytes > 0
    assert [s.pass_name for s in first.steps] == ["prune", "quantize", "gguf"]


def test_what_cannot_be_estimated_is_refused(models):
    with pytest.raises(WeightsmithError, match="cannot be estimated before running"):
        estimate(models["llama"], [("prune", settings_from("prune", {"method": "magnitude", "format": "sparse"}))])
    merge = settings_from("merge", {"merge_method": "linear", "models": [{"model": str(models["llama"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(WeightsmithError, match=r"step 1 \(merge\): the size of its output is not estimated"):
        estimate(models["llama"], [("merge", merge)])
    with pytest.raises(WeightsmithError, match=r"step 1 \(gguf\) writes a single file"):
        estimate(models["llama"], [("gguf", settings_from("gguf", {})), ("copy", settings_from("copy", {}))])
    with pytest.raises(WeightsmithError, match="no weight matches the targets"):
        estimate(models["llama"], [("quantize", settings_from("quantize", {"targets": ["nothing"]}))])


@pytest.mark.slow
@pytest.mark.parametrize(
    "steps",
    [
        [("quantize", {**RTN, "bits": 4, "group_size": 64, "format": "packed"})],
        [("quantize", {**RTN, "format": "gguf:q3_k_m"}), ("gguf", {"type": "q3_k_m"})],
    ],
    ids=["packed-w4-g64", "gguf-q3_k_m-export"],
)
def test_smollm2(smollm2, tmp_path, steps):
    run_and_compare(smollm2, steps, tmp_path, threads=None)
