"""Checkpoint folders: write/read round trips, sharding, provenance, atomic output."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightsmith.checkpoint import INDEX_NAME, Checkpoint, CheckpointWriter, copy_checkpoint
from weightsmith.provenance import RECORD_NAME, Record, sha256_file
from weightsmith.stformat import DTYPES, torch_dtype

ALL_DTYPES = sorted((torch_dtype(name) for name in DTYPES), key=str)


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(ALL_DTYPES):
        base = torch.randn(7, i + 2, generator=g) * 50
        if dtype == torch.bool:
            out[f"t.{i}"] = base > 0
        elif dtype.is_floating_point:
            out[f"t.{i}"] = base.to(dtype)
        else:
            lo = 0 if "uint" in str(dtype) else -100
            out[f"t.{i}"] = base.clamp(lo, 100).to(torch.int64).to(dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0, 4)
    return out


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, b.view(-1).view(torch.uint8) if b.numel() else b)


@pytest.mark.parametrize("max_shard_size", [2 * 1024**3, 120])
def test_round_trip_every_dtype(tmp_path, max_shard_size):
    tensors = sample_tensors()
    with CheckpointWriter(tmp_path / "out", max_shard_size=max_shard_size) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    ckpt = Checkpoint(tmp_path / "out")
    assert set(ckpt.names()) == set(tensors)
    for name, t in tensors.items():
        assert_same(ckpt.get(name), t)
        assert ckpt.info(name).shape == tuple(t.shape) and ckpt.info(name).dtype == t.dtype
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    if max_shard_size > 10**6:
        assert files == ["model.safetensors"] and not (tmp_path / "out" / INDEX_NAME).exists()
    else:
        assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(tensors)
        # the index maps every name to the shard that really holds it
        for name, fname in index["weight_map"].items():
            assert name in load_file(tmp_path / "out" / fname)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # the safetensors library itself reads what we wrote
    merged = {}
    for f in files:
        merged.update(load_file(tmp_path / "out" / f))
    for name, t in tensors.items():
        assert_same(merged[name], t)


def test_header_outgrowing_its_reservation_is_shifted(tmp_path):
    tensors = {f"a.very.long.tensor.name.{i:04d}": torch.full((3,), float(i)) for i in range(50)}
    with CheckpointWriter(tmp_path / "out", header_reserve=16) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_provenance_lists_input_hashes_and_chains(tmp_path, tiny_llama):
    src = Checkpoint(tiny_llama)
    record = Record("copy", {"dtype": "bfloat16"}, seed=7)
    record.add_input(src.folder, src.files, src.provenance)
    record.figures["answer"] = 42
    copy_checkpoint(src, tmp_path / "a", dtype=torch.bfloat16, record=record)
    doc = json.loads((tmp_path / "a" / RECORD_NAME).read_text())
    assert doc["pass"] == "copy" and doc["seed"] == 7 and doc["parameters"] == {"dtype": "bfloat16"}
    assert doc["figures"] == {"answer": 42}
    (entry,) = doc["inputs"]
    assert entry["files"] == {f.name: sha256_file(f) for f in src.files}
    # a second pass keeps the first pass's record as its parent
    second = Checkpoint(tmp_path / "a")
    record2 = Record("copy", {})
    record2.add_input(second.folder, second.files, second.provenance)
    copy_checkpoint(second, tmp_path / "b", record=record2)
    doc2 = json.loads((tmp_path / "b" / RECORD_NAME).read_text())
    assert doc2["inputs"][0]["parent"] == doc
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"
    assert Checkpoint(tmp_path / "b").get("model.norm.weight").dtype == torch.bfloat16


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", max_shard_size=64) as writer:
            for i in range(5):
                writer.add(f"t{i}", torch.zeros(32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(tmp_path):
    from weightsmith.errors import WeightsmithError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(WeightsmithError, match="already exists; pass --force"):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add("x", torch.ones(2))
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    with CheckpointWriter(tmp_path / "out", force=True) as writer:
        writer.add("x", torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_same_input_gives_byte_identical_output(tmp_path, tiny_llama):
    for name in ("a", "b"):
        src = Checkpoint(tiny_llama)
        record = Record("copy", {})
        record.add_input(src.folder, src.files, src.provenance)
        copy_checkpoint(src, tmp_path / name, max_shard_size=4096, record=record)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len(files_a) > 5
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def _mapped_bytes(file) -> int:
    """Bytes of this process's address space mapped from ``file`` (Linux /proc/self/maps)."""
    total = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(Path(file).resolve()):
            begin, end = (int(x, 16) for x in fields[0].split("-"))
            total += end - begin
    return total


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps")
def test_lazy_get_maps_only_the_tensor(tmp_path, tiny_llama):
    folder = shutil.copytree(tiny_llama, tmp_path / "model")  # the file is written to below
    ckpt = Checkpoint(folder)
    name = "model.layers.0.self_attn.q_proj.weight"
    info = ckpt.info(name)
    before = info.file.read_bytes()
    stored = torch.frombuffer(bytearray(before[info.start : info.end]), dtype=torch.float32).reshape(32, 32)
    assert info.file.stat().st_size > 8 * info.nbytes  # so mapping the whole file would show
    t = ckpt.get(name)
    assert t.shape == (32, 32) and t.dtype == torch.float32 and torch.equal(t, stored)
    # lazy: the tensor is a mapping of its own bytes (within a page each side), not a copy made by get()
    assert info.nbytes <= _mapped_bytes(info.file) <= info.nbytes + 2 * mmap.PAGESIZE
    with open(info.file, "r+b") as fh:  # a change to the file shows through the mapping
        fh.seek(info.start)
        fh.write(struct.pack("<f", 7.5))
    assert float(t[0, 0]) == 7.5
    # copy-on-write: writing into the tensor changes the tensor only, never the file
    t.mul_(0)
    assert not t.any()
    after = info.file.read_bytes()
    assert after[: info.start] == before[: info.start] and after[info.start + 4 :] == before[info.start + 4 :]
    assert struct.unpack_from("<f", after, info.start) == (7.5,)
    again = ckpt.get(name)
    assert float(again[0, 0]) == 7.5 and torch.equal(again.flatten()[1:], stored.flatten()[1:])
    del t, again
    assert _mapped_bytes(info.file) == 0  # the mapping goes with the tensors
    assert ckpt.num_parameters == sum(i.numel for i in ckpt.tensors.values())
    names_by_shard = [n for _, names in ckpt.iter_shards() for n in names]
    assert names_by_shard == ckpt.names() and len(set(names_by_shard)) == len(ckpt.tensors)


