"""The pass registry: one settings model per pass drives the CLI and recipes alike; Python callers,
the CLI and recipes all run passes through it; the runtime's process-wide settings are restored."""

from __future__ import annotations

import json
import string

import pytest
import torch
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.options import field_options
from weightsmith.passes import REGISTRY, Inputs, run_pass, settings_from
from weightsmith.recipe import load_recipe, run_recipe
from weightsmith.runtime import Runtime

from .conftest import SAMPLE_TEXT


def command_path(name: str) -> list[str]:
    """The words that name a pass's command (``export gguf`` for a pass in a group)."""
    group = REGISTRY[name].group
    return [group, name] if group else [name]


def click_command(name: str):
    from weightsmith.cli import app

    command = typer.main.get_command(app)
    for word in command_path(name):
        command = command.commands[word]
    return command


def option_names(name: str) -> set[str]:
    names: set[str] = set()
    for param in click_command(name).params:
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_settings_field_is_a_cli_option_with_the_same_default(name):
    spec = REGISTRY[name]
    file_fields = set(spec.settings_file.model_fields) if spec.settings_file else set()
    command = click_command(name)
    by_name = {p.name: p for p in command.params}
    options = option_names(name)
    for field, info in spec.settings.model_fields.items():
        if field in file_fields:
            assert "config" in by_name, f"{name}: {field} comes from the CONFIG file, which the command must take"
            continue
        flag = f"--{field.replace('_', '-')}"
        assert flag in options, f"{name}: settings field {field!r} has no {flag} option"
        param = by_name[f"s_{field}"]
        if info.is_required():  # no default: the option is unset unless given, and settings refuse it missing
            assert param.default is None, field
            continue
        default = info.default_factory() if info.default_factory is not None else info.default
        if isinstance(default, bool):
            assert param.default is default
        elif isinstance(default, list):
            assert list(param.default or []) == [str(v) for v in default]
        else:
            assert param.default == (None if default is None else str(default)), field


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_flags_show_no_value_placeholder(name, cli):
    result = cli(*command_path(name), "--help")
    assert result.exit_code == 0
    for marker in ("<bool>", "<int>", "<float>", "<str>]"):
        assert marker not in result.stdout.replace("<str> ", ""), (name, marker)
    spec = REGISTRY[name]
    for opt in field_options(spec.settings, set(spec.settings_file.model_fields) if spec.settings_file else set()):
        assert opt.decls[0].split("/")[0] in result.stdout


def test_cli_and_recipe_give_the_same_validation_error(tmp_path, tiny_llama, cli):
    cases = [("group_size", "0"), ("bits", "5"), ("damp", "inf"), ("samples", "many"), ("overrides", "down_proj:bits=9"), ("method", "spqr")]
    for field, value in cases:
        recipe = tmp_path / f"{field}.yml"
        recipe.write_text(f"steps:\n  - pass: quantize\n    {field}: {json.dumps([value] if field == 'overrides' else value)}\n")
        with pytest.raises(WeightsmithError) as info:
            load_recipe(recipe)
        from_recipe = str(info.value).removeprefix(f"{recipe}: step 1 (quantize): ")
        result = cli("quantize", tiny_llama, tmp_path / "out", f"--{field.replace('_', '-')}", value)
        assert result.exit_code == 2
        assert result.stderr.strip() == f"error: {from_recipe}", field
        assert not (tmp_path / "out").exists()


def test_quantize_options_missing_before_now_reach_the_settings(tmp_path, tiny_llama):
    steps = settings_from("quantize", {"block_size": "16", "awq_grid": "5", "batch_size": "2"})
    assert (steps.block_size, steps.awq_grid, steps.batch_size) == (16, 5, 2)


def test_run_pass_from_python_reports_logical_parameters(tmp_path, tiny_llama):
    out = tmp_path / "q"
    report = run_pass("quantize", [tiny_llama], out, {"method": "rtn", "bits": 4, "group_size": 16, "format": "packed"})
    src = Checkpoint(tiny_llama)
    assert report.pass_name == "quantize" and report.output == out
    assert report.parameters == src.num_parameters  # logical weights, not int32 words
    assert report.bytes_written == Checkpoint(out).file_bytes < src.file_bytes
    assert report.bits_per_weight == pytest.approx(4 + 32 / 16)  # fp32 scales per group of 16
    assert report.extra["quantized_linears"] == 14
    with pytest.raises(WeightsmithError, match="already exists; pass --force"):
        run_pass("quantize", [tiny_llama], out, {"method": "rtn"})
    with pytest.raises(WeightsmithError, match="quantize takes one input model, got 0"):
        run_pass("quantize", [], tmp_path / "none", {"method": "rtn"})


def test_runtime_restores_torch_threads():
    before = torch.get_num_threads()
    inside = []
    with Runtime(threads=1).applied():
        inside.append(torch.get_num_threads())
    assert inside == [1] and torch.get_num_threads() == before
    with Runtime().applied():
        assert torch.get_num_threads() == before


def test_runtime_rejects_bad_values():
    with pytest.raises(WeightsmithError, match="threads must be at least 1"):
        Runtime(threads=0)
    with pytest.raises(WeightsmithError, match="device 'nonsense' is not usable"):
        with Runtime(device="nonsense").applied():
            pass


