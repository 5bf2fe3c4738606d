"""Where weightsmith keeps caches and finds the shared assets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/weightsmith`` (default ``~/.cache/weightsmith``), created on demand."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "weightsmith"
    path.mkdir(parents=True, exist_ok=True)
    return path


def assets_dir() -> Path:
    """The shared assets folder: ``$WEIGHTSMITH_ASSETS``, default ``../shared/assets`` from the
    current folder (the project root, where make and CI run)."""
    return Path(os.environ.get("WEIGHTSMITH_ASSETS") or Path.cwd().parent / "shared" / "assets")


def asset(relative: str) -> Path | None:
    """The asset at ``relative`` inside :func:`assets_dir`, or None when it is absent."""
    path = assets_dir() / relative
    return path if path.exists() else None
