"""The Typer application, its global options and what every command shares: option callbacks,
the device / torchrun context, output-folder checks."""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import typer

from inrseg import __version__
from inrseg.core.errors import InputError, env_switch
from inrseg.core.progress import set_quiet
from inrseg.engine import init_distributed, leave_distributed, resolve_device

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Medical image segmentation with implicit neural representations.")
data_app = typer.Typer(no_args_is_help=True, help="Make and check datasets.")
app.add_typer(data_app, name="data")

#: ``debug``: show tracebacks; ``command``: the command line, recorded as provenance
state: dict = {"debug": False, "command": None}

DEVICE_HELP = ("auto (CUDA when present), cpu, cuda, cuda:N or mps. Under torchrun 'cuda' means each rank's "
               "own GPU (LOCAL_RANK).")


#: seeds: what every random generator inrseg seeds accepts (numpy's legacy seeding, 32 bits)
SEED_MIN, SEED_MAX = 0, 2**32 - 1
#: CPU threads: more than any machine has
MAX_THREADS = 1024
#: the longest wall-time budget, in minutes (about two years; longer ones overflow the clock)
MAX_BUDGET_MINUTES = 1e6
#: the largest grid axis of an option (``--shape``, ``--plane-size``)
MAX_AXIS = 4096


def positive(value: Optional[float]) -> Optional[float]:
    """Option callback: a positive finite number (``None`` passes)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a positive finite number, not {value}")
    return value


def positive_at_most(limit: float) -> Callable[[Optional[float]], Optional[float]]:
    """Option callback factory: a finite number in ``(0, limit]`` (``None`` passes)."""
    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and not (math.isfinite(value) and 0 < value <= limit):
            raise typer.BadParameter(f"must be a positive finite number, at most {limit:g}, not {value}")
        return value
    return check


#: ``--budget-minutes`` / ``--minutes``
budget_minutes_option = positive_at_most(MAX_BUDGET_MINUTES)


def fraction(value: float) -> float:
    """Option callback: a fraction in [0, 1)."""
    if not (math.isfinite(value) and 0 <= value < 1):
        raise typer.BadParameter(f"must be a fraction in [0, 1), not {value}")
    return value


def parse_shape(text: Optional[str], option: str = "--shape") -> Optional[tuple[int, ...]]:
    """``"160,192"`` or ``"160x192"`` -> ``(160, 192)``; every axis from 4 to :data:`MAX_AXIS`
    voxels (errors name ``option``)."""
    if not text:
        return None
    hint = f"'{option}'"
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape like 160,192", param_hint=hint) from None
    if any(v < 4 for v in shape):
        raise typer.BadParameter("every axis needs at least 4 voxels", param_hint=hint)
    if any(v > MAX_AXIS for v in shape):
        raise typer.BadParameter(f"{text!r}: an axis may have at most {MAX_AXIS} voxels", param_hint=hint)
    return shape


def check_replaceable(out: Path, force: bool, written_here: Callable[[Path], bool], command: str) -> None:
    """``--out`` of a command that replaces its output folder whole: a non-empty folder needs
    ``--force``, and even then only a folder that ``command`` itself wrote (``written_here``) is
    replaced, never a folder of the user's (a dataset, a home folder)."""
    check_output_dir(out, force)
    if out.is_dir() and any(out.iterdir()) and not written_here(out):
        raise InputError(out, f"holds files that {command} did not write; --force replaces only an earlier "
                              f"output of {command} (choose another --out; nothing was changed)")


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output folder that is a file (whatever ``--force`` says), or a non-empty one
    without ``--force``."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory (the output is a folder; nothing was changed)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(out, "exists and is not empty (use --force to replace it)")


def command_line() -> str:
    """The command as the user typed it (provenance of bench and evaluate reports)."""
    return state.get("command") or shlex.join(["inrseg", *sys.argv[1:]])


@contextlib.contextmanager
def run_on(device: str) -> Iterator[torch.device]:
    """Resolve ``--device`` and, under torchrun, join the process group for the command
    (NCCL on GPUs, gloo on CPUs); leaves it at the end. Yields the :class:`torch.device`."""
    dev = resolve_device(device)
    joined = init_distributed(dev)
    clean = False
    try:
        yield dev
        clean = True
    finally:
        if joined:
            leave_distributed(clean)


def _version(value: bool) -> None:
    if value:
        print(f"inrseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines."),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          threads: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS,
                                                help="CPU threads for PyTorch (default: all)."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    set_quiet(quiet or env_switch("INRSEG_QUIET"))
    state["debug"] = debug
    if threads:
        torch.set_num_threads(threads)
