"""Helpers for the benchmark scripts: run a command as a whole process, measure wall time and peak RSS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PEERS_BIN = ROOT / ".venv-peers" / "bin"

#: mergekit-yaml with torch.argsort and torch.sort made stable: among equal magnitudes at a
#: density cut, TIES and breadcrumbs then keep the lower flat index, as weightsmith does (mergekit's
#: own unstable sorts pick any of them).
STABLE_MERGEKIT = """
import functools, sys, torch
torch.argsort = functools.partial(torch.argsort, stable=True)
torch.sort = functools.partial(torch.sort, stable=True)
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
sys.exit(main())
"""


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def measure(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
    """Wall time and peak resident set size (MiB) of ``cmd`` as a whole process, measured by
    ``/usr/bin/time -v`` (a small process of its own, so the RSS of this Python process, which a
    forked child would inherit as its high-water mark until exec, does not leak into the figure).
    Output goes through temporary files, so a chatty command cannot block on a full pipe."""
    with tempfile.TemporaryFile("w+") as out, tempfile.NamedTemporaryFile("w+") as rusage, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-v", "-o", rusage.name, *map(str, cmd)],
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        report = Path(rusage.name).read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1))
    return Run(wall, rss_kb / 1024, stdout, stderr)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in a checkpoint folder."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` for the tables' ratio columns, None when either is missing or ``b`` is 0."""
    return None if a is None or b is None or b == 0 else a / b


def or_dash(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted by ``spec`` (and ``suffix``), or "-" when missing."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def goal_word(ok: bool | None) -> str:
    """A goal column's word: met, NOT met, or "-" when the row has no goal."""
    return "-" if ok is None else ("met" if ok else "NOT met")
