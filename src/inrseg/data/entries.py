"""The entries of a dataset or input folder: regular files only, one file per case.

A named pipe, a socket or a device named like an image would block a reader forever (or feed it
an endless stream), so every entry inrseg is about to read is :func:`os.stat`-ed first - never
opened - and refused unless it is a regular file (a symbolic link to one is fine). Two files that
name one case (``x.nii`` and ``x.nii.gz``; ``x.nii.gz`` and ``x_0000.nii.gz``; one channel twice)
are refused, never one of them picked.

Every refusal is an :class:`~inrseg.core.errors.InputError` naming the entry.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable, Iterable

from inrseg.core.errors import InputError

__all__ = ["entry_kind", "files_by_case", "require_regular_file"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def entry_kind(mode: int) -> str:
    """``"a directory"``, ``"a named pipe (FIFO)"``, ... for an ``st_mode``; ``"a regular file"``."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def require_regular_file(path: str | Path, what: str = "file") -> os.stat_result:
    """The :func:`os.stat` of ``path`` (links followed) if it is a regular file; else an
    :class:`InputError` saying what it is instead (missing, a broken link, a directory, a named
    pipe, a socket, a device). ``what`` names the file expected, e.g. ``"NIfTI file"``. The file
    is never opened, so a named pipe cannot block."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, "is a broken symbolic link" if os.path.lexists(path) else "no such file") from None
    except NotADirectoryError:
        raise InputError(path, "no such file (a folder on its path is a file)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(path, "is a loop of symbolic links") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, f"is {entry_kind(st.st_mode)}, expected a regular {what}")
    return st


def files_by_case(files: Iterable[Path], key: Callable[[Path], tuple[str, int | None]]
                  ) -> dict[str, dict[int | None, Path]]:
    """``{case id: {channel: file}}`` of ``files``, where ``key(file)`` is its ``(case id,
    channel)`` (channel ``None`` for a file without a channel suffix).

    Raises:
        InputError: naming the second of two files with one case id and channel (``x.nii`` and
            ``x.nii.gz``), or a case with both a channel-less file and channel files.
    """
    out: dict[str, dict[int | None, Path]] = {}
    for f in sorted(files):
        case, channel = key(f)
        chans = out.setdefault(case, {})
        if channel in chans or (chans and (channel is None) != (None in chans)):
            other = chans.get(channel) or next(iter(chans.values()))
            what = f"case {case!r}" + (f" channel {channel}" if channel is not None and channel in chans else "")
            raise InputError(f, f"names {what}, as {other.name} does: keep one file per case and channel")
        chans[channel] = f
    return out
