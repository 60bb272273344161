"""SIREN coordinate network with a segmentation head, as a purely functional forward.

The network of MetaSeg:

* ``f_theta``: ``L`` linear layers; the first ``L - 1`` are followed by ``sin(w0 * .)``
  (w0 = 30), the last is linear to the ``out_features`` intensities. SIREN init: first layer
  weights ``U(-1/in, 1/in)``, the others ``U(-sqrt(6/in)/w0, +sqrt(6/in)/w0)``; biases
  ``U(-1/sqrt(in), 1/sqrt(in))`` (PyTorch's ``nn.Linear`` default, as in the SIREN code).
* ``g_phi``: ``Linear(h, h) -> LeakyReLU(0.01) -> Linear(h, C)`` on the output of the last
  sine layer (the "penultimate features" ``f^{L-1}(x)``, shape ``(..., N, h)``).

Parameters live in a flat ``dict[str, Tensor]`` with the names of :class:`SirenSeg`'s
``state_dict`` (``"f.0.weight"``, ..., ``"g.0.weight"``, ``"g.2.bias"``), so the same dict
feeds :func:`siren_forward` directly, ``torch.func.functional_call(SirenSeg, params, ...)``,
``torch.autograd.grad(..., create_graph=True)`` (second-order MAML) and safetensors.

Stacked parameters: any ``f.*`` tensor may carry a leading batch axis ``B`` (weights
``(B, out, in)``, biases ``(B, out)``) with coordinates ``(B, N, d)``; each image then has its
own INR and the products run as one batched matmul (``torch.baddbmm``). The head is always
shared (unbatched); it acts on the last axis and broadcasts over ``(B, N)``.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

Params = Mapping[str, torch.Tensor]


def num_f_layers(params: Params) -> int:
    """Number of linear layers ``L`` of ``f`` in a parameter dict."""
    n = 0
    while f"f.{n}.weight" in params:
        n += 1
    return n


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ w.T + b``; ``w`` ``(out, in)`` with ``x`` ``(..., in)``, or stacked ``w``
    ``(B, out, in)``, ``b`` ``(B, out)`` with ``x`` ``(B, N, in)``."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def siren_features(params: Params, coords: torch.Tensor, w0: float = 30.0) -> torch.Tensor:
    """Output of the last sine layer.

    Args:
        params: ``f.{i}.weight`` / ``f.{i}.bias`` for ``i < L`` (plus possibly head entries).
        coords: ``(N, d)`` coordinates in [-1, 1], or ``(B, N, d)`` with stacked ``f`` params.

    Returns:
        features ``(N, h)`` or ``(B, N, h)``.
    """
    n = num_f_layers(params)
    x = coords
    for i in range(n - 1):
        x = torch.sin(w0 * _linear(x, params[f"f.{i}.weight"], params[f"f.{i}.bias"]))
    return x


def siren_forward(params: Params, coords: torch.Tensor, w0: float = 30.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensities ``(..., N, out)`` and penultimate features ``(..., N, h)`` of ``f``."""
    n = num_f_layers(params)
    feats = siren_features(params, coords, w0)
    out = _linear(feats, params[f"f.{n - 1}.weight"], params[f"f.{n - 1}.bias"])
    return out, feats


def num_head_layers(params: Params) -> int:
    """Number of linear layers of the head ``g`` (``g.0``, ``g.2``, ...) in a parameter dict."""
    n = 0
    while f"g.{2 * n}.weight" in params:
        n += 1
    return n


