"""Gaussian random Fourier features of coordinates (Tancik et al., 2020).

``gamma(x) = [sin(2 pi x B), cos(2 pi x B)]`` with ``B`` a ``(d, L)`` matrix of Gaussian
frequencies, ``B_ij ~ N(0, sigma^2)``. MORSE encodes the continuous coordinate of each refined
point this way (``L = 128``, so 256 features); the paper makes ``B`` trainable, the official code
keeps it fixed (a buffer). Both are offered.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianFourierFeatures(nn.Module):
    """``(..., d)`` coordinates -> ``(..., 2 L)`` features ``[sin(2 pi x B), cos(2 pi x B)]``.

    Args:
        in_dim: coordinate dimension ``d`` (2 or 3).
        num_frequencies: ``L``, the number of frequencies (output has ``2 L`` channels).
        sigma: standard deviation of the frequencies, in cycles per unit of coordinate
            (coordinates span ``[-1, 1]``, i.e. 2 units per field of view).
        trainable: learn ``B`` (paper) or keep it fixed as a buffer (official code).
        seed: seed of the generator drawing ``B`` (reproducible without touching global RNG).

    ``B`` is drawn on the CPU (the same values whatever the device) and then placed, like the
    parameters of torch's own layers, on the default device (that of an enclosing
    ``with torch.device(...)``).
    """

    def __init__(self, in_dim: int, num_frequencies: int = 128, sigma: float = 1.0,
                 trainable: bool = True, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        b = torch.randn(in_dim, num_frequencies, generator=g, device="cpu") * sigma
        b = b.to(torch.get_default_device())
        if trainable:
            self.B = nn.Parameter(b)
        else:
            self.register_buffer("B", b)
        self.in_dim, self.num_frequencies = in_dim, num_frequencies

    @property
    def out_dim(self) -> int:
        return 2 * self.num_frequencies

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., 2 L)``."""
        proj = 2 * math.pi * coords.to(self.B.dtype) @ self.B
        return torch.cat([proj.sin(), proj.cos()], dim=-1)
