"""The budget search: the space and its pure trial -> recipe mapping, the proxy, and whole searches on
a tiny model (budget kept on disk, estimates equal to the bytes written, infeasible trials never run,
killed searches resume, two workers share a study on SQLite and on a real PostgreSQL server)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from weightsmith.arch import arch_for
from weightsmith.errors import WeightsmithError
from weightsmith.passes import settings_from
from weightsmith.search.config import Budget, SearchSettings
from weightsmith.search.space import Candidate, Group, depth_bands, group_modules, group_pattern, make_groups, recipe_for

from .conftest import SAMPLE_TEXT, make_tiny_llama

LLAMA = arch_for({"model_type": "llama"})
CLI = [sys.executable, "-c", "from weightsmith.cli import main; main()"]


def test_depth_bands_cover_every_layer_once():
    assert depth_bands(30, 4) == [(0, 7), (8, 15), (16, 22), (23, 29)]
    assert depth_bands(2, 4) == [(0, 0), (1, 1)]
    for n, k in ((7, 3), (30, 1), (5, 5)):
        bands = depth_bands(n, k)
        assert [i for a, b in bands for i in range(a, b + 1)] == list(range(n))
    assert [g.name for g in make_groups(4, 2)] == ["attn.0-1", "mlp.0-1", "attn.2-3", "mlp.2-3"]


def test_candidate_names_round_trip():
    for c in (Candidate("gptq", 4, 64), Candidate("rtn", 3, 128, symmetric=False), Candidate("gptq", 8, -1), Candidate("rtn", gguf_type="q4_k")):
        assert Candidate.parse(c.name) == c
    assert Candidate("gptq", 4, 64).name == "gptq-w4g64"
    assert Candidate("rtn", 3, 32, symmetric=False).name == "rtn-w3ag32"
    with pytest.raises(ValueError):
        Candidate.parse("gptq")


def test_group_pattern_matches_exactly_its_modules():
    from compress.targets import matches

    every = [f"model.layers.{i}.{lin}" for i in range(12) for lin in LLAMA.linears]
    for group in make_groups(12, 3):
        chosen = [m for m in every if matches(group_pattern(group, LLAMA), m)]
        assert chosen == sorted(group_modules(group, LLAMA), key=every.index)
    assert group_modules(Group("attn", 1, 1), LLAMA) == [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
    assert not matches(group_pattern(Group("mlp", 1, 1), LLAMA), "model.layers.11.mlp.up_proj")


def test_recipe_for_is_pure_and_gives_each_group_its_candidate():
    groups = make_groups(4, 2)
    cands = [Candidate("gptq", 4, 64), Candidate("rtn", 8, 128), Candidate("gptq", 3, 32), Candidate("gptq", 2, 64)]
    assignment = {g.name: c for g, c in zip(groups, cands)}
    steps = recipe_for(assignment, groups, LLAMA, {"samples": 8})
    assert steps == recipe_for(dict(assignment), groups, LLAMA, {"samples": 8})
    assert len(steps) == 1 and steps[0]["format"] == "packed"
    values = dict(steps[0])
    config = settings_from(values.pop("pass"), values)
    for group, cand in assignment.items():
        g = next(x for x in groups if x.name == group)
        for module in group_modules(g, LLAMA):
            got = config.settings_for(module)
            assert (got.method, got.grid.bits, got.grid.group_size) == (cand.method, cand.bits, cand.group_size)
    gguf = recipe_for({g.name: Candidate("gptq", gguf_type="q4_0") for g in groups}, groups, LLAMA, {}, gguf="q4_k_m")
    assert [s["pass"] for s in gguf] == ["quantize", "gguf"] and gguf[0]["format"] == "gguf:q4_k_m" and gguf[1]["type"] == "q4_k_m"
    values = dict(gguf[0])
    config = settings_from(values.pop("pass"), values)
    assert config.gguf_type_for("model.layers.3.mlp.down_proj") == "q4_0"


def test_budget_parse():
    assert Budget.parse("60MB") == Budget("bytes", 60e6)
    assert Budget.parse("3.5bpw") == Budget("bpw", 3.5)
    assert Budget.parse("gguf:80MB") == Budget("gguf", 80e6)
    with pytest.raises(ValueError, match="write a size"):
        Budget.parse("lots")
    with pytest.raises(WeightsmithError, match="budget"):
        settings_from("search", {"model": "m", "budget": "lots"})


# ---- whole searches on a tiny model -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("search") / "tiny", layers=4, hidden=64)


def spec(tmp_path: Path, model: Path, **extra) -> Path:
    doc = {
        "model": str(model),
        "calib": str(SAMPLE_TEXT),
        "eval": str(SAMPLE_TEXT),
        "eval_tokens": 512,
        "samples": 8,
        "seq_len": 64,
        "proxy_tokens": 256,
        "front": 2,
        "space": {"depth_groups": 2, "bits": [2, 4, 8], "group_size": [32]},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def search_settings(path: Path, **options) -> SearchSettings:
    values = {**SearchSettings.read_file(path), **options}
    return settings_from("search", values, path).read_from(path)


def uniform_bytes(model: Path, cand: str, tmp_path: Path) -> int:
    from weightsmith.search.run import Problem

    problem = Problem.open(search_settings(spec(tmp_path, model), budget="1TB"))
    return problem.size(problem.uniform(Candidate.parse(cand)))[0]


def run_search(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([*CLI, "search", *args], capture_output=True, text=True, env=env, **kw)


def study_trials(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_search_keeps_the_budget_on_disk_and_never_runs_infeasible_trials(tmp_path, tiny4, monkeypatch):
    from weightsmith.passes import run_pass
    from weightsmith.search import run as search_run

    budget = (uniform_bytes(tiny4, "gptq-w4g32", tmp_path) + uniform_bytes(tiny4, "gptq-w8g32", tmp_path)) // 2
    scored = []
    original_kl = search_run.Scorer.kl

    def counting_kl(self, assignment, shape=search_run.Shape()):
        scored.append({g: c.name for g, c in assignment.items()})
        return original_kl(self, assignment, shape)

    monkeypatch.setattr(search_run.Scorer, "kl", counting_kl)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    settings = search_settings(spec(tmp_path, tiny4), budget=f"{budget}B", trials=6, storage=storage, study="t1")
    out = tmp_path / "best"
    report = run_pass("search", [], out, settings)
    trials = [t for t in study_trials(storage, "t1") if t.state.name == "COMPLETE"]
    assert len(trials) == 6
    feasible = [t for t in trials if t.user_attrs["scored"]]
    infeasible = [t for t in trials if not t.user_attrs["scored"]]
    # every scored trial fits, every unscored one does not, and only the scored ones reached the proxy
    assert all(t.user_attrs["bytes"] <= budget for t in feasible)
    assert all(t.user_attrs["bytes"] > budget for t in infeasible)
    assert sorted(json.dumps(t.params, sort_keys=True) for t in feasible) == sorted(json.dumps(p, sort_keys=True) for p in scored)
    # the output is within budget on disk, and every rebuilt trial's estimate is its size on disk
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk <= budget and report.bytes_written == on_disk
    rows = list(csv.DictReader(open(out / "pareto.csv")))
    rebuilt = [r for r in rows if r["bytes_on_disk"]]
    assert rebuilt and all(int(r["estimated_bytes"]) == int(r["bytes_on_disk"]) for r in rebuilt)
    best = json.loads((out / "weightsmith.json").read_text())
    assert best is not None
    for name in ("best-recipe.yaml", "report.md", "pareto.png", "sensitivity.json", "sensitivity.png"):
        assert (out / name).stat().st_size > 0
    # the best recipe rebuilds the same model
    recipe = yaml.safe_load((out / "best-recipe.yaml").read_text())
    assert recipe["model"] == str(tiny4) and recipe["steps"][0]["pass"] == "quantize"
    sens = json.loads((out / "sensitivity.json").read_text())
    assert set(sens) == {"attn.0-1", "mlp.0-1", "attn.2-3", "mlp.2-3"}
    assert all(row["gptq-w2g32"] > row["gptq-w4g32"] > row["gptq-w8g32"] for row in sens.values())


def test_gguf_budget_estimate_is_the_file_size(tmp_path, tiny4):
    from weightsmith.passes import run_pass

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    path = spec(tmp_path, tiny4, space={"depth_groups": 1, "gguf_types": ["q4_0", "q8_0"], "gguf_mix": "q8_0"})
    settings = search_settings(path, budget="gguf:1GB", trials=3, storage=storage, study="g1")
    out = tmp_path / "best"
    run_pass("search", [], out, settings)
    rows = [r for r in csv.DictReader(open(out / "pareto.csv")) if r["bytes_on_disk"]]
    assert rows and all(int(r["estimated_bytes"]) == int(r["bytes_on_disk"]) for r in rows)
    gguf = out / "model.gguf"
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(gguf).tensors if ".attn_q." in t.name or ".ffn_down." in t.name}
    assert types <= {"Q4_0", "Q8_0"} and types


def _wait_for(predicate, timeout: float = 300.0) -> None:
    start = time.time()
    while not predicate():
        if time.time() - start > timeout:
            raise AssertionError("timed out")
        time.sleep(0.5)


def test_killed_search_resumes_the_same_study(tmp_path, tiny4):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    path = spec(tmp_path, tiny4)
    budget = uniform_bytes(tiny4, "gptq-w8g32", tmp_path)
    args = [str(path), str(tmp_path / "out"), "--budget", f"{budget}B", "--trials", "8", "--storage", storage, "--study", "k1"]
    proc = subprocess.Popen([*CLI, "search", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def some_done() -> bool:
        try:
            return sum(t.state.name == "COMPLETE" for t in study_trials(storage, "k1")) >= 3
        except Exception:  # noqa: BLE001 - the study does not exist yet
            return False

    _wait_for(some_done)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [t for t in study_trials(storage, "k1") if t.state.name == "COMPLETE"]
    assert 3 <= len(before) < 8 and not (tmp_path / "out").exists()
    done = run_search(args)
    assert done.returncode == 0, done.stderr
    after = [t for t in study_trials(storage, "k1") if t.state.name == "COMPLETE"]
    assert len(after) == 8
    # the first trials are the killed run's, unchanged
    assert [(t.number, t.params, t.value) for t in after[: len(before)]] == [(t.number, t.params, t.value) for t in before]


def _two_workers(tmp_path: Path, model: Path, storage: str, study: str) -> None:
    path = spec(tmp_path, model)
    budget = uniform_bytes(model, "gptq-w8g32", tmp_path)
    done = run_search([str(path), str(tmp_path / "out"), "--budget", f"{budget}B", "--trials", "8", "--storage", storage, "--study", study, "--jobs", "2"])
    assert done.returncode == 0, done.stderr
    trials = study_trials(storage, study)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8 and len(trials) == 8
    assert sorted(t.number for t in trials) == list(range(8))
    assert {t.user_attrs["worker"] for t in complete} == {0, 1}


def test_two_workers_share_one_sqlite_study(tmp_path, tiny4):
    _two_workers(tmp_path, tiny4, f"sqlite:///{tmp_path / 'study.db'}", "w2")


def test_two_workers_share_one_postgresql_study(tmp_path, tiny4, postgres_url):
    _two_workers(tmp_path, tiny4, postgres_url, "w2pg")


def test_sensitivity_command_writes_table_json_and_heatmap(tmp_path, tiny4, cli):
    path = spec(tmp_path, tiny4)
    result = cli("sensitivity", tiny4, "--spec", path, "--out", tmp_path / "sens")
    assert result.exit_code == 0, result.stderr
    sens = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    assert list(sens) == ["attn.0-1", "mlp.0-1", "attn.2-3", "mlp.2-3"]
    assert all(list(row) == ["gptq-w2g32", "gptq-w4g32", "gptq-w8g32"] for row in sens.values())
    # fewer bits, more KL, in every group; and nothing is free
    assert all(row["gptq-w2g32"] > row["gptq-w4g32"] > row["gptq-w8g32"] > 0 for row in sens.values())
    assert (tmp_path / "sens" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "attn.0-1" in result.stdout


def test_search_spec_errors_name_the_file_and_key(tmp_path, tiny4, cli):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny4), "space": {"bits": [5]}}))
    result = cli("search", path, tmp_path / "out", "--budget", "60MB")
    assert result.exit_code == 2
    assert str(path) in result.stderr and "bits" in result.stderr
    path.write_text(yaml.safe_dump({"model": str(tiny4), "spaces": {}}))
    result = cli("search", path, tmp_path / "out", "--budget", "60MB")
    assert result.exit_code == 2 and "unknown key 'spaces'" in result.stderr
    path.write_text(yaml.safe_dump({"model": str(tiny4)}))
    result = cli("search", path, tmp_path / "out", "--budget", "lots")
    assert result.exit_code == 2 and "budget" in result.stderr


def test_proxy_candidates_order_by_layer_output_error():
    """On a layer whose input channels differ in scale, AWQ from the Hessian alone beats RTN and GPTQ
    beats RTN (correlated inputs); pseudo inputs reproduce the Hessian."""
    from weightsmith.search.proxy import ProxySettings, candidate_weight, pseudo_inputs

    torch.manual_seed(0)
    mix = torch.eye(64) + 0.3 * torch.randn(64, 64)
    x = (torch.randn(2048, 64) @ mix) * torch.linspace(0.1, 5, 64)
    w = torch.randn(96, 64)
    H = 2 / x.shape[0] * x.T @ x
    X = pseudo_inputs(H)
    assert torch.allclose(X.T @ X, H, rtol=1e-3, atol=1e-3 * float(H.abs().max()))

    def err(method: str, **grid) -> float:
        q = candidate_weight(w, H, Candidate(method, **grid), ProxySettings())
        return float(((x @ (w - q).T) ** 2).mean())

    for grid in ({"bits": 3, "group_size": 32}, {"gguf_type": "q4_0"}):
        assert err("awq", **grid) < 0.9 * err("rtn", **grid)
        assert err("gptq", **grid) < 0.9 * err("rtn", **grid)


def test_dropping_layers_in_the_proxy_is_the_pruned_model(tmp_path, tiny4):
    """A trial that drops layers: the proxy's skipped layers give the KL of the structurally pruned
    model, and its recipe removes them first and quantizes the rest under their new indices, to the
    estimated bytes."""
    from weightsmith.evaluate import WindowSums, window_sums
    from weightsmith.models import load_model
    from weightsmith.passes import run_pass
    from weightsmith.recipe import run_recipe
    from weightsmith.runtime import Runtime
    from weightsmith.search.run import Problem, Scorer, Shape, _validate

    space = {"depth_groups": 2, "bits": [8], "group_size": [32], "drop_layers": [0, 1]}
    problem = Problem.open(search_settings(spec(tmp_path, tiny4, space=space), budget="1TB"))
    scorer = Scorer(problem, Runtime())
    problem.layer_order = scorer.proxy.layer_order()
    assert sorted(problem.layer_order) == [0, 1, 2, 3]
    dropped = problem.dropped(1)
    pruned_dir = tmp_path / "pruned"
    run_pass("prune", [tiny4], pruned_dir, {"structured": {"layers": dropped}})
    pruned = load_model(pruned_dir)
    sums = WindowSums()
    with torch.inference_mode():
        for ids, x, ref in zip(scorer.proxy.windows, scorer.proxy.inputs, scorer.proxy.reference):
            sums.add(window_sums(pruned(x, use_cache=False).logits[0].float(), ids, ref))
    assert scorer.proxy.score({}, skip=dropped) == pytest.approx(sums.kl / sums.positions, rel=1e-4)
    assert sums.kl > 0

    assignment = problem.uniform(Candidate("gptq", 8, 32))
    steps = problem.steps(assignment, Shape(drop=1))
    assert steps[0] == {"pass": "prune", "structured": {"layers": dropped}}
    out = tmp_path / "out"
    run_recipe(_validate(steps), problem.folder, out, Runtime(workdir=tmp_path / "work"))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    targets = [t for g in config["quantization_config"]["config_groups"].values() for t in g["targets"]]
    assert sorted({int(t.split(".")[2]) for t in targets}) == [0, 1, 2] and len(targets) == 3 * 7
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) == problem.size(assignment, Shape(drop=1))[0]


def _fit_budget(tmp_path: Path, model: Path, cli, trials: int | None) -> None:
    """The fit-budget preset run as a user runs it (`weightsmith run RECIPE OUT --model M`), as it is
    or with fewer trials: a packed model within 4.25 bits per weight, the search's files beside it."""
    from weightsmith.paths import asset
    from weightsmith.recipe import preset_path

    if asset("text/wikitext2-test-calib.raw") is None:
        pytest.skip("the preset calibrates on the assets' WikiText-2 text (set WEIGHTSMITH_ASSETS)")
    recipe = preset_path("fit-budget")
    if trials is not None:
        doc = yaml.safe_load(recipe.read_text())
        doc["steps"][0]["trials"] = trials
        recipe = tmp_path / "fit-budget.yaml"
        recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    result = cli("run", recipe, out, "--model", model, "--workdir", tmp_path / "work")
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    rows = list(csv.DictReader(open(out / "pareto.csv")))
    number = re.search(r"Best: trial (\d+),", (out / "report.md").read_text())[1]
    best = next(r for r in rows if r["label"] == f"trial-{number}")
    assert 0 < float(best["bits_per_weight"]) <= 4.25 and int(best["bytes_on_disk"]) == int(best["estimated_bytes"])
    assert len(yaml.safe_load((out / "best-recipe.yaml").read_text())["steps"]) == 1


