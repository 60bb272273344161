"""NISF's configuration: :class:`NISFConfig`, the presets, the network a config describes and
the :data:`RECIPE` the registry reads.

Presets (``inrseg train nisf --preset P``; ``inrseg config nisf --preset P`` prints them):

* ``nisf-paper``: the paper's settings: 8 Gabor layers x 128, whole frames per step, Adam lr
  1e-4, 672 inference steps (GPU-sized);
* ``nisf-cpu``: the same network on random voxel subsets (8,192 per case and step), lr 1e-3,
  a 300-step inference curve;
* ``nisf-cpu-small``: 4 layers x 64 on 4,096 voxels per step, a 200-step inference curve.

The default preset is ``nisf-cpu-small`` for all data (2D, 3D and 3D + t). With a
``budget_minutes``, no ``steps`` override and a constant schedule, a preset that sets ``steps``
trains until the budget ends (:func:`config_from_preset`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from inrseg.engine import OPEN_ENDED_STEPS
from inrseg.methods.configs import Recipe
from inrseg.nn.gabor import ACTIVATIONS
from inrseg.nn.nisf import NISFNet

__all__ = ["DEFAULT_PRESET", "NISFConfig", "PRESETS", "RECIPE", "build_network", "config_from_preset",
           "default_preset"]


@dataclass
class NISFConfig:
    """Hyper-parameters of NISF (saved in the checkpoint). Defaults follow the paper. ``h``: a
    latent code; coordinates are in the normalised units of
    :func:`inrseg.data.grids.coordinate_grid` (the largest physical axis spans [-1, 1])."""

    # network
    activation: str = "gabor"           # "gabor" (WIRE) | "sine" (SIREN) | "relu" (+ Gaussian Fourier features)
    width: int = 128                    # hidden units W of every layer
    depth: int = 8                      # activation layers: 1 input + (depth - 1) residual
    latent_size: int | None = None      # latent size L; None: = width (added at the first residual unprojected)
    w0: float | None = None             # Gabor / sine frequency; None: 10 (Gabor), 30 (sine)
    s0: float = 10.0                    # Gabor envelope width multiplier
    fourier_frequencies: int = 128      # "relu" only: number of random Fourier features
    fourier_sigma: float = 10.0         # "relu" only: std of the Fourier frequencies (cycles per unit)
    # prior training
    steps: int = 2000                   # prior-training optimiser steps
    subjects_per_step: int = 1          # cases per step and rank (the paper: 1)
    points_per_step: int | None = None  # random voxels per case and step; None: the whole frame
    lr: float = 1e-4                    # Adam learning rate of the network weights
    latent_lr: float | None = None      # Adam learning rate of the training latents; None: = lr
    alpha: float = 10.0                 # weight of the reconstruction BCE (training and inference)
    latent_reg: float = 1e-4            # weight of mean(h^2) per image (training and inference)
    lr_schedule: str = "constant"       # "constant" | "cosine" (both Adams decay to 0 over `steps`, a half cosine)
    weight_reg: float = 1e-4            # weight of sum(p^2) over the backbone's parameters (heads excluded)
    coord_jitter: float = 1e-4          # std of the Gaussian noise added to training coordinates
    annotated_frame_fraction: float = 0.5  # 3D+t with ignored voxels: share of frame draws among the annotated frames
    latent_init_std: float = 1e-2       # initial latents h ~ N(0, std^2), training and inference
    augment: int = 0                    # augmented copies per training case, each with its own latent
    augment_rotate: float = 0.1         # max rotation of an augmented copy (rad)
    augment_scale: float = 0.1          # max relative scaling of an augmented copy
    augment_translate: float = 0.0      # max shift of an augmented copy (fraction of the grid's extent)
    augment_elastic: float = 0.0        # RMS displacement (voxels) of a copy's smooth deformation (0: affine only)
    save_every: int = 100               # training-state (resume file) interval in steps
    budget_minutes: float | None = None  # wall time of the whole fit (prior training + steps curve)
    # inference
    infer_lr: float = 1e-4              # Adam learning rate of the latent fitted to a test image
    infer_steps: int = 672              # latent-fitting steps when no validation cases choose them
    infer_max_steps: int = 1000         # length of the validation steps curve
    curve_every: int = 25               # validation Dice every this many steps of the curve
    infer_points: int | None = None     # random voxels per image and inference step; None: all (chunked)
    # data / numerics
    keep_aspect: bool = True            # coordinates keep the physical aspect of the grid (mm), not [0, 1] per axis
    normalization: str = "minmax"       # intensity normalisation to [0, 1] (inrseg.data.preprocess.normalize)
    chunk: int = 16384                  # max points per inference forward pass (all images of a batch)
    seed: int = 0                       # seeds the weights, the latents' initialisation and every draw

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
        """The latent size ``L``."""
        return self.width if self.latent_size is None else int(self.latent_size)


#: preset name -> config fields
PRESETS: dict[str, dict[str, Any]] = {
    "nisf-paper": dict(),
    "nisf-cpu": dict(lr=1e-3, points_per_step=8192, infer_points=8192, infer_lr=1e-2,
                     infer_max_steps=300, curve_every=20, infer_steps=200, steps=3000),
    "nisf-cpu-small": dict(width=64, depth=4, lr=1e-3, points_per_step=4096, infer_points=4096,
                           infer_lr=1e-2, infer_max_steps=200, curve_every=20, infer_steps=100,
                           steps=3000),
}

#: the preset of ``inrseg train nisf`` and ``bench`` for all data
DEFAULT_PRESET = "nisf-cpu-small"


def default_preset(spatial_ndim: int) -> str:
    """The preset for data of ``spatial_ndim`` grid axes: :data:`DEFAULT_PRESET` for all."""
    return DEFAULT_PRESET


def config_from_preset(preset: str = DEFAULT_PRESET, **overrides: Any) -> NISFConfig:
    """A :class:`NISFConfig` from a :data:`PRESETS` name, with keyword overrides.

    A preset's ``steps`` is the length of a run without a time limit: with a ``budget_minutes``,
    no ``steps`` override and a constant schedule, the prior trains until the budget ends
    instead (``steps`` = :data:`inrseg.engine.OPEN_ENDED_STEPS`). A cosine schedule needs its
    length and keeps the preset's.

    Raises:
        ValueError: an unknown preset, or a value the config refuses.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown NISF preset {preset!r} ({', '.join(PRESETS)})")
    cfg = replace(NISFConfig(**PRESETS[preset]), **overrides)
    if ("steps" in PRESETS[preset] and "steps" not in overrides and cfg.budget_minutes is not None
            and cfg.lr_schedule == "constant"):
        cfg = replace(cfg, steps=OPEN_ENDED_STEPS)
    return cfg


def _build(preset: str, spatial_ndim: int, overrides: dict[str, Any]) -> NISFConfig:
    return config_from_preset(preset, **overrides)


#: how the registry makes a NISF config: :func:`config_from_preset` (no data-dependent defaults)
RECIPE = Recipe(NISFConfig, PRESETS, default_preset, _build)


def build_network(cfg: NISFConfig, coord_dim: int, num_classes: int, out_channels: int) -> NISFNet:
    """:class:`~inrseg.nn.nisf.NISFNet` with ``cfg``'s architecture:
    ``coords (B, N, coord_dim), latents (B, L) -> (B, N, num_classes), (B, N, out_channels)``.
    Its layers draw their initial weights from the global torch RNG."""
    return NISFNet(coord_dim, num_classes, out_channels, activation=cfg.activation,
                   width=cfg.width, depth=cfg.depth, latent_dim=cfg.latent_dim, w0=cfg.w0,
                   s0=cfg.s0, fourier_frequencies=cfg.fourier_frequencies,
                   fourier_sigma=cfg.fourier_sigma, seed=cfg.seed)
