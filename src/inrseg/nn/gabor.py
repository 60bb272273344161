"""Coordinate-network layers: real Gabor wavelet (WIRE), sine (SIREN) and ReLU + Fourier features.

Every layer here is "linear map(s) followed by a point-wise activation". They share one small
interface so that a network can compute the linear part itself when it wants to (NISF splits the
first layer's input ``[coordinate, latent]`` into a per-point and a per-subject product, see
:func:`split_linear`):

* ``layer.linears``: the :class:`torch.nn.Linear` maps whose outputs feed the activation;
* ``layer.activate(*pre)``: the activation of those pre-activations;
* ``layer(x) == layer.activate(*(lin(x) for lin in layer.linears))``.

Shapes: inputs ``(..., in_features)``, outputs ``(..., out_features)``; any leading axes
(points ``N``, subjects ``B``) are carried through. Coordinates are unit-less (the project's
convention maps a field of view onto ``[-1, 1]``, :mod:`inrseg.data.grids`).

Layers
------
:class:`GaborLayer` (WIRE, Saragadam et al. 2023, real form)
    ``y = cos(w0 * (W_f x + b_f)) * exp(-(s0 * (W_s x + b_s))^2)``, two independent linear maps
    for the frequency and the Gaussian envelope; ``w0 = s0 = 10`` by default (NISF's values).
    Weights use PyTorch's default ``nn.Linear`` initialisation, as WIRE does. The envelope's
    exponent is clamped at 80 (``exp(-80) ~ 2e-35``): identical values, but float32 ``exp`` of
    large negative arguments is ~10x slower on CPUs, which made the layer 4x slower overall.
:class:`SineLayer` (SIREN, Sitzmann et al. 2020)
    ``y = sin(w0 (W x + b))`` with the SIREN initialisation: first layer ``U(-1/in, 1/in)``,
    others ``U(-sqrt(6/in)/w0, sqrt(6/in)/w0)``; ``w0 = 30``.
:class:`ReluLayer`
    ``y = relu(W x + b)``, Kaiming-uniform (PyTorch default) initialisation; used after
    :class:`inrseg.nn.fourier.GaussianFourierFeatures` (Tancik et al. 2020, fixed) for the ReLU + positional-encoding ablation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GaborLayer", "gabor_activation", "SineLayer", "ReluLayer", "make_layer",
           "split_linear", "ACTIVATIONS"]

#: the Gaussian envelope's exponent is clamped at this value (see GaborLayer.activate).
_ENVELOPE_CLAMP = 80.0

#: activation names accepted by :func:`make_layer`.
ACTIVATIONS = ("gabor", "sine", "relu")


class _GaborFunction(torch.autograd.Function):
    """Fused ``cos(w0 a) * exp(-(s0 b)^2)`` with a hand-written backward (first order only).

    Autograd's version runs ~20 element-wise passes per layer; this one ~10 and keeps two
    tensors instead of six, which matters on CPU where the activation, not the matrix product,
    dominates at width 128 (``shared/CPU-NOTES.md``).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, w0: float, s0: float) -> torch.Tensor:
        # exp of a very negative float32 takes a slow (underflow) path on CPUs, ~10x slower than
        # the normal range; exp(-80) ~ 2e-35 is already 0 for all purposes, so clamp there.
        env = (b * s0).square_().clamp_(max=_ENVELOPE_CLAMP).neg_().exp_()
        y = torch.cos(a * w0).mul_(env)
        ctx.save_for_backward(a, b, env, y)
        ctx.w0, ctx.s0 = w0, s0
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        a, b, env, y = ctx.saved_tensors
        w0, s0 = ctx.w0, ctx.s0
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = torch.sin(a * w0).mul_(env).mul_(g).mul_(-w0)       # d/da = -w0 sin(w0 a) env
        if ctx.needs_input_grad[1]:
            gb = (b * (-2.0 * s0 * s0)).mul_(y).mul_(g)              # d/db = -2 s0^2 b y
        return ga, gb, None, None