@pytest.mark.slow
def test_fit_budget_preset_as_shipped(tmp_path, tiny4, cli):
    """Minutes even on a tiny model (64 calibration blocks of 512 tokens, 40 trials, three rebuilds
    scored on 20,480 tokens): a slow test."""
    _fit_budget(tmp_path, tiny4, cli, trials=None)


def test_a_budget_nothing_fits_stops_before_any_work(tmp_path, tiny4, cli):
    result = cli("search", spec(tmp_path, tiny4), tmp_path / "out", "--budget", "1000B", "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert result.exit_code == 2
    assert "nothing in the space fits the budget (checkpoint of at most 1000 bytes): the smallest model needs" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.db").exists()


def test_sparse_candidates_names_recipe_and_proxy(tmp_path, tiny4):
    """A group may be pruned (Wanda, a share or N:M) before it is quantized: the candidate's name
    round-trips, the recipe prunes exactly the sparse groups first, the proxy's weights hold the
    pattern, and the rebuilt model keeps it under quantization, at the estimated bytes."""
    from weightsmith.checkpoint import Checkpoint
    from weightsmith.recipe import run_recipe
    from weightsmith.runtime import Runtime
    from weightsmith.search.run import Problem, Scorer, _validate

    for c in (Candidate("gptq", 4, 32, sparsity="2:4"), Candidate("rtn", 8, 64, sparsity="0.5"), Candidate("awq", gguf_type="q4_0", sparsity="4:8")):
        assert Candidate.parse(c.name) == c
    assert Candidate("gptq", 4, 32, sparsity="2:4").name == "gptq-w4g32-sp2of4"
    space = {"depth_groups": 2, "bits": [4], "group_size": [32], "sparsity": [0, "2:4"]}
    problem = Problem.open(search_settings(spec(tmp_path, tiny4, space=space), budget="1TB"))
    assert [c.name for c in problem.candidates] == ["gptq-w4g32", "gptq-w4g32-sp2of4"]
    dense, sparse = problem.candidates
    assignment = {"attn.0-1": sparse, "mlp.0-1": dense, "attn.2-3": dense, "mlp.2-3": sparse}
    steps = problem.steps(assignment)
    assert [s["pass"] for s in steps] == ["prune", "quantize"] and steps[0]["method"] == "wanda" and steps[0]["sparsity"] == 0.0
    assert [o["pattern"] for o in steps[0]["overrides"]] == ["2:4", "2:4"]
    assert problem.steps(problem.uniform(dense))[0]["pass"] == "quantize"

    def two_of_four(w: torch.Tensor) -> bool:
        nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        return bool((nz <= 2).all())

    scorer = Scorer(problem, Runtime())
    group = problem.groups[0]
    for module, w in scorer.cache.get(group, sparse).items():
        assert two_of_four(w), module
    assert scorer.kl(assignment) > scorer.kl(problem.uniform(dense)) > 0

    out = tmp_path / "out"
    run_recipe(_validate(steps), problem.folder, out, Runtime(workdir=tmp_path / "work"))
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) == problem.size(assignment)[0]
    from weightsmith.models import load_model

    model = load_model(out)
    model(torch.zeros(1, 2, dtype=torch.long))  # compressed weights are decompressed on first use
    for i in range(4):
        for lin in ("self_attn.q_proj", "mlp.down_proj"):
            w = model.get_submodule(f"model.layers.{i}.{lin}").weight
            sparse_group = (i < 2) == (lin.startswith("self_attn"))
            assert two_of_four(w) == sparse_group, (i, lin)
    assert Checkpoint(out).config["num_hidden_layers"] == 4


