"""weightsmith.json: the provenance record written into every output folder.

It records the pass and its parameters, the seed, each input folder with the sha256 of every weight
file, package versions and the pass's measured figures. An input's own weightsmith.json is kept as
its ``parent``, so lineage chains across passes. Wall-clock times are left out on purpose: the same
inputs, recipe and seed give a byte-identical output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from weightsmith.paths import cache_dir

RECORD_NAME = "weightsmith.json"
FORMAT_VERSION = 1
_VERSIONED = ("weightsmith", "torch", "transformers", "safetensors")


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """sha256 of files, remembered by (path, size, mtime, inode) like git's index does, so that a
    large input is hashed once and not on every pass."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "sha256.json"
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"

    def sha256(self, path: Path) -> str:
        key = self.key(path)
        if key not in self.entries:
            self.entries[key] = sha256_file(path)
        return self.entries[key]

    def save(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


class Record:
    """Collects what weightsmith.json says about one pass; input files are hashed in a background
    thread while the pass works."""

    def __init__(self, pass_name: str, parameters: dict | None = None, seed: int | None = None) -> None:
        self.pass_name = pass_name
        self.parameters = parameters or {}
        self.seed = seed
        self.figures: dict[str, object] = {}
        self._inputs: list[tuple[Path, list[Path], dict | None]] = []
        self._cache = HashCache()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._hashes: dict[Path, Future[str]] = {}

    def add_input(self, folder: Path, files: list[Path], parent: dict | None) -> None:
        """An input checkpoint: its folder, its weight files (hashed now, in the background) and its
        own provenance record, if any."""
        self._inputs.append((folder, files, parent))
        for file in files:
            if file not in self._hashes:
                self._hashes[file] = self._pool.submit(self._cache.sha256, file)

    def finish(self) -> dict:
        inputs = []
        for folder, files, parent in self._inputs:
            inputs.append(
                {
                    "path": str(folder.resolve()),
                    "files": {f.name: self._hashes[f].result() for f in files},
                    "parent": parent,
                }
            )
        self._pool.shutdown()
        self._cache.save()
        return {
            "format": FORMAT_VERSION,
            "pass": self.pass_name,
            "parameters": self.parameters,
            "seed": self.seed,
            "inputs": inputs,
            "figures": self.figures,
            "versions": versions(),
        }