def gabor_activation(a: torch.Tensor, b: torch.Tensor, w0: float = 10.0,
                     s0: float = 10.0) -> torch.Tensor:
    """Real Gabor wavelet ``cos(w0 a) * exp(-(s0 b)^2)`` of pre-activations ``a``, ``b`` (same
    shape). Fused on the autograd path; the envelope exponent is clamped at 80 (values below
    ``exp(-80)`` are zero to float32 precision anyway). Not twice differentiable when
    gradients are required (first order is all NISF needs)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _GaborFunction.apply(a, b, float(w0), float(s0))
    env = (b * s0).square_().clamp_(max=_ENVELOPE_CLAMP).neg_().exp_()
    return torch.cos(a * w0).mul_(env)


class GaborLayer(nn.Module):
    """Real Gabor wavelet (WIRE) layer ``(..., in) -> (..., out)``.

    ``y = cos(w0 * (W_f x + b_f)) * exp(-(s0 * (W_s x + b_s))^2)``.

    Args:
        in_features: input width.
        out_features: output width.
        w0: frequency multiplier of the cosine (rad per unit of pre-activation), default 10.
        s0: width multiplier of the Gaussian envelope, default 10 (larger = narrower wavelet).
    """

    def __init__(self, in_features: int, out_features: int, w0: float = 10.0,
                 s0: float = 10.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w0, self.s0 = float(w0), float(s0)
        self.freq = nn.Linear(in_features, out_features)
        self.scale = nn.Linear(in_features, out_features)

    @property
    def linears(self) -> tuple[nn.Linear, nn.Linear]:
        """(frequency map, envelope map)."""
        return self.freq, self.scale

    def activate(self, z_freq: torch.Tensor, z_scale: torch.Tensor) -> torch.Tensor:
        """Gabor activation of the two pre-activations ``(..., out)`` each."""
        return gabor_activation(z_freq, z_scale, self.w0, self.s0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.freq(x), self.scale(x))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w0={self.w0}, s0={self.s0}"


class SineLayer(nn.Module):
    """SIREN layer ``(..., in) -> (..., out)``: ``y = sin(w0 (W x + b))``.

    Args:
        in_features, out_features: widths.
        w0: frequency multiplier, default 30.
        is_first: use the first-layer initialisation ``U(-1/in, 1/in)`` (coordinates as input).
    """

    def __init__(self, in_features: int, out_features: int, w0: float = 30.0,
                 is_first: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w0, self.is_first = float(w0), is_first
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / in_features if is_first else math.sqrt(6.0 / in_features) / self.w0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    @property
    def linears(self) -> tuple[nn.Linear]:
        return (self.linear,)

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.linear(x))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w0={self.w0}, is_first={self.is_first}"


class ReluLayer(nn.Module):
    """``(..., in) -> (..., out)``: ``y = relu(W x + b)`` (PyTorch default initialisation)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear = nn.Linear(in_features, out_features)

    @property
    def linears(self) -> tuple[nn.Linear]:
        return (self.linear,)

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.linear(x))


def make_layer(activation: str, in_features: int, out_features: int, *, w0: float | None = None,
               s0: float = 10.0, is_first: bool = False) -> nn.Module:
    """A layer by activation name (``"gabor"``, ``"sine"``, ``"relu"``).

    ``w0`` defaults to 10 for Gabor and 30 for sine; ``s0`` is used by Gabor only; ``is_first``
    selects SIREN's first-layer initialisation.
    """
    if activation == "gabor":
        return GaborLayer(in_features, out_features, w0=10.0 if w0 is None else w0, s0=s0)
    if activation == "sine":
        return SineLayer(in_features, out_features, w0=30.0 if w0 is None else w0,
                         is_first=is_first)
    if activation == "relu":
        return ReluLayer(in_features, out_features)
    raise ValueError(f"unknown activation {activation!r} ({', '.join(ACTIVATIONS)})")


def split_linear(linear: nn.Linear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``linear(cat([x, h.expand], -1))`` without materialising the concatenation.

    Args:
        linear: a map of ``d + L`` inputs (the first ``d`` read ``x``, the last ``L`` read ``h``).
        x: per-point inputs ``(B, N, d)``.
        h: per-subject inputs ``(B, L)``, shared by the ``N`` points of subject ``b``.

    Returns:
        ``(B, N, out)``. The latent product is computed once per subject instead of per point.
    """
    d = x.shape[-1]
    w = linear.weight
    return F.linear(x, w[:, :d], linear.bias) + F.linear(h, w[:, d:])[:, None, :]
