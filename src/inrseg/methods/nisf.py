"""NISF: Neural Implicit Segmentation Functions (Stolt-Anso et al., MICCAI 2023).

An auto-decoder. One MLP ``f(c, h) -> (class probabilities, intensity)`` maps a continuous
coordinate ``c`` and a per-subject latent code ``h`` to a segmentation and a reconstruction of
the image. Prior training learns the MLP and one latent per training image jointly, with labels.
At test time the MLP is frozen and a fresh latent is optimised on the image intensities alone;
the segmentation head then reads labels anywhere in continuous space: on the image grid, on a
finer grid, in slices that were held out of the fit, or on an arbitrary oblique plane.

Network (:class:`NISFNet`; see ``shared/METHODS.md``)
    ``x_0 = G_0([c, h]) + h``, ``x_k = G_k(x_{k-1}) + x_{k-1}`` (k = 1..depth-1), with real Gabor
    (WIRE) layers ``G`` (:mod:`inrseg.nn.gabor`); heads ``softmax(Linear(x, C))`` and
    ``sigmoid(Linear(x, C_in))``. Defaults: depth 8, width 128, latent 128, w0 = s0 = 10.
    SIREN (``activation="sine"``) and ReLU + Gaussian Fourier features (``"relu"``) are
    selectable for ablations.

Coordinates (a deliberate change from the official code, which uses ``index / length`` in
[0, 1) and ignores the spacing)
    :func:`inrseg.data.grids.coordinate_grid` with ``keep_aspect=True``: cell-centred, the
    largest physical axis spans [-1, 1] and the others are scaled by their extent in mm, so the
    1.8 x 1.8 x 8 mm cine voxels keep their true shape. Time (4D) is a fourth axis in [-1, 1].
    This is what makes resampling, held-out slices and oblique planes physically consistent.

Prior training loss (per image of the batch, averaged over the batch)
    ``BCE(softmax, one-hot) + softDice(softmax, one-hot; background included)
    + alpha * BCE(sigmoid, intensity in [0, 1]) + latent_reg * mean(h^2)``
    plus ``weight_reg * sum(p^2)`` over the backbone (Gabor layers; heads excluded) once per step.
    Intensities: :func:`inrseg.data.preprocess.normalize` ``"minmax"``. Adam, no schedule.
    One latent per training *case* (for 3D+t one case is one subject across all its frames).
    A step draws ``subjects_per_step`` cases, for 3D+t one random frame of each, and either all
    its voxels (the paper) or ``points_per_step`` random ones (CPU presets); Gaussian jitter of
    std ``coord_jitter`` is added to the training coordinates.

Inference (:meth:`NISF.fit_latents`)
    Network frozen (``requires_grad`` off, weights untouched); a latent initialised to
    ``N(0, latent_init_std^2)`` - the same draw for every image (seeded), so an image's result
    does not depend on which other images share its batch - is optimised with Adam on
    ``alpha * BCE(reconstruction) + latent_reg * mean(h^2)`` (the paper's intent: the official
    code silently optimised the whole network). ``alpha`` only rescales the gradient; Adam is
    nearly invariant to it. Several images are fitted together: latents ``(B, L)``, points
    ``(B, N, d)``, and the loss is the *sum* over images of each image's mean, so each latent
    receives exactly its own gradient. The number of steps is chosen on the validation cases
    (best mean foreground Dice on a steps curve, stored with the curve in the checkpoint), never
    on test data.

Training is resumable (a state file every ``save_every`` steps; the per-step random draws are
seeded by ``(seed, step)``, so a resumed run reproduces an uninterrupted one) and can stop on a
time budget.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inrseg.checkpoints import load_checkpoint, load_train_state, save_checkpoint, save_train_state
from inrseg.data.grids import (coordinate_grid, resampled_affine, resampled_shape,
                               world_to_coords)
from inrseg.data.io import Volume
from inrseg.data.preprocess import normalize
from inrseg.errors import InputError
from inrseg.metrics import case_metrics
from inrseg.nn.fourier import GaussianFourierFeatures
from inrseg.nn.gabor import ACTIVATIONS, make_layer, split_linear
from inrseg.progress import progress, status

__all__ = ["NISF", "NISFConfig", "NISFNet", "PRESETS", "LatentFit", "HeldOutResult", "PlaneView",
           "heldout_mask", "plane_points", "save_plane_png"]


@dataclass
class NISFConfig:
    """Hyper-parameters of NISF (saved in the checkpoint). Defaults follow the paper."""

    # network
    activation: str = "gabor"           # "gabor" (WIRE) | "sine" (SIREN) | "relu" (+ Fourier feat.)
    width: int = 128                    # hidden units
    depth: int = 8                      # activation layers: 1 input + (depth - 1) residual
    latent_size: int | None = None      # None: = width (the latent is added at the first residual)
    w0: float | None = None             # Gabor/sine frequency; None: 10 (Gabor), 30 (sine)
    s0: float = 10.0                    # Gabor envelope width multiplier
    fourier_frequencies: int = 128      # "relu" only: random Fourier features
    fourier_sigma: float = 10.0         # "relu" only: std of the frequencies (cycles per unit)
    # prior training
    steps: int = 2000                   # optimiser steps
    subjects_per_step: int = 1          # cases per step (the paper: 1)
    points_per_step: int | None = None  # random voxels per case and step; None: the whole frame
    lr: float = 1e-4                    # Adam, network weights
    latent_lr: float | None = None      # Adam, training latents; None: = lr
    alpha: float = 10.0                 # weight of the reconstruction BCE
    latent_reg: float = 1e-4            # x mean(h^2)
    weight_reg: float = 1e-4            # x sum(p^2) over the backbone
    coord_jitter: float = 1e-4          # std of Gaussian noise on training coordinates
    latent_init_std: float = 1e-2       # h ~ N(0, std^2) (variance 1e-4), training and inference
    save_every: int = 100               # training-state interval (steps)
    budget_minutes: float | None = None  # stop prior training after this wall time
    # inference
    infer_lr: float = 1e-4              # Adam on the latent
    infer_steps: int = 672              # used when no validation cases choose it
    infer_max_steps: int = 1000         # length of the validation steps curve
    curve_every: int = 25               # validation Dice every this many steps
    infer_points: int | None = None     # random voxels per image and step; None: all (chunked)
    # data / numerics
    keep_aspect: bool = True            # physical aspect of the coordinates (see module doc)
    normalization: str = "minmax"
    chunk: int = 16384                  # max points per forward pass
    seed: int = 0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r} ({', '.join(ACTIVATIONS)})")
        if self.depth < 1 or self.width < 1:
            raise ValueError("depth and width must be positive")

    @property
    def latent_dim(self) -> int:
        return self.width if self.latent_size is None else int(self.latent_size)


PRESETS: dict[str, dict[str, Any]] = {
    # the paper: whole frames per step, lr 1e-4, 672 inference steps (GPU-sized)
    "nisf-paper": dict(),
    # CPU: random voxel subsets, larger learning rates, a shorter inference curve
    "nisf-cpu": dict(lr=1e-3, points_per_step=8192, infer_points=8192, infer_lr=1e-2,
                     infer_max_steps=300, curve_every=20, infer_steps=200, steps=3000),
    # CPU, smaller network (64 x 4, 21K parameters): ~20x cheaper per step than 128 x 8; on
    # 40x40x8x4 cardiac phantoms 1 minute of training reached validation Dice 0.87
    "nisf-cpu-small": dict(width=64, depth=4, lr=1e-3, points_per_step=4096, infer_points=4096,
                           infer_lr=1e-2, infer_max_steps=200, curve_every=20, infer_steps=100,
                           steps=3000),
}


# ============================================================================================
# network
# ============================================================================================

class NISFNet(nn.Module):
    """Residual coordinate MLP with a segmentation and a reconstruction head.

    Args:
        coord_dim: coordinate dimension ``d`` (2, 3 or 4).
        num_classes: ``C``, background included.
        out_channels: reconstructed intensity channels ``C_in``.
        cfg: architecture options (activation, width, depth, latent size, w0, s0, Fourier).

    ``forward(coords (B, N, d), latents (B, L)) -> (seg_logits (B, N, C), rec_logits (B, N, C_in))``;
    probabilities are ``softmax(seg_logits, -1)`` and ``sigmoid(rec_logits)``.
    """

    def __init__(self, coord_dim: int, num_classes: int, out_channels: int, cfg: NISFConfig) -> None:
        super().__init__()
        W, L = cfg.width, cfg.latent_dim
        self.coord_dim, self.latent_dim = coord_dim, L
        if cfg.activation == "relu":
            self.encoding: nn.Module | None = GaussianFourierFeatures(
                coord_dim, cfg.fourier_frequencies, cfg.fourier_sigma, trainable=False, seed=cfg.seed)
            in_c = self.encoding.out_dim
        else:
            self.encoding = None
            in_c = coord_dim
        kw = dict(w0=cfg.w0, s0=cfg.s0)
        self.layers = nn.ModuleList(
            [make_layer(cfg.activation, in_c + L, W, is_first=True, **kw)]
            + [make_layer(cfg.activation, W, W, **kw) for _ in range(cfg.depth - 1)])
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


# ============================================================================================
# results of per-image work
# ============================================================================================

@dataclass
class LatentFit:
    """A latent code fitted to one image, with the geometry needed to query it anywhere.

    Attributes:
        latent: ``(L,)`` float32.
        shape: grid shape ``S`` of the image it was fitted to.
        spacing: mm per voxel of the spatial axes.
        affine: ``(4, 4)`` voxel -> world (mm) of that grid.
        spatial_ndim: 2, 3 or 4 (3D + t).
        time_step: frame interval for 4D images, else ``None``.
        steps: optimisation steps it was fitted for.
        path: the image file, if any.
    """

    latent: torch.Tensor
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    spatial_ndim: int
    time_step: float | None = None
    steps: int = 0
    path: Path | None = None


@dataclass
class HeldOutResult:
    """Segmentation of slices the latent never saw.

    Attributes:
        labels: full-grid prediction ``(*S,)`` (observed and held-out slices), image affine.
        reconstruction: intensities ``(C_in, *S)`` in the normalised [0, 1] range.
        axis: grid axis of the held-out slices; ``indices``: their positions along it.
        heldout_dice: per-class Dice ``(C,)`` on the held-out slices (``None`` without labels).
        heldout_mean_foreground_dice / observed_mean_foreground_dice: mean foreground Dice on
            the held-out and on the observed slices (``NaN`` without labels).
    """

    labels: Volume
    reconstruction: Volume
    axis: int
    indices: list[int]
    heldout_dice: np.ndarray | None = None
    heldout_mean_foreground_dice: float = float("nan")
    observed_mean_foreground_dice: float = float("nan")


@dataclass
class PlaneView:
    """An image and label map rendered on an arbitrary plane.

    Attributes:
        image: ``(nu, nv)`` reconstructed intensity (first channel, normalised [0, 1]).
        labels: ``(nu, nv)`` int64 labels.
        affine: ``(4, 4)``: pixel ``(i, j, 0)`` -> world mm; columns are ``du * u``, ``dv * v``
            and the unit normal ``u x v`` (1 mm), so ``Volume(labels, affine, 2)`` writes a 2D
            NIfTI that overlays the source image in a viewer.
        frame: the (possibly fractional) time frame it was rendered at (4D), else ``None``.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    frame: float | None = None

    def as_volumes(self) -> tuple[Volume, Volume]:
        """``(image (1, nu, nv), labels (nu, nv))`` as 2D :class:`Volume` objects."""
        return (Volume(self.image[None].astype(np.float32), self.affine, 2),
                Volume(self.labels, self.affine, 2))


