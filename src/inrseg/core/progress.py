"""Progress bars for every loop that can take more than a few seconds.

One switch silences them all: :func:`set_quiet` (the CLI's ``--quiet``) or the environment
variable ``INRSEG_QUIET=1``. Bars are written to stderr when it is a terminal (or
``INRSEG_PROGRESS`` is set). When stderr is a log file or a pipe, bars still count (into
``/dev/null``) and the CLI's :class:`Heartbeat` prints one plain status line at least every
30 s (``INRSEG_STATUS_SECONDS``): the newest bar's count, rate and remaining time, and the
command's time budget.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

from inrseg.core.errors import env_number, env_switch

T = TypeVar("T")
#: set by :func:`set_quiet`; ``None``: as ``INRSEG_QUIET`` says
_quiet: bool | None = None


def set_quiet(quiet: bool) -> None:
    """Silence (``True``) or enable (``False``) all progress bars and status lines."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """Whether progress output is silenced (:func:`set_quiet`, else ``INRSEG_QUIET``)."""
    return env_switch("INRSEG_QUIET") if _quiet is None else _quiet


def check_environment() -> None:
    """Read ``INRSEG_QUIET``, ``INRSEG_PROGRESS`` and ``INRSEG_STATUS_SECONDS`` once, so that a
    bad value is named before a command starts its work.

    Raises:
        InputError: a value out of range, naming the variable.
    """
    env_switch("INRSEG_QUIET")
    env_switch("INRSEG_PROGRESS")
    status_seconds()


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _disabled() -> bool:
    if is_quiet() or _rank() != 0:
        return True
    if env_switch("INRSEG_PROGRESS"):
        return False
    return not sys.stderr.isatty()


_live: dict = {"bar": None, "message": "", "budget": None}
_devnull = None


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
             leave: bool = False, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual bar with ``total``), honouring ``--quiet``.
    Without a terminal the bar counts silently and the :class:`Heartbeat` reports it."""
    global _devnull
    if _disabled() and not is_quiet() and _rank() == 0:
        if _devnull is None:
            _devnull = open(os.devnull, "w", encoding="utf-8")
        bar = tqdm(iterable, desc=desc, total=total, leave=False, file=_devnull, mininterval=1e9, **kwargs)
        _live["bar"] = weakref.ref(bar)
        return bar
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=_disabled(),
                dynamic_ncols=True, file=sys.stderr, **kwargs)


def status(message: str) -> None:
    """Print a one-line status message to stderr unless quiet (rank 0 only under torchrun)."""
    _live["message"] = message
    if not is_quiet() and _rank() == 0:
        print(message, file=sys.stderr, flush=True)


def last_status() -> str:
    """The last message :func:`status` was given (``""`` if none since the command started)."""
    return _live["message"]


def set_budget(budget) -> None:
    """Report this :class:`~inrseg.engine.Budget` in the heartbeat lines (``None``: none)."""
    _live["budget"] = budget


def heartbeat_line() -> str:
    """What the command is doing now, in one line: the newest live progress bar (count, rate,
    time left) or the last status message, and the time budget used."""
    ref = _live["bar"]
    bar = ref() if ref is not None else None
    parts = []
    if bar is not None and not getattr(bar, "disable", True) and bar.n < (bar.total or float("inf")):
        d = dict(bar.format_dict)
        d["bar_format"] = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]" \
            if d.get("total") else "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
        parts.append(tqdm.format_meter(**d))
    elif _live["message"]:
        parts.append(f"still working on: {_live['message']}")
    budget = _live["budget"]
    if budget is not None and getattr(budget, "limited", False):
        parts.append(f"budget {budget.elapsed_s() / 60:.1f} of {budget.minutes:.1f} min used")
    return "; ".join(parts)


def status_seconds() -> float:
    """Seconds between the heartbeat's status lines: ``INRSEG_STATUS_SECONDS`` (default 30, 0
    for none), checked (:func:`~inrseg.core.errors.env_number`)."""
    return env_number("INRSEG_STATUS_SECONDS", 30.0, 0.0, 86400.0, "a number of seconds")


class Heartbeat:
    """While active, print :func:`heartbeat_line` every ``interval`` seconds when stderr is not
    a terminal (logs of batch jobs), so a long phase never goes silent. Rank 0 only."""

    def __init__(self, interval: float | None = None) -> None:
        """``interval``: seconds between lines (default ``INRSEG_STATUS_SECONDS``, 30; 0 = none).

        Raises:
            InputError: ``INRSEG_STATUS_SECONDS`` is not a number of seconds in [0, 86400].
        """
        self.interval = status_seconds() if interval is None else interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.interval):
            line = heartbeat_line()
            if line and not is_quiet():
                print(f"[{(time.perf_counter() - t0) / 60:.1f} min] {line}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Heartbeat":
        if _rank() == 0 and not is_quiet() and not sys.stderr.isatty() and self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="inrseg-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        _live.update(bar=None, budget=None)
