"""Our merges equal mergekit's on the same configs (fixtures from bench/make_merge_oracle.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge.run import merge_checkpoints
from weightsmith.checkpoint import Checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"
CONFIGS = sorted(p.stem for p in FIXTURES.glob("*.yml"))


def test_fixtures_present():
    assert {"linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "model_stock", "passthrough"} <= set(CONFIGS)
    assert "mergekit 0.1.5" in (FIXTURES / "README.md").read_text()


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_mergekit(name, tmp_path, monkeypatch):
    monkeypatch.chdir(FIXTURES)  # the configs name models relative to this folder, as mergekit ran them
    report = merge_checkpoints(FIXTURES / f"{name}.yml", tmp_path / "out")
    ours, theirs = Checkpoint(tmp_path / "out"), Checkpoint(FIXTURES / "outputs" / name)
    assert sorted(ours.names()) == sorted(theirs.names())
    for tensor in theirs.names():
        a, b = ours.get(tensor), theirs.get(tensor)
        assert a.dtype == b.dtype and a.shape == b.shape, tensor
        if a.dtype == torch.float32:
            assert (a - b).abs().max().item() <= 1e-6, tensor
        else:
            assert torch.equal(a, b), tensor
    assert ours.config["num_hidden_layers"] == theirs.config["num_hidden_layers"] == report.layers
    assert report.tensors == len(theirs.names())


def test_relative_paths_also_resolve_from_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merge_checkpoints(FIXTURES / "slerp.yml", tmp_path / "out")
    ours, theirs = Checkpoint(tmp_path / "out"), Checkpoint(FIXTURES / "outputs" / "slerp")
    assert all((ours.get(n) - theirs.get(n)).abs().max() <= 1e-6 for n in theirs.names())