def test_copy_from_copies_bytes_file_to_file(tmp_path, tiny_llama, monkeypatch):
    src = Checkpoint(shutil.copytree(tiny_llama, tmp_path / "model"))
    files_before = {f: f.read_bytes() for f in src.files}

    def no_tensor(self, name):
        raise AssertionError(f"{name} went through get()")

    monkeypatch.setattr(Checkpoint, "get", no_tensor)  # the bytes go file to file, never through torch
    with CheckpointWriter(tmp_path / "out", max_shard_size=4096) as writer:
        for name in reversed(src.names()):
            writer.copy_from(src, name)
    monkeypatch.undo()
    out = Checkpoint(tmp_path / "out")
    assert len(out.files) > 1 and set(out.names()) == set(src.names())
    for name in src.names():
        a, b = src.info(name), out.info(name)
        assert (b.st_dtype, b.shape) == (a.st_dtype, a.shape)
        assert b.file.read_bytes()[b.start : b.end] == files_before[a.file][a.start : a.end], name
    # the output is a copy: overwriting it leaves the input as it was
    for f in out.files:
        f.write_bytes(bytes(f.stat().st_size))
    assert {f: f.read_bytes() for f in src.files} == files_before


def test_pickle_checkpoint_loads_only_with_flag(tmp_path, cli):
    folder = tmp_path / "pkl"
    folder.mkdir()
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(state, folder / "pytorch_model.bin")
    result = cli("inspect", folder)
    assert result.exit_code == 2
    assert f"{folder / 'pytorch_model.bin'}: pickle checkpoint refused" in result.stderr
    result = cli("copy", folder, tmp_path / "st", "--allow-pickle")
    assert result.exit_code == 0, result.output
    ckpt = Checkpoint(tmp_path / "st")
    assert torch.equal(ckpt.get("w"), state["w"]) and torch.equal(ckpt.get("b"), state["b"])
    assert os.path.exists(tmp_path / "st" / RECORD_NAME)


