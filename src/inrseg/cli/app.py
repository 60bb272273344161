"""The Typer application, its global options and what every command shares: option callbacks,
the device / torchrun context, output-folder checks."""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
import typer

from inrseg import __version__
from inrseg.core.errors import InputError
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


def positive(value: Optional[float]) -> Optional[float]:
    """Option callback: a positive finite number (``None`` passes)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a positive finite number, not {value}")
    return value


def fraction(value: float) -> float:
    """Option callback: a fraction in [0, 1)."""
    if not (math.isfinite(value) and 0 <= value < 1):
        raise typer.BadParameter(f"must be a fraction in [0, 1), not {value}")
    return value


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"160,192"`` or ``"160x192"`` -> ``(160, 192)``; every axis at least 4 voxels."""
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape like 160,192") from None
    if any(v < 4 for v in shape):
        raise typer.BadParameter("every axis needs at least 4 voxels")
    return shape


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder without ``--force``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
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
          threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for PyTorch (default: all)."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    set_quiet(quiet)
    state["debug"] = debug
    if threads:
        torch.set_num_threads(threads)
