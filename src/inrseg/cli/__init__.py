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

Errors about the user's files are one line (``error: <file>: <problem>``), exit code 2, no
traceback unless ``--debug``. ``--quiet`` silences progress bars and status lines.
"""

from __future__ import annotations

import errno
import shlex
import sys
from typing import Optional

import typer

from inrseg.cli import bench_cmds, data_cmds, segment, train
from inrseg.cli.app import app, state
from inrseg.core.errors import InrsegError
from inrseg.core.progress import Heartbeat, last_status

__all__ = ["app", "main"]

#: the modules whose commands ``app`` holds (importing them registers the commands)
COMMAND_MODULES = (bench_cmds, data_cmds, segment, train)

#: click's base exception class, as typer vendors it (found through the MRO, not a private import)
_ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _os_error_line(exc: OSError) -> Optional[str]:
    """One line for an operating-system error the user can act on (disk full, no permission,
    read-only file system, quota), naming the file; ``None`` for any other."""
    problems = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
                errno.EDQUOT: "disk quota exceeded"}
    if exc.errno not in problems:
        return None
    where = exc.filename if exc.filename is not None else "output"
    return f"{where}: {problems[exc.errno]}; nothing was left half-written"


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 failure, 2 bad input or usage,
    130 interrupted). Errors are one line on stderr; ``--debug`` shows the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    state["debug"] = "--debug" in args
    state["command"] = shlex.join(["inrseg", *args])  # recorded as provenance by bench / evaluate --html
    try:
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
    except OSError as exc:
        line = _os_error_line(exc)
        if line is None or state["debug"]:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
