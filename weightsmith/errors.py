"""The one error type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

from pathlib import Path


class WeightsmithError(Exception):
    """A problem with the user's input or request: shown as one line, exit code 2, no traceback.

    ``path`` names the file (or folder, or recipe) the problem is in; ``problem`` says what is wrong.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
