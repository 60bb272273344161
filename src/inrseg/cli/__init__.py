"""The ``inrseg`` command line: thin commands over the layers below.

    inrseg data phantom --kind brain2d --n 6 --out X      # embedded synthetic datasets
    inrseg data check DIR                                 # validate a dataset, print a summary
    inrseg methods                                        # the registry: methods, presets, abilities
    inrseg config METHOD [--preset P]                     # every config field, default and meaning
    inrseg train METHOD --data DIR --out model.safetensors [--preset P] [--set k=v] [--config F]
    inrseg segment --model model.safetensors --input DIR --output PRED
    inrseg evaluate --pred PRED --gt DIR/labelsTs --out REPORT   # or --gt a folder of UK Biobank subjects
    inrseg bench --data DIR --methods unet,metaseg --budget-minutes 5
    inrseg info model.safetensors
    inrseg demo

Errors about the user's files and options are one line (``error: <file>: <problem>``), exit code
2; a failing machine (a full disk, a file-size limit, no memory, any ``OSError``, a writer's own
error) is one line naming the file, exit code 1 (2 where the user's name is at fault: too long, a
folder where a file is expected); no traceback unless ``--debug``. ``--quiet`` silences progress
bars and status lines.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import sys
from typing import Optional

import typer

from inrseg.cli import bench_cmds, data_cmds, ensemble_cmd, segment, train
from inrseg.cli.app import app, state
from inrseg.core.errors import InrsegError, blamed
from inrseg.core.memory import memory_cap
from inrseg.core.progress import Heartbeat, check_environment, last_status

__all__ = ["app", "main"]

#: the modules whose commands ``app`` holds (importing them registers the commands)
COMMAND_MODULES = (bench_cmds, data_cmds, ensemble_cmd, segment, train)

#: click's base exception class, as typer vendors it (found through the MRO, not a private import)
_ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


#: errno -> (problem, exit code): 2 where the user's name or option is at fault, 1 for the
#: machine (any errno not listed: the system's own words, exit 1)
_ERRNO_PROBLEMS = {
    errno.ENOSPC: ("no space left on the device", 1),
    errno.EDQUOT: ("disk quota exceeded", 1),
    errno.EFBIG: ("file too large for this system's limits (a file-size limit, see ulimit -f)", 1),
    errno.EACCES: ("permission denied", 1),
    errno.EPERM: ("operation not permitted", 1),
    errno.EROFS: ("read-only file system", 1),
    errno.EIO: ("input/output error (a failing disk or network file system)", 1),
    errno.EMFILE: ("too many open files (see ulimit -n)", 1),
    errno.ENAMETOOLONG: ("file name too long (a name may have at most 255 bytes)", 2),
    errno.EISDIR: ("is a directory, expected a file", 2),
    errno.ENOTDIR: ("a part of the path is not a directory", 2),
    errno.ENOENT: ("no such file or directory", 2),
    errno.ELOOP: ("too many levels of symbolic links", 2),
    errno.EEXIST: ("already exists", 2),
    errno.ENOTEMPTY: ("folder not empty", 2),
    errno.EXDEV: ("on another file system than its folder's other files", 1),
}

#: the top-level packages whose own exception types are writers' errors (a full disk inside
#: safetensors' Rust code, nibabel, matplotlib / Pillow, the CSV writer)
_WRITER_PACKAGES = ("safetensors", "nibabel", "matplotlib", "PIL", "csv", "_csv")

_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def _failure_line(exc: BaseException) -> Optional[tuple[str, int]]:
    """``(line, exit code)`` for a failure of the machine or of a writer: any :class:`OSError`
    (every errno), a writer's own error (:data:`_WRITER_PACKAGES`) and any error raised while
    :func:`inrseg.core.files.atomic_path` was writing a file; the line names the file. ``None``
    for anything else (a bug: it keeps its traceback)."""
    where = blamed(exc)
    if isinstance(exc, OSError):
        code = exc.errno
        where = where or (os.fsdecode(exc.filename) if exc.filename is not None else None)
        if exc.filename2 is not None:
            where = f"{where} -> {os.fsdecode(exc.filename2)}"
    elif type(exc).__module__.split(".")[0] in _WRITER_PACKAGES or where is not None:
        found = _OS_ERROR_IN_TEXT.search(str(exc))  # safetensors: "I/O error: ... (os error 28)"
        code = int(found.group(1)) if found else None
    else:
        return None
    if code in _ERRNO_PROBLEMS:
        problem, exit_code = _ERRNO_PROBLEMS[code]
    elif code is not None:
        problem, exit_code = os.strerror(code).lower(), 1
    else:
        text = str(exc).strip().splitlines()
        problem, exit_code = f"{type(exc).__name__}: {text[0] if text else 'failed'}", 1
    return f"{where or 'output'}: {problem}", exit_code


def _utf8_safe_streams() -> None:
    """Under a locale that cannot encode a case id or label name (``LC_ALL=C``), print it
    escaped rather than fail."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 failure, 2 bad input or usage,
    130 interrupted). Errors are one line on stderr; ``--debug`` shows the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    state["debug"] = "--debug" in args
    state["command"] = shlex.join(["inrseg", *args])  # recorded as provenance by bench / evaluate --html
    _utf8_safe_streams()
    try:
        memory_cap()  # a bad INRSEG_* variable is named before any file is read
        check_environment()
        with Heartbeat():
            code = app(args=args, prog_name="inrseg", standalone_mode=False)
        if code == 130 and not last_status().startswith("interrupted"):  # typer turns Ctrl-C into 130
            print("interrupted", file=sys.stderr)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except _ClickError as exc:  # usage errors: bad option values, unknown commands
        if type(exc).__name__ == "NoArgsIsHelpError":
            ctx = getattr(exc, "ctx", None)
            print(ctx.get_help() if ctx is not None else exc.format_message())
            return 2
        if state["debug"]:
            raise
        print(f"error: {exc.format_message()} (see --help)", file=sys.stderr)
        return exc.exit_code if isinstance(exc.exit_code, int) and exc.exit_code else 2
    except InrsegError as exc:
        if state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if state["debug"]:
            raise
        print("error: out of memory (try a smaller --scale, patch or batch)", file=sys.stderr)
        return 1
    except Exception as exc:  # the machine or a writer failed: one line naming the file
        failure = _failure_line(exc)
        if failure is None or state["debug"]:
            raise
        print(f"error: {failure[0]}", file=sys.stderr)
        return failure[1]


if __name__ == "__main__":
    sys.exit(main())
