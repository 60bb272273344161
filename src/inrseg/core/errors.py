"""Errors that reach the user as one line: ``<file>: <problem>``.

Everything the user can get wrong (a bad file, a mismatched label map, a checkpoint of the wrong
method, a bad environment setting: :func:`env_number`) raises :class:`InputError`; the CLI prints
``error: <path>: <problem>`` and exits with code 2, without a traceback unless ``--debug`` is given.
A writer's own error (a full disk in safetensors, nibabel, a bare ``write()``) carries no file
name: :func:`blame` records the file it was writing, for the CLI's one line.
"""

from __future__ import annotations

import math
import os
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


#: attribute under which :func:`blame` records the file a failing writer was writing
_BLAMED = "_inrseg_file"


def blame(exc: BaseException, path: str | Path) -> None:
    """Record on ``exc`` that it was raised while writing ``path`` (the target the user named,
    not a temporary), unless an inner writer already did; the CLI names that file in its one
    line for errors that carry no file name (safetensors', nibabel's, a bare ``write()``)."""
    if getattr(exc, _BLAMED, None) is None:
        try:
            setattr(exc, _BLAMED, str(path))
        except (AttributeError, TypeError):  # an exception type without instance attributes
            pass


def blamed(exc: BaseException) -> str | None:
    """The file :func:`blame` recorded on ``exc`` (``None``: none)."""
    return getattr(exc, _BLAMED, None)


def reblame(exc: BaseException, old: Path, new: Path) -> None:
    """Where ``exc`` names a file under ``old`` (a temporary folder), name the same file under
    ``new`` (the folder the user asked for) instead."""
    for attr in (_BLAMED, "filename", "filename2"):
        value = getattr(exc, attr, None)
        if not isinstance(value, str):
            continue
        with_old = Path(value)
        if with_old == old or old in with_old.parents:
            try:
                setattr(exc, attr, str(new / with_old.relative_to(old)))
            except (AttributeError, TypeError):
                pass


#: the values of an on/off environment variable (case-insensitive)
_SWITCH = {"": False, "0": False, "false": False, "no": False, "off": False,
           "1": True, "true": True, "yes": True, "on": True}


def env_switch(name: str) -> bool:
    """The on/off environment variable ``name`` (unset or empty: off).

    Raises:
        InputError: a value other than 0/1, true/false, yes/no, on/off, naming the variable.
    """
    raw = os.environ.get(name, "").strip()
    if raw.lower() not in _SWITCH:
        raise InputError(None, f"environment variable {name}={raw!r:.40}: expected 1 or 0 (true/false, yes/no, "
                               f"on/off)")
    return _SWITCH[raw.lower()]


def env_number(name: str, default: float | None, low: float, high: float, unit: str) -> float | None:
    """The environment variable ``name`` as a finite number in ``[low, high]`` (``default``
    when unset or empty).

    Raises:
        InputError: a value that is not such a number, naming the variable (no file is at fault).
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(None, f"environment variable {name}={raw!r:.40}: expected {unit} from {low:g} to "
                               f"{high:g} (unset it for the default{'' if default is None else f', {default:g}'})")
    return value
