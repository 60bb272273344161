"""NISF: Neural Implicit Segmentation Functions (Stolt-Anso et al., MICCAI 2023).

An auto-decoder. One MLP ``f(c, h) -> (class probabilities, intensity)`` maps a continuous
coordinate ``c`` and a per-subject latent code ``h`` to a segmentation and a reconstruction of
the image. Prior training learns the MLP and one latent per training image jointly, with labels.
At test time the MLP is frozen and a fresh latent is optimised on the image intensities alone;
the segmentation head then reads labels anywhere in continuous space: on the image grid, on a
finer grid, in slices that were held out of the fit, or on an arbitrary oblique plane.

Network (:class:`~inrseg.nn.nisf.NISFNet`; see ``shared/METHODS.md``)
    ``x_0 = G_0([c, h]) + h``, ``x_k = G_k(x_{k-1}) + x_{k-1}`` (k = 1..depth-1), with real Gabor
    (WIRE) layers ``G`` (:mod:`inrseg.nn.gabor`); heads ``softmax(Linear(x, C))`` and
    ``sigmoid(Linear(x, C_in))``. Defaults: depth 8, width 128, latent 128, w0 = s0 = 10.
    SIREN (``activation="sine"``) and ReLU + Gaussian Fourier features (``"relu"``) are
    selectable for ablations. bf16 autocast is off unless forced: sine and Gabor activations
    at w0 = 10-30 lose their phase in bf16.

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
    Each image's terms are means over its own points. With an ignore label (a sparsely
    labelled cine) the reconstruction term still covers every point, the two segmentation terms
    only the labelled ones (an image drawn without any labelled point has segmentation loss 0).
    The soft Dice is MONAI's
    :class:`~monai.losses.DiceLoss` (smooth 1 in numerator and denominator, see
    :func:`soft_dice_loss`). Intensities: :func:`inrseg.data.preprocess.normalize` ``"minmax"``.
    Adam (one for the network, one for the latents), constant lr (``lr_schedule="cosine"``:
    both decay to 0 over ``steps`` steps, a half cosine). One latent per training
    *case* (for 3D+t one case is one subject across all its frames). A step draws
    ``subjects_per_step`` cases, for 3D+t one random frame of each, and either all its voxels
    (the paper) or ``points_per_step`` random ones (CPU presets); Gaussian jitter of std
    ``coord_jitter`` is added to the training coordinates. A sparsely labelled cine (a case with
    ignored voxels, e.g. labels at end-diastole only) would give a segmentation signal to one
    step in ``T`` only, so for such a case the frame is drawn, with probability
    ``annotated_frame_fraction`` (default 0.5), among the frames that hold annotated voxels,
    else uniformly among all frames (the reconstruction loss stays on every frame drawn); a
    case without ignored voxels draws uniformly, exactly as before. The step's cases are stacked
    (zero-padded to the largest) into one ``(B, N, d)`` forward pass.

Training runs on the engine (:func:`inrseg.engine.run_training`): resumable (a state file
every ``save_every`` steps), per-step draws a pure function of ``(seed, step, rank)``, so a
resumed run reproduces an uninterrupted one. Under torchrun the network trains under DDP and
each rank *owns* the latents of its share ``r::world`` of the training cases: it loads and
draws only those cases, so only their rows of the ``(n, L)`` latent table receive gradients
(the other rows have zero gradient and zero Adam moments and never move); the table and its
Adam moments are gathered (a sum of each rank's own rows) for the resume state and the
checkpoint. A step's global batch is ``world x subjects_per_step`` cases (a rank owning
fewer cases draws all of its own).

Time budget (``budget`` / ``config.budget_minutes``) bounds the whole :meth:`NISF.fit`:
prior training gets the time that is left after the validation steps curve, whose cost is
estimated on the validation cases before training (the mean of 4 timed latent steps x
``infer_max_steps`` + a timed Dice evaluation x the curve's evaluations, all timed warm: the
first call pays one-off costs of many steps) with a 50 % margin for a busy machine, but never
less than half of the time; the curve stops at the deadline and keeps the best step so far.

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
    on test data. The Dice is the project's one definition (:func:`inrseg.metrics.score_case`:
    for 3D + t the mean over the annotated frames of the per-frame 3D Dice, ignored voxels
    excluded), the one ``inrseg evaluate`` reports.

Devices: the network and the optimisation live on ``device``; image data stays on the CPU and
moves to the device chunk by chunk; results (labels, latents) come back on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from inrseg.engine.checkpoints import load_checkpoint, save_checkpoint
from inrseg.methods.base import check_spatial_ndim
from inrseg.data.augment import augmented_pair, copy_seed
from inrseg.data.grids import (coordinate_grid, resampled_affine, resampled_shape,
                               world_to_coords)
from inrseg.data.io import IGNORE, Volume, label_array
from inrseg.data.planes import PlaneView, heldout_mask, plane_points
from inrseg.data.preprocess import normalize
from inrseg.core.errors import InputError
from inrseg.metrics import score_case
from inrseg.nn.gabor import ACTIVATIONS
from inrseg.nn.nisf import NISFNet
from inrseg.core.progress import progress, status
from inrseg.eval.evaluate import save_plane_png
from inrseg.engine import (OPEN_ENDED_STEPS, Budget, LoopSettings, TrainTask, all_reduce_sum_,
                             as_budget, broadcast_object, resolve_device, run_training, shard,
                             step_rng, use_bf16, world, wrap_ddp)

# NISFNet, PlaneView, heldout_mask, plane_points and save_plane_png live in inrseg.nn.nisf,
# inrseg.data.planes and inrseg.eval.evaluate; re-exported here for existing imports.
__all__ = ["DEFAULT_PRESET", "NISF", "NISFConfig", "NISFNet", "PRESETS", "LatentFit", "HeldOutResult", "PlaneView",
           "build_network", "config_from_preset", "heldout_mask", "plane_points", "save_plane_png",
           "soft_dice_loss"]

#: margin on the estimated cost of the validation steps curve when splitting the budget
_CURVE_MARGIN = 1.5
#: prior training gets at least this share of the budget left when it starts
_MIN_PRIOR_SHARE = 0.5


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
    lr_schedule: str = "constant"       # "constant" | "cosine" (to 0 over `steps`, both Adams)
    weight_reg: float = 1e-4            # x sum(p^2) over the backbone
    coord_jitter: float = 1e-4          # std of Gaussian noise on training coordinates
    annotated_frame_fraction: float = 0.5  # 3D+t with ignored voxels: share of frame draws among
                                        # the annotated frames (the rest: uniform over all frames)
    latent_init_std: float = 1e-2       # h ~ N(0, std^2) (variance 1e-4), training and inference
    augment: int = 0                    # augmented copies per training case, each with its own
                                        # latent (inrseg.data.augment: affine + intensity)
    augment_rotate: float = 0.1         # max rotation of a copy (rad)
    augment_scale: float = 0.1          # max relative scaling of a copy
    augment_translate: float = 0.0      # max shift of a copy (fraction of the grid's extent)
    augment_elastic: float = 0.0        # RMS displacement (voxels) of a copy's smooth random
                                        # deformation (0: affine only)
    save_every: int = 100               # training-state interval (steps)
    budget_minutes: float | None = None  # wall time of the whole fit (prior + steps curve)
    # inference
    infer_lr: float = 1e-4              # Adam on the latent
    infer_steps: int = 672              # used when no validation cases choose it
    infer_max_steps: int = 1000         # length of the validation steps curve
    curve_every: int = 25               # validation Dice every this many steps
    infer_points: int | None = None     # random voxels per image and step; None: all (chunked)
    # data / numerics
    keep_aspect: bool = True            # physical aspect of the coordinates (see module doc)
    normalization: str = "minmax"
    chunk: int = 16384                  # max points per inference forward pass
    seed: int = 0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r} ({', '.join(ACTIVATIONS)})")
        if self.depth < 1 or self.width < 1:
            raise ValueError("depth and width must be positive")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if (self.augment < 0 or self.augment_rotate < 0 or not 0 <= self.augment_scale < 1
                or not 0 <= self.augment_translate < 1 or self.augment_elastic < 0):
            raise ValueError("augment must be >= 0, augment_rotate >= 0, augment_scale and "
                             "augment_translate in [0, 1), augment_elastic >= 0")
        if not 0.0 <= self.annotated_frame_fraction <= 1.0:
            raise ValueError(f"annotated_frame_fraction must lie in [0, 1], got "
                             f"{self.annotated_frame_fraction}")

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



def build_network(cfg: NISFConfig, coord_dim: int, num_classes: int, out_channels: int) -> NISFNet:
    """:class:`~inrseg.nn.nisf.NISFNet` with ``cfg``'s architecture:
    ``coords (B, N, coord_dim), latents (B, L) -> (B, N, num_classes), (B, N, out_channels)``."""
    return NISFNet(coord_dim, num_classes, out_channels, activation=cfg.activation,
                   width=cfg.width, depth=cfg.depth, latent_dim=cfg.latent_dim, w0=cfg.w0,
                   s0=cfg.s0, fourier_frequencies=cfg.fourier_frequencies,
                   fourier_sigma=cfg.fourier_sigma, seed=cfg.seed)


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


# ============================================================================================
# small pure helpers
# ============================================================================================

def _labels_for_metrics(a: np.ndarray) -> np.ndarray:
    """A 1D label array as ``(n, 1)`` for :func:`score_case` (Dice is reshape-invariant);
    2D, 3D and 3D + t arrays unchanged (3D + t is scored per frame)."""
    return a[:, None] if a.ndim == 1 else a


def _dice(pred: np.ndarray, gt: np.ndarray, num_classes: int,
          ignore_label: int | None = None) -> tuple[np.ndarray, float]:
    """Per-class Dice ``(C,)`` and mean foreground Dice: :func:`inrseg.metrics.score_case`
    without distances (3D + t ``(X, Y, Z, T)``: the mean over annotated frames), voxels of
    ``gt`` equal to ``ignore_label`` excluded."""
    m = score_case(_labels_for_metrics(pred), _labels_for_metrics(gt), num_classes,
                   distances=False, ignore_label=ignore_label)
    return m.dice, m.mean_foreground_dice


def soft_dice_loss(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Per-image soft Dice loss ``(B,)`` of class probabilities and one-hot labels ``(B, C, N)``.

    ``1 - mean_c (2 sum_n p y + 1) / (sum_n p + sum_n y + 1)``, background included: MONAI's
    :class:`~monai.losses.DiceLoss` with smooth 1 in numerator and denominator. Points where
    ``p = y = 0`` (padding) add nothing.
    """
    loss = DiceLoss(include_background=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")
    with torch.device(probs.device):  # MONAI's losses make tensors without a device
        return loss(probs, onehot).flatten(1).mean(1)


def _point_weights(sizes: Sequence[int]) -> torch.Tensor:
    """``(B, max n_b)`` on the CPU: ``1 / n_b`` on the ``n_b`` points of item ``b``, 0 on its
    padding, so a weighted sum over points is each item's own mean."""
    w = torch.zeros(len(sizes), max(sizes), device="cpu")
    for b, n in enumerate(sizes):
        w[b, :n] = 1.0 / n
    return w


def _seg_weights(labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` weights of the segmentation loss: ``1 / M_b`` on the ``M_b`` labelled points
    (label not ``IGNORE``, weight > 0) of item ``b``, 0 elsewhere (all 0 if it has none)."""
    labelled = ((labels != IGNORE) & (weight > 0)).to(weight.dtype)
    return labelled / labelled.sum(-1, keepdim=True).clamp(min=1.0)


def _gather_rows(table: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The whole ``(n, ...)`` table on every rank, each row from the rank that owns it.

    ``own (n,)`` bool marks this rank's rows; every row has exactly one owner, so the sum over
    ranks of ``table`` with the other rows zeroed is the owners' rows. A copy (detached).
    """
    mask = own.reshape(-1, *([1] * (table.dim() - 1))).to(table.dtype)
    return all_reduce_sum_(table.detach() * mask)


# ============================================================================================
# the method
# ============================================================================================

@dataclass
class _Subject:
    """One image prepared for NISF: ``N = prod(S)`` points, flattened in C order."""

    coords: torch.Tensor            # (N, d) float32
    intensity: torch.Tensor         # (N, C_in) float32 in [0, 1]
    labels: torch.Tensor | None     # (N,) int64, IGNORE (-1) where unlabelled
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    time_step: float | None
    path: Path | None = None


class NISF:
    """Neural Implicit Segmentation Functions behind the :class:`~inrseg.methods.base.Segmenter`
    protocol (2D, 3D and 3D + t images).

    Args:
        label_names: class names indexed by label value (background first).
        spatial_ndim: grid axes of the images: 2, 3 or 4 (3D + t; time is a 4th coordinate).
        in_channels: image channels (all are reconstructed).
        config: hyper-parameters (default: the paper's).
        device: where the network lives and trains (``"cpu"``, ``"cuda:0"``, ``"auto"``...).
    """

    method: ClassVar[str] = "nisf"
    #: grid dimensionalities it segments
    spatial_ndims: ClassVar[tuple[int, ...]] = (2, 3, 4)
    #: bf16 autocast is not safe: Gabor / sine activations lose their phase in bf16
    bf16_safe: ClassVar[bool] = False

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: NISFConfig | None = None, device: str | torch.device = "cpu") -> None:
        check_spatial_ndim(type(self), spatial_ndim)
        self.config = config or NISFConfig()
        self.label_names = list(label_names)
        self.spatial_ndim = int(spatial_ndim)
        self.in_channels = int(in_channels)
        self.device = resolve_device(device)
        cuda = [self.device.index] if self.device.type == "cuda" else []
        with torch.device(self.device), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.config.seed)  # the same initial weights on every rank
            self.net = build_network(self.config, self.spatial_ndim, self.num_classes, self.in_channels)
        self.train_latents: torch.Tensor | None = None   # (n_train, L) after fit, on the CPU
        self.infer_steps: int = self.config.infer_steps
        self.val_curve: list[dict] = []
        self.history: list[dict] = []

    def to(self, device: str | torch.device) -> "NISF":
        """Run the network on ``device`` (``"cuda"``...). Image data stays in host memory and
        is moved chunk by chunk; results (labels, latents) are returned on the CPU."""
        self.device = resolve_device(device)
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
            la = label_array(labels).reshape(-1)        # the ignore value (if any) -> IGNORE
            known = la[la != IGNORE]
            if known.size and (known.min() < 0 or known.max() >= self.num_classes):
                raise InputError(labels.path, f"label values must lie in [0, {self.num_classes - 1}]")
            lab = torch.from_numpy(la if sel is None else la[sel])
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

    @torch.no_grad()
    def _evaluate(self, coords: torch.Tensor, latents: torch.Tensor, want_image: bool = True,
                  want_probs: bool = False) -> dict[str, torch.Tensor]:
        """Chunked forward of ``coords (B, N, d)`` under ``latents (B, L)``: labels ``(B, N)``,
        intensities ``(B, N, C_in)`` and optionally probabilities ``(B, N, C)``, on the CPU."""
        self.net.eval()
        B, N = coords.shape[:2]
        labels = torch.empty(B, N, dtype=torch.int64, device="cpu")
        image = torch.empty(B, N, self.in_channels, device="cpu") if want_image else None
        probs = torch.empty(B, N, self.num_classes, device="cpu") if want_probs else None
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
                       labels: torch.Tensor, intensity: torch.Tensor, weight: torch.Tensor,
                       latents: torch.Tensor, seg_weight: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over the ``B`` images of a step of each image's loss (terms are means over the
        image's own points; the segmentation terms over its labelled points).

        Args:
            seg_logits: ``(B, N, C)``; rec_logits: ``(B, N, C_in)``.
            labels: ``(B, N)`` int64 (``IGNORE`` where unlabelled); intensity: ``(B, N, C_in)``
                in [0, 1].
            weight: ``(B, N)``: ``1 / N_b`` on the ``N_b`` points of image ``b``, 0 on padding.
            latents: ``(B, L)``.
            seg_weight: ``(B, N)`` weights of the segmentation terms: ``1 / M_b`` on the ``M_b``
                labelled points of image ``b``, 0 elsewhere (:func:`_seg_weights`); ``None``:
                ``weight`` (every point labelled).

        Returns:
            the scalar loss and the batch means of its ``bce``, ``dice`` and ``rec`` terms.
        """
        cfg = self.config
        seg_weight = weight if seg_weight is None else seg_weight
        with torch.autocast(self.device.type, enabled=False):  # losses in fp32 under bf16
            p = torch.softmax(seg_logits.float(), -1)                               # (B, N, C)
            onehot = F.one_hot(labels.clamp(min=0), self.num_classes).to(p.dtype)   # IGNORE -> 0, masked
            valid = (seg_weight > 0).to(p.dtype)[..., None]                         # (B, N, 1)
            bce = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), onehot, reduction="none")
            bce_seg = (bce.mean(-1) * seg_weight).sum(-1)                           # (B,)
            dice = soft_dice_loss((p * valid).transpose(1, 2), (onehot * valid).transpose(1, 2))
            rec = F.binary_cross_entropy_with_logits(rec_logits.float(), intensity, reduction="none")
            rec = (rec.mean(-1) * weight).sum(-1)
            lat = cfg.latent_reg * latents.float().pow(2).mean(-1)
            total = (bce_seg + dice + cfg.alpha * rec + lat).mean()
        return total, {"bce": bce_seg.mean().item(), "dice": dice.mean().item(), "rec": rec.mean().item()}

    # ------------------------------------------------------------------ prior training
    def initial_train_latents(self, n: int) -> torch.Tensor:
        """The seeded prior-training initialisation ``(n, L) ~ N(0, latent_init_std^2)``, CPU."""
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        return torch.randn(n, cfg.latent_dim, generator=gen, device="cpu") * cfg.latent_init_std

    def fit(self, train: Sequence[Any], val: Sequence[Any] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Train the prior (network + one latent per training case), then choose the number of
        inference steps on ``val`` (best mean foreground Dice; ``config.infer_steps`` without
        ``val``).

        ``train`` / ``val``: :class:`~inrseg.data.layouts.Case` objects or ``(image, labels)``
        Volume pairs. ``state_path``: resumable training state, written every ``save_every``
        steps and at the end; if it exists, training continues from it. ``budget``: deadline of
        the whole call, prior training and steps curve (default: ``config.budget_minutes``
        from now; see the module doc for the split). ``log_path``: per-step metrics (JSON
        lines). ``precision``: ``auto`` (fp32: :attr:`bf16_safe` is off), ``fp32`` or ``bf16``.

        With ``config.augment = K``, every training case also gets K augmented copies
        (:func:`inrseg.data.augment.augmented_pair`, seeded by ``(seed, case, copy)``), each with
        its own latent: ``train_latents`` holds ``n * (1 + K)`` rows, the cases first.

        Under torchrun every rank calls it: rank ``r`` loads and trains the cases
        ``r::world`` (their latents, their copies'), DDP averages the network's gradients, rank 0 alone
        loads ``val`` and runs the steps curve, and every rank ends with the same model.
        """
        cfg = self.config
        budget = as_budget(budget, cfg.budget_minutes)
        rank, size = world()
        n, L = len(train), cfg.latent_dim
        if n == 0:
            raise ValueError("NISF.fit needs at least one training case")
        if n < size:
            raise InputError(None, f"{n} training cases for {size} ranks: NISF needs at least one "
                                   f"case per rank")
        mine = shard(range(n))
        subjects: dict[int, _Subject] = {}
        k_aug = cfg.augment
        for i in progress(mine, desc="loading training cases"):
            img, lab = self._load_pair(train[i])
            if lab is None:
                raise InputError(img.path, "NISF prior training needs labelled cases")
            subjects[i] = self._prepare(img, lab)
            for c in range(1, k_aug + 1):  # copy c of case i has latent row c * n + i
                subjects[c * n + i] = self._prepare(*augmented_pair(
                    img, lab, copy_seed(cfg.seed, i, c), cfg.augment_rotate, cfg.augment_scale,
                    cfg.augment_translate, cfg.augment_elastic))
        # the latent table: the n cases, then k_aug blocks of n copies; a rank owns its cases and
        # their copies
        mine = sorted(subjects)
        n = n * (1 + k_aug)
        # with unlabelled (ignored) points the segmentation terms are means over the labelled ones
        sparse = any(bool((s.labels == IGNORE).any()) for s in subjects.values())
        frames_of = {i: self._annotated_frames(s) for i, s in subjects.items()}
        val_subs = []
        if rank == 0:
            pairs = [self._load_pair(v) for v in (val or [])]
            val_subs = [self._prepare(img, lab) for img, lab in pairs if lab is not None]
        prior_budget = budget.share(self._prior_share(val_subs, budget))

        own = torch.as_tensor(np.isin(np.arange(n), mine), device=self.device)      # (n,) bool
        latents = nn.Parameter(self.initial_train_latents(n).to(self.device))       # (n, L)
        opt_net = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        opt_lat = torch.optim.Adam([latents], lr=cfg.latent_lr if cfg.latent_lr is not None else cfg.lr)
        schedulers = []
        if cfg.lr_schedule == "cosine":
            total = max(1, cfg.steps)
            schedulers = [torch.optim.lr_scheduler.LambdaLR(
                o, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
                for o in (opt_net, opt_lat)]
        train_net = wrap_ddp(self.net, self.device)

        def step(i: int) -> tuple[torch.Tensor, dict[str, float]]:
            rng = step_rng(cfg.seed, i, rank)
            k = min(cfg.subjects_per_step, len(mine))
            picks = [int(j) for j in rng.choice(mine, size=k, replace=False)]
            samples = [self._sample_points(subjects[j], rng, frames_of[j]) for j in picks]
            coords, inten, labs = (pad_sequence([s[c] for s in samples], batch_first=True).to(self.device)
                                   for c in range(3))                   # (B, N, d), (B, N, C_in), (B, N)
            weight = _point_weights([s[0].shape[0] for s in samples]).to(self.device)   # (B, N)
            h = latents[torch.as_tensor(picks, device=self.device)]                     # (B, L)
            seg, rec = train_net(coords, h)
            seg_w = _seg_weights(labs, weight) if sparse else None
            loss, parts = self._training_loss(seg, rec, labs, inten, weight, h, seg_w)
            if cfg.weight_reg > 0:
                loss = loss + cfg.weight_reg * sum(p.pow(2).sum() for p in self.net.backbone_parameters())
            return loss, parts

        def weights() -> dict[str, torch.Tensor]:
            return {**{f"net.{k}": v for k, v in self.net.state_dict().items()},
                    "latents": _gather_rows(latents, own)}

        def load_weights(w: dict[str, torch.Tensor]) -> None:
            if tuple(w["latents"].shape) != (n, L):
                raise InputError(state_path, f"training state has {w['latents'].shape[0]} latents, "
                                             f"the training set {n} cases")
            self.net.load_state_dict({k[4:]: v for k, v in w.items() if k.startswith("net.")})
            with torch.no_grad():  # own rows only: the others stay as an uninterrupted run left them
                latents.copy_(torch.where(own[:, None], w["latents"].to(self.device), latents))

        moments = ("exp_avg", "exp_avg_sq")

        def extra_state() -> dict[str, torch.Tensor]:
            st = opt_lat.state[latents]
            return {f"latent_{k}": _gather_rows(st[k], own) for k in moments}

        def load_extra_state(extra: dict[str, torch.Tensor]) -> None:
            st = opt_lat.state[latents]  # rank 0's, loaded by the engine: own rows only here
            for k in moments:
                st[k].copy_(extra[f"latent_{k}"].to(self.device) * own[:, None])

        res = run_training(
            TrainTask(name="nisf prior", method=self.method, step=step, optimizers=[opt_net, opt_lat],
                      schedulers=schedulers,
                      params=[*self.net.parameters(), latents], weights=weights,
                      load_weights=load_weights, modules=[self.net], grad_sync="ddp",
                      extra_state=extra_state, load_extra_state=load_extra_state,
                      bf16=use_bf16(self.device, precision, self.bf16_safe)),
            LoopSettings(steps=cfg.steps, val_every=cfg.save_every, budget=prior_budget, seed=cfg.seed,
                         state_path=state_path, log_path=log_path, device=self.device))
        self.history = res.history
        self.train_latents = _gather_rows(latents, own).cpu()
        self.net.eval()

        chosen = self._steps_curve(val_subs, budget) if val_subs else None
        chosen = broadcast_object(chosen)
        if chosen is None:
            self.infer_steps = cfg.infer_steps
        else:
            self.infer_steps, self.val_curve = chosen
            status(f"nisf: {self.infer_steps} inference steps chosen on {len(val_subs)} validation cases")

    def _prior_share(self, val_subs: list[_Subject], budget: Budget) -> float:
        """The share of ``budget``'s remaining time that prior training gets (the same on every
        rank: rank 0, which holds ``val_subs``, decides): all of it without a time limit or
        validation cases, else what the validation steps curve leaves (its estimated cost, see
        :meth:`_curve_seconds`, x 1.5), but at least half."""
        share = 1.0
        if budget.limited and val_subs:
            need = _CURVE_MARGIN * self._curve_seconds(val_subs)
            share = min(1.0, max(_MIN_PRIOR_SHARE, 1.0 - need / max(budget.remaining_s(), 1e-9)))
        return float(broadcast_object(share))

    def _annotated_frames(self, s: _Subject) -> np.ndarray | None:
        """The frames of a 3D + t case that hold an annotated voxel, ``(k,)`` int64, when the
        case has ignored voxels; ``None`` otherwise (not 3D + t, no labels, or fully labelled:
        frames are then drawn uniformly)."""
        if self.spatial_ndim != 4 or s.labels is None:
            return None
        known = (s.labels != IGNORE).reshape(-1, s.shape[3])        # C order: time fastest
        if bool(known.all()):
            return None
        return np.flatnonzero(known.any(0).numpy()).astype(np.int64)

    def _sample_points(self, s: _Subject, rng: np.random.Generator,
                       annotated_frames: np.ndarray | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training sample of a case: a random frame (4D), all or ``points_per_step`` of its
        voxels, with coordinate jitter. Returns ``coords (n, d)``, ``intensity (n, C_in)``,
        ``labels (n,)``, on the CPU.

        ``annotated_frames`` (:meth:`_annotated_frames`; a sparsely labelled cine): with
        probability ``annotated_frame_fraction`` the frame is one of them, else any frame. With
        ``None`` (or an empty array, or a fraction of 0) no extra number is drawn, so the draws
        are those of a fully labelled case."""
        cfg = self.config
        if self.spatial_ndim == 4:
            T = s.shape[3]
            if (annotated_frames is not None and annotated_frames.size and
                    cfg.annotated_frame_fraction > 0 and rng.random() < cfg.annotated_frame_fraction):
                t = int(annotated_frames[rng.integers(annotated_frames.size)])
            else:
                t = int(rng.integers(T))
            idx = torch.arange(t, s.coords.shape[0], T, device="cpu")   # C order: time is the fastest axis
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
        """The seeded inference initialisation ``(L,) ~ N(0, latent_init_std^2)``, CPU."""
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed + 1)
        return torch.randn(self.config.latent_dim, generator=gen, device="cpu") * self.config.latent_init_std

    def _optimise_latents(self, coords: list[torch.Tensor], targets: list[torch.Tensor],
                          steps: int,
                          callback: Callable[[int, torch.Tensor], bool | None] | None = None,
                          desc: str = "fitting latents") -> torch.Tensor:
        """Optimise one latent per image on reconstruction BCE + latent L2, network frozen.

        Args:
            coords: per image ``(N_b, d)`` coordinates of the observed voxels (CPU).
            targets: per image ``(N_b, C_in)`` intensities in [0, 1] (CPU).
            steps: Adam steps.
            callback: called as ``callback(step, latents (B, L))`` after step 0 (the initial
                latent) and after every step; returning ``True`` ends the fit there.

        Returns:
            latents ``(B, L)`` on the CPU.
        """
        cfg = self.config
        B = len(coords)
        sizes = [c.shape[0] for c in coords]
        n_max = max(sizes)
        d = coords[0].shape[1]
        X = pad_sequence(list(coords), batch_first=True)             # (B, n_max, d)
        Y = pad_sequence(list(targets), batch_first=True)            # (B, n_max, C_in)
        Wt = _point_weights(sizes)                                   # (B, n_max), 0 on padding
        h = self.initial_latent().expand(B, -1).clone().to(self.device).requires_grad_(True)
        opt = torch.optim.Adam([h], lr=cfg.infer_lr)
        use_subsets = cfg.infer_points is not None and cfg.infer_points < n_max
        with self._frozen():
            stop = callback is not None and bool(callback(0, h.detach().cpu()))
            for step in progress(range(steps), desc=desc):
                if stop:
                    break
                opt.zero_grad(set_to_none=True)
                if use_subsets:
                    # the same draw for every image (seeded by step): batch-independent results
                    idx = torch.stack([torch.from_numpy(np.random.default_rng([cfg.seed, step]).choice(
                        sizes[b], size=min(cfg.infer_points, sizes[b]), replace=False))
                        if sizes[b] > cfg.infer_points else
                        torch.arange(sizes[b], device="cpu").repeat(
                            math.ceil(cfg.infer_points / sizes[b]))[: cfg.infer_points]
                        for b in range(B)])                                   # (B, n)
                    xs = torch.gather(X, 1, idx[..., None].expand(-1, -1, d))
                    ys = torch.gather(Y, 1, idx[..., None].expand(-1, -1, self.in_channels))
                    ws = torch.full(idx.shape, 1.0 / idx.shape[1], device="cpu")
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
                stop = callback is not None and bool(callback(step + 1, h.detach().cpu()))
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

    def select_infer_steps(self, val_pairs: Sequence[tuple[Volume, Volume]],
                           budget: Budget | None = None) -> tuple[int, list[dict]]:
        """Steps curve on validation cases: mean foreground Dice every ``curve_every`` steps up
        to ``infer_max_steps`` (all cases fitted in one batch); stops early, keeping the best
        step so far, when ``budget`` expires. Returns the best step (>= 1; ``infer_steps`` if
        the curve has none) and the curve ``[{"step", "dice", "per_case"}]``."""
        return self._steps_curve([self._prepare(img, lab) for img, lab in val_pairs], budget)

    def _steps_curve(self, subs: list[_Subject], budget: Budget | None = None) -> tuple[int, list[dict]]:
        """:meth:`select_infer_steps` of prepared, labelled cases."""
        cfg = self.config
        budget = budget if budget is not None else Budget(None)
        gts = [s.labels.numpy().reshape(s.shape) for s in subs]
        curve: list[dict] = []
        every = max(1, cfg.curve_every)

        def record(step: int, lat: torch.Tensor) -> bool:
            over = budget.expired()
            if step % every and step != cfg.infer_max_steps and not over:
                return False
            scores = self._curve_scores(subs, gts, lat)
            curve.append({"step": step, "dice": float(np.nanmean(scores)),
                          "per_case": [float(x) for x in scores]})
            return over

        self._optimise_latents([s.coords for s in subs], [s.intensity for s in subs],
                               cfg.infer_max_steps, callback=record, desc="validation steps curve")
        if curve[-1]["step"] < cfg.infer_max_steps:
            status(f"nisf: time budget reached at step {curve[-1]['step']} of the validation steps curve")
        candidates = [c for c in curve if c["step"] >= 1 and not math.isnan(c["dice"])]
        best = max(candidates, key=lambda c: c["dice"]) if candidates else {"step": cfg.infer_steps}
        return int(best["step"]), curve

    def _curve_scores(self, subs: list[_Subject], gts: list[np.ndarray], lat: torch.Tensor) -> list[float]:
        """Mean foreground Dice of each case under its latent ``lat[b]`` (``lat (B, L)``), on its
        grid: :func:`inrseg.metrics.score_case` (3D + t: mean over annotated frames), unlabelled
        voxels (``IGNORE`` in ``gts``) excluded."""
        scores = []
        for b, (s, gt) in enumerate(zip(subs, gts)):
            coords, shape = s.coords, s.shape
            if self.spatial_ndim == 4:  # only the annotated frames are scored: predict only those
                frames = np.flatnonzero((gt != IGNORE).reshape(-1, shape[3]).any(0))
                if frames.size < shape[3]:
                    d = coords.shape[-1]
                    coords = coords.reshape(*shape, d)[..., torch.from_numpy(frames), :].reshape(-1, d)
                    shape, gt = (*shape[:3], int(frames.size)), gt[..., frames]
            pred = self._evaluate(coords[None], lat[b: b + 1], want_image=False)["labels"][0]
            scores.append(_dice(pred.numpy().reshape(shape), gt, self.num_classes, IGNORE)[1])
        return scores

    def _curve_seconds(self, subs: list[_Subject]) -> float:
        """Estimated wall time of the steps curve on ``subs``: the time of a latent step x
        ``infer_max_steps`` plus that of a Dice evaluation x the curve's evaluations, both timed
        warm (the first call of each pays one-off costs many times a step's). The network's
        weights do not change the cost."""
        cfg = self.config
        gts = [s.labels.numpy().reshape(s.shape) for s in subs]
        stamps: list[float] = []
        lat = self._optimise_latents([s.coords for s in subs], [s.intensity for s in subs], 5,
                                     callback=lambda step, h: stamps.append(time.perf_counter()),
                                     desc="timing the steps curve")
        per_step = (stamps[5] - stamps[1]) / 4                    # steps 2 to 5
        self._curve_scores(subs, gts, lat)
        t0 = time.perf_counter()
        self._curve_scores(subs, gts, lat)
        per_evaluation = time.perf_counter() - t0
        evaluations = cfg.infer_max_steps // max(1, cfg.curve_every) + 2
        return cfg.infer_max_steps * per_step + evaluations * per_evaluation

    # ------------------------------------------------------------------ inference: outputs
    def _check_fit(self, fit: LatentFit) -> None:
        if fit.spatial_ndim != self.spatial_ndim or fit.latent.shape != (self.config.latent_dim,):
            raise ValueError("this LatentFit does not belong to this model")

    def segment(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map ``(*S',)`` of a fitted latent on the image grid resampled by ``scale``
        (``S' = round(S * scale)``, a number for all axes or one per axis) with the matching
        affine (:func:`~inrseg.data.grids.resampled_affine`)."""
        return self._render_grid(fit, scale)[0]

    def probabilities(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Softmax class probabilities ``(num_classes, *S')`` float32 of a fitted latent on the
        grid of :meth:`segment` (whose labels are their argmax)."""
        self._check_fit(fit)
        new_shape, affine, ts = self._grid_geometry(fit, scale)
        out = self._evaluate(self._coords(fit.shape, fit.spacing, scale)[None], fit.latent[None],
                             want_image=False, want_probs=True)
        data = out["probs"][0].T.numpy().reshape((self.num_classes,) + new_shape).astype(np.float32)
        return Volume(data, affine, self.spatial_ndim, ts, path=fit.path)

    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """:meth:`probabilities` of ``image``'s fitted latent (the fit of :meth:`predict`)."""
        return self.probabilities(self.fit_latents([image])[0], scale)

    def reconstruct(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Reconstructed intensities ``(C_in, *S')`` in the normalised [0, 1] range."""
        return self._render_grid(fit, scale)[1]

    def _grid_geometry(self, fit: LatentFit, scale: float | Sequence[float]
                       ) -> tuple[tuple[int, ...], np.ndarray, float | None]:
        """Shape, affine and time step of ``fit``'s grid resampled by ``scale``."""
        new_shape = resampled_shape(fit.shape, scale)
        affine = fit.affine if new_shape == tuple(fit.shape) else resampled_affine(fit.affine, fit.shape, new_shape)
        ts = fit.time_step
        if self.spatial_ndim == 4 and ts is not None and new_shape[3] != fit.shape[3]:
            ts = ts * fit.shape[3] / new_shape[3]
        return new_shape, affine, ts

    def _render_grid(self, fit: LatentFit, scale: float | Sequence[float]) -> tuple[Volume, Volume]:
        self._check_fit(fit)
        new_shape, affine, ts = self._grid_geometry(fit, scale)
        coords = self._coords(fit.shape, fit.spacing, scale)
        out = self._evaluate(coords[None], fit.latent[None])
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
            gt = label_array(labels)                      # unlabelled voxels -> IGNORE, excluded
            if gt.shape != image.shape:
                raise InputError(labels.path, "label shape does not match the image")
            idx = res.indices
            rest = [i for i in range(image.shape[axis]) if i not in set(idx)]
            pred = lab_vol.data
            res.heldout_dice, res.heldout_mean_foreground_dice = _dice(
                np.take(pred, idx, axis), np.take(gt, idx, axis), self.num_classes, IGNORE)
            res.observed_mean_foreground_dice = _dice(
                np.take(pred, rest, axis), np.take(gt, rest, axis), self.num_classes, IGNORE)[1]
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
            t = torch.full((c.shape[0], 1), (2 * fr + 1) / T - 1, device="cpu")
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
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "NISF":
        """Read a checkpoint written by :meth:`save` onto ``device``."""
        tensors, meta = load_checkpoint(path, cls.method)
        cfg = NISFConfig(**meta["config"])
        obj = cls(meta["label_names"], meta["spatial_ndim"], meta["in_channels"], cfg, device=device)
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


#: the CPU default of ``inrseg train nisf`` and ``bench``: on brain3d-seg4 the 4 x 64 prior
#: after 6 minutes scores what the 8 x 128 one scores after 60 (0.680 / 0.674 test Dice, 3
#: augmented copies each) and fits a test volume 8x faster (docs/findings/nisf.md)
DEFAULT_PRESET = "nisf-cpu-small"


def config_from_preset(preset: str = DEFAULT_PRESET, **overrides: Any) -> NISFConfig:
    """A :class:`NISFConfig` from a :data:`PRESETS` name, with keyword overrides.

    The CPU presets' ``steps`` (3,000) is the length of a run without a time limit. With a
    ``budget_minutes`` and no ``steps`` override, a constant-lr prior trains until the budget
    ends instead (``steps`` = :data:`inrseg.engine.OPEN_ENDED_STEPS`): a 5-minute budget used to stop after
    ~2 minutes of 3,000 steps. A cosine schedule needs its length and keeps the preset's.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown NISF preset {preset!r} ({', '.join(PRESETS)})")
    cfg = replace(NISFConfig(**PRESETS[preset]), **overrides)
    if ("steps" in PRESETS[preset] and "steps" not in overrides and cfg.budget_minutes is not None
            and cfg.lr_schedule == "constant"):
        cfg = replace(cfg, steps=OPEN_ENDED_STEPS)
    return cfg