def test_one_dtype_table_parses_what_users_write():
    from weightsmith.errors import WeightsmithError
    from weightsmith.stformat import numpy_view, parse_dtype, parse_torch_dtype, st_dtype

    written = {
        "bf16": "BF16", "BFloat16": "BF16", "torch.bfloat16": "BF16",
        "fp16": "F16", "float16": "F16", "FP32": "F32", "float32": "F32", " fp64 ": "F64", "float64": "F64",
    }
    assert {name: parse_dtype(name) for name in written} == written
    assert parse_torch_dtype("bf16") is torch.bfloat16 and parse_torch_dtype("fp32") is torch.float32
    for bad in ("fp8", "int8", "F32x", "", "bf 16"):
        with pytest.raises(WeightsmithError) as info:
            parse_dtype(bad)
        assert str(info.value) == f"unknown dtype {bad!r}; choose from fp64, float64, fp32, float32, fp16, float16, bf16, bfloat16"
    # every entry: the torch dtype of the same name and size, and back
    for name, entry in DTYPES.items():
        dtype = torch_dtype(name)
        assert str(dtype) == f"torch.{entry.torch}" and st_dtype(dtype) == name
        assert torch.empty(0, dtype=dtype).element_size() == entry.itemsize
    assert {name: str(numpy_view(name)) for name, e in DTYPES.items() if e.numpy} == {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16"
    }
    with pytest.raises(KeyError):
        numpy_view("I32")
    with pytest.raises(KeyError):
        st_dtype(torch.complex64)


def test_config_dtype_goes_under_the_key_the_config_uses():
    from weightsmith.checkpoint import config_with_dtype

    old = {"architectures": ["X"], "torch_dtype": "float32", "vocab_size": 8}
    new = config_with_dtype(old, "BF16")
    assert list(new.items()) == [("architectures", ["X"]), ("torch_dtype", "bfloat16"), ("vocab_size", 8)]
    assert old["torch_dtype"] == "float32"  # a copy: the source config is left as it was
    assert config_with_dtype({"dtype": "bfloat16", "torch_dtype": "bfloat16", "a": 1}, "F16") == {"dtype": "float16", "torch_dtype": "float16", "a": 1}
    assert list(config_with_dtype({"a": 1}, "F32").items()) == [("a", 1), ("dtype", "float32")]


def test_merge_config_dtypes_use_the_same_parser():
    from merge.config import load_config
    from weightsmith.errors import WeightsmithError

    config, _ = load_config({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "torch.float16", "out_dtype": "BF16"})
    assert (config.compute_st_dtype, config.output_st_dtype) == ("F16", "BF16")
    assert (config.compute_dtype, config.output_dtype) == (torch.float16, torch.bfloat16)
    with pytest.raises(WeightsmithError, match=r"^dtype: unknown dtype 'fp8'; choose from fp64, float64, fp32, "):
        load_config({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "fp8"})


def test_header_parsing_and_the_numpy_merge_engine_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, merge.engine_numpy, merge.config, weightsmith.checkpoint, weightsmith.stformat as s\n"
        "assert s.parse_dtype('bf16') == 'BF16'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
