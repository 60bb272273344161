"""MetaSeg's test-time fit and the head on the fitted features.

At test time (and in every validation) a copy of the meta-learned ``theta*`` is fitted to one
image's pixels: Adam (or SGD, ``inner_optimizer``) on the MSE only, the head ``phi`` frozen;
the labels are the argmax of the head on the fitted SIREN's penultimate features.
:class:`TestTimeFit` holds these steps for :class:`~inrseg.methods.metaseg.MetaSeg`. Several
images of one grid shape are fitted at once with stacked parameters (one batched matmul per
layer); Adam is element-wise, so this equals fitting them one at a time.

Shapes: ``S`` the grid, ``N = prod(S)`` voxels, ``d`` axes, ``C`` channels, ``h`` the SIREN
width, ``K`` classes, ``B`` images fitted together, ``M`` query points. Coordinates are those of
:mod:`inrseg.data.grids` (cell-centred, [-1, 1] per axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from inrseg.core.seeding import torch_generator
from inrseg.data.grids import axis_scales, coordinate_grid
from inrseg.data.volume import IGNORE, Volume, label_array
from inrseg.data.preprocess import check_input, normalize
from inrseg.methods.metaseg.config import MetaSegConfig
from inrseg.methods.metaseg.inner import ADAM_BETAS, Task, adam_direction
from inrseg.nn.siren import Params, head_forward, siren_features, siren_forward

__all__ = ["PreparedImage", "TestTimeFit"]


@dataclass
class PreparedImage:
    """An image as MetaSeg fits it: its pixels on its grid, flattened (C order), on the model's
    device.

    Attributes:
        shape: the grid ``S``.
        coords: ``(N, d)`` voxel-centre coordinates.
        pixels: ``(N, C)`` normalised intensities.
        weight: ``(N,)`` MSE weights (``bg_mse_weight`` on background voxels), or ``None``.
        labels: ``(N,)`` int64 (``IGNORE`` where unlabelled), or ``None`` for an unlabelled image.
        labelled: ``(N,)`` bool when some voxel is unlabelled, else ``None``.
        step: ``(d,)`` coordinate distance of one voxel along each axis.
    """

    shape: tuple[int, ...]
    coords: torch.Tensor
    pixels: torch.Tensor
    weight: torch.Tensor | None
    labels: torch.Tensor | None = None
    labelled: torch.Tensor | None = None
    step: torch.Tensor | None = None

    def task(self) -> Task:
        """The whole labelled image as a meta-training :class:`~inrseg.methods.metaseg.inner.Task`."""
        assert self.labels is not None
        return Task(self.coords, self.pixels, self.labels, self.weight, self.labelled)


class TestTimeFit:
    """The test-time fit of :class:`~inrseg.methods.metaseg.MetaSeg` and its head.

    Reads the model's ``config`` (:class:`MetaSegConfig`), ``params`` (the flat parameter dict of
    :mod:`inrseg.nn.siren`), ``lrs`` (Meta-SGD's learned learning rates, or ``None``),
    ``spatial_ndim``, ``in_channels`` and ``device``.
    """

    __test__ = False  # not a pytest class
    config: MetaSegConfig
    params: dict[str, torch.Tensor]
    lrs: dict[str, torch.Tensor] | None
    spatial_ndim: int
    in_channels: int
    device: torch.device

    @property
    def theta_keys(self) -> list[str]:
        """The SIREN's parameter names (``f.*``): what the test-time fit adapts."""
        return [k for k in self.params if k.startswith("f.")]

    @property
    def head(self) -> dict[str, torch.Tensor]:
        """The head's parameters (``g.*``)."""
        return {k: v for k, v in self.params.items() if k.startswith("g.")}

    def prepare(self, image: Volume, labels: Volume | None = None) -> PreparedImage:
        """``image`` ``(C, *S)`` (and its label map ``(*S,)``) as flattened tensors on the device."""
        check_input(image, self.in_channels, self.spatial_ndim)
        cfg = self.config
        x = torch.from_numpy(normalize(image.data, cfg.normalization)).to(self.device)   # (C, *S)
        pixels = x.reshape(x.shape[0], -1).T.contiguous()                                # (N, C)
        coords = coordinate_grid(image.shape, image.spacing, cfg.keep_aspect, device=self.device)
        weight = None
        if cfg.bg_mse_weight != 1.0:
            weight = torch.where(pixels.abs().sum(1) == 0, cfg.bg_mse_weight, 1.0)        # (N,)
        lab = None if labels is None else torch.from_numpy(
            label_array(labels).reshape(-1)).to(self.device)                    # (N,), ignored: IGNORE
        labelled = None
        if lab is not None and bool((lab == IGNORE).any()):
            labelled = lab != IGNORE
        step = torch.as_tensor(2.0 / np.asarray(image.shape, float)
                               * axis_scales(image.shape, image.spacing, cfg.keep_aspect),
                               dtype=torch.float32, device=self.device)
        return PreparedImage(tuple(image.shape), coords, pixels, weight, lab, labelled, step)

    def test_lrs(self) -> dict[str, torch.Tensor | float]:
        """Test-time learning rate per ``theta`` key: Meta-SGD's learned ``(1, *shape)`` tensors
        (clamped at 0), else ``test_lr`` (default ``inner_lr``)."""
        cfg = self.config
        if self.lrs is not None:
            return {k: self.lrs[k].detach().clamp_min(0).unsqueeze(0) for k in self.theta_keys}
        lr = cfg.test_lr if cfg.test_lr is not None else cfg.inner_lr
        return {k: lr for k in self.theta_keys}

    def fit_theta(self, images: Sequence[PreparedImage], steps: int, snapshots: Sequence[int] = (),
                  gen: torch.Generator | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Fit one copy of ``theta*`` per image (stacked; all images of one grid shape) on the
        MSE only, head untouched; ``fit_points`` random voxels per step (drawn by ``gen``, a
        generator on its device; default: a CPU one seeded with ``config.seed``), or all voxels.

        Yields ``(t, theta)`` after ``t`` steps for each ``t`` in ``snapshots`` (0 allowed) and
        at ``steps``; ``theta`` holds stacked tensors ``(B, ...)`` on the model's device
        (detached; do not modify).
        """
        cfg = self.config
        if len({im.shape for im in images}) != 1:
            raise ValueError("fit_theta needs images of one grid shape")
        gen = gen if gen is not None else torch_generator(cfg.seed)
        B = len(images)
        coords = images[0].coords                                             # (N, d)
        pixels = torch.stack([im.pixels for im in images])                    # (B, N, C)
        weight = None if images[0].weight is None else torch.stack([im.weight for im in images])
        N = coords.shape[0]
        theta = {k: self.params[k].detach().unsqueeze(0).repeat(B, *([1] * self.params[k].dim()))
                 .requires_grad_(True) for k in self.theta_keys}
        lrs = self.test_lrs()
        b1, b2 = ADAM_BETAS
        m = {k: torch.zeros_like(v) for k, v in theta.items()}
        v2 = {k: torch.zeros_like(v) for k, v in theta.items()}
        snaps = set(int(s) for s in snapshots)
        if 0 in snaps or steps == 0:
            yield 0, {k: t.detach() for k, t in theta.items()}
        for t in range(1, steps + 1):
            if cfg.fit_points is not None and cfg.fit_points < N:
                idx = torch.randint(N, (B, cfg.fit_points), generator=gen, device=gen.device)
                chunks = [idx.to(self.device)]                                # (B, n)
            else:
                per = max(256, cfg.chunk // B)
                chunks = [torch.arange(s, min(N, s + per), device=self.device).expand(B, -1)
                          for s in range(0, N, per)]
            grads = None
            for idx in chunks:
                with torch.enable_grad():  # also under a caller's no_grad (predict)
                    c = coords[idx]                                           # (B, n, d)
                    y = pixels.gather(1, idx.unsqueeze(-1).expand(-1, -1, pixels.shape[-1]))
                    out, _ = siren_forward(theta, c, cfg.w0)
                    err = (out - y).pow(2).mean(-1)                           # (B, n)
                    if weight is not None:
                        err = err * weight.gather(1, idx)
                    # sum over images of each image's mean: images stay independent
                    loss = err.sum() / (idx.shape[1] if len(chunks) == 1 else N)
                    g = torch.autograd.grad(loss, list(theta.values()))
                grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            with torch.no_grad():
                for (k, p), g in zip(theta.items(), grads):
                    m[k].mul_(b1).add_(g, alpha=1 - b1)
                    v2[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.sub_(lrs[k] * (g if cfg.inner_optimizer == "sgd" else adam_direction(m[k], v2[k], t)))
            if t in snaps or t == steps:
                yield t, {k: t_.detach() for k, t_ in theta.items()}

    def fitted_theta(self, images: Sequence[PreparedImage], steps: int,
                     gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The stacked ``theta`` ``(B, ...)`` after ``steps`` steps of :meth:`fit_theta`."""
        theta = None
        for _, theta in self.fit_theta(images, steps, gen=gen):
            pass
        return theta

    @torch.no_grad()
    def features(self, theta: Params, coords: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, M, h)`` of stacked ``theta`` at ``coords`` ``(M, d)`` (shared)
        or ``(B, M, d)`` (per image), in chunks of ``chunk`` points."""
        B = next(iter(theta.values())).shape[0]
        if coords.dim() == 2:
            coords = coords.unsqueeze(0).expand(B, -1, -1)
        per = max(256, self.config.chunk // B)
        return torch.cat([siren_features(theta, coords[:, s:s + per], self.config.w0)
                          for s in range(0, coords.shape[1], per)], dim=1)

    @property
    def context_points(self) -> int:
        """Points whose features the phase-2 head reads per query: ``1 + 2 d`` with
        ``head_context``, else 1."""
        return 1 + 2 * self.spatial_ndim if self.config.head_context > 0 else 1

    @property
    def context_offsets(self) -> list[list[int]]:
        """The context head's points in units of ``head_context`` voxels, in the order its input
        concatenates them: the point, ``+`` axis 0 ... ``+`` axis d-1, ``-`` axis 0 ... ``-`` axis d-1."""
        d = self.spatial_ndim
        return [[0] * d] + [[sign * int(a == b) for b in range(d)] for sign in (1, -1) for a in range(d)]

    @torch.no_grad()
    def head_inputs(self, theta: Params, coords: torch.Tensor, step: torch.Tensor | None,
                    points: int) -> torch.Tensor:
        """What a head reads at ``coords`` ``(M, d)`` or ``(B, M, d)``: the features ``(B, M, h)``
        (``points`` = 1), or with ``points = 1 + 2 d`` the features at the point and at
        ``+-head_context`` voxels along each axis, concatenated ``(B, M, points * h)`` in the
        order of :attr:`context_offsets`. ``step``: one voxel in coordinates, ``(d,)`` or per
        image ``(B, d)``. Neighbours outside the grid are read off the INR all the same (it is
        defined everywhere)."""
        if points == 1:
            return self.features(theta, coords)
        if step is None:
            raise ValueError("this head reads neighbouring points: it needs the image's voxel step")
        if points != 1 + 2 * self.spatial_ndim:
            raise ValueError(f"a head reads 1 or {1 + 2 * self.spatial_ndim} points, not {points}")
        B = next(iter(theta.values())).shape[0]
        c = coords if coords.dim() == 3 else coords.unsqueeze(0)                     # (1 or B, M, d)
        st = (step if step.dim() == 2 else step.unsqueeze(0)).to(c)                  # (1 or B, d)
        offsets = torch.tensor(self.context_offsets, device=c.device, dtype=c.dtype) * self.config.head_context  # (P, d) voxels
        return torch.cat([self.features(theta, (c + (o * st).unsqueeze(1)).expand(B, -1, -1))
                          for o in offsets], dim=-1)

    @torch.no_grad()
    def point_logits(self, theta: Params, coords: torch.Tensor, head: Params | None = None,
                     step: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``(B, M, K)`` of stacked ``theta`` at ``coords`` ``(M, d)`` or
        ``(B, M, d)`` through ``head`` (default: the model's), ``chunk`` points at a time;
        ``step`` (:attr:`PreparedImage.step`) is needed by a head with context."""
        head = self.params if head is None else head
        points = head["g.0.weight"].shape[1] // self.config.hidden
        per = max(256, self.config.chunk // points)
        return torch.cat([head_forward(head, self.head_inputs(theta, coords[..., s:s + per, :], step, points))
                          for s in range(0, coords.shape[-2], per)], dim=-2)

    @torch.no_grad()
    def image_logits(self, theta: Params, im: PreparedImage, head: Params | None = None) -> torch.Tensor:
        """Class logits ``(B, N, K)`` at every voxel of ``im`` (its grid, C order), for ``B``
        stacked fits of images of ``im``'s shape and voxel step.

        Equals :meth:`point_logits` at ``im.coords`` up to float rounding, faster for a head with
        context: the features are computed once per voxel of the grid padded by ``head_context``
        voxels on every side (the padding read off the INR, which is defined everywhere), and
        the neighbours' are slices of it: ``prod(S + 2k) / prod(S)`` feature evaluations per
        voxel instead of ``1 + 2 d``."""
        head = self.params if head is None else head
        points = head["g.0.weight"].shape[1] // self.config.hidden
        k = self.config.head_context
        if points == 1 or k != int(k):
            return self.point_logits(theta, im.coords, head, im.step)
        k, d, h = int(k), self.spatial_ndim, self.config.hidden
        if points != 1 + 2 * d:
            raise ValueError(f"a head reads 1 or {1 + 2 * d} points, not {points}")
        S = im.shape
        # the padded grid: voxel i of axis a (i in -k .. n + k - 1) at origin_a + i * step_a
        origin, step = im.coords[0], im.step.to(im.coords)                               # (d,), (d,)
        axes = [origin[a] + torch.arange(-k, n + k, device=origin.device, dtype=origin.dtype) * step[a]
                for a, n in enumerate(S)]
        padded = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, d)
        B = next(iter(theta.values())).shape[0]
        feats = self.features(theta, padded).reshape(B, *(n + 2 * k for n in S), h)     # (B, *(S + 2k), h)
        eye = [[k * u for u in o] for o in self.context_offsets]                          # (P, d) voxels, head order
        rows = max(1, self.config.chunk // max(1, math.prod(S[1:])))                     # axis-0 rows per block
        out = []
        for r in range(0, S[0], rows):
            r1 = min(S[0], r + rows)
            x = torch.cat([feats[(slice(None), slice(k + o[0] + r, k + o[0] + r1))
                                 + tuple(slice(k + o[a], k + o[a] + S[a]) for a in range(1, d))]
                           for o in eye], dim=-1)                                        # (B, r1 - r, *S[1:], P h)
            out.append(head_forward(head, x.reshape(B, -1, points * h)))
        return torch.cat(out, dim=1)