# ============================================================================================
# small pure helpers
# ============================================================================================

def heldout_mask(shape: Sequence[int], axis: int, indices: Sequence[int]) -> np.ndarray:
    """Boolean ``(*S,)`` mask, ``True`` where a voxel is observed (not in a held-out slice)."""
    if not 0 <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for a {len(shape)}-axis grid")
    idx = sorted({int(i) for i in indices})
    if not idx or idx[0] < 0 or idx[-1] >= shape[axis]:
        raise ValueError(f"held-out indices {list(indices)} must be a non-empty subset of "
                         f"[0, {shape[axis] - 1}]")
    if len(idx) == shape[axis]:
        raise ValueError("cannot hold out every slice")
    keep = np.ones(shape[axis], bool)
    keep[idx] = False
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(keep.reshape(view), tuple(shape)).copy()


def plane_points(centre_mm: Sequence[float], u: Sequence[float], v: Sequence[float],
                 size: tuple[int, int], pixel_mm: float | tuple[float, float]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """World points of a plane's pixel centres and the plane's affine.

    Args:
        centre_mm: ``(3,)`` world position of the plane's centre (mm).
        u, v: in-plane directions ``(3,)`` (normalised here; ``v`` is orthogonalised to ``u``).
        size: ``(nu, nv)`` pixels along ``u`` and ``v``.
        pixel_mm: pixel size in mm (one value or ``(du, dv)``).

    Returns:
        ``(points (nu * nv, 3) mm, row-major over (i, j)``, ``affine (4, 4))``.
    """
    c = np.asarray(centre_mm, float)
    u = np.asarray(u, float)
    v = np.asarray(v, float)
    if c.shape != (3,) or u.shape != (3,) or v.shape != (3,):
        raise ValueError("centre and directions must be 3-vectors (world mm)")
    u = u / np.linalg.norm(u)
    v = v - (v @ u) * u
    if np.linalg.norm(v) < 1e-6:
        raise ValueError("the plane's directions u and v are parallel")
    v = v / np.linalg.norm(v)
    du, dv = (float(pixel_mm),) * 2 if np.isscalar(pixel_mm) else tuple(float(p) for p in pixel_mm)
    nu, nv = int(size[0]), int(size[1])
    origin = c - 0.5 * (nu - 1) * du * u - 0.5 * (nv - 1) * dv * v
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = du * u, dv * v, np.cross(u, v), origin
    i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    pts = origin + i.reshape(-1, 1) * du * u + j.reshape(-1, 1) * dv * v
    return pts, affine


def save_plane_png(view: PlaneView, path: str | Path, alpha: float = 0.45,
                   title: str | None = None) -> Path:
    """Write a PNG: the plane's image (left) and its labels over the image (right).

    Pixel ``(i, j)`` is drawn with ``i`` horizontal and ``j`` vertical (upwards). Atomic.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from inrseg.data.io import atomic_path

    img, lab = view.image.T, view.labels.T
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2 * img.shape[0] / max(img.shape[1], 1) + 0.6))
    for ax in axes:
        ax.imshow(img, cmap="gray", origin="lower", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_axis_off()
    n = max(int(lab.max()) + 1, 2)
    colours = plt.get_cmap("tab10")(np.arange(n) % 10)
    colours[0, 3] = 0.0  # background transparent
    axes[1].imshow(np.ma.masked_equal(lab, 0), cmap=ListedColormap(colours), vmin=0, vmax=n - 1,
                   origin="lower", alpha=alpha, interpolation="nearest")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _labels_for_metrics(a: np.ndarray) -> np.ndarray:
    """Reshape any label array to 2D/3D for :func:`case_metrics` (Dice is reshape-invariant)."""
    if a.ndim in (2, 3):
        return a
    if a.ndim == 1:
        return a[:, None]
    return a.reshape(a.shape[0], a.shape[1], -1)


def _dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, float]:
    """Per-class Dice ``(C,)`` and mean foreground Dice (project conventions, no distances)."""
    m = case_metrics(_labels_for_metrics(pred), _labels_for_metrics(gt), num_classes,
                     distances=False)
    return m.dice, m.mean_foreground_dice


# ============================================================================================
# the method
# ============================================================================================

@dataclass
class _Subject:
    """One image prepared for NISF: ``N = prod(S)`` points, flattened in C order."""

    coords: torch.Tensor            # (N, d) float32
    intensity: torch.Tensor         # (N, C_in) float32 in [0, 1]
    labels: torch.Tensor | None     # (N,) int64
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    time_step: float | None
    path: Path | None = None
    extra: dict = field(default_factory=dict)


class NISF:
    """Neural Implicit Segmentation Functions behind the :class:`~inrseg.segmenter.Segmenter`
    protocol (2D, 3D and 3D + t images).

    Args:
        label_names: class names indexed by label value (background first).
        spatial_ndim: grid axes of the images: 2, 3 or 4 (3D + t; time is a 4th coordinate).
        in_channels: image channels (all are reconstructed).
        config: hyper-parameters (default: the paper's).
    """

    method: ClassVar[str] = "nisf"

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: NISFConfig | None = None) -> None:
        if spatial_ndim not in (2, 3, 4):
            raise ValueError(f"spatial_ndim must be 2, 3 or 4, got {spatial_ndim}")
        self.config = config or NISFConfig()
        self.label_names = list(label_names)
        self.spatial_ndim = int(spatial_ndim)
        self.in_channels = int(in_channels)
        torch.manual_seed(self.config.seed)
        self.net = NISFNet(self.spatial_ndim, len(self.label_names), self.in_channels, self.config)
        self.train_latents: torch.Tensor | None = None   # (n_train, L) after fit
        self.infer_steps: int = self.config.infer_steps
        self.val_curve: list[dict] = []
        self.history: list[dict] = []
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "NISF":
        """Run the network on ``device`` (``"cuda"``...). Image data stays in host memory and
        is moved chunk by chunk; results (labels, latents) are returned on the CPU."""
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    # ------------------------------------------------------------------ data
    def _coords(self, shape: Sequence[int], spacing: Sequence[float],
                scale: float | Sequence[float] = 1.0) -> torch.Tensor:
        """Coordinates ``(N', d)`` of the (resampled) grid of an image of ``shape``."""
        return coordinate_grid(shape, spacing if self.config.keep_aspect else None,
                               keep_aspect=self.config.keep_aspect, scale=scale, flatten=True)

    def _prepare(self, image: Volume, labels: Volume | None = None,
                 observed: np.ndarray | None = None) -> _Subject:
        """Coordinates, normalised intensities and labels of an image's voxels.

        With ``observed`` (boolean ``(*S,)``), only the observed voxels are kept, and the
        intensity normalisation is computed from them alone, so nothing of the unobserved
        voxels reaches the fit.
        """
        if image.spatial_ndim != self.spatial_ndim:
            raise InputError(image.path, f"has {image.spatial_ndim} grid axes, the model expects "
                                         f"{self.spatial_ndim}")
        if image.data.shape[0] != self.in_channels:
            raise InputError(image.path, f"has {image.data.shape[0]} channels, the model expects "
                                         f"{self.in_channels}")
        coords = self._coords(image.shape, image.spacing)                  # (N, d)
        data = image.data.reshape(self.in_channels, -1)                     # (C_in, N)
        sel = None
        if observed is not None:
            m = np.asarray(observed, bool)
            if m.shape != image.shape:
                raise ValueError(f"observed mask shape {m.shape} != image shape {image.shape}")
            sel = np.flatnonzero(m.reshape(-1))
            if sel.size == 0:
                raise ValueError("observed mask selects no voxel")
            coords, data = coords[torch.from_numpy(sel)], data[:, sel]
        x = normalize(data, self.config.normalization)                      # (C_in, n) in [0, 1]
        inten = torch.from_numpy(np.ascontiguousarray(x.T))                 # (n, C_in)
        lab = None
        if labels is not None:
            if labels.shape != image.shape:
                raise InputError(labels.path, f"label shape {labels.shape} does not match image "
                                              f"shape {image.shape}")
            la = np.asarray(labels.data).reshape(-1)
            if la.size and (la.min() < 0 or la.max() >= self.num_classes):
                raise InputError(labels.path, f"label values must lie in [0, {self.num_classes - 1}]")
            lab = torch.from_numpy((la if sel is None else la[sel]).astype(np.int64))
        return _Subject(coords, inten, lab, image.shape, image.spacing,
                        np.asarray(image.affine, float), image.time_step, image.path)

    @staticmethod
    def _load_pair(item: Any) -> tuple[Volume, Volume | None]:
        """A :class:`~inrseg.data.layouts.Case` or an ``(image, labels)`` pair of Volumes."""
        if hasattr(item, "load"):
            return item.load()
        image, labels = item
        return image, labels

    # ------------------------------------------------------------------ forward helpers
    def _chunks(self, n: int, b: int) -> Iterator[slice]:
        step = max(1, self.config.chunk // max(b, 1))
        for s in range(0, n, step):
            yield slice(s, min(n, s + step))

    def _forward(self, coords: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked forward ``(B, N, d), (B, L) -> (B, N, C), (B, N, C_in)`` (keeps the graph)."""
        dev = self.device
        outs = [self.net(coords[:, sl].to(dev), latents.to(dev))
                for sl in self._chunks(coords.shape[1], coords.shape[0])]
        return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)

    @torch.no_grad()
    def _evaluate(self, coords: torch.Tensor, latents: torch.Tensor, want_image: bool = True,
                  want_probs: bool = False) -> dict[str, torch.Tensor]:
        """Labels ``(B, N)``, intensities ``(B, N, C_in)`` and optionally probabilities."""
        self.net.eval()
        B, N = coords.shape[:2]
        labels = torch.empty(B, N, dtype=torch.int64)
        image = torch.empty(B, N, self.in_channels) if want_image else None
        probs = torch.empty(B, N, self.num_classes) if want_probs else None
        for sl in self._chunks(N, B):
            seg, rec = self.net(coords[:, sl].to(self.device), latents.to(self.device))
            labels[:, sl] = seg.argmax(-1).cpu()
            if image is not None:
                image[:, sl] = torch.sigmoid(rec).cpu()
            if probs is not None:
                probs[:, sl] = torch.softmax(seg, -1).cpu()
        out = {"labels": labels}
        if image is not None:
            out["image"] = image
        if probs is not None:
            out["probs"] = probs
        return out

    def _training_loss(self, seg_logits: torch.Tensor, rec_logits: torch.Tensor,
                       labels: torch.Tensor, intensity: torch.Tensor, latent: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one image: ``seg (N, C)``, ``rec (N, C_in)``, ``labels (N,)``,
        ``intensity (N, C_in)``, ``latent (L,)``."""
        cfg = self.config
        p = torch.softmax(seg_logits, -1)
        onehot = F.one_hot(labels, self.num_classes).to(p.dtype)
        bce_seg = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), onehot)
        inter = (p * onehot).sum(0)
        dice = 1.0 - ((2 * inter + 1.0) / (p.sum(0) + onehot.sum(0) + 1.0)).mean()
        rec = F.binary_cross_entropy_with_logits(rec_logits, intensity)
        lat = cfg.latent_reg * latent.pow(2).mean()
        total = bce_seg + dice + cfg.alpha * rec + lat
        return total, {"bce": bce_seg.item(), "dice": dice.item(), "rec": rec.item()}

    # ------------------------------------------------------------------ prior training
    def fit(self, train: Sequence[Any], val: Sequence[Any] | None = None,
            state_path: Path | None = None) -> None:
        """Train the prior (network + one latent per training case), then choose the number of
        inference steps on ``val`` (best mean foreground Dice; ``config.infer_steps`` without
        ``val``).

        ``train`` / ``val``: :class:`~inrseg.data.layouts.Case` objects or ``(image, labels)``
        Volume pairs. ``state_path``: resumable training state, written every ``save_every``
        steps and at the end; if it exists, training continues from it.
        """
        cfg = self.config
        subjects = []
        for item in progress(train, desc="loading training cases"):
            img, lab = self._load_pair(item)
            if lab is None:
                raise InputError(img.path, "NISF prior training needs labelled cases")
            subjects.append(self._prepare(img, lab))
        if not subjects:
            raise ValueError("NISF.fit needs at least one training case")
        n, L = len(subjects), cfg.latent_dim
        gen = torch.Generator().manual_seed(cfg.seed)
        latents = nn.Parameter((torch.randn(n, L, generator=gen) * cfg.latent_init_std).to(self.device))
        opt = torch.optim.Adam([
            {"params": list(self.net.parameters()), "lr": cfg.lr},
            {"params": [latents], "lr": cfg.latent_lr if cfg.latent_lr is not None else cfg.lr}])
        start = 0
        if state_path is not None and Path(state_path).exists():
            st = load_train_state(state_path, self.method)
            if tuple(st["latents"].shape) != (n, L):
                raise InputError(state_path, f"training state has {st['latents'].shape[0]} latents, "
                                             f"the training set {n} cases")
            self.net.load_state_dict(st["model"])
            with torch.no_grad():
                latents.copy_(st["latents"])
            opt.load_state_dict(st["optimizer"])
            start, self.history = int(st["step"]), list(st["history"])
            status(f"resuming NISF from step {start} ({state_path})")

        def save_state(step: int) -> None:
            if state_path is not None:
                save_train_state(state_path, self.method, {
                    "model": self.net.state_dict(), "latents": latents.detach(),
                    "optimizer": opt.state_dict(), "step": step, "history": self.history})

        t0 = time.perf_counter()
        bar = progress(total=cfg.steps, desc="training nisf prior", initial=start)
        step = start
        for step in range(start, cfg.steps):
            self.net.train()
            rng = np.random.default_rng([cfg.seed, step])   # per-step draws: exact resumption
            picks = rng.choice(n, size=min(cfg.subjects_per_step, n), replace=False)
            total = torch.zeros((), device=self.device)
            parts = {"bce": 0.0, "dice": 0.0, "rec": 0.0}
            for i in picks:
                coords, inten, labs = self._sample_points(subjects[int(i)], rng)
                h = latents[int(i)]
                seg, rec = self._forward(coords[None], h[None])
                loss, info = self._training_loss(seg[0], rec[0], labs.to(self.device),
                                                 inten.to(self.device), h)
                total = total + loss / len(picks)
                for k in parts:
                    parts[k] += info[k] / len(picks)
            if cfg.weight_reg > 0:
                total = total + cfg.weight_reg * sum(p.pow(2).sum() for p in self.net.backbone_parameters())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{total.item():.3f}")
            over_budget = (cfg.budget_minutes is not None
                           and time.perf_counter() - t0 > 60 * cfg.budget_minutes)
            last = step + 1 == cfg.steps or over_budget
            if (step + 1) % max(1, cfg.save_every) == 0 or last:
                self.history.append({"step": step + 1, "loss": total.item(), **parts})
                save_state(step + 1)
            if over_budget:
                status(f"time budget of {cfg.budget_minutes} min reached at step {step + 1}")
                break
        bar.close()
        self.train_latents = latents.detach().cpu().clone()
        self.net.eval()

        val_pairs = [self._load_pair(v) for v in (val or [])]
        val_pairs = [(i, l) for i, l in val_pairs if l is not None]
        if val_pairs:
            self.infer_steps, self.val_curve = self.select_infer_steps(val_pairs)
            status(f"nisf: {self.infer_steps} inference steps chosen on {len(val_pairs)} "
                   f"validation cases")
        else:
            self.infer_steps = cfg.infer_steps

    def _sample_points(self, s: _Subject, rng: np.random.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training sample of a case: a random frame (4D), all or ``points_per_step`` of its
        voxels, with coordinate jitter. Returns ``coords (n, d)``, ``intensity (n, C_in)``,
        ``labels (n,)``."""
        cfg = self.config
        if self.spatial_ndim == 4:
            T = s.shape[3]
            t = int(rng.integers(T))
            idx = torch.arange(t, s.coords.shape[0], T)        # C order: time is the fastest axis
        else:
            idx = None
        n_all = s.coords.shape[0] if idx is None else idx.numel()
        if cfg.points_per_step is not None and cfg.points_per_step < n_all:
            sub = torch.from_numpy(rng.choice(n_all, size=cfg.points_per_step, replace=False))
            idx = sub if idx is None else idx[sub]
        coords = s.coords if idx is None else s.coords[idx]
        inten = s.intensity if idx is None else s.intensity[idx]
        labs = s.labels if idx is None else s.labels[idx]
        if cfg.coord_jitter > 0:
            noise = rng.standard_normal(coords.shape).astype(np.float32) * cfg.coord_jitter
            coords = coords + torch.from_numpy(noise)
        return coords, inten, labs

    # ------------------------------------------------------------------ inference: latents
    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """Network weights frozen (``requires_grad=False``) inside the block, restored after."""
        flags = [p.requires_grad for p in self.net.parameters()]
        self.net.eval()
        try:
            for p in self.net.parameters():
                p.requires_grad_(False)
            yield
        finally:
            for p, f in zip(self.net.parameters(), flags):
                p.requires_grad_(f)

    def initial_latent(self) -> torch.Tensor:
        """The seeded inference initialisation ``(L,) ~ N(0, latent_init_std^2)``."""
        gen = torch.Generator().manual_seed(self.config.seed + 1)
        return torch.randn(self.config.latent_dim, generator=gen) * self.config.latent_init_std

    def _optimise_latents(self, coords: list[torch.Tensor], targets: list[torch.Tensor],
                          steps: int,
                          callback: Callable[[int, torch.Tensor], None] | None = None,
                          desc: str = "fitting latents") -> torch.Tensor:
        """Optimise one latent per image on reconstruction BCE + latent L2, network frozen.

        Args:
            coords: per image ``(N_b, d)`` coordinates of the observed voxels.
            targets: per image ``(N_b, C_in)`` intensities in [0, 1].
            steps: Adam steps.
            callback: called as ``callback(step, latents (B, L))`` after step 0 (the initial
                latent) and after every step.

        Returns:
            latents ``(B, L)``.
        """
        cfg = self.config
        B = len(coords)
        sizes = [c.shape[0] for c in coords]
        n_max = max(sizes)
        d = coords[0].shape[1]
        X = torch.zeros(B, n_max, d)
        Y = torch.zeros(B, n_max, self.in_channels)
        Wt = torch.zeros(B, n_max)                       # per-point weight 1/N_b, 0 on padding
        for b, (c, y) in enumerate(zip(coords, targets)):
            X[b, : sizes[b]], Y[b, : sizes[b]], Wt[b, : sizes[b]] = c, y, 1.0 / sizes[b]
        h = self.initial_latent().expand(B, -1).clone().to(self.device).requires_grad_(True)
        opt = torch.optim.Adam([h], lr=cfg.infer_lr)
        use_subsets = cfg.infer_points is not None and cfg.infer_points < n_max
        with self._frozen():
            if callback is not None:
                callback(0, h.detach().cpu())
            for step in progress(range(steps), desc=desc):
                opt.zero_grad(set_to_none=True)
                if use_subsets:
                    # the same draw for every image (seeded by step): batch-independent results
                    idx = torch.stack([torch.from_numpy(np.random.default_rng([cfg.seed, step]).choice(
                        sizes[b], size=min(cfg.infer_points, sizes[b]), replace=False))
                        if sizes[b] > cfg.infer_points else
                        torch.arange(sizes[b]).repeat(math.ceil(cfg.infer_points / sizes[b]))[: cfg.infer_points]
                        for b in range(B)])                                   # (B, n)
                    xs = torch.gather(X, 1, idx[..., None].expand(-1, -1, d))
                    ys = torch.gather(Y, 1, idx[..., None].expand(-1, -1, self.in_channels))
                    ws = torch.full(idx.shape, 1.0 / idx.shape[1])
                    batches = [(xs, ys, ws)]
                else:
                    batches = [(X, Y, Wt)]                  # all points, chunked below
                for xs, ys, ws in batches:
                    for sl in self._chunks(xs.shape[1], B):
                        dev = self.device
                        rec = self.net.reconstruct(xs[:, sl].to(dev), h)
                        bce = F.binary_cross_entropy_with_logits(rec, ys[:, sl].to(dev), reduction="none")
                        loss = cfg.alpha * (bce.mean(-1) * ws[:, sl].to(dev)).sum()
                        loss.backward()                     # accumulates into h.grad per chunk
                reg = cfg.latent_reg * h.pow(2).mean(-1).sum()
                reg.backward()
                opt.step()
                if callback is not None:
                    callback(step + 1, h.detach().cpu())
        return h.detach().cpu()

    def fit_latents(self, images: Sequence[Volume], steps: int | None = None,
                    observed: Sequence[np.ndarray | None] | None = None) -> list[LatentFit]:
        """Fit one latent per image, all in one batch (network frozen).

        Args:
            images: ``(C_in, *S)`` Volumes (shapes may differ).
            steps: optimisation steps (default: the validated :attr:`infer_steps`).
            observed: optional per image boolean ``(*S,)`` masks; the latent sees only voxels
                where the mask is ``True`` (e.g. :func:`heldout_mask`).

        Returns:
            one :class:`LatentFit` per image.
        """
        steps = self.infer_steps if steps is None else int(steps)
        subs = [self._prepare(img, observed=None if observed is None else observed[k])
                for k, img in enumerate(images)]
        coords, targets = [s.coords for s in subs], [s.intensity for s in subs]
        lat = self._optimise_latents(coords, targets, steps)
        return [LatentFit(lat[k].clone(), s.shape, s.spacing, s.affine, self.spatial_ndim,
                          s.time_step, steps, s.path) for k, s in enumerate(subs)]

    def select_infer_steps(self, val_pairs: Sequence[tuple[Volume, Volume]]
                           ) -> tuple[int, list[dict]]:
        """Steps curve on validation cases: mean foreground Dice every ``curve_every`` steps up
        to ``infer_max_steps`` (all cases fitted in one batch). Returns the best step (>= 1) and
        the curve ``[{"step", "dice", "per_case"}]``."""
        cfg = self.config
        subs = [self._prepare(img, lab) for img, lab in val_pairs]
        gts = [s.labels.numpy() for s in subs]
        curve: list[dict] = []
        every = max(1, cfg.curve_every)

        def record(step: int, lat: torch.Tensor) -> None:
            if step % every and step != cfg.infer_max_steps:
                return
            scores = []
            for b, s in enumerate(subs):
                pred = self._evaluate(s.coords[None], lat[b : b + 1], want_image=False)["labels"][0]
                scores.append(_dice(pred.numpy(), gts[b], self.num_classes)[1])
            curve.append({"step": step, "dice": float(np.nanmean(scores)),
                          "per_case": [float(x) for x in scores]})

        self._optimise_latents([s.coords for s in subs], [s.intensity for s in subs],
                               cfg.infer_max_steps, callback=record, desc="validation steps curve")
        candidates = [c for c in curve if c["step"] >= 1 and not math.isnan(c["dice"])]
        best = max(candidates, key=lambda c: c["dice"]) if candidates else {"step": cfg.infer_steps}
        return int(best["step"]), curve

    # ------------------------------------------------------------------ inference: outputs
    def _check_fit(self, fit: LatentFit) -> None:
        if fit.spatial_ndim != self.spatial_ndim or fit.latent.shape != (self.config.latent_dim,):
            raise ValueError("this LatentFit does not belong to this model")

    def segment(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map ``(*S',)`` of a fitted latent on the image grid resampled by ``scale``
        (``S' = round(S * scale)``, a number for all axes or one per axis) with the matching
        affine (:func:`~inrseg.data.grids.resampled_affine`)."""
        return self._render_grid(fit, scale)[0]

    def reconstruct(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Reconstructed intensities ``(C_in, *S')`` in the normalised [0, 1] range."""
        return self._render_grid(fit, scale)[1]

    def _render_grid(self, fit: LatentFit, scale: float | Sequence[float]) -> tuple[Volume, Volume]:
        self._check_fit(fit)
        new_shape = resampled_shape(fit.shape, scale)
        coords = self._coords(fit.shape, fit.spacing, scale)
        out = self._evaluate(coords[None], fit.latent[None])
        affine = fit.affine if new_shape == tuple(fit.shape) else resampled_affine(fit.affine, fit.shape, new_shape)
        ts = fit.time_step
        if self.spatial_ndim == 4 and ts is not None and new_shape[3] != fit.shape[3]:
            ts = ts * fit.shape[3] / new_shape[3]
        labels = Volume(out["labels"][0].numpy().reshape(new_shape), affine, self.spatial_ndim, ts,
                        path=fit.path)
        image = Volume(out["image"][0].T.numpy().reshape((self.in_channels,) + new_shape),
                       affine, self.spatial_ndim, ts, path=fit.path)
        return labels, image

    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map of ``image`` (``(C_in, *S)``): fit a latent for :attr:`infer_steps` steps,
        then label the grid resampled by ``scale`` (affine resampled to match).

        ``scale``: one factor for every grid axis - for 3D + t that includes time (2 doubles
        the frames, the time step halves) - or one per axis, e.g. ``(2, 2, 4, 1)``.
        """
        return self.segment(self.fit_latents([image])[0], scale)

    def predict_many(self, images: Sequence[Volume], scale: float | Sequence[float] = 1.0) -> list[Volume]:
        """:meth:`predict` for several images, their latents fitted in one batch."""
        return [self.segment(f, scale) for f in self.fit_latents(images)]

    def predict_heldout(self, image: Volume, axis: int, indices: Sequence[int],
                        labels: Volume | None = None, steps: int | None = None) -> HeldOutResult:
        """Fit the latent without the slices ``indices`` along grid ``axis``, then segment the
        whole grid; with ``labels``, report Dice on the held-out and on the observed slices."""
        mask = heldout_mask(image.shape, axis, indices)
        fit = self.fit_latents([image], steps=steps, observed=[mask])[0]
        lab_vol, rec_vol = self._render_grid(fit, 1.0)
        res = HeldOutResult(lab_vol, rec_vol, axis, sorted({int(i) for i in indices}))
        if labels is not None:
            gt = np.asarray(labels.data)
            if gt.shape != image.shape:
                raise InputError(labels.path, "label shape does not match the image")
            idx = res.indices
            rest = [i for i in range(image.shape[axis]) if i not in set(idx)]
            pred = lab_vol.data
            res.heldout_dice, res.heldout_mean_foreground_dice = _dice(
                np.take(pred, idx, axis), np.take(gt, idx, axis), self.num_classes)
            res.observed_mean_foreground_dice = _dice(
                np.take(pred, rest, axis), np.take(gt, rest, axis), self.num_classes)[1]
        return res

    def render_plane(self, fit: LatentFit, centre_mm: Sequence[float], u: Sequence[float],
                     v: Sequence[float], size: tuple[int, int],
                     pixel_mm: float | tuple[float, float] = 1.0, frame: float = 0.0) -> PlaneView:
        """Image and labels of a fitted latent on an arbitrary plane (world mm).

        Args:
            fit: a latent fitted to a 3D or 3D + t image.
            centre_mm: ``(3,)`` plane centre in the image's world space (mm).
            u, v: ``(3,)`` in-plane directions (world; normalised, ``v`` orthogonalised).
            size: ``(nu, nv)`` pixels.
            pixel_mm: pixel size(s) in mm.
            frame: time frame for 3D + t (fractional frames interpolate in time).

        Returns:
            :class:`PlaneView` with ``(nu, nv)`` arrays and the plane's affine. Points outside
            the fitted field of view are extrapolated by the network (no masking).
        """
        self._check_fit(fit)
        if self.spatial_ndim == 2:
            raise ValueError("oblique planes need a 3D or 3D + t model")
        pts, affine = plane_points(centre_mm, u, v, size, pixel_mm)
        spatial = fit.shape[:3]
        c = world_to_coords(pts, fit.affine, spatial, fit.spacing if self.config.keep_aspect else None,
                            keep_aspect=self.config.keep_aspect).float()
        fr = None
        if self.spatial_ndim == 4:
            T = fit.shape[3]
            fr = float(frame)
            t = torch.full((c.shape[0], 1), (2 * fr + 1) / T - 1)
            c = torch.cat([c, t], 1)
        out = self._evaluate(c[None], fit.latent[None])
        nu, nv = int(size[0]), int(size[1])
        return PlaneView(out["image"][0, :, 0].numpy().reshape(nu, nv),
                         out["labels"][0].numpy().reshape(nu, nv), affine, fr)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        """Write network weights, training latents, config, chosen step count and its curve."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.train_latents is not None:
            tensors["train_latents"] = self.train_latents
        save_checkpoint(path, self.method, tensors, {
            "config": asdict(self.config), "label_names": self.label_names,
            "spatial_ndim": self.spatial_ndim, "in_channels": self.in_channels,
            "infer_steps": self.infer_steps, "val_curve": self.val_curve,
            "history": self.history, "num_params": self.num_params})

    @classmethod
    def load(cls, path: str | Path) -> "NISF":
        tensors, meta = load_checkpoint(path, cls.method)
        cfg = NISFConfig(**meta["config"])
        obj = cls(meta["label_names"], meta["spatial_ndim"], meta["in_channels"], cfg)
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        try:
            obj.net.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(path, f"weights do not match the stored config "
                                   f"({str(exc).splitlines()[0]})") from None
        obj.train_latents = tensors.get("train_latents")
        obj.infer_steps = int(meta.get("infer_steps", cfg.infer_steps))
        obj.val_curve = list(meta.get("val_curve", []))
        obj.history = list(meta.get("history", []))
        return obj


def config_from_preset(preset: str = "nisf-cpu", **overrides: Any) -> NISFConfig:
    """A :class:`NISFConfig` from a :data:`PRESETS` name, with keyword overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown NISF preset {preset!r} ({', '.join(PRESETS)})")
    return replace(NISFConfig(**PRESETS[preset]), **overrides)
