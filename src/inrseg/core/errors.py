"""Errors that reach the user as one line: ``<file>: <problem>``.

Everything the user can get wrong (a bad file, a mismatched label map, a checkpoint of the wrong
method) raises :class:`InputError`; the CLI prints ``error: <path>: <problem>`` and exits with
code 2, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

from pathlib import Path


class InrsegError(Exception):
    """Base class of errors inrseg reports to the user as one line."""


class InputError(InrsegError):
    """A user-supplied file or directory is unusable.

    Args:
        path: the offending file or directory (``None`` when no file is involved).
        problem: what is wrong with it, one short clause, no trailing period.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)
