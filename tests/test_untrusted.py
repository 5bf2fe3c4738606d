"""Untrusted checkpoints: every malformed input is one line naming the file and the problem, exit 2."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.stformat import parse_header


def raw_file(header: dict, data: bytes, declared_len: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if declared_len is None else declared_len) + body + data


def write_model(folder: Path, content: bytes, name: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}

CASES = {
    "truncated": (b"\x10\x00\x00", "truncated safetensors file: 3 bytes"),
    "length_past_eof": (struct.pack("<Q", 10_000) + b"{}", "header length 10000 runs past the end of the file (10 bytes)"),
    "not_json": (struct.pack("<Q", 6) + b"{nope}" + b"\0" * 8, "header is not valid JSON"),
    "offsets_past_end": (raw_file(GOOD, bytes(20)), "tensor 'b': data offsets run past the end of the file"),
    "overlap": (
        raw_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)),
        "tensor 'b': data overlaps tensor 'a'",
    ),
    "size_mismatch": (
        raw_file({"a": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, bytes(16)),
        "tensor 'a': 16 bytes stored but shape [3, 3] x F32 needs 36",
    ),
    "unknown_dtype": (raw_file({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)), "tensor 'a': unknown dtype 'F128'"),
    "trailing_bytes": (raw_file(GOOD, bytes(30)), "6 bytes after the last tensor belong to no tensor"),
    "bad_shape": (raw_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "shape must be a list of non-negative integers"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_file_is_one_line_exit_2(tmp_path, cli, case):
    content, message = CASES[case]
    path = write_model(tmp_path / "m", content)
    result = cli("inspect", tmp_path / "m")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ")
    assert message in lines[0]
    assert "Traceback" not in result.output


def sharded(folder: Path, weight_map: dict[str, str], shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for fname, tensors in shards.items():
        save_file(tensors, folder / fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_index_pointing_outside_the_folder(tmp_path, cli):
    save_file({"x": torch.ones(2)}, tmp_path / "x.safetensors")
    folder = sharded(tmp_path / "m", {"x": "../x.safetensors"}, {})
    result = cli("inspect", folder)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {folder / 'model.safetensors.index.json'}: tensor 'x': shard '../x.safetensors' is outside the checkpoint folder"


def test_missing_shard(tmp_path, cli):
    folder = sharded(tmp_path / "m", {"x": "a.safetensors", "y": "b.safetensors"}, {"a.safetensors": {"x": torch.ones(2)}})
    result = cli("inspect", folder)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {folder / 'model.safetensors.index.json'}: shard b.safetensors is missing"


def test_tensor_in_two_shards(tmp_path, cli):
    folder = sharded(
        tmp_path / "m",
        {"x": "a.safetensors", "y": "b.safetensors"},
        {"a.safetensors": {"x": torch.ones(2)}, "b.safetensors": {"x": torch.ones(2), "y": torch.zeros(1)}},
    )
    result = cli("inspect", folder)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {folder / 'b.safetensors'}: tensor 'x' is also stored in a.safetensors"


def test_pickle_without_flag(tmp_path, cli):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({"x": torch.ones(2)}, folder / "pytorch_model.bin")
    result = cli("eval", folder, "--text", tmp_path / "t.txt")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: {folder / 'pytorch_model.bin'}: pickle checkpoint refused")


def test_missing_model_and_not_gguf(tmp_path, cli):
    result = cli("inspect", tmp_path / "nothing")
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {tmp_path / 'nothing'}: no such file or folder"
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(20))
    result = cli("convert", tmp_path / "fake.gguf", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'fake.gguf'}: not a GGUF file (wrong magic bytes)"
    assert not (tmp_path / "out").exists()


def valid_file_bytes() -> bytes:
    import io

    from safetensors.torch import save

    buf = io.BytesIO(save({"w": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}))
    return buf.getvalue()


VALID = valid_file_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
)
def test_mutated_header_is_a_clean_error_or_a_correct_read(tmp_path, edits, cut):
    data = bytearray(VALID)
    header_end = 8 + struct.unpack("<Q", VALID[:8])[0]
    for pos, value in edits:
        data[pos % header_end] = value  # mutate the length prefix and the JSON header
    if cut is not None:
        data = data[:cut]
    folder = tmp_path / "m"
    path = write_model(folder, bytes(data))
    try:
        ckpt = Checkpoint(folder)
    except WeightsmithError as exc:
        assert str(exc).startswith(f"{path}: ")
        return
    # it parsed: then every tensor must read back with the shape and byte count the header claims
    for name in ckpt.names():
        info = ckpt.info(name)
        t = ckpt.get(name)
        assert tuple(t.shape) == info.shape and t.numel() * t.element_size() == info.nbytes
    assert sum(i.nbytes for i in ckpt.tensors.values()) + 8 + struct.unpack("<Q", bytes(data[:8]))[0] == len(data)


def test_parse_header_accepts_what_safetensors_writes():
    header = parse_header(VALID, len(VALID), "mem")
    assert {n: (e.dtype, e.shape) for n, e in header.tensors.items()} == {"w": ("F32", (3, 4)), "b": ("BF16", (5,))}