def test_a_narrower_mlp_in_the_proxy_is_the_pruned_model(tmp_path, tiny4):
    """A trial that removes a share of the MLP channels: the proxy's zeroed channels give the KL of
    the structurally pruned model (the prune pass's own magnitude choice), and its recipe narrows the
    MLP and quantizes, to the estimated bytes."""
    from weightsmith.evaluate import WindowSums, window_sums
    from weightsmith.models import load_model
    from weightsmith.passes import run_pass
    from weightsmith.recipe import run_recipe
    from weightsmith.runtime import Runtime
    from weightsmith.search.run import Problem, Scorer, Shape, _validate

    space = {"depth_groups": 2, "bits": [8], "group_size": [32], "mlp_width": [0, 0.5], "drop_layers": [0, 1]}
    problem = Problem.open(search_settings(spec(tmp_path, tiny4, space=space), budget="1TB"))
    scorer = Scorer(problem, Runtime())
    problem.layer_order = scorer.proxy.layer_order()
    shape = Shape(drop=1, mlp=0.5)
    pruned_dir = tmp_path / "pruned"
    run_pass("prune", [tiny4], pruned_dir, {"structured": {"mlp": 0.5, "layers": problem.dropped(1)}, "importance": "magnitude"})
    pruned = load_model(pruned_dir)
    assert pruned.config.intermediate_size == 64 and pruned.config.num_hidden_layers == 3
    sums = WindowSums()
    with torch.inference_mode():
        for ids, x, ref in zip(scorer.proxy.windows, scorer.proxy.inputs, scorer.proxy.reference):
            sums.add(window_sums(pruned(x, use_cache=False).logits[0].float(), ids, ref))
    expected = sums.kl / sums.positions
    assert scorer.proxy.score({}, skip=problem.dropped(1), channels=scorer._cut(0.5)) == pytest.approx(expected, rel=1e-4)
    # the cut is undone for the next trial
    assert scorer.proxy.score({}) == pytest.approx(0.0, abs=1e-9)
    assert scorer.structure_sensitivity()["mlp 0.5"] > 0

    assignment = problem.uniform(Candidate("gptq", 8, 32))
    steps = problem.steps(assignment, shape)
    assert steps[0] == {"pass": "prune", "structured": {"layers": problem.dropped(1), "mlp": 0.5}, "importance": "magnitude"}
    out = tmp_path / "out"
    run_recipe(_validate(steps), problem.folder, out, Runtime(workdir=tmp_path / "work"))
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 64 and config["num_hidden_layers"] == 3
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) == problem.size(assignment, shape)[0]
    assert scorer.kl(assignment, shape) > scorer.kl(assignment)