def head_forward(params: Params, features: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    """Segmentation head ``g``: features ``(..., h)`` -> class logits ``(..., C)``; linear layers
    ``g.0, g.2, ...`` with LeakyReLU between them (the paper's head has two)."""
    n = num_head_layers(params)
    x = features
    for i in range(n):
        x = F.linear(x, params[f"g.{2 * i}.weight"], params[f"g.{2 * i}.bias"])
        if i < n - 1:
            x = F.leaky_relu(x, slope)
    return x


def full_forward(params: Params, coords: torch.Tensor, w0: float = 30.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensities ``(..., N, out)`` and class logits ``(..., N, C)``."""
    out, feats = siren_forward(params, coords, w0)
    return out, head_forward(params, feats)


def init_params(in_features: int, out_features: int, hidden: int, layers: int, num_classes: int,
                w0: float = 30.0, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32, head_hidden: int | None = None,
                head_layers: int = 2, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """SIREN-initialised ``f`` (``layers`` linear layers of width ``hidden``) and head ``g``
    (``head_layers`` linear layers, hidden width ``head_hidden``, default ``hidden``: the
    paper's ``Linear(h, h) -> LeakyReLU -> Linear(h, C)``).

    The head uses PyTorch's default ``nn.Linear`` init (``U(+-1/sqrt(in))`` for weight and bias).
    The values are drawn on the generator's device (the CPU without one), so one seed gives the
    same network whatever ``device`` the tensors are then moved to.
    """
    if layers < 2:
        raise ValueError(f"a SIREN needs at least 2 linear layers, got {layers}")
    draw_on = generator.device if generator is not None else torch.device("cpu")

    def uniform(shape: tuple[int, ...], bound: float) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, dtype=dtype, device=draw_on)
        return ((u * 2 - 1) * bound).to(device)

    params: dict[str, torch.Tensor] = {}
    dims = [in_features] + [hidden] * (layers - 1) + [out_features]
    for i in range(layers):
        fan_in, fan_out = dims[i], dims[i + 1]
        bound = 1.0 / fan_in if i == 0 else math.sqrt(6.0 / fan_in) / w0
        params[f"f.{i}.weight"] = uniform((fan_out, fan_in), bound)
        params[f"f.{i}.bias"] = uniform((fan_out,), 1.0 / math.sqrt(fan_in))
    if head_layers < 1:
        raise ValueError(f"the head needs at least 1 linear layer, got {head_layers}")
    hdims = [hidden] + [head_hidden or hidden] * (head_layers - 1) + [num_classes]
    for i in range(head_layers):
        name, fan_in, fan_out = f"g.{2 * i}", hdims[i], hdims[i + 1]
        params[f"{name}.weight"] = uniform((fan_out, fan_in), 1.0 / math.sqrt(fan_in))
        params[f"{name}.bias"] = uniform((fan_out,), 1.0 / math.sqrt(fan_in))
    return params


class SirenSeg(nn.Module):
    """Module view of the same network, for ``torch.func.functional_call`` and ``state_dict``.

    ``forward(coords (N, d)) -> (intensity (N, out), logits (N, C))``. Its parameter names are
    those of :func:`init_params`.
    """

    def __init__(self, in_features: int, out_features: int, hidden: int, layers: int,
                 num_classes: int, w0: float = 30.0, generator: torch.Generator | None = None,
                 head_hidden: int | None = None, head_layers: int = 2) -> None:
        super().__init__()
        self.w0 = w0
        self.f = nn.ModuleList()
        dims = [in_features] + [hidden] * (layers - 1) + [out_features]
        for i in range(layers):
            self.f.append(nn.Linear(dims[i], dims[i + 1]))
        hdims = [hidden] + [head_hidden or hidden] * (head_layers - 1) + [num_classes]
        mods: list[nn.Module] = []
        for i in range(head_layers):
            if i:
                mods.append(nn.LeakyReLU(0.01))
            mods.append(nn.Linear(hdims[i], hdims[i + 1]))
        self.g = nn.Sequential(*mods)
        init = init_params(in_features, out_features, hidden, layers, num_classes, w0, generator,
                           head_hidden=head_hidden, head_layers=head_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(init[name])

    def params(self) -> dict[str, torch.Tensor]:
        """The current parameters by name, read through attribute access (so the tensors
        substituted by ``functional_call`` are the ones used)."""
        out: dict[str, torch.Tensor] = {}
        for i, lin in enumerate(self.f):
            out[f"f.{i}.weight"], out[f"f.{i}.bias"] = lin.weight, lin.bias
        for i in range(0, len(self.g), 2):
            out[f"g.{i}.weight"], out[f"g.{i}.bias"] = self.g[i].weight, self.g[i].bias
        return out

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return full_forward(self.params(), coords, self.w0)
