"""Files written whole or not at all, locks against concurrent writers, stale temporaries.

* :func:`atomic_path` / :func:`atomic_dir`: write into a temporary sibling, rename it onto the
  target only when the block succeeds; an interrupted write never leaves anything half-written
  at the target.
* :func:`exclusive_lock`: one inrseg process writes a given output at a time.
* :func:`stale_temporaries` / :func:`remove_stale_temporaries`: what a killed writer left.
* :func:`check_writable`: a bad output path is found before the work starts.
* :func:`read_json`: a JSON object file, with one-line errors naming the file.

Every problem the user can fix raises :class:`~inrseg.core.errors.InputError` naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from inrseg.core.errors import InputError

__all__ = ["atomic_dir", "atomic_path", "check_writable", "current_umask", "exclusive_lock",
           "make_dir_public", "read_json", "remove_stale_temporaries", "stale_temporaries"]


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_dir_public(path: Path) -> None:
    """Give a directory made by :func:`tempfile.mkdtemp` (mode 0700) the umask's mode."""
    os.chmod(path, 0o777 & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffix (``.nii.gz``, ``.json``...) so writers that choose the
    format from the extension behave. On error the temporary file is removed: nothing
    half-written is ever left at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 (and some writers recreate the file): give it the umask's mode,
        # so colleagues can read results as with any other file
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        if exc.errno is not None and exc.filename in (None, str(tmp_path), tmp):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_json(path: str | Path) -> dict:
    """The JSON object stored in ``path``; :class:`~inrseg.core.errors.InputError` if the file
    is missing, is not valid JSON or holds something other than an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise InputError(path, "expected a JSON object")
    return obj


def check_writable(path: str | Path, what: str = "output") -> None:
    """Raise :class:`InputError` unless ``path``'s nearest existing ancestor directory is
    writable: called before a long job, so a bad ``--out`` is found before the work starts."""
    path = Path(path).absolute()
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(path, f"cannot write the {what}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot write the {what}: {probe} is not writable")


def stale_temporaries(path: str | Path) -> list[Path]:
    """Hidden temporary siblings ``.NAME.*.tmp*`` that :func:`atomic_path` / :func:`atomic_dir`
    left behind for ``path`` when a process was killed mid-write."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}.*") if ".tmp" in p.name[len(path.name) + 2:])


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete :func:`stale_temporaries` of ``path`` (call it holding :func:`exclusive_lock`, so
    that no live writer's file is taken); returns what was removed, for the caller to report."""
    removed = stale_temporaries(path)
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[Path]:
    """Hold ``PATH.lock`` (an advisory ``flock``, released by the kernel even on SIGKILL) for the
    block; a second inrseg process writing ``path`` fails at once with :class:`InputError`."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(path, "another inrseg process is writing it (wait for it to finish)") from None
        yield lock
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; when the block succeeds it becomes
    ``path`` in one rename, so ``path`` is either written whole or left as it was.

    ``path`` must not exist or be empty, unless ``force`` (then it is replaced). The check runs
    before the block (fail early) and again at the rename (another writer may have finished
    meanwhile: its folder is never mixed with ours).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InputError(path, "exists and is not empty (use --force to replace it)")
    check_writable(path, "output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    make_dir_public(tmp)
    try:
        yield tmp
        old = None
        if path.is_dir():
            if any(path.iterdir()):
                if not force:
                    raise InputError(path, "was written by another process meanwhile; nothing was changed")
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old.tmp", dir=path.parent))
                os.replace(path, old / "x")
            else:
                path.rmdir()
        try:
            os.rename(tmp, path)
        except OSError:
            raise InputError(path, "was written by another process meanwhile; nothing was changed") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
