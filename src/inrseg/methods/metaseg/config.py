"""MetaSeg's configuration: :class:`MetaSegConfig`, the presets and the :data:`RECIPE` the
registry reads.

Presets (``inrseg train metaseg --preset P``; ``inrseg config metaseg --preset P`` prints them):

* ``2d-seg4``: 2D, 5 classes: 6 linear layers x 128, focal gamma 1, a phase-2 head with
  context (the features 4 voxels away along each axis too), trained at lr 1e-3 for 500 steps
  on every training image;
* ``2d-seg24``: 2D, 24 classes + background: 5 layers x 512, focal gamma 2;
* ``3d-seg4``: 3D, 5 classes: 6 layers x 256, focal gamma 3, MSE weight 0.1 on background
  voxels, the phase-2 head of ``2d-seg4``;
* ``2d-seg4-paper``, ``2d-seg24-paper``, ``3d-seg4-paper``: the same networks with the published
  (GPU-sized) training settings, :data:`PAPER_SETTINGS`: every pixel in every inner, outer and
  test-time step, Adam lr 1e-4 throughout and constant, the joint inner loss, 5,000 outer
  steps, the paper's per-point phase-2 head (lr 1e-4, 300 steps).

The default preset is ``3d-seg4`` for 3D data and ``2d-seg4`` for 2D data (:func:`default_preset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inrseg.methods.configs import Recipe

__all__ = ["MetaSegConfig", "PAPER_SETTINGS", "PRESETS", "RECIPE", "default_preset"]


@dataclass
class MetaSegConfig:
    """Hyper-parameters of MetaSeg (saved in the checkpoint). ``theta``: the SIREN ``f``'s
    parameters; ``phi``: the head ``g``'s; ``T_f``: the test-time step count."""

    # network
    hidden: int = 128                      # width h of f and of the head's hidden layer
    layers: int = 6                        # linear layers of f (layers - 1 sine layers)
    w0: float = 30.0                       # SIREN frequency factor: sin(w0 * (W x + b))
    head_hidden: int | None = None         # hidden width of the head (None: hidden, as in the paper)
    head_layers: int = 2                   # linear layers of the head (2: the paper's Linear -> LeakyReLU -> Linear)
    # loss: MSE(pixels) + seg_weight * focal(labels)
    focal_gamma: float = 1.0               # focal loss exponent gamma (0: cross-entropy)
    seg_weight: float = 1.0                # weight of the focal loss beside the pixel MSE
    bg_mse_weight: float = 1.0             # MSE weight of background pixels (intensity == 0)
    # meta-training
    steps: int = 5000                      # outer (meta) steps; the budget may stop sooner
    meta_batch: int = 1                    # tasks (images) per outer step and rank
    inner_steps: int = 2                   # inner-loop steps per task (one support subset each)
    inner_loss: str = "joint"              # "joint": MSE + focal, theta and phi adapted; "pixels": MSE, theta only (= test time)
    inner_lr: float = 1e-4                 # inner Adam lr (initial value of the learned lrs with meta_sgd)
    outer_lr: float = 1e-4                 # outer Adam lr (peak of the schedule)
    first_order: bool = False              # first-order MAML throughout
    first_order_steps: int = 0             # warm-up: this many first-order outer steps first
    meta_sgd: bool = False                 # learn per-parameter inner learning rates (Meta-SGD)
    inner_optimizer: str = "adam"          # inner and test-time update: "adam" (differentiable Adam) | "sgd" (theta - lr * g)
    points_per_task: int | None = 2048     # random pixels per inner / outer step (None: all)
    query_pixels: str = "fresh"            # outer-loss pixels: "fresh" random subset | "same" as the first inner step's
    outer_schedule: str = "cosine"         # outer lr: "constant" | "cosine" (after outer_warmup)
    outer_warmup: int = 250                # linear warm-up steps of the outer lr (scaled by T / steps under a budget)
    grad_clip: float | None = 10.0         # outer gradient-norm clip (None: off)
    fit_schedule_to_budget: bool = True    # a budget that allows fewer outer steps than `steps`: warm-up + cosine over the steps it allows
    val_every: int = 100                   # outer steps between validations (best meta-parameters kept)
    val_fit_steps: int = 25                # test-time steps of the meta-training validation
    val_max_cases: int = 4                 # validation images scored during meta-training
    val_max_voxels: int | None = 65536     # an image with more voxels is scored on this many fixed random ones (None: all)
    budget_minutes: float | None = None    # wall-time limit of the whole fit (meta-training + phase 2)
    # test time
    test_lr: float | None = None           # test-time Adam lr (None: inner_lr)
    tf_candidates: tuple[int, ...] = (25, 50, 100)   # T_f values tried on the validation images
    default_tf: int = 25                   # T_f when there is no validation data
    fit_points: int | None = 4096          # random pixels per test-time Adam step (None: all)
    fit_batch: int = 1                     # images fitted at once (stacked parameters)
    # phase 2: head retraining on fitted features, per candidate T_f
    phase2_steps: int = 300                # head Adam steps per candidate T_f (0: keep the meta-learned head)
    head_context: float = 0.0              # > 0: the phase-2 head also reads the features +- this many voxels along each axis (1 + 2 d points); 0: per point
    phase2_lr: float = 1e-4                # Adam lr of the phase-2 head
    phase2_points: int = 4096              # pixels per training image whose features are kept
    phase2_max_cases: int | None = 12      # training images fitted for phase 2 (None: all)
    phase2_batch: int = 8192               # feature vectors per head step
    phase2_val_every: int = 50             # head steps between validations (best head kept)
    val_points: int = 4096                 # pixels per validation image for the choice of T_f and head
    # misc
    normalization: str = "minmax"          # intensity normalisation of each image (inrseg.data.preprocess.normalize)
    keep_aspect: bool = False              # coordinates keep the grid's physical aspect ratio (else [-1, 1] per axis)
    chunk: int = 16384                     # points per forward chunk (memory bound)
    seed: int = 0                          # seed of the initialisation and of every random draw

    def __post_init__(self) -> None:
        for name, allowed in (("inner_loss", ("pixels", "joint")), ("inner_optimizer", ("adam", "sgd")),
                              ("query_pixels", ("fresh", "same")), ("outer_schedule", ("constant", "cosine"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r} ({', '.join(allowed)})")


#: the published training settings, applied on top of a network preset by the ``*-paper`` presets
PAPER_SETTINGS: dict[str, Any] = dict(
    points_per_task=None, fit_points=None, inner_lr=1e-4, outer_lr=1e-4, inner_loss="joint", steps=5000,
    phase2_lr=1e-4, phase2_steps=300, head_context=0.0, phase2_max_cases=None, outer_schedule="constant",
    outer_warmup=0, val_every=50)

_NETWORKS: dict[str, dict[str, Any]] = {
    "2d-seg4": dict(hidden=128, layers=6, focal_gamma=1.0, head_context=4.0, phase2_lr=1e-3, phase2_steps=500,
                    phase2_max_cases=None),
    "2d-seg24": dict(hidden=512, layers=5, focal_gamma=2.0),
    "3d-seg4": dict(hidden=256, layers=6, focal_gamma=3.0, bg_mse_weight=0.1, head_context=4.0, phase2_lr=1e-3,
                    phase2_steps=500, phase2_max_cases=None),
}

#: preset name -> config fields
PRESETS: dict[str, dict[str, Any]] = {
    **_NETWORKS,
    **{f"{name}-paper": {**fields, **PAPER_SETTINGS} for name, fields in _NETWORKS.items()},
}


def default_preset(spatial_ndim: int) -> str:
    """The preset for data of ``spatial_ndim`` grid axes: ``3d-seg4`` for 3D, ``2d-seg4`` for 2D."""
    return "3d-seg4" if spatial_ndim >= 3 else "2d-seg4"


#: how the registry makes a MetaSeg config (the preset's fields, then the overrides)
RECIPE = Recipe(MetaSegConfig, PRESETS, default_preset)
