"""Files written whole or not at all, locks against concurrent writers, stale temporaries.

* :func:`atomic_path` / :func:`atomic_dir`: write into a temporary sibling, rename it onto the
  target only when the block succeeds; an interrupted write never leaves anything half-written
  at the target.
* :func:`exclusive_lock`: one inrseg process writes a given output at a time.
* :func:`stale_temporaries` / :func:`remove_stale_temporaries`: what a killed writer left.
* :func:`check_writable`: a bad output path is found before the work starts.
* :func:`refuse_overlap`: no output of a command is, or holds, one of its inputs.
* :func:`claim_output`: the lock, the stale temporaries removed and named, and the folders a
  failing command created removed again.
* :func:`read_json` / :func:`write_text`: JSON and text files, UTF-8 whatever the locale.

Temporary names are ``.NAME.<random>.tmp...``; for a name so long that this would pass the
255-byte limit of a file name, ``.HEAD~HASH.<random>.tmp...`` (:func:`temp_prefix`).

Every problem the user can fix raises :class:`~inrseg.core.errors.InputError` naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from inrseg.core.errors import InputError, blame, reblame
from inrseg.core.progress import status

__all__ = ["atomic_dir", "atomic_path", "check_writable", "claim_output", "current_umask", "exclusive_lock",
           "first_missing_ancestor", "make_dir_public", "read_json", "refuse_overlap", "remove_made_folders",
           "remove_stale_temporaries",
           "stale_temporaries", "temp_prefix", "text_of", "write_text"]

#: the longest file name (bytes) of the file systems inrseg writes to
NAME_MAX = 255
#: the longest suffix a temporary name keeps (``.safetensors``, ``.nii.gz``, ``.train-state``)
_MAX_KEPT_SUFFIX = 16
#: bytes after the prefix of a temporary name at most: the random part, ``.tmp`` / ``.old.tmp``
#: and the kept suffix
_TEMP_TAIL = 8 + len(".old.tmp") + _MAX_KEPT_SUFFIX
#: what follows :func:`temp_prefix` in a temporary name: tempfile's random part, then ``.tmp``
_TEMP_REST = re.compile(r"[a-z0-9_]+\.(old\.)?tmp.*", re.S)


def temp_prefix(name: str) -> str:
    """The prefix of the temporary names of a file or folder ``name``: ``.NAME.``, or, where a
    temporary name would pass :data:`NAME_MAX` bytes, ``.HEAD~HASH.`` with ``HEAD`` the start of
    ``name`` and ``HASH`` 12 hex digits of its SHA-1 (one prefix per name, so that
    :func:`stale_temporaries` finds what a killed writer left)."""
    prefix = f".{name}."
    budget = NAME_MAX - _TEMP_TAIL
    if len(os.fsencode(prefix)) <= budget:
        return prefix
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
    head = name
    while head and len(os.fsencode(f".{head}~{digest}.")) > budget:
        head = head[:-1]
    return f".{head}~{digest}."


def _kept_suffix(name: str) -> str:
    """The extension a temporary copy of ``name`` keeps (writers choose the format by it)."""
    suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    return suffix if len(os.fsencode(suffix)) <= _MAX_KEPT_SUFFIX else ""


def first_missing_ancestor(path: str | Path) -> Optional[Path]:
    """The topmost folder of ``path``'s parent chain that does not exist yet (``None``: the
    parent exists): what writing ``path`` creates."""
    made = Path(path).absolute().parent
    if made.exists():
        return None
    while not made.parent.exists() and made != made.parent:
        made = made.parent
    return made


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
    made = first_missing_ancestor(path)
    tmp_path: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=f".tmp{_kept_suffix(path.name)}",
                                   dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        # mkstemp creates 0600 (and some writers recreate the file): give it the umask's mode,
        # so colleagues can read results as with any other file
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        remove_made_folders(made)
        named = None if exc.filename is None else Path(os.fsdecode(exc.filename))
        if exc.errno is not None and (named is None or path.parent in (named, named.parent)):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # our temporary, or none named
        raise
    except Exception as exc:  # a writer's own error (safetensors, nibabel, ...): name the file too
        remove_made_folders(made)
        blame(exc, path)
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def remove_made_folders(made: Optional[Path]) -> None:
    """Remove the folder chain a failed command created (:func:`first_missing_ancestor`, taken
    before it wrote), where nothing else was put in it."""
    if made is None:
        return
    for d in sorted((p for p in [made, *made.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()


def text_of(s: str) -> str:
    """``s`` as the text it stands for: a name read from the file system under a locale that
    cannot decode it (``LC_ALL=C``) holds its UTF-8 bytes as surrogate escapes, which no UTF-8
    file can hold; they become the characters they encode (or U+FFFD)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return s.encode("utf-8", "replace").decode("utf-8")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` as UTF-8 (whatever the locale; names as :func:`text_of`),
    atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text_of(text), encoding="utf-8")
    return Path(path)


def read_json(path: str | Path) -> dict:
    """The JSON object stored in ``path``; :class:`~inrseg.core.errors.InputError` if the file
    is missing, is not valid JSON or holds something other than an object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a JSON file") from None
    except NotADirectoryError:
        raise InputError(path, "no such file (a folder on its path is a file)") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise InputError(path, "expected a JSON object")
    return obj


def check_writable(path: str | Path, what: str = "output") -> None:
    """Raise :class:`InputError` unless ``path``'s nearest existing ancestor directory is
    writable and no name in it is longer than :data:`NAME_MAX` bytes: called before a long job, so
    a bad ``--out`` is found before the work starts."""
    path = Path(path).absolute()
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InputError(path, f"cannot write the {what}: a name in the path is {len(os.fsencode(part))} "
                                   f"bytes long, longer than the {NAME_MAX} a file system allows")
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
    prefix = temp_prefix(path.name)
    return sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(prefix) and _TEMP_REST.fullmatch(p.name[len(prefix):]))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete :func:`stale_temporaries` of ``path`` (call it holding :func:`exclusive_lock`, so
    that no live writer's file is taken); returns what was removed, for the caller to report."""
    removed = stale_temporaries(path)
    for p in removed:
        _remove(p)
    return removed


@contextlib.contextmanager
def claim_output(path: str | Path, *also: Path) -> Iterator[None]:
    """For the block that writes ``path`` (a file or a folder): check that it can be written
    (:func:`check_writable`) and hold :func:`exclusive_lock` on it; remove what a killed writer
    of ``path`` (or of ``also``) left behind, naming each in a status line; if the block fails
    (any ``Exception``), remove the folders that were created for ``path``, where the block
    left them empty. Ctrl-C keeps them: a resumable state may live there."""
    path = Path(path)
    check_writable(path)
    made = first_missing_ancestor(path)
    try:
        with exclusive_lock(path):
            for stale in [t for p in (path, *also) for t in stale_temporaries(p)]:
                kind = "folder" if stale.is_dir() else "file"
                _remove(stale)
                status(f"removed {stale}: a temporary {kind} an interrupted run left behind")
            yield
    except Exception:
        remove_made_folders(made)
        raise


def _same(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file or folder (equal resolved paths, or one inode: bind mounts,
    hard links)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _inside(inner: Path, outer: Path) -> bool:
    """``inner`` lies inside ``outer`` (both resolved)."""
    return any(_same(p, outer) for p in inner.parents)


def refuse_overlap(outputs: Mapping[str, str | Path | None],
                   inputs: Mapping[str, str | Path | Sequence[str | Path] | None], contains: bool = True) -> None:
    """Refuse, before anything is written or deleted, an output that is one of the command's
    inputs or (``contains``) holds one, whatever ``--force`` says: writing it would replace the
    input. ``outputs``: option -> path; ``inputs``: option -> its path, or a list of paths (the
    files read through it, so that ``--output C/test/subject`` over an input ``C/test`` of
    subject folders is refused too); ``None``: not given. An output inside an
    input folder that is none of the files read there is allowed (``segment --input D --output
    D/pred``): nothing of the input is replaced, and inrseg's readers never look into it. Paths
    are compared after resolving symbolic links, and by inode where both exist (bind mounts,
    hard links). ``contains=False`` for a command that only adds a new folder under its output
    (``bench``).

    Raises:
        InputError: naming the output, the input's option and the input.
    """
    for out_opt, out in outputs.items():
        if out is None:
            continue
        o = Path(os.path.realpath(out))
        for in_opt, given in inputs.items():
            for inp in [given] if isinstance(given, (str, Path)) else (given or ()):
                i = Path(os.path.realpath(inp))
                if _same(o, i):
                    relation = f"is the input {in_opt}" + ("" if inp is given else f" ({inp})")
                elif contains and _inside(i, o):
                    relation = f"holds the input {in_opt} ({inp})"
                else:
                    continue
                raise InputError(out, f"{out_opt} {relation}: an output must lie outside the command's inputs, "
                                      f"whatever --force says (nothing was changed)")


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[Path]:
    """Hold ``.PATH.lock`` (an advisory ``flock``, released by the kernel even on SIGKILL) for the
    block; a second inrseg process writing ``path`` fails at once with :class:`InputError`."""
    path = Path(path)
    lock = path.with_name(f"{temp_prefix(path.name)}lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:  # name the output the user asked for, not our lock file
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
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
    made = first_missing_ancestor(path)
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
        make_dir_public(tmp)
        yield tmp
        old = None
        if path.is_dir():
            if any(path.iterdir()):
                if not force:
                    raise InputError(path, "was written by another process meanwhile; nothing was changed")
                old = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".old.tmp", dir=path.parent))
                os.replace(path, old / "x")
            else:
                path.rmdir()
        try:
            os.rename(tmp, path)
        except OSError:
            if old is not None:  # put the folder that was there back
                os.replace(old / "x", path)
                old.rmdir()
            raise InputError(path, "was written by another process meanwhile; nothing was changed") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:  # name the file under the folder the user asked for, not ours
        if tmp is not None:
            reblame(exc, tmp, path)
            shutil.rmtree(tmp, ignore_errors=True)
        remove_made_folders(made)
        raise
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
