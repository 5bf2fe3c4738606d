"""Recipes with a step cache: a recipe equals its passes run by hand, a second run reuses every step,
a run killed mid-step resumes to the same bytes, input references, the resolved recipe re-runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.passes import run_pass
from weightsmith.recipe import STEP_REPORT, read_recipe, run_recipe
from weightsmith.runtime import Runtime

from .conftest import SAMPLE_TEXT, make_tiny_llama

PRUNE = {"method": "wanda", "sparsity": 0.5, "calib": str(SAMPLE_TEXT), "samples": 4, "seq_len": 32}
QUANTIZE = {"method": "rtn", "bits": 4, "group_size": 16, "format": "packed"}


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def prune_quantize(tmp_path: Path, model: Path | None = None) -> Path:
    doc = {"steps": [{"pass": "prune", **PRUNE}, {"pass": "quantize", **QUANTIZE}]}
    if model is not None:
        doc = {"model": str(model), **doc}
    return write_recipe(tmp_path / "recipe.yaml", doc)


def files_bytes(folder: Path, suffix: str = "") -> dict[str, bytes]:
    """Every (non-hidden) file of a folder whose name ends with ``suffix``, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(suffix) and not p.name.startswith(".")}


def step_folders(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "steps").iterdir() if not p.name.startswith("."))


def llama_like(folder: Path, tiny_llama: Path, seed: int) -> Path:
    """Another tiny Llama with ``tiny_llama``'s vocabulary and tokenizer."""
    make_tiny_llama(folder, seed=seed, vocab=Checkpoint(tiny_llama).config["vocab_size"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_llama / name, folder / name)
    return folder


@pytest.fixture()
def other_llama(tmp_path, tiny_llama) -> Path:
    return llama_like(tmp_path / "other", tiny_llama, seed=2)


def test_recipe_equals_the_passes_by_hand_and_chains_the_records(tmp_path, tiny_llama):
    runtime = Runtime(workdir=tmp_path / "work")
    results = run_recipe(read_recipe(prune_quantize(tmp_path, tiny_llama)), None, tmp_path / "out", runtime)
    assert [(r.pass_name, r.cached) for r in results] == [("prune", False), ("quantize", False)]
    run_pass("prune", [tiny_llama], tmp_path / "pruned", PRUNE)
    run_pass("quantize", [tmp_path / "pruned"], tmp_path / "by-hand", QUANTIZE)
    ours, theirs = files_bytes(tmp_path / "out", ".safetensors"), files_bytes(tmp_path / "by-hand", ".safetensors")
    assert ours and ours == theirs
    out, by_hand = Checkpoint(tmp_path / "out"), Checkpoint(tmp_path / "by-hand")
    assert out.names() == by_hand.names() and all(torch.equal(out.get(n), by_hand.get(n)) for n in out.names())
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "by-hand" / "config.json").read_bytes()
    # each step's output is its cache folder; the steps' records chain, down to the input model
    assert sorted(r.output for r in results) == step_folders(tmp_path / "work")
    record = json.loads((tmp_path / "out" / "weightsmith.json").read_text())
    assert record["pass"] == "quantize" and record["inputs"][0]["path"] == str(results[0].output.resolve())
    parent = record["inputs"][0]["parent"]
    assert parent["pass"] == "prune" and parent["parameters"]["sparsity"] == 0.5
    assert parent["inputs"][0]["path"] == str(tiny_llama.resolve())
    assert record["recipe"]["step_keys"] == [r.key for r in results]
    assert [s["pass"] for s in record["recipe"]["document"]["steps"]] == ["prune", "quantize"]
    assert not (tmp_path / "out" / STEP_REPORT).exists()


def test_second_run_reuses_every_step(tmp_path, tiny_llama):
    recipe = read_recipe(prune_quantize(tmp_path, tiny_llama))
    runtime = Runtime(workdir=tmp_path / "work")
    first = run_recipe(recipe, None, tmp_path / "out", runtime)
    stamps = {p: p.stat().st_mtime_ns for folder in step_folders(tmp_path / "work") for p in folder.iterdir()}
    with pytest.raises(WeightsmithError, match="already exists; pass --force"):
        run_recipe(recipe, None, tmp_path / "out", runtime)
    second = run_recipe(recipe, None, tmp_path / "out", runtime.with_(force=True))
    assert [r.cached for r in second] == [True, True]
    assert [r.key for r in second] == [r.key for r in first]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing in the cache was rewritten
    # the figures are the first run's, the weights at OUT are the cache's own files (hard links)
    assert [r.report.bits_per_weight for r in second] == [r.report.bits_per_weight for r in first]
    assert second[0].report.sparsity == first[0].report.sparsity == pytest.approx(0.5)
    weights = tmp_path / "out" / "model.safetensors"
    assert weights.stat().st_ino == (second[-1].output / "model.safetensors").stat().st_ino
    written = files_bytes(tmp_path / "out")
    # a different seed is a different calibration draw: a new key for the calibrated step and after it
    reseeded = run_recipe(recipe, None, tmp_path / "out", runtime.with_(force=True, seed=1))
    assert [r.cached for r in reseeded] == [False, False] and reseeded[0].key != first[0].key
    # --no-cache runs every step again into the same keys, with the same bytes
    again = run_recipe(recipe, None, tmp_path / "again", runtime, use_cache=False)
    assert [r.cached for r in again] == [False, False] and [r.key for r in again] == [r.key for r in first]
    assert files_bytes(tmp_path / "again") == written


