"""How much memory this process may still allocate, checked before a large allocation."""

from __future__ import annotations

import os
from pathlib import Path

from inrseg.core.errors import InputError, env_number

__all__ = ["available_memory", "check_memory", "memory_cap"]


def memory_cap() -> float | None:
    """Bytes the environment variable ``INRSEG_MAX_MEMORY_GB`` allows (``None``: unset).

    Raises:
        InputError: a value that is not a number of GiB in [0.001, 10^6], naming the variable.
    """
    gib = env_number("INRSEG_MAX_MEMORY_GB", None, 1e-3, 1e6, "a number of GiB")
    return None if gib is None else gib * 2**30


def available_memory() -> int:
    """Bytes of memory this process may still allocate: ``MemAvailable`` of ``/proc/meminfo``
    (Linux), else the free physical pages; environment ``INRSEG_MAX_MEMORY_GB`` caps it."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 2**62
    cap = memory_cap()
    return avail if cap is None else min(avail, int(cap))


def check_memory(path: Path | None, nbytes: float, what: str) -> None:
    """Raise :class:`~inrseg.core.errors.InputError` if allocating ``nbytes`` for ``what`` would
    exceed :func:`available_memory` (checked before anything is allocated)."""
    avail = available_memory()
    if nbytes > avail:
        raise InputError(path, f"{what} needs {nbytes / 2**30:.1f} GiB of memory, only "
                               f"{avail / 2**30:.1f} GiB is available")
