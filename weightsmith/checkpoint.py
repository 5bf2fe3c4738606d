"""Hugging Face checkpoint folders: read lazily tensor by tensor, write shard by shard, atomically.

A checkpoint folder holds ``config.json``, tokenizer files, ``model.safetensors`` or shards listed by
``model.safetensors.index.json``, and (when weightsmith wrote it) ``weightsmith.json``, the
provenance record. Every header and index is validated before any tensor is read (see
:mod:`weightsmith.stformat`); pickle checkpoints are refused unless explicitly allowed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from weightsmith import provenance
from weightsmith.errors import WeightsmithError
from weightsmith.stformat import DTYPES, TensorEntry, encode_header, numpy_view, read_header, st_dtype, torch_dtype

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
#: Files copied from a source checkpoint into an output: configuration and tokenizer.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class TensorInfo:
    """What the headers say about one tensor; no data read."""

    name: str
    file: Path
    #: the safetensors dtype name (``BF16``, ``F32``, ...)
    st_dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return torch_dtype(self.st_dtype)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A validated, lazily read checkpoint folder.

    Construction reads only headers, the index and config.json; :meth:`get` memory-maps one tensor.
    """

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        if not self.folder.exists():
            raise WeightsmithError(self.folder, "no such file or folder")
        if not self.folder.is_dir():
            raise WeightsmithError(self.folder, "not a checkpoint folder (a .gguf file? run `weightsmith convert` first)")
        self.allow_pickle = allow_pickle
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.files, self.tensors = self._scan()
        self.config: dict = self._read_config()

    # ---- discovery and validation -------------------------------------------------------------
    def _scan(self) -> tuple[list[Path], dict[str, TensorInfo]]:
        index = self.folder / INDEX_NAME
        if index.exists():
            files, expected = self._read_index(index)
            return files, self._read_safetensors(files, expected)
        single = self.folder / SINGLE_NAME
        if single.exists():
            return [single], self._read_safetensors([single], None)
        loose = sorted(self.folder.glob("*.safetensors"))
        if loose:
            return loose, self._read_safetensors(loose, None)
        pickles = sorted(p for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickles:
            return pickles, self._read_pickles(pickles)
        ggufs = sorted(self.folder.glob("*.gguf"))
        if ggufs:
            raise WeightsmithError(ggufs[0], "GGUF file: run `weightsmith convert` to make a safetensors checkpoint of it")
        raise WeightsmithError(self.folder, "no model.safetensors, safetensors shards or index found")

    def _read_index(self, index: Path) -> tuple[list[Path], dict[str, Path]]:
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsmithError(index, f"cannot read the index: {exc}") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsmithError(index, "index has no weight_map")
        root = self.folder.resolve()
        expected: dict[str, Path] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not fname:
                raise WeightsmithError(index, f"tensor {name!r}: shard name must be a string")
            target = (self.folder / fname).resolve()
            if os.path.isabs(fname) or ".." in Path(fname).parts or target.parent != root:
                raise WeightsmithError(index, f"tensor {name!r}: shard {fname!r} is outside the checkpoint folder")
            expected[name] = self.folder / fname
        files = sorted(set(expected.values()))
        for file in files:
            if not file.is_file():
                raise WeightsmithError(index, f"shard {file.name} is missing")
        return files, expected

    def _read_safetensors(self, files: list[Path], expected: dict[str, Path] | None) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            header = read_header(file)
            for entry in header.tensors.values():
                if entry.name in tensors:
                    raise WeightsmithError(file, f"tensor {entry.name!r} is also stored in {tensors[entry.name].file.name}")
                tensors[entry.name] = _info(entry, file)
        if expected is not None:
            for name, file in expected.items():
                if name not in tensors:
                    raise WeightsmithError(file, f"tensor {name!r} listed in the index is not in this shard")
                if tensors[name].file != file:
                    raise WeightsmithError(
                        self.folder / INDEX_NAME, f"tensor {name!r} is indexed in {file.name} but stored in {tensors[name].file.name}"
                    )
            extra = sorted(set(tensors) - set(expected))
            if extra:
                raise WeightsmithError(self.folder / INDEX_NAME, f"tensor {extra[0]!r} is stored in a shard but not indexed")
        return tensors

    def _read_pickles(self, files: list[Path]) -> dict[str, TensorInfo]:
        if not self.allow_pickle:
            raise WeightsmithError(
                files[0],
                "pickle checkpoint refused (loading pickle can run arbitrary code); pass --allow-pickle to load it "
                "with torch.load(weights_only=True)",
            )
        import torch

        tensors: dict[str, TensorInfo] = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's problem
                raise WeightsmithError(file, f"cannot load with weights_only=True: {str(exc).splitlines()[0]}") from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise WeightsmithError(file, "not a state dict of tensors")
            self._pickled[file] = state
            for name, tensor in state.items():
                if name in tensors:
                    raise WeightsmithError(file, f"tensor {name!r} is also stored in {tensors[name].file.name}")
                nbytes = tensor.numel() * tensor.element_size()
                tensors[name] = TensorInfo(name, file, st_dtype(tensor.dtype), tuple(tensor.shape), 0, nbytes)
        return tensors

    def _read_config(self) -> dict:
        path = self.folder / "config.json"
        return read_json_object(path) if path.exists() else {}

    # ---- queries ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in storage order (file by file, offset by offset)."""
        return [t.name for t in sorted(self.tensors.values(), key=lambda t: (self.files.index(t.file), t.start))]

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise WeightsmithError(self.folder, f"no tensor named {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (headers excluded)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def file_bytes(self) -> int:
        """Size on disk of the weight files."""
        return sum(f.stat().st_size for f in self.files)

    @property
    def num_parameters(self) -> int:
        """Logical parameters: a linear packed in the compressed-tensors layout counts as the
        ``out * in`` weights of its ``weight_shape``, not as its int32 storage, scales and zero points."""
        from weightsmith.summary import logical_parameters

        return logical_parameters(self)

    @property
    def provenance(self) -> dict | None:
        """This folder's own weightsmith.json, when it has one."""
        path = self.folder / provenance.RECORD_NAME
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsmithError(path, f"not valid JSON: {exc}") from None

    def stored_raw(self, name: str) -> bool:
        """Whether ``name``'s bytes sit in a safetensors file (so they can be copied as they are)."""
        return self.info(name).file not in self._pickled

    # ---- data ---------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, memory-mapped (copy-on-write) from its file: only its pages are read,
        and the mapping is released when the tensor is."""
        import torch

        info = self.info(name)
        if info.file in self._pickled:
            return self._pickled[info.file][name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = np.memmap(info.file, dtype=np.uint8, mode="c", offset=info.start, shape=(info.nbytes,))
        return torch.from_numpy(raw).view(info.dtype).reshape(info.shape)

    def array(self, name: str) -> np.ndarray:
        """The floating-point tensor ``name`` as a flat read-only numpy array memory-mapped from its
        safetensors file, without torch: float16/32/64 as such, bfloat16 as its raw 16 bits
        (uint16). ValueError for other dtypes and for tensors of pickle checkpoints."""
        info = self.info(name)
        if info.file in self._pickled or DTYPES[info.st_dtype].numpy is None:
            raise ValueError(f"{name}: only floating-point safetensors tensors are read as arrays")
        dtype = numpy_view(info.st_dtype)
        if info.nbytes == 0:
            return np.empty(0, dtype)
        # a plain ndarray over the mapping: slicing np.memmap runs Python code on every slice
        return np.memmap(info.file, dtype=dtype, mode="r", offset=info.start, shape=(info.numel,)).view(np.ndarray)

    def iter_shards(self) -> Iterator[tuple[Path, list[str]]]:
        """(file, tensor names in it) in storage order."""
        by_file: dict[Path, list[str]] = {f: [] for f in self.files}
        for name in self.names():
            by_file[self.tensors[name].file].append(name)
        yield from by_file.items()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in storage order, one at a time."""
        for _, names in self.iter_shards():
            for name in names:
                yield name, self.get(name)


def _info(entry: TensorEntry, file: Path) -> TensorInfo:
    return TensorInfo(entry.name, file, entry.dtype, entry.shape, entry.start, entry.end)


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy()


class _ShardFile:
    """One output shard being written: data goes after a reserved header region, so tensors are
    streamed to disk as they come; the header is written last (or the data shifted if it outgrew
    the reservation)."""

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self.reserve = reserve
        self.fh = open(path, "wb")
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self.size = 0
        #: the header's ``__metadata__`` (string values)
        self.metadata: dict[str, str] = {"format": "pt"}
        self.fh.seek(8 + reserve)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = _tensor_bytes(tensor)
        self.entries.append((name, st_dtype(tensor.dtype), tuple(tensor.shape), self.size, self.size + data.nbytes))
        self.fh.write(memoryview(data))
        self.size += data.nbytes

    def add_array(self, name: str, dtype: str, shape: tuple[int, ...], data: np.ndarray) -> None:
        """Append the raw bytes of a contiguous array as a tensor of safetensors dtype ``dtype``."""
        self.entries.append((name, dtype, shape, self.size, self.size + data.nbytes))
        self.fh.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self.size += data.nbytes

    def add_raw(self, name: str, info: TensorInfo) -> None:
        """Append a tensor by copying its bytes file to file in the kernel (copy_file_range)."""
        self.entries.append((name, info.st_dtype, info.shape, self.size, self.size + info.nbytes))
        self.fh.flush()
        with open(info.file, "rb") as src:
            offset, remaining = info.start, info.nbytes
            while remaining:
                sent = os.copy_file_range(src.fileno(), self.fh.fileno(), remaining, offset)
                if sent == 0:
                    raise WeightsmithError(info.file, f"tensor {name!r}: file ended while copying")
                offset += sent
                remaining -= sent
        self.fh.seek(0, os.SEEK_END)
        self.size += info.nbytes

    def close(self) -> None:
        header = encode_header(self.entries, self.metadata, reserve=self.reserve)
        if len(header) == 8 + self.reserve:
            self.fh.seek(0)
            self.fh.write(header)
            self.fh.close()
            return
        self.fh.close()
        shifted = self.path.with_suffix(".shift")
        with open(self.path, "rb") as src, open(shifted, "wb") as dst:
            dst.write(header)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
        os.replace(shifted, self.path)


class CheckpointWriter:
    """Write a checkpoint folder atomically: into a temporary folder beside ``dest``, renamed into
    place only when the ``with`` block completes without error.

    Tensors are written as they come (:meth:`add`), cut into shards at ``max_shard_size`` bytes.
    ``source`` names the folder whose config and tokenizer files are copied (``config`` overrides its
    config.json). ``record`` becomes weightsmith.json.
    """

    def __init__(
        self,
        dest: str | Path,
        *,
        force: bool = False,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        source: str | Path | None = None,
        config: dict | None = None,
        record: provenance.Record | None = None,
        header_reserve: int = 64 * 1024,
    ) -> None:
        self.dest = Path(dest)
        self.force = force
        if max_shard_size <= 0:
            raise WeightsmithError(None, f"max shard size must be positive, got {max_shard_size}")
        self.max_shard_size = max_shard_size
        self.source = Path(source) if source is not None else None
        self.config = config
        self.record = record
        self.header_reserve = header_reserve + (-header_reserve) % 8
        self.tmp: Path | None = None
        self._shards: list[_ShardFile] = []
        self._names: set[str] = set()
        self._extra: dict[str, _ShardFile] = {}

    def __enter__(self) -> CheckpointWriter:
        if self.dest.exists() and not self.force:
            raise WeightsmithError(self.dest, "already exists; pass --force to overwrite it")
        parent = self.dest.absolute().parent
        if not parent.is_dir():
            raise WeightsmithError(self.dest, f"parent folder {parent} does not exist")
        self.tmp = parent / f".{self.dest.name}.weightsmith-tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor to the output."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        try:
            st_dtype(tensor.dtype)
        except KeyError:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors") from None
        self._shard_for(name, tensor.numel() * tensor.element_size()).add(name, tensor)

    def add_array(self, name: str, dtype: str, shape: tuple[int, ...], data: np.ndarray) -> None:
        """Append one tensor given as a contiguous array of its raw values (bfloat16 as uint16) and
        its safetensors dtype name ``dtype``."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if dtype not in DTYPES or data.nbytes != math.prod(shape) * DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {name!r}: {data.nbytes} bytes do not make a {dtype} tensor of shape {shape}")
        self._shard_for(name, data.nbytes).add_array(name, dtype, tuple(shape), data)

    def copy_from(self, checkpoint: Checkpoint, name: str, as_name: str | None = None) -> None:
        """Append ``name`` from ``checkpoint`` unchanged. Bytes go file to file in the kernel when
        the source is safetensors, without passing through Python."""
        info = checkpoint.info(name)
        if not checkpoint.stored_raw(name) or not hasattr(os, "copy_file_range"):
            self.add(as_name or name, checkpoint.get(name))
            return
        as_name = as_name or name
        if as_name in self._names:
            raise ValueError(f"tensor {as_name!r} written twice")
        self._shard_for(as_name, info.nbytes).add_raw(as_name, info)

    def add_extra(self, fname: str, name: str, data: np.ndarray, note: str | None = None) -> None:
        """Append a uint8 array as tensor ``name`` of the extra safetensors file ``fname`` in the output
        folder: a file the checkpoint's index does not list, so transformers and the passes read the
        model without it (GGUF blocks for the export beside the dense weights). ``note`` is stored
        under ``name`` in the file's header metadata."""
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        if fname not in self._extra:
            self._extra[fname] = _ShardFile(self.tmp / f"{fname}.tmp", self.header_reserve)
        data = np.ascontiguousarray(data, dtype=np.uint8)
        self._extra[fname].add_array(name, "U8", tuple(data.shape), data)
        if note is not None:
            self._extra[fname].metadata[name] = note

    def _shard_for(self, name: str, nbytes: int) -> _ShardFile:
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        self._names.add(name)
        if not self._shards or (self._shards[-1].entries and self._shards[-1].size + nbytes > self.max_shard_size):
            if self._shards:
                self._shards[-1].close()
            self._shards.append(_ShardFile(self.tmp / f"shard-{len(self._shards):05d}.tmp", self.header_reserve))
        return self._shards[-1]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.tmp is not None
        try:
            if exc_type is None:
                self._finish()
        except BaseException:
            self._discard()
            raise
        if exc_type is not None:
            self._discard()
            return
        self._publish()

    def _discard(self) -> None:
        for shard in [*self._shards, *self._extra.values()]:
            if not shard.fh.closed:
                shard.fh.close()
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _finish(self) -> None:
        assert self.tmp is not None
        if not self._shards:
            raise ValueError("no tensors were written")
        self._shards[-1].close()
        n = len(self._shards)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        for shard, fname in zip(self._shards, names):
            os.replace(shard.path, self.tmp / fname)
            for entry in shard.entries:
                weight_map[entry[0]] = fname
        if n > 1:
            total = sum(shard.size for shard in self._shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(self.tmp / INDEX_NAME, index)
        for fname, extra in self._extra.items():
            extra.close()
            os.replace(extra.path, self.tmp / fname)
        if self.source is not None:
            for fname in SIDECAR_FILES:
                src = self.source / fname
                if src.is_file() and not (fname == "config.json" and self.config is not None):
                    shutil.copyfile(src, self.tmp / fname)
        if self.config is not None:
            _write_json(self.tmp / "config.json", self.config)
        if self.record is not None:
            _write_json(self.tmp / provenance.RECORD_NAME, self.record.finish())

    def _publish(self) -> None:
        assert self.tmp is not None
        old = None
        if self.dest.exists():
            old = self.tmp.parent / f".{self.dest.name}.weightsmith-old-{uuid.uuid4().hex[:12]}"
            os.replace(self.dest, old)
        os.replace(self.tmp, self.dest)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        log.info("wrote %s", self.dest)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, tokenizer files); a one-line error naming
    the file otherwise."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsmithError(path, f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise WeightsmithError(path, "not a JSON object")
    return doc


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (a merge config, a search spec); a one-line error naming
    the file otherwise, ``what`` saying what the file should be."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsmithError(path, "no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WeightsmithError(path, f"not a readable YAML file: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise WeightsmithError(path, what)
    return doc


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def config_with_dtype(config: dict, dtype: str) -> dict:
    """A copy of the config.json document ``config`` declaring weights of the safetensors dtype
    ``dtype`` (``BF16`` -> ``"bfloat16"``). The declaration goes under the key the document already
    uses (``torch_dtype`` in files older transformers wrote, ``dtype`` in newer ones; both when it has
    both), else under ``dtype``; the other keys keep their order. Every writer that changes the
    weights' dtype declares it through this function."""
    out = dict(config)
    for key in [k for k in ("torch_dtype", "dtype") if k in out] or ["dtype"]:
        out[key] = DTYPES[dtype].torch
    return out


def copy_checkpoint(src: Checkpoint, dest: str | Path, *, dtype: torch.dtype | None = None, **writer_args) -> Path:
    """The identity pass (optionally casting floating tensors to ``dtype``): tensor by tensor."""
    config = None if dtype is None else config_with_dtype(src.config, st_dtype(dtype))
    with CheckpointWriter(dest, source=src.folder, config=config, **writer_args) as writer:
        for name in src.names():
            info = src.info(name)
            if dtype is not None and info.dtype.is_floating_point and info.dtype != dtype:
                writer.add(name, src.get(name).to(dtype))
            else:
                writer.copy_from(src, name)
    return Path(dest)
