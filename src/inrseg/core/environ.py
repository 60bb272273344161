"""Environment variables set for the length of a block (nnU-Net's folders, a scheduler's threads)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

__all__ = ["environment"]


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` while the block runs; afterwards every one of them is as
    it was (restored, or removed if it was not set), whatever happens in the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
