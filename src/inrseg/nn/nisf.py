"""NISF's network: a residual coordinate MLP conditioned on a per-subject latent code, with a
segmentation and a reconstruction head (Stolt-Anso et al., MICCAI 2023).

``x_0 = G_0([c, h]) + h``, ``x_k = G_k(x_{k-1}) + x_{k-1}`` (k = 1..depth-1), with real Gabor
(WIRE) layers ``G`` (:mod:`inrseg.nn.gabor`); heads ``softmax(Linear(x, C))`` and
``sigmoid(Linear(x, C_in))``. SIREN (``activation="sine"``) and ReLU + Gaussian Fourier
features (``"relu"``) are selectable for ablations. The method around it (prior training,
latent fitting, outputs) is :mod:`inrseg.methods.nisf`.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from inrseg.nn.fourier import GaussianFourierFeatures
from inrseg.nn.gabor import make_layer, split_linear

__all__ = ["NISFNet"]


class NISFNet(nn.Module):
    """Residual coordinate MLP with a segmentation and a reconstruction head.

    Args:
        coord_dim: coordinate dimension ``d`` (2, 3 or 4).
        num_classes: ``C``, background included.
        out_channels: reconstructed intensity channels ``C_in``.
        activation: ``"gabor"`` (WIRE), ``"sine"`` (SIREN) or ``"relu"`` (+ Fourier features).
        width: hidden units ``W``.
        depth: activation layers: 1 input + ``depth - 1`` residual.
        latent_dim: latent size ``L`` (``None``: ``W``; otherwise a bias-free projection
            ``L -> W`` feeds the first residual).
        w0: Gabor / sine frequency (``None``: 10 for Gabor, 30 for sine).
        s0: Gabor envelope width multiplier.
        fourier_frequencies, fourier_sigma: ``"relu"`` only: fixed Gaussian Fourier features.
        seed: seed of the Fourier frequencies (the layers use the global RNG, like ``nn.Linear``).

    ``forward(coords (B, N, d), latents (B, L)) -> (seg_logits (B, N, C), rec_logits (B, N, C_in))``;
    probabilities are ``softmax(seg_logits, -1)`` and ``sigmoid(rec_logits)``.
    """

    def __init__(self, coord_dim: int, num_classes: int, out_channels: int, *,
                 activation: str = "gabor", width: int = 128, depth: int = 8,
                 latent_dim: int | None = None, w0: float | None = None, s0: float = 10.0,
                 fourier_frequencies: int = 128, fourier_sigma: float = 10.0, seed: int = 0) -> None:
        super().__init__()
        W = width
        L = width if latent_dim is None else int(latent_dim)
        self.coord_dim, self.latent_dim = coord_dim, L
        if activation == "relu":
            self.encoding: nn.Module | None = GaussianFourierFeatures(
                coord_dim, fourier_frequencies, fourier_sigma, trainable=False, seed=seed)
            in_c = self.encoding.out_dim
        else:
            self.encoding = None
            in_c = coord_dim
        kw = dict(w0=w0, s0=s0)
        self.layers = nn.ModuleList(
            [make_layer(activation, in_c + L, W, is_first=True, **kw)]
            + [make_layer(activation, W, W, **kw) for _ in range(depth - 1)])
        # the latent joins the first residual; a projection only when its size differs
        self.latent_proj = nn.Linear(L, W, bias=False) if L != W else None
        self.seg_head = nn.Linear(W, num_classes)
        self.rec_head = nn.Linear(W, out_channels)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The weights regularised by ``weight_reg`` (layers and latent projection, no heads)."""
        yield from self.layers.parameters()
        if self.latent_proj is not None:
            yield from self.latent_proj.parameters()

    def features(self, coords: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Last hidden features ``(B, N, W)`` of ``coords (B, N, d)`` under ``latents (B, L)``."""
        x = self.encoding(coords) if self.encoding is not None else coords
        first = self.layers[0]
        pre = [split_linear(lin, x, latents) for lin in first.linears]
        skip = latents if self.latent_proj is None else self.latent_proj(latents)
        h = first.activate(*pre) + skip[:, None, :]
        for layer in self.layers[1:]:
            h = layer(h) + h
        return h

    def forward(self, coords: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(coords, latents)
        return self.seg_head(h), self.rec_head(h)

    def reconstruct(self, coords: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction logits ``(B, N, C_in)`` only (inference skips the segmentation head)."""
        return self.rec_head(self.features(coords, latents))