def merge_recipe(tmp_path, a, b, first: str = "", ref: str | None = None) -> object:
    models = f"      - model: {ref or a}\n        parameters: {{weight: 0.5}}\n      - model: {b}\n        parameters: {{weight: 0.5}}\n"
    path = tmp_path / "chain.yml"
    path.write_text(f"steps:\n{first}  - pass: merge\n    merge_method: linear\n    models:\n{models}")
    return path


def test_recipe_refuses_to_drop_an_earlier_step(tmp_path, tiny_llama):
    from .conftest import make_tiny_llama

    b = make_tiny_llama(tmp_path / "b", seed=2, vocab=Checkpoint(tiny_llama).config["vocab_size"])
    first = "  - pass: quantize\n    method: rtn\n    bits: 8\n    group_size: 16\n"
    steps = load_recipe(merge_recipe(tmp_path, tiny_llama, b, first))
    with pytest.raises(WeightsmithError, match=r"step 2 \(merge\) names its own input models and would drop step 1's output; use it as `model: previous`"):
        run_recipe(steps, tiny_llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the recipe's input model is dropped just the same when the merge comes first
    steps = load_recipe(merge_recipe(tmp_path, tiny_llama, b))
    with pytest.raises(WeightsmithError, match="would drop the input model"):
        run_recipe(steps, tiny_llama, tmp_path / "out")
    with pytest.raises(WeightsmithError, match=r"step 1 \(merge\) refers to `previous`, but nothing comes before it"):
        run_recipe(load_recipe(merge_recipe(tmp_path, tiny_llama, b, ref="previous")), None, tmp_path / "out")


def test_recipe_merge_uses_the_previous_output(tmp_path, tiny_llama):
    from .conftest import make_tiny_llama

    b = make_tiny_llama(tmp_path / "b", seed=2, vocab=Checkpoint(tiny_llama).config["vocab_size"])
    first = "  - pass: quantize\n    method: rtn\n    bits: 8\n    group_size: 16\n"
    steps = load_recipe(merge_recipe(tmp_path, tiny_llama, b, first, ref="previous"))
    reports = run_recipe(steps, tiny_llama, tmp_path / "out")
    assert [r.pass_name for r in reports] == ["quantize", "merge"]
    quantized = run_pass("quantize", [tiny_llama], tmp_path / "q", {"method": "rtn", "bits": 8, "group_size": 16})
    out, q, cb = Checkpoint(tmp_path / "out"), Checkpoint(quantized.output), Checkpoint(b)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(out.get(name), 0.5 * q.get(name) + 0.5 * cb.get(name))
    record = json.loads((tmp_path / "out" / "weightsmith.json").read_text())
    assert record["pass"] == "merge" and record["inputs"][0]["parent"]["pass"] == "quantize"


# Values a user might type for any option: numbers in and out of range, non-finite, words, empty.
VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["0", "-1", "1", "2", "3", "4", "8", "16", "nan", "inf", "-inf", "1e30", "", "true", "yes", "x"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(string.ascii_letters + string.digits + ":=,._-", max_size=10),
)


def base_arguments(name: str, tiny: object, tmp: object) -> list[str]:
    if name == "merge":
        config = tmp / "merge.yml"
        config.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny}\n    parameters: {{weight: 0.5}}\n  - model: {tiny}\n    parameters: {{weight: 0.5}}\n")
        return [str(config)]
    if name == "quantize":
        return [str(tiny), "--calib", str(SAMPLE_TEXT), "--samples", "2", "--seq-len", "16", "--awq-samples", "1"]
    return [str(tiny)]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_any_option_value_succeeds_or_fails_in_one_line(name, tiny_llama, tmp_path_factory):
    """Out-of-range and ill-typed values through the CLI: success, or exit 2 with one line naming
    the problem; never a traceback."""
    from typer.testing import CliRunner

    from weightsmith.cli import app

    spec = REGISTRY[name]
    skip = set(spec.settings_file.model_fields) if spec.settings_file else set()
    options = field_options(spec.settings, skip)
    valued = [o for o in options if not o.is_flag]
    flags = [o for o in options if o.is_flag]
    runner = CliRunner()
    tmp = tmp_path_factory.mktemp(f"fuzz-{name}")
    base = [*command_path(name), *base_arguments(name, tiny_llama, tmp)]
    counter = iter(range(10**6))

    @settings(max_examples=12 if spec.inputs is Inputs.ONE else 8, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        chosen=st.lists(st.tuples(st.sampled_from(valued), VALUES), min_size=1, max_size=3) if valued else st.just([]),
        switched=st.lists(st.tuples(st.sampled_from(flags), st.booleans()), max_size=2) if flags else st.just([]),
    )
    def check(chosen, switched):
        args = list(base) + [str(tmp / f"out-{next(counter)}")]
        for opt, value in chosen:
            args += [opt.decls[0], value]
        for opt, on in switched:
            on_name, _, off_name = opt.decls[0].partition("/")
            args.append(on_name if on else off_name)
        result = runner.invoke(app, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
        assert result.exit_code in (0, 2), (args, result.exit_code, result.output)
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
            assert "Traceback" not in result.output

    check()
