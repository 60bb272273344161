"""Progress bars for every loop that can take more than a few seconds.

One switch silences them all: :func:`set_quiet` (the CLI's ``--quiet``) or the environment
variable ``INRSEG_QUIET=1``. Bars are written to stderr and are disabled automatically when
stderr is not a terminal and ``INRSEG_PROGRESS`` is not set, so logs stay clean.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_quiet: bool = os.environ.get("INRSEG_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Silence (``True``) or enable (``False``) all progress bars and status lines."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """Whether progress output is silenced."""
    return _quiet


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _disabled() -> bool:
    if _quiet or _rank() != 0:
        return True
    if os.environ.get("INRSEG_PROGRESS", "") not in ("", "0"):
        return False
    return not sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
             leave: bool = False, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual bar with ``total``), honouring ``--quiet``."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=_disabled(),
                dynamic_ncols=True, file=sys.stderr, **kwargs)


def status(message: str) -> None:
    """Print a one-line status message to stderr unless quiet (rank 0 only under torchrun)."""
    if not _quiet and _rank() == 0:
        print(message, file=sys.stderr, flush=True)
