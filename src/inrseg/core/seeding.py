"""Seeded generators: every random draw of a training step is a pure function of its seed."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["step_rng", "torch_generator"]


def step_rng(seed: int, step: int, *index: int) -> np.random.Generator:
    """The NumPy generator of the random draws of optimiser step ``step`` (item ``index``).

    A pure function of its arguments: resuming at step ``s`` draws what an uninterrupted run
    drew, and item ``j`` of a global batch is the same whichever rank draws it.
    """
    return np.random.default_rng([int(seed), int(step), *(int(i) for i in index)])


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded :class:`torch.Generator` on an explicit device."""
    return torch.Generator(device=device).manual_seed(int(seed) % (2 ** 63))