def test_collected_hessians_are_each_linears_own(tmp_path):
    """Every linear's Hessian from one forward of the whole model equals the one computed from its own
    inputs: linears reading the same tensor share it, and no two layers' inputs are confused (their
    tensors have the same shape and may reuse each other's memory)."""
    from weightsmith.models import load_model
    from weightsmith.search.proxy import collect_hessians

    model = load_model(make_tiny_llama(tmp_path / "m", layers=6, hidden=64))
    modules = [f"model.layers.{i}.{lin}" for i in range(6) for lin in LLAMA.linears]
    batches = [torch.randint(0, 300, (2, 32)) for _ in range(3)]
    got = collect_hessians(model, modules, batches)
    inputs: dict[str, list] = {m: [] for m in modules}
    hooks = [model.get_submodule(m).register_forward_pre_hook(lambda mod, args, m=m: inputs[m].append(args[0].detach().clone())) for m in modules]
    with torch.inference_mode():
        for b in batches:
            model(b, use_cache=False)
    for h in hooks:
        h.remove()
    for m in modules:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[m]]).double()
        expected = 2 / x.shape[0] * x.T @ x
        assert torch.allclose(got[m].double(), expected, rtol=1e-4, atol=1e-5), m
    assert got["model.layers.2.self_attn.q_proj"] is got["model.layers.2.self_attn.v_proj"]
    assert got["model.layers.2.self_attn.q_proj"] is not got["model.layers.3.self_attn.q_proj"]