def test_a_changed_input_or_setting_is_a_new_key(tmp_path, tiny_llama, other_llama):
    runtime = Runtime(workdir=tmp_path / "work")
    base = run_recipe(read_recipe(prune_quantize(tmp_path)), [tiny_llama], tmp_path / "a", runtime)
    other = run_recipe(read_recipe(prune_quantize(tmp_path)), [other_llama], tmp_path / "b", runtime)
    assert base[0].key != other[0].key and base[1].key != other[1].key
    doc = {"model": str(tiny_llama), "steps": [{"pass": "prune", **PRUNE}, {"pass": "quantize", **QUANTIZE, "group_size": 32}]}
    changed = run_recipe(read_recipe(write_recipe(tmp_path / "c.yaml", doc)), None, tmp_path / "c", runtime)
    assert changed[0].key == base[0].key and changed[0].cached
    assert changed[1].key != base[1].key and not changed[1].cached


def wait_for(condition, what: str, proc: subprocess.Popen, limit: float = 300.0) -> None:
    """Poll ``condition`` until it holds; fail (naming ``what``) if the process ends first. The
    limit only keeps a broken run from hanging the suite."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"weightsmith run ended (exit {proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def test_a_run_killed_mid_step_resumes_to_the_same_bytes(tmp_path, tiny_llama, cli):
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT.read_text() * 20)
    slow = {"pass": "quantize", "method": "gptq", "bits": 4, "group_size": 16, "calib": str(calib), "samples": 96, "seq_len": 64}
    recipe = write_recipe(tmp_path / "slow.yaml", {"model": str(tiny_llama), "steps": [{"pass": "prune", "method": "magnitude", "sparsity": 0.5}, slow]})
    work = tmp_path / "work"
    command = [sys.executable, "-c", "from weightsmith.cli import main; main()", "run", str(recipe), str(tmp_path / "out"), "--workdir", str(work)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        steps = work / "steps"
        # step 1 finished (its folder is there), step 2's pass is writing (its temporary folder is there)
        wait_for(lambda: steps.is_dir() and len(step_folders(work)) == 1, "step 1 finished", proc)
        wait_for(lambda: any("weightsmith-tmp" in p.name for p in steps.iterdir()), "step 2 started writing", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists() and len(step_folders(work)) == 1
    assert [p for p in steps.iterdir() if p.name.startswith(".")]  # what the killed step left
    resumed = cli("run", recipe, tmp_path / "out", "--workdir", work)
    assert resumed.exit_code == 0, resumed.output
    assert "step 1/2 prune: cached" in resumed.stderr and "step 2/2 quantize: running" in resumed.stderr
    assert [p.name for p in steps.iterdir() if p.name.startswith(".")] == []  # swept
    assert len(step_folders(work)) == 2
    whole = cli("run", recipe, tmp_path / "whole", "--workdir", tmp_path / "fresh")
    assert whole.exit_code == 0, whole.output
    assert "cached" not in whole.stderr
    resumed_files = files_bytes(tmp_path / "out")
    whole_files = files_bytes(tmp_path / "whole")
    assert resumed_files.keys() == whole_files.keys()
    # the work folders differ, and so the input paths weightsmith.json names; everything else is equal
    for name in resumed_files.keys() - {"weightsmith.json"}:
        assert resumed_files[name] == whole_files[name], name


def test_input_references_pick_the_input_models(tmp_path, tiny_llama, other_llama):
    # a linear merge weighting input 2 fully and input 1 not at all gives input 2's tensors
    doc = {
        "steps": [
            {
                "pass": "merge",
                "merge_method": "linear",
                "models": [{"model": "input:2", "parameters": {"weight": 1.0}}, {"model": "input", "parameters": {"weight": 0.0}}],
            }
        ]
    }
    recipe = read_recipe(write_recipe(tmp_path / "pick.yaml", doc))
    run_recipe(recipe, [tiny_llama, other_llama], tmp_path / "out", Runtime(workdir=tmp_path / "work"))
    out, chosen = Checkpoint(tmp_path / "out"), Checkpoint(other_llama)
    assert all(torch.equal(out.get(n), chosen.get(n)) for n in chosen.names())
    resolved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert "model" not in resolved  # the merge names both inputs itself
    assert [m["model"] for m in resolved["steps"][0]["models"]] == [str(other_llama.resolve()), str(tiny_llama.resolve())]
    # `inputs` expands to one entry per input model: a soup is their mean
    doc["steps"][0]["models"] = [{"model": "inputs", "parameters": {"weight": 1.0}}]
    soup = read_recipe(write_recipe(tmp_path / "soup.yaml", doc))
    run_recipe(soup, [tiny_llama, other_llama], tmp_path / "soup", Runtime(workdir=tmp_path / "work"))
    mean = Checkpoint(tmp_path / "soup")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(mean.get(name), (Checkpoint(tiny_llama).get(name) + chosen.get(name)) / 2)
    expanded = yaml.safe_load((tmp_path / "soup" / "recipe.yaml").read_text())["steps"][0]["models"]
    assert expanded == [{"model": str(m.resolve()), "parameters": {"weight": 1.0}} for m in (tiny_llama, other_llama)]


def test_reference_errors_name_the_step(tmp_path, tiny_llama, other_llama):
    merge = {"pass": "merge", "merge_method": "linear", "models": [{"model": "input:1"}, {"model": "input:3"}]}
    recipe = read_recipe(write_recipe(tmp_path / "r.yaml", {"steps": [merge]}))
    with pytest.raises(WeightsmithError, match=r"step 1 \(merge\): input:3 refers to input model 3, but only 2 were given"):
        run_recipe(recipe, [tiny_llama, other_llama], tmp_path / "out", Runtime(workdir=tmp_path / "work"))
    with pytest.raises(WeightsmithError, match=r"step 1 \(merge\): input:1 refers to input model 1, but none was given"):
        run_recipe(recipe, None, tmp_path / "out", Runtime(workdir=tmp_path / "work"))
    quantize_then_merge = {"steps": [{"pass": "quantize", **QUANTIZE}, {**merge, "models": [{"model": "previous"}, {"model": "input:3"}]}]}
    recipe = read_recipe(write_recipe(tmp_path / "r.yaml", quantize_then_merge))
    with pytest.raises(WeightsmithError, match=r"step 2 \(merge\): input:3 refers to input model 3, but only 1 was given"):
        run_recipe(recipe, [tiny_llama], tmp_path / "out")
    for bad, problem in (("input:0", "write input:N with N the input model's number, from 1"), ("input:two", "write input:N")):
        with pytest.raises(WeightsmithError, match=rf"step 1 \(merge\): '{bad}': {problem}"):
            read_recipe(write_recipe(tmp_path / "r.yaml", {"steps": [{**merge, "models": [{"model": bad}]}]}))
    with pytest.raises(WeightsmithError, match=r"step 1 \(merge\): `inputs` \(every input model\) can only be the model of a `models:` entry, not base_model"):
        read_recipe(write_recipe(tmp_path / "r.yaml", {"steps": [{**merge, "base_model": "inputs"}]}))
    # an input model no step reads is refused, not dropped
    recipe = read_recipe(prune_quantize(tmp_path))
    with pytest.raises(WeightsmithError, match="input model 2 is used by no step"):
        run_recipe(recipe, [tiny_llama, other_llama], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_recipe_keys_are_validated(tmp_path):
    steps = [{"pass": "quantize", **QUANTIZE}]
    with pytest.raises(WeightsmithError, match="unknown key 'evaluation'; allowed keys: model, eval, eval_tokens, steps"):
        read_recipe(write_recipe(tmp_path / "r.yaml", {"evaluation": "x.txt", "steps": steps}))
    with pytest.raises(WeightsmithError, match="`eval_tokens` must be a whole number of at least 2, got 'many'"):
        read_recipe(write_recipe(tmp_path / "r.yaml", {"eval_tokens": "many", "steps": steps}))
    with pytest.raises(WeightsmithError, match="`model` is a checkpoint folder or hub id, or a list of them"):
        read_recipe(write_recipe(tmp_path / "r.yaml", {"model": [1, 2], "steps": steps}))
    recipe = read_recipe(write_recipe(tmp_path / "r.yaml", {"model": ["a", "b"], "eval": "texts/wiki.txt", "steps": steps}))
    assert recipe.models == ["a", "b"] and recipe.eval == tmp_path / "texts" / "wiki.txt" and recipe.eval_tokens == 4096


def test_resolved_recipe_reruns_to_the_same_bytes(tmp_path, tiny_llama, cli):
    (tmp_path / "models").mkdir()
    local = llama_like(tmp_path / "models" / "base", tiny_llama, seed=3)
    # a relative model path (beside the recipe), a relative evaluation text, defaults left out
    recipe = write_recipe(
        tmp_path / "models" / "r.yaml",
        {"model": "base", "eval": "sample.txt", "eval_tokens": 256, "steps": [{"pass": "prune", **PRUNE, "calib": "sample.txt"}, {"pass": "quantize", "method": "rtn", "bits": 8}]},
    )
    (tmp_path / "models" / "sample.txt").write_text(SAMPLE_TEXT.read_text())
    work = tmp_path / "work"
    first = cli("run", recipe, tmp_path / "out", "--workdir", work)
    assert first.exit_code == 0, first.output
    assert "ppl" in first.stdout and "2 quantize" in first.stdout
    resolved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert resolved["model"] == str(local.resolve()) and resolved["eval"] == str(tmp_path / "models" / "sample.txt")
    assert resolved["steps"][0]["calib"] == str(tmp_path / "models" / "sample.txt")
    assert resolved["steps"][1]["group_size"] == 128 and resolved["steps"][1]["format"] == "dense"  # defaults filled in
    assert "calib" in resolved["steps"][1]  # every setting, even one RTN does not use
    # from anywhere, the resolved recipe runs the same steps (same keys: all cached) ...
    again = cli("run", tmp_path / "out" / "recipe.yaml", tmp_path / "again", "--workdir", work)
    assert again.exit_code == 0, again.output
    assert again.stderr.count(": cached") == 2
    # the perplexities are kept too: nothing is evaluated again, the table is the same
    assert "evaluating" in first.stderr and "evaluating" not in again.stderr
    table = [line for line in first.stdout.splitlines() if line.strip().startswith(("input ", "1 prune ", "2 quantize "))]
    assert len(table) == 3
    assert [line.split()[-3:] for line in table] == [line.split()[-3:] for line in again.stdout.splitlines() if line.strip().startswith(("input ", "1 prune ", "2 quantize "))]
    # ... and run afresh it writes the same bytes, its resolved recipe included
    fresh = cli("run", tmp_path / "out" / "recipe.yaml", tmp_path / "fresh", "--workdir", work, "--no-cache")
    assert fresh.exit_code == 0, fresh.output
    assert "cached" not in fresh.stderr
    assert files_bytes(tmp_path / "fresh") == files_bytes(tmp_path / "out")


def test_a_gguf_output_is_one_file_with_its_recipe_beside_it(tmp_path, tiny_llama, cli):
    recipe = write_recipe(tmp_path / "r.yaml", {"steps": [{"pass": "quantize", "method": "rtn", "bits": 8, "group_size": 32, "format": "packed"}, {"pass": "gguf"}]})
    out = tmp_path / "m.gguf"
    result = cli("run", recipe, out, "--model", tiny_llama, "--workdir", tmp_path / "work", "--eval", SAMPLE_TEXT)
    assert result.exit_code == 0, result.output
    from gguf import GGUFReader

    reader = GGUFReader(out)
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} == {"Q8_0"}
    name = reader.fields["general.name"]
    assert bytes(name.parts[name.data[0]]).decode() == tiny_llama.name  # not the cache folder's name
    resolved = yaml.safe_load((tmp_path / "m.gguf.recipe.yaml").read_text())
    assert resolved["steps"][1] == {"pass": "gguf", "type": "auto", "tensor_type": [], "pure": False, "name": tiny_llama.name}
    record = json.loads((tmp_path / "m.gguf.weightsmith.json").read_text())
    assert record["pass"] == "gguf" and record["inputs"][0]["parent"]["pass"] == "quantize"
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(("input ", "1 quantize ", "2 gguf "))]
    assert [row[0] for row in rows] == ["input", "1", "2"]
    ppl = [float(row[-3]) for row in rows]  # perplexity of each row, the GGUF's read back from the file
    assert all(p > 1 for p in ppl) and ppl[2] == pytest.approx(ppl[1], rel=1e-2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.gguf")) == ["m.gguf", "m.gguf.recipe.yaml", "m.gguf.weightsmith.json"]
