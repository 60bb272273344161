"""MetaSeg ("Fit Pixels, Get Labels"): meta-learned SIREN + segmentation head.

A SIREN ``f_theta`` maps coordinates to intensities; a shallow head ``g_phi`` reads labels off
``f``'s last sine-layer features (``inrseg.nn.siren``). The head is the paper's
``Linear(h, h) -> LeakyReLU -> Linear(h, C)``; ``head_hidden`` / ``head_layers`` give a
wider / deeper one (an option only: it did not help, ``docs/findings/metaseg.md``).
Training (:meth:`MetaSeg.fit`):

1. **Meta-training** (second-order MAML, :func:`meta_loss`): per task (one training image) a
   differentiable Adam adapts the network for ``inner_steps`` steps, the outer Adam minimises
   MSE + focal loss after adaptation. Inner loop (``inner_loss``): ``"joint"`` (default, the
   paper's code: MSE + focal, ``theta`` and ``phi``) or ``"pixels"`` (MSE only, ``theta``
   only: exactly what test time does). The loop is a pure function of a parameter dict
   (``inrseg.nn.siren``'s functional forward, equal to ``torch.func.functional_call`` on
   ``SirenSeg``), differentiated with ``torch.autograd.grad(create_graph=True)``. Random
   coordinate subsets per inner / outer step (``points_per_task``), meta-batch >= 1,
   first-order option and first-order warm-up, Meta-SGD option (learned per-parameter inner learning rates).
   Validation every ``val_every`` steps fits ``theta`` to the validation images' pixels
   (head frozen, MSE only, exactly as at test time) and scores Dice with that adapted
   network; the best meta-parameters are kept. The outer loop is the training engine's
   (:func:`inrseg.engine.run_training`: budget, validation cadence, best state, resume
   state, metrics log); under torchrun every rank computes its share of each meta-batch and
   the engine averages the meta-gradients by hand (DDP has no double backward).
2. **Phase 2 + choice of T_f**: ``theta*`` is fitted (MSE only) to training and validation
   images; the penultimate features at each candidate step count ``t`` in ``tf_candidates``
   are stored on random pixel subsets. For every ``t`` a head is retrained from ``phi*`` on
   the training features (focal loss, best on validation kept; an engine run too), and scored
   on the validation features; the ``(t, head)`` with the best validation Dice becomes
   ``(T_f, phi)``. The Dice-vs-steps curve is stored in the checkpoint (``tf_curve``).
   Validation Dice here is computed on ``val_points`` random pixels per image (an estimate;
   full images in step 1). Under torchrun phase 2 runs on rank 0 and its result is broadcast.
3. **Test time** (:meth:`MetaSeg.predict`): copy ``theta*``, Adam on MSE only for ``T_f``
   steps (head frozen), labels = argmax of the head on any coordinates: the image grid, a
   finer/coarser grid (``scale``), or given points (:meth:`MetaSeg.predict_points`).
   Several images are fitted at once with stacked parameters (one batched matmul per layer,
   :meth:`MetaSeg.predict_batch`); Adam is element-wise, so this equals one-at-a-time fitting.

The wall-time budget (``budget_minutes`` or the ``budget`` of :meth:`MetaSeg.fit`) bounds steps
1 and 2 together: meta-training stops early enough to leave phase 2 its estimated time.

Deviations of the CPU defaults from the paper / official code (``--paper`` restores it), and
why (measured in ``docs/findings/metaseg.md``):

* meta-training steps use ``points_per_task`` random pixels of the image, test-time and
  validation fits ``fit_points`` (``None``: whole images, the paper's);
* the outer lr is warmed up and cosine-decayed instead of constant;
* the head is retrained per candidate ``T_f`` (phase 2 of the paper, generalised) so the
  head always matches the step count it is used with;
* ``head_context`` (off in the paper): the phase-2 head also reads the features at a few
  voxels' distance along each axis, a small receptive field for a per-point head. The
  meta-learned head stays the paper's; the phase-2 head starts as ``phi*`` (zero weights on
  the neighbours' features);
* background MSE weighting (3D preset) uses intensity == 0 as background, since test time has
  no labels.

Ignore label: pixels without a label (a dataset's ``dataset.json`` ``"ignore"``) keep their MSE
term; the focal loss (inner ``joint`` loop, outer loss, phase-2 head) is the mean over the
labelled pixels only, phase 2 stores features at labelled pixels, and the validation Dice skips
unlabelled pixels. Without an ignore label every computation is unchanged.

Experiments and their result files: ``docs/findings/metaseg.md``
(``benchmarks/metaseg_experiments.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses.focal_loss import softmax_focal_loss

from inrseg.engine.checkpoints import load_checkpoint, save_checkpoint
from inrseg.methods.base import check_spatial_ndim
from inrseg.data.grids import axis_scales, coordinate_grid, resampled_affine, resampled_shape
from inrseg.data.io import IGNORE, Volume, label_array
from inrseg.data.layouts import Case
from inrseg.data.preprocess import check_input, normalize
from inrseg.core.errors import InputError
from inrseg.metrics import case_metrics
from inrseg.nn.siren import Params, full_forward, head_forward, init_params, siren_features, siren_forward
from inrseg.core.progress import progress, status
from inrseg.engine import (SCHEDULE_STEPS_KEY, Budget, LoopSettings, TrainTask, as_budget, broadcast_object,
                             resolve_device, run_training, seconds_per_call, step_rng, steps_that_fit,
                             torch_generator, use_bf16, world)

PRESETS: dict[str, dict] = {
    # 2D, 5 classes: 6 linear layers x 128 (83K parameters with the head), focal gamma 1. CPU
    # defaults: the phase-2 head reads the features 4 pixels away too, trains at lr 1e-3 for 500
    # steps, on the features of every training image (docs/findings/metaseg.md, 2026-12-05; the
    # paper's: per point, lr 1e-4).
    "2d-seg4": dict(hidden=128, layers=6, focal_gamma=1.0, head_context=4.0, phase2_lr=1e-3, phase2_steps=500,
                    phase2_max_cases=None),
    # 2D, 24 classes + background: 5 layers x 512 (1.06M), focal gamma 2. (At the old inner lr
    # 1e-3 a width-512 SIREN did not fit at all; the default 1e-4 is safe for every width:
    # docs/findings/metaseg.md, "learning rate and width".)
    "2d-seg24": dict(hidden=512, layers=5, focal_gamma=2.0),
    # 3D, 5 classes: 6 layers x 256 (330K), focal gamma 3, MSE weight 0.1 on background voxels;
    # the phase-2 head of 2d-seg4 (7 points; on brain3d-seg4 validation 0.681 against 0.675 for
    # the per-point head, the same meta-learned model: docs/findings/metaseg.md, 2026-12-05).
    "3d-seg4": dict(hidden=256, layers=6, focal_gamma=3.0, bg_mse_weight=0.1, head_context=4.0, phase2_lr=1e-3,
                    phase2_steps=500, phase2_max_cases=None),
}


@dataclass
class MetaSegConfig:
    """Hyper-parameters of MetaSeg (saved in the checkpoint)."""

    # network
    hidden: int = 128                      # width of f and of the head's hidden layer
    layers: int = 6                        # linear layers of f (layers - 1 sine layers)
    w0: float = 30.0
    head_hidden: int | None = None         # hidden width of the head (None: hidden, as the paper)
    head_layers: int = 2                   # linear layers of the head (2: the paper's)
    # loss: MSE(pixels) + seg_weight * focal(labels)
    focal_gamma: float = 1.0
    seg_weight: float = 1.0
    bg_mse_weight: float = 1.0             # MSE weight of background pixels (intensity == 0)
    # meta-training
    steps: int = 5000                      # outer steps (the paper's 5,000; the budget may stop sooner)
    meta_batch: int = 1                    # tasks (images) per outer step and rank
    inner_steps: int = 2
    inner_loss: str = "joint"              # "joint" (paper): MSE + focal, theta and phi adapted;
                                           # "pixels": MSE, theta only (= test time)
    inner_lr: float = 1e-4                 # inner Adam lr (init value of the learned lrs with meta_sgd)
    outer_lr: float = 1e-4
    first_order: bool = False              # first-order MAML throughout
    first_order_steps: int = 0             # warm-up: this many first-order outer steps first
    meta_sgd: bool = False                 # learn per-parameter inner learning rates
    inner_optimizer: str = "adam"          # "adam" (differentiable Adam) | "sgd" (theta - lr * g);
                                           # test time uses the same update
    points_per_task: int | None = 2048     # random pixels per inner/outer step (None: all)
    query_pixels: str = "fresh"            # outer-loss pixels: "fresh" random subset | "same" as
                                           # the first inner step's
    outer_schedule: str = "cosine"         # outer lr: "constant" | "cosine" (after outer_warmup)
    outer_warmup: int = 250                # linear warm-up steps of the outer lr (5 % of steps)
    grad_clip: float | None = 10.0         # outer gradient-norm clip (None: off)
    fit_schedule_to_budget: bool = True    # a budget that allows fewer outer steps than `steps`:
                                           # warm-up + cosine over the steps it allows
    val_every: int = 100
    val_fit_steps: int = 25                # test-time steps used by the meta-training validation
    val_max_cases: int = 4                 # validation images scored during meta-training
    val_max_voxels: int | None = 65536     # ... an image with more voxels (3D) on this many fixed
                                           # random ones (None: all; a 2D slice is scored whole)
    budget_minutes: float | None = None    # wall-time limit of the whole fit (meta-training + phase 2)
    # test time
    test_lr: float | None = None           # test-time Adam lr (None: inner_lr)
    tf_candidates: tuple[int, ...] = (25, 50, 100)   # at lr 1e-4 (docs/findings/metaseg.md)
    default_tf: int = 25                   # T_f when there is no validation data
    fit_points: int | None = 4096          # random pixels per test-time Adam step (None: all)
    fit_batch: int = 1                     # images fitted at once (stacked; 1 is fastest on CPU)
    # phase 2: head retraining on fitted features, per candidate T_f
    phase2_steps: int = 300                # 0: keep the meta-learned head
    head_context: float = 0.0              # > 0: the phase-2 head also reads the features at
                                           # +- this many voxels along each axis (1 + 2 d points;
                                           # docs/findings/metaseg.md); 0: the paper's per-point head
    phase2_lr: float = 1e-4
    phase2_points: int = 4096              # pixels per training image whose features are kept
    phase2_max_cases: int | None = 12      # training images fitted for phase 2 (12 = 24, docs/findings/metaseg.md)
    phase2_batch: int = 8192               # feature vectors per head step
    phase2_val_every: int = 50
    val_points: int = 4096                 # pixels per validation image for T_f / head selection
    # misc
    normalization: str = "minmax"
    keep_aspect: bool = False
    chunk: int = 16384                     # points per forward chunk
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("inner_loss", ("pixels", "joint")), ("inner_optimizer", ("adam", "sgd")),
                              ("query_pixels", ("fresh", "same")), ("outer_schedule", ("constant", "cosine"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r} ({', '.join(allowed)})")


# ============================================================================================
# Losses, inner loop (pure functions of parameter dicts)
# ============================================================================================

def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float,
               labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over points of the focal loss ``-(1 - p_t)^gamma log p_t`` (``p_t``: softmax
    probability of the target class); logits ``(N, C)``, target ``(N,)`` int64. Scalar, in the
    logits' dtype, twice differentiable (second-order MAML).

    ``labelled`` ``(N,)`` bool: the mean is over the labelled points only (0 if there is none;
    the target of the others, e.g. ``IGNORE``, is never read); ``None``: every point.

    MONAI's softmax focal loss (``softmax_focal_loss``, the function behind its ``FocalLoss``)
    on a one-hot target, summed over classes. Not the ``FocalLoss`` module itself: its forward
    casts the logits to float32, so float64 meta-gradients (their finite-difference checks)
    would lose precision.
    """
    if labelled is None:
        onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)            # (N, C)
        return softmax_focal_loss(logits, onehot, gamma).sum(-1).mean()
    onehot = F.one_hot(torch.where(labelled, target, 0), logits.shape[-1]).to(logits.dtype)
    keep = labelled.to(logits.dtype)
    return (softmax_focal_loss(logits, onehot, gamma).sum(-1) * keep).sum() / keep.sum().clamp(min=1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over points (and channels) of ``weight * (pred - target)^2``; ``pred``/``target``
    ``(..., N, C)``, ``weight`` ``(..., N)`` or ``None``. Returns the mean over all leading axes."""
    err = (pred - target).pow(2).mean(-1)
    if weight is not None:
        err = err * weight
    return err.mean()


@dataclass
class Task:
    """Pixels of one image (or a subset of them), on one device.

    Attributes:
        coords: ``(N, d)`` coordinates in [-1, 1].
        pixels: ``(N, C)`` intensities in [0, 1].
        labels: ``(N,)`` int64 class indices (``IGNORE`` where unlabelled).
        weight: ``(N,)`` MSE weights (background down-weighting), or ``None``.
        labelled: ``(N,)`` bool, the pixels with a label; ``None``: all of them.
    """

    coords: torch.Tensor
    pixels: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor | None = None
    labelled: torch.Tensor | None = None

    def subset(self, n: int | None, rng: np.random.Generator) -> "Task":
        """``n`` random points (without replacement, drawn by ``rng``), or ``self`` when ``n`` is
        None / >= N."""
        N = self.coords.shape[0]
        if n is None or n >= N:
            return self
        idx = torch.from_numpy(rng.choice(N, size=n, replace=False)).to(self.coords.device)   # (n,)
        return Task(self.coords[idx], self.pixels[idx], self.labels[idx],
                    None if self.weight is None else self.weight[idx],
                    None if self.labelled is None else self.labelled[idx])


def task_loss(params: Params, task: Task, cfg: MetaSegConfig) -> torch.Tensor:
    """MSE on pixels + ``seg_weight`` x focal loss on the labelled pixels (scalar)."""
    out, logits = full_forward(params, task.coords, cfg.w0)
    return weighted_mse(out, task.pixels, task.weight) + cfg.seg_weight * focal_loss(
        logits, task.labels, cfg.focal_gamma, task.labelled)


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def adam_direction(m: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
    """Adam's update direction ``m_hat / (sqrt(v_hat) + eps)`` after ``t`` steps, with the
    bias-corrected moments of ``m`` and ``v`` (any shape, returned shape). ``+ 1e-30`` inside the
    square root keeps its derivative finite where a gradient is exactly 0."""
    b1, b2 = ADAM_BETAS
    return (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t) + 1e-30).sqrt() + ADAM_EPS)


def inner_adapt(params: Params, support: Sequence[Task], cfg: MetaSegConfig,
                lrs: Params | None = None, create_graph: bool = True) -> dict[str, torch.Tensor]:
    """Differentiable Adam, one step per support task; moments start at 0.

    ``cfg.inner_loss == "pixels"``: MSE on the pixels, ``theta`` only (exactly the test-time
    procedure, so the outer loss measures what test time gets); ``"joint"``: MSE + focal loss,
    ``theta`` and ``phi`` (the paper's code).

    With ``create_graph`` the result is differentiable to second order in ``params`` (MAML);
    without it the gradients are constants (first-order MAML: the result still depends on
    ``params`` through the identity, and on ``lrs`` through the update).

    Returns:
        adapted parameters (same keys and shapes as ``params``).
    """
    b1, b2 = ADAM_BETAS
    if cfg.inner_loss not in ("pixels", "joint"):
        raise ValueError(f"unknown inner_loss {cfg.inner_loss!r} (pixels, joint)")
    joint = cfg.inner_loss == "joint"
    keys = [k for k in params if joint or k.startswith("f.")]
    m = {k: torch.zeros_like(params[k]) for k in keys}
    v = {k: torch.zeros_like(params[k]) for k in keys}
    cur = dict(params)
    for t, task in enumerate(support, 1):
        if joint:
            loss = task_loss(cur, task, cfg)
        else:
            loss = weighted_mse(siren_forward(cur, task.coords, cfg.w0)[0], task.pixels, task.weight)
        grads = torch.autograd.grad(loss, [cur[k] for k in keys], create_graph=create_graph)
        new = dict(cur)
        for k, g in zip(keys, grads):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            lr = lrs[k] if lrs is not None else cfg.inner_lr
            new[k] = cur[k] - lr * (g if cfg.inner_optimizer == "sgd" else adam_direction(m[k], v[k], t))
        cur = new
    return cur


def meta_loss(params: Params, support: Sequence[Task], query: Task, cfg: MetaSegConfig,
              lrs: Params | None = None, create_graph: bool = True) -> torch.Tensor:
    """Outer (query) loss after adapting on ``support``: the MAML objective of one task."""
    return task_loss(inner_adapt(params, support, cfg, lrs, create_graph), query, cfg)


# ============================================================================================
# The segmenter
# ============================================================================================

#: meta-training gets ``1 - (estimated phase-2 time) / (time left)`` of the time left when
#: :meth:`MetaSeg.fit` starts, kept within these bounds
META_SHARE_BOUNDS = (0.25, 0.95)
#: phase-2 time over the time of its timed parts (test-time steps, head gradient steps): the
#: Adam updates, feature extraction and head validations come on top
PHASE2_OVERHEAD = 1.25
#: offset of phase 2's random draws from meta-training's (both are functions of the seed)
PHASE2_SEED = 17
VAL_VOXELS_SEED = 23        # the fixed voxels of the meta-training validation (val_max_voxels)



@dataclass
class _Image:
    """A prepared image: pixels on its grid, flattened, on the model's device. ``labels`` is
    None for unlabelled."""

    shape: tuple[int, ...]
    coords: torch.Tensor                 # (N, d)
    pixels: torch.Tensor                 # (N, C)
    weight: torch.Tensor | None          # (N,)
    labels: torch.Tensor | None = None   # (N,) int64, IGNORE where unlabelled
    labelled: torch.Tensor | None = None  # (N,) bool when some pixel is unlabelled, else None
    step: torch.Tensor | None = None     # (d,) coordinate distance of one voxel along each axis

    def task(self) -> Task:
        assert self.labels is not None
        return Task(self.coords, self.pixels, self.labels, self.weight, self.labelled)


class MetaSeg:
    """MetaSeg segmenter (any number of grid axes; 2D and 3D presets).

    Args:
        label_names: class names indexed by label value.
        spatial_ndim: grid axes of the images (2, 3, or 4 for 3D + t).
        in_channels: image channels.
        config: hyper-parameters.
        device: where the parameters live and every fit runs (``"cpu"``, ``"cuda:0"``, ``"auto"``...).
    """

    method: ClassVar[str] = "metaseg"
    #: grid dimensionalities it segments
    spatial_ndims: ClassVar[tuple[int, ...]] = (2, 3)
    #: sines at w0 = 30 lose their phase in bf16: fp32 unless ``precision="bf16"`` is asked for
    bf16_safe: ClassVar[bool] = False

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: MetaSegConfig | None = None, device: str | torch.device = "cpu") -> None:
        check_spatial_ndim(type(self), spatial_ndim)
        self.config = config or MetaSegConfig()
        self.label_names = list(label_names)
        self.spatial_ndim = spatial_ndim
        self.in_channels = in_channels
        self.device = resolve_device(device)
        cfg = self.config
        self.params: dict[str, torch.Tensor] = init_params(
            spatial_ndim, in_channels, cfg.hidden, cfg.layers, len(self.label_names), cfg.w0,
            torch_generator(cfg.seed), head_hidden=cfg.head_hidden, head_layers=cfg.head_layers,
            device=self.device)
        self.lrs: dict[str, torch.Tensor] | None = (
            {k: torch.full_like(v, cfg.inner_lr) for k, v in self.params.items()} if cfg.meta_sgd else None)
        self.t_f: int = cfg.default_tf
        self.history: list[dict] = []
        self.tf_curve: list[dict] = []
        #: the meta-learned head (g.*) before phase 2 replaced it, for the diagnostics
        self.meta_head: dict[str, torch.Tensor] | None = None
        self.best_step: int | None = None
        self.start_step: int = 0          # outer step the last fit() started from (resume)
        self.timings: dict[str, float] = {}

    def to(self, device: str | torch.device) -> "MetaSeg":
        """Move the parameters (and learned learning rates) to ``device``."""
        self.device = resolve_device(device)
        self.params = {k: v.to(self.device) for k, v in self.params.items()}
        if self.lrs is not None:
            self.lrs = {k: v.to(self.device) for k, v in self.lrs.items()}
        return self

    @property
    def num_params(self) -> int:
        """Parameters of f and the head (learned learning rates not counted)."""
        return sum(v.numel() for v in self.params.values())

    @property
    def theta_keys(self) -> list[str]:
        return [k for k in self.params if k.startswith("f.")]

    # ------------------------------------------------------------------ data
    def _prepare(self, image: Volume, labels: Volume | None = None) -> _Image:
        """``image`` ``(C, *S)`` (and its label map ``(*S)``) as flattened tensors on the device."""
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
        return _Image(tuple(image.shape), coords, pixels, weight, lab, labelled, step)

    def _query_coords(self, image: Volume, scale: float | Sequence[float]) -> torch.Tensor | None:
        """Coordinates ``(M, d)`` of ``image``'s grid resampled by ``scale``, on the device; None
        where that is the image's own grid (:meth:`image_logits` reads it faster)."""
        if resampled_shape(image.shape, scale) == tuple(image.shape):
            return None
        return coordinate_grid(image.shape, image.spacing, self.config.keep_aspect, scale=scale,
                               device=self.device)

    # ------------------------------------------------------------------ test-time fitting
    def _test_lrs(self) -> dict[str, torch.Tensor | float]:
        """Test-time Adam lr per ``theta`` key: learned ``(1, *shape)`` tensors, or a float."""
        cfg = self.config
        if self.lrs is not None:
            return {k: self.lrs[k].detach().clamp_min(0).unsqueeze(0) for k in self.theta_keys}
        lr = cfg.test_lr if cfg.test_lr is not None else cfg.inner_lr
        return {k: lr for k in self.theta_keys}

    def fit_theta(self, images: Sequence[_Image], steps: int, snapshots: Sequence[int] = (),
                  gen: torch.Generator | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Fit one copy of ``theta*`` per image (stacked, all images of one grid shape), Adam on
        MSE only, head untouched. ``gen``: CPU generator of the pixel draws (default: seeded
        with ``config.seed``).

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
        lrs = self._test_lrs()
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
                c = coords[idx]                                               # (B, n, d)
                y = pixels.gather(1, idx.unsqueeze(-1).expand(-1, -1, pixels.shape[-1]))
                out, _ = siren_forward(theta, c, cfg.w0)
                err = (out - y).pow(2).mean(-1)                               # (B, n)
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
        order: the point, ``+`` axis 0 ... ``+`` axis d-1, ``-`` axis 0 ... ``-`` axis d-1.
        ``step``: one voxel in coordinates, ``(d,)`` or per image ``(B, d)``. Neighbours outside
        the grid are read off the INR all the same (it is defined everywhere)."""
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
    def logits(self, theta: Params, coords: torch.Tensor, head: Params | None = None,
               step: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``(B, M, C)`` of stacked ``theta`` at ``coords`` ``(M, d)`` or
        ``(B, M, d)`` through the head (default: the model's), ``chunk`` points at a time;
        ``step`` (the image's voxel step, :class:`_Image`) is needed by a head with context."""
        head = self.params if head is None else head
        points = head["g.0.weight"].shape[1] // self.config.hidden
        per = max(256, self.config.chunk // points)
        return torch.cat([head_forward(head, self.head_inputs(theta, coords[..., s:s + per, :], step, points))
                          for s in range(0, coords.shape[-2], per)], dim=-2)

    @torch.no_grad()
    def image_logits(self, theta: Params, im: _Image, head: Params | None = None) -> torch.Tensor:
        """Class logits ``(B, N, C)`` at every voxel of the prepared image ``im`` (its grid, C
        order), for ``B`` stacked fits of images of ``im``'s shape and voxel step.

        Equals :meth:`logits` at ``im.coords`` up to float rounding, faster for a head with
        context: the features are computed once per voxel of the grid padded by ``head_context``
        voxels on every side (the padding read off the INR, which is defined everywhere), and
        the neighbours' are slices of it - ``(prod(S + 2k) / prod(S))`` feature evaluations per
        voxel instead of ``1 + 2 d`` (2D 160 x 192: 1.1 instead of 5)."""
        head = self.params if head is None else head
        points = head["g.0.weight"].shape[1] // self.config.hidden
        k = self.config.head_context
        if points == 1 or k != int(k):
            return self.logits(theta, im.coords, head, im.step)
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

    def _fit_predict(self, images: Sequence[Volume], queries: Sequence[torch.Tensor | None],
                     probabilities: bool = False) -> list[torch.Tensor]:
        """Labels ``(M_i,)`` int64 (on the device) at ``queries[i]`` ``(M_i, d)`` (None: every
        voxel of the image's own grid) after fitting each image for ``T_f`` steps - or, with
        ``probabilities``, the head's softmax ``(M_i, C)``; images of one shape are fitted
        together, ``fit_batch`` at a time."""
        prepared = [self._prepare(im) for im in images]
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.shape, []).append(i)
        for idxs in groups.values():
            for s in range(0, len(idxs), self.config.fit_batch):
                block = idxs[s:s + self.config.fit_batch]
                theta = None
                for _, theta in self.fit_theta([prepared[i] for i in block], self.t_f):
                    pass
                for j, i in enumerate(block):
                    one = {k: v[j:j + 1] for k, v in theta.items()}
                    logits = (self.image_logits(one, prepared[i]) if queries[i] is None
                              else self.logits(one, queries[i], step=prepared[i].step))[0]
                    out[i] = torch.softmax(logits, -1) if probabilities else logits.argmax(-1)
        return out  # type: ignore[return-value]

    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map ``(*S',)`` int64 of ``image`` (``(C, *S)``), ``S' = round(S * scale)``, with
        the affine of the resampled grid (the image's own affine for ``scale == 1``)."""
        return self.predict_batch([image], scale)[0]

    def predict_batch(self, images: Sequence[Volume], scale: float | Sequence[float] = 1.0) -> list[Volume]:
        """:meth:`predict` of several images, fitted together (stacked parameters)."""
        queries = [self._query_coords(im, scale) for im in images]
        labels = self._fit_predict(images, queries)
        result = []
        for im, lab in zip(images, labels):
            new_shape = resampled_shape(im.shape, scale)
            affine = im.affine if new_shape == tuple(im.shape) else resampled_affine(im.affine, im.shape, new_shape)
            result.append(Volume(lab.reshape(new_shape).cpu().numpy().astype(np.int64), np.asarray(affine, float),
                                 self.spatial_ndim, im.time_step, path=im.path))
        return result

    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """The head's softmax ``(num_classes, *S')`` float32 after the test-time fit, on the grid
        of :meth:`predict` (whose labels are its argmax)."""
        q = self._query_coords(image, scale)
        probs = self._fit_predict([image], [q], probabilities=True)[0]                # (M, C)
        new_shape = resampled_shape(image.shape, scale)
        affine = image.affine if new_shape == tuple(image.shape) else resampled_affine(image.affine, image.shape,
                                                                                         new_shape)
        data = probs.T.reshape((len(self.label_names),) + new_shape).cpu().numpy().astype(np.float32)
        return Volume(data, np.asarray(affine, float), self.spatial_ndim, image.time_step, path=image.path)

    def predict_points(self, image: Volume, coords: torch.Tensor | np.ndarray) -> np.ndarray:
        """Labels ``(N,)`` int64 at continuous coordinates ``(N, d)`` (the convention of
        :mod:`inrseg.data.grids`: cell-centred, [-1, 1] per axis) after fitting ``image``."""
        q = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
        if q.dim() != 2 or q.shape[1] != self.spatial_ndim:
            raise ValueError(f"coords must be (N, {self.spatial_ndim}), got {tuple(q.shape)}")
        return self._fit_predict([image], [q])[0].cpu().numpy().astype(np.int64)

    # ------------------------------------------------------------------ training
    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Meta-train on ``train``; choose the meta-parameters, ``T_f`` and the retrained head
        on ``val`` (never on test data).

        ``budget`` (default: ``config.budget_minutes`` from now) bounds the whole call, phase 2
        included. ``state_path``: resumable meta-training state (phase 2 is redone after a
        resume); ``log_path``: meta-training's per-step metrics. ``precision``: fp32 unless
        ``"bf16"`` (sines need fp32). Under torchrun every rank meta-trains its share of each
        meta-batch (``meta_batch`` tasks per rank); phase 2 and the choice of ``T_f`` run on
        rank 0 and every rank ends with its result.
        """
        cfg = self.config
        budget = as_budget(budget, cfg.budget_minutes)
        rank, size = world()
        train_s = [self._prepare(*c.load()) for c in progress(train, desc="loading training cases")]
        val_s = [self._prepare(*c.load()) for c in (val or [])]
        bf16 = use_bf16(self.device, precision, self.bf16_safe)
        # The budget split. Phase 2 fits each of its images (at most phase2_max_cases training
        # images, and the validation images) for max(T_f candidates) test-time steps, then
        # retrains one head per candidate for phase2_steps. Its time is estimated here (rank 0)
        # from a few timed test-time steps and head gradient steps (x PHASE2_OVERHEAD), plus one
        # meta-training validation (the last one runs after meta-training's deadline). Meta-
        # training gets the rest of the time left, within META_SHARE_BOUNDS; phase 2 then runs
        # against the whole budget's deadline and cuts itself short where the estimate was low
        # (select_tf_and_head).
        share = broadcast_object(self._meta_share(train_s, val_s, budget) if rank == 0 else None)
        meta_budget = budget.share(share)
        total = cfg.steps  # a resumed run gets its schedule back with its state
        if cfg.fit_schedule_to_budget and not (state_path is not None and Path(state_path).exists()):
            total = broadcast_object(self._steps_within(train_s, val_s[:cfg.val_max_cases], meta_budget)
                                     if rank == 0 else None)
        t0 = time.perf_counter()
        res = run_training(
            self._meta_task(train_s, val_s[:cfg.val_max_cases], bf16, total),
            LoopSettings(steps=total, val_every=cfg.val_every, budget=meta_budget,
                         seed=cfg.seed, state_path=state_path, log_path=log_path, device=self.device))
        self.params = {k: v.detach() for k, v in self.params.items()}
        if self.lrs is not None:
            self.lrs = {k: v.detach() for k, v in self.lrs.items()}
        self.history, self.best_step, self.start_step = res.history, res.best_step, res.start_step
        t1 = time.perf_counter()
        if rank == 0:
            self.select_tf_and_head(train_s, val_s, budget, bf16)
        if size > 1:  # rank 0's T_f, heads and T_f curve on every rank
            heads = None
            if rank == 0:
                heads = ({k: v.cpu() for k, v in self.params.items() if k.startswith("g.")},
                         None if self.meta_head is None else {k: v.cpu() for k, v in self.meta_head.items()})
            self.t_f, heads, self.tf_curve = broadcast_object((self.t_f, heads, self.tf_curve) if rank == 0 else None)
            self.params.update({k: v.to(self.device) for k, v in heads[0].items()})
            self.meta_head = None if heads[1] is None else {k: v.to(self.device) for k, v in heads[1].items()}
        self.timings = {"meta_train_s": t1 - t0, "phase2_and_tf_s": time.perf_counter() - t1,
                        "meta_share": share, "schedule_steps": self._schedule_steps}

    def _meta_share(self, train_s: Sequence[_Image], val_s: Sequence[_Image], budget: Budget) -> float:
        """Meta-training's share of the time left (see the budget split in :meth:`fit`)."""
        if not budget.limited:
            return 1.0
        cfg = self.config
        fb = cfg.fit_batch
        fitting = self.fit_theta([im for im in train_s if im.shape == train_s[0].shape][:fb], 4, range(1, 5))
        per_fit_step = seconds_per_call(lambda: next(fitting), self.device)
        n_train = 0 if cfg.phase2_steps <= 0 else (
            len(train_s) if cfg.phase2_max_cases is None else min(len(train_s), cfg.phase2_max_cases))
        cands = self._tf_candidates(bool(val_s))
        fit_steps = (math.ceil(n_train / fb) + math.ceil(len(val_s) / fb)) * max(cands)
        head_s = 0.0
        if n_train:
            head = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items() if k.startswith("g.")}
            rows = torch.zeros(min(cfg.phase2_batch, n_train * cfg.phase2_points), cfg.hidden * self.context_points,
                               device=self.device)
            head["g.0.weight"] = head["g.0.weight"].detach().repeat(1, self.context_points).requires_grad_(True)
            labels = torch.zeros(rows.shape[0], dtype=torch.int64, device=self.device)
            head_s = cfg.phase2_steps * len(cands) * seconds_per_call(lambda: torch.autograd.grad(
                focal_loss(head_forward(head, rows), labels, cfg.focal_gamma), list(head.values())), self.device)
        last_val_s = math.ceil(min(len(val_s), cfg.val_max_cases) / fb) * cfg.val_fit_steps * per_fit_step
        estimate = PHASE2_OVERHEAD * (fit_steps * per_fit_step + head_s) + last_val_s
        lo, hi = META_SHARE_BOUNDS
        return min(hi, max(lo, 1.0 - estimate / max(budget.remaining_s(), 1e-9)))

    def _steps_within(self, train_s: Sequence[_Image], val_s: Sequence[_Image], budget: Budget) -> int:
        """The outer steps T that meta-training plans for: ``config.steps``, or fewer where
        ``budget`` (meta-training's share) would stop it sooner, so that the outer lr's warm-up
        and cosine decay run their whole course within the budget instead of being cut off at
        a high lr. Timed here: two tasks of a meta-batch (after a warm-up one) on a throwaway
        copy of the parameters, plus one validation per ``val_every`` steps
        (:func:`inrseg.engine.steps_that_fit` plans the time)."""
        cfg = self.config
        if not budget.limited or cfg.steps <= 0:
            return cfg.steps
        params = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        lrs = None if self.lrs is None else {k: v.detach().clone().requires_grad_(True) for k, v in self.lrs.items()}
        draws = iter(range(10))

        def one_task() -> None:
            rng = step_rng(cfg.seed, 2 ** 31 - 1, next(draws))           # a step no run reaches
            task = train_s[int(rng.integers(len(train_s)))].task()
            support = [task.subset(cfg.points_per_task, rng) for _ in range(cfg.inner_steps)]
            query = task.subset(cfg.points_per_task, rng)
            loss = meta_loss(params, support, query, cfg, lrs, create_graph=not cfg.first_order)
            torch.autograd.grad(loss, list(params.values()) + list((lrs or {}).values()))

        per_step = seconds_per_call(one_task, self.device, calls=2) * cfg.meta_batch
        if val_s:
            per_step += seconds_per_call(lambda: self._val_dice(val_s, cfg.val_fit_steps), self.device,
                                         calls=1) / max(1, cfg.val_every)
        return steps_that_fit(budget, cfg.steps, per_step, "metaseg meta-training", "the outer lr schedule runs")

    def _meta_task(self, train_s: Sequence[_Image], val_s: Sequence[_Image], bf16: bool = False,
                   total: int | None = None) -> TrainTask:
        """Meta-training (the MAML outer loop) as an engine task, over ``total`` outer steps
        (default ``config.steps``: the length of the lr schedule; the warm-up scales with it; the
        length travels with the weights, so a resumed run keeps it).

        Makes ``self.params`` (and ``self.lrs`` with ``meta_sgd``) leaf tensors that the task
        trains in place. The global meta-batch of step ``s`` holds ``world_size x meta_batch``
        tasks; task ``j`` (its training image and pixel subsets) is drawn from
        ``step_rng(seed, s, j)``, and rank ``r`` computes tasks ``r * meta_batch`` to
        ``(r + 1) * meta_batch - 1``. The step's loss is the mean meta-loss of this rank's tasks
        (their graphs are all held until the backward); the engine averages the meta-gradients,
        the learned learning rates' included, over ranks: the mean over the global meta-batch.
        Validation: mean foreground Dice of ``val_s`` after ``val_fit_steps`` test-time steps.
        """
        cfg = self.config
        rank, _ = world()
        params = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        lrs = None if self.lrs is None else {k: v.detach().clone().requires_grad_(True) for k, v in self.lrs.items()}
        self.params, self.lrs = params, lrs
        trained = {**params, **{f"lr.{k}": v for k, v in (lrs or {}).items()}}
        T = [max(1, cfg.steps if total is None else total)]
        self._schedule_steps = T[0]
        mine = range(rank * cfg.meta_batch, (rank + 1) * cfg.meta_batch)

        def step(s: int) -> tuple[torch.Tensor, dict[str, float]]:
            first_order = cfg.first_order or s < cfg.first_order_steps
            losses = []
            for j in mine:
                rng = step_rng(cfg.seed, s, j)
                task = train_s[int(rng.integers(len(train_s)))].task()
                support = [task.subset(cfg.points_per_task, rng) for _ in range(cfg.inner_steps)]
                query = support[0] if cfg.query_pixels == "same" else task.subset(cfg.points_per_task, rng)
                losses.append(meta_loss(params, support, query, cfg, lrs, create_graph=not first_order))
            return torch.stack(losses).mean(), {}

        def weights() -> dict[str, torch.Tensor]:
            return {**trained, SCHEDULE_STEPS_KEY: torch.tensor(T[0], dtype=torch.int64, device=self.device)}

        def load_weights(weights: dict[str, torch.Tensor]) -> None:
            if SCHEDULE_STEPS_KEY in weights:
                T[0] = self._schedule_steps = int(weights[SCHEDULE_STEPS_KEY])
            with torch.no_grad():
                for k, v in trained.items():
                    v.copy_(weights[k])

        def validate() -> dict[str, float]:
            return {"val_dice": self._val_dice(val_s, cfg.val_fit_steps)}

        opt = torch.optim.Adam(trained.values(), lr=cfg.outer_lr)

        def outer_lr_factor(s: int) -> float:
            warm = max(0, round(cfg.outer_warmup * min(1.0, T[0] / max(1, cfg.steps))))
            if s < warm:
                return (s + 1) / warm
            if cfg.outer_schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, T[0] - warm))))
            return 1.0

        return TrainTask(name="metaseg meta-training", method=self.method, step=step,
                         optimizers=[opt],
                         schedulers=[torch.optim.lr_scheduler.LambdaLR(opt, outer_lr_factor)],
                         params=list(trained.values()), weights=weights,
                         load_weights=load_weights, validate=validate if val_s else None,
                         grad_sync="allreduce", grad_clip=cfg.grad_clip, bf16=bf16)

    def _val_dice(self, val_s: Sequence[_Image], steps: int) -> float:
        """Mean foreground Dice of ``val_s`` after fitting ``theta`` for ``steps`` (head frozen),
        on the full grids - or, for images of more than ``val_max_voxels`` voxels, on that many
        fixed random voxels (the same at every validation: a 3D volume of 860K voxels would
        otherwise cost as much as 30 outer steps to score)."""
        scores = []
        nb, cap = self.config.fit_batch, self.config.val_max_voxels
        for s in range(0, len(val_s), nb):
            block = val_s[s:s + nb]
            theta = None
            for _, theta in self.fit_theta(block, steps):
                pass
            N = block[0].coords.shape[0]
            if cap is None or N <= cap:
                pred = self.image_logits(theta, block[0]).argmax(-1).cpu()                   # (B, N)
                truth = [im.labels.reshape(im.shape).cpu().numpy() for im in block]
                pred = [p.reshape(block[0].shape).numpy() for p in pred]
            else:
                gen = torch_generator(self.config.seed + VAL_VOXELS_SEED, self.device)
                idx = torch.randperm(N, generator=gen, device=self.device)[:cap]             # (cap,)
                # (cap, 1): case_metrics takes 2D or 3D maps, and Dice only counts voxels
                pred = list(self.logits(theta, block[0].coords[idx], step=block[0].step).argmax(-1)
                            .reshape(-1, cap, 1).cpu().numpy())
                truth = [im.labels[idx].reshape(cap, 1).cpu().numpy() for im in block]
            for p, t in zip(pred, truth):
                scores.append(case_metrics(p, t, len(self.label_names), distances=False,
                                           ignore_label=IGNORE).mean_foreground_dice)
        return float(np.nanmean(scores))

    # ------------------------------------------------------------------ phase 2 + T_f
    def _tf_candidates(self, with_val: bool) -> list[int]:
        """The T_f values tried (ascending), or the default alone without validation data."""
        cfg = self.config
        return sorted({int(t) for t in cfg.tf_candidates if t >= 0}) if with_val else [cfg.default_tf]

    def _snapshot_features(self, images: Sequence[_Image], n_points: int, snaps: Sequence[int],
                           gen: torch.Generator, budget: Budget) -> tuple[dict[int, torch.Tensor], torch.Tensor, int]:
        """Fit ``images`` up to ``max(snaps)`` steps; head inputs ``{t: (M, P * h)}`` (``P``:
        :attr:`context_points`) at ``n_points`` random pixels per image (the same pixels for every ``t``), their labels ``(M,)``, and the
        number of images fitted: once ``budget`` has expired no further block of images is
        started (the first always is). An image with unlabelled pixels gives labelled pixels
        only (drawn with replacement when it has fewer than ``n_points``)."""
        # one preallocated store per t, filled block by block (a list of blocks concatenated at the
        # end would hold every feature twice: 4.5 GB at the peak for 60 slices of 160 x 192)
        total = sum(min(n_points, im.coords.shape[0]) for im in images)
        feats: dict[int, torch.Tensor | None] = {t: None for t in snaps}
        labels = []
        filled = 0
        groups: dict[tuple[int, ...], list[_Image]] = {}
        for im in images:
            groups.setdefault(im.shape, []).append(im)
        fb = self.config.fit_batch
        blocks = [group[s:s + fb] for group in groups.values() for s in range(0, len(group), fb)]
        fitted, limit = 0, max(snaps)
        P, width = self.context_points, self.context_points * self.config.hidden
        for block in blocks:
            if fitted and budget.expired():
                status(f"time budget reached: features of {fitted} of {len(images)} images")
                break
            N = block[0].coords.shape[0]
            idx = torch.stack([torch.randperm(N, generator=gen, device=gen.device)[:n_points]
                               if im.labelled is None else self._labelled_pixels(im, n_points, gen)
                               for im in block]).to(self.device)                       # (B, n)
            q = block[0].coords[idx]                                                  # (B, n, d)
            labels.append(torch.stack([im.labels[i] for im, i in zip(block, idx)]).reshape(-1))
            voxel = torch.stack([im.step for im in block])                            # (B, d)
            for t, theta in self.fit_theta(block, limit, [s for s in snaps if s <= limit], gen):
                if t in feats:
                    x = self.head_inputs(theta, q, voxel, P).reshape(-1, width)
                    if feats[t] is None:
                        feats[t] = torch.empty(total, width, dtype=x.dtype, device=x.device)
                    feats[t][filled:filled + x.shape[0]] = x
                if not fitted and t < limit and budget.expired():
                    # out of time within the first block: stop at this snapshot, drop longer fits
                    status(f"time budget reached: fits stop at {t} steps")
                    limit = t
                    break
            fitted += len(block)
            filled += idx.numel()
        return ({t: v[:filled] for t, v in feats.items() if t <= limit and v is not None}, torch.cat(labels), fitted)

    @staticmethod
    def _labelled_pixels(im: _Image, n: int, gen: torch.Generator) -> torch.Tensor:
        """``min(n, N)`` random pixel indices of ``im`` among its labelled ones (with
        replacement if it has fewer than that; any pixels if it has none), on ``gen``'s device."""
        N = im.coords.shape[0]
        n = min(n, N)
        cand = torch.nonzero(im.labelled)[:, 0].to(gen.device)
        if cand.numel() == 0:
            return torch.randperm(N, generator=gen, device=gen.device)[:n]
        if cand.numel() >= n:
            return cand[torch.randperm(cand.numel(), generator=gen, device=gen.device)[:n]]
        return cand[torch.randint(cand.numel(), (n,), generator=gen, device=gen.device)]

    def _subset_dice(self, head: Params, feats: torch.Tensor, labels: torch.Tensor, n_images: int) -> float:
        """Mean over images of the mean foreground Dice on the stored pixel subsets: head inputs
        ``(n_images * P, w)``, labels ``(n_images * P,)``; a head that reads fewer columns (the
        meta-learned head beside context inputs) reads the first ones (the point's own)."""
        with torch.no_grad():
            pred = head_forward(head, feats[:, :head["g.0.weight"].shape[1]]).argmax(-1).reshape(n_images, -1).cpu()
        lab = labels.reshape(n_images, -1).cpu()
        scores = [case_metrics(p[None].numpy(), g[None].numpy(), len(self.label_names), distances=False,
                               ignore_label=IGNORE).mean_foreground_dice for p, g in zip(pred, lab)]
        return float(np.nanmean(scores))

    def _retrain_head(self, t: int, feats: torch.Tensor, labels: torch.Tensor, val_feats: torch.Tensor | None,
                      val_labels: torch.Tensor | None, n_val: int, budget: Budget,
                      bf16: bool = False) -> tuple[dict, float]:
        """Phase 2 for candidate ``t``: Adam on the focal loss of the head over stored features
        ``feats`` ``(M, h)`` with labels ``(M,)``, from ``phi*``, in this process alone (an engine
        run that stops at ``budget``'s deadline). Batches of ``phase2_batch`` rows are drawn
        from ``step_rng(seed + PHASE2_SEED, i, t)``.

        Returns:
            the best head on the ``n_val`` images' features ``val_feats`` ``(n_val * P, h)``
            (``phi*`` itself unless a step beats it) and its score; without validation images,
            the last head and ``-inf``.
        """
        cfg = self.config
        head = {k: v.detach().clone() for k, v in self.params.items() if k.startswith("g.")}
        start = ({k: v.clone() for k, v in head.items()},
                 self._subset_dice(head, val_feats, val_labels, n_val) if n_val else -math.inf)
        w = head["g.0.weight"]
        if feats.shape[1] > w.shape[1]:  # a context head: phi* with zero weights on the neighbours
            head["g.0.weight"] = torch.cat([w, w.new_zeros(w.shape[0], feats.shape[1] - w.shape[1])], 1)
        head = {k: v.requires_grad_(True) for k, v in head.items()}
        labelled = labels != IGNORE
        if not bool(labelled.all()):  # only labelled pixels train the head
            feats, labels = feats[labelled], labels[labelled]
            if feats.shape[0] == 0:
                return start
        n = min(cfg.phase2_batch, feats.shape[0])

        def step(i: int) -> tuple[torch.Tensor, dict[str, float]]:
            rng = step_rng(cfg.seed + PHASE2_SEED, i, t)
            idx = torch.from_numpy(rng.integers(feats.shape[0], size=n)).to(feats.device)   # (n,)
            return focal_loss(head_forward(head, feats[idx]), labels[idx], cfg.focal_gamma), {}

        def load_weights(weights: dict[str, torch.Tensor]) -> None:
            with torch.no_grad():
                for k, v in head.items():
                    v.copy_(weights[k])

        def validate() -> dict[str, float]:
            return {"val_dice": self._subset_dice(head, val_feats, val_labels, n_val)}

        res = run_training(
            TrainTask(name=f"metaseg head (T_f = {t})", method=self.method, step=step,
                      optimizers=[torch.optim.Adam(head.values(), lr=cfg.phase2_lr)],
                      params=list(head.values()), weights=lambda: dict(head), load_weights=load_weights,
                      validate=validate if n_val else None, grad_sync="none", bf16=bf16),
            LoopSettings(steps=cfg.phase2_steps, val_every=cfg.phase2_val_every, budget=budget,
                         seed=cfg.seed, device=self.device, solo=True))
        if n_val and not res.best_score > start[1]:
            return start
        return {k: v.detach() for k, v in head.items()}, res.best_score if n_val else -math.inf

    def select_tf_and_head(self, train_s: Sequence[_Image], val_s: Sequence[_Image],
                           budget: Budget | None = None, bf16: bool = False) -> None:
        """Phase 2 (head retraining per candidate T_f) and the choice of T_f on ``val_s``.

        Ends by ``budget``'s deadline (default: none) where it can: once it has passed, no
        further images are fitted (one block of training and one of validation images always
        are, and their fits stop at the first candidate step count reached after the deadline,
        dropping the longer candidates), a head being retrained stops with its best so far, and
        the candidates left (ascending; the first is always tried) are skipped.
        """
        cfg = self.config
        budget = budget if budget is not None else Budget(None)
        gen = torch_generator(cfg.seed + PHASE2_SEED)
        cands = self._tf_candidates(bool(val_s))
        phase2 = cfg.phase2_steps > 0 and len(train_s) > 0
        if not val_s and not phase2:
            self.t_f = cfg.default_tf
            return
        tr_feats = tr_labels = None
        if phase2:
            chosen = list(train_s)
            if cfg.phase2_max_cases is not None and len(chosen) > cfg.phase2_max_cases:
                order = torch.randperm(len(chosen), generator=gen, device=gen.device)[:cfg.phase2_max_cases]
                chosen = [chosen[int(i)] for i in order]
            status(f"phase 2: fitting {len(chosen)} training images for up to {max(cands)} steps")
            tr_feats, tr_labels, _ = self._snapshot_features(chosen, cfg.phase2_points, cands, gen, budget)
        va_feats = va_labels = None
        n_val = 0
        if val_s:
            status(f"choosing T_f among {cands} on {len(val_s)} validation images")
            va_feats, va_labels, n_val = self._snapshot_features(val_s, cfg.val_points, cands, gen, budget)
        # candidates whose fits the budget cut short are dropped (the smallest is always kept)
        cands = [t for t in cands if (tr_feats is None or t in tr_feats) and (va_feats is None or t in va_feats)]
        meta_head = {k: v for k, v in self.params.items() if k.startswith("g.")}
        self.meta_head = {k: v.detach().clone() for k, v in meta_head.items()}
        self.tf_curve, best = [], None
        for t in cands:
            if best is not None and budget.expired():
                status(f"time budget reached: T_f candidates {cands[len(self.tf_curve):]} skipped")
                break
            entry: dict = {"t_f": t}
            if val_s:
                entry["val_dice_meta_head"] = self._subset_dice(meta_head, va_feats[t], va_labels, n_val)
            head, score = meta_head, entry.get("val_dice_meta_head", -math.inf)
            if phase2:
                head, score = self._retrain_head(t, tr_feats[t], tr_labels, None if va_feats is None else va_feats[t],
                                                 va_labels, n_val, budget, bf16)
                entry["val_dice_phase2"] = score
            self.tf_curve.append(entry)
            if best is None or score > best[1]:
                best = (t, score, head)
        self.t_f = best[0]
        self.params.update({k: v.detach().clone() for k, v in best[2].items()})
        status(f"T_f = {self.t_f} (validation Dice {best[1]:.4f})")

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        tensors = dict(self.params)
        tensors.update({f"meta_head.{k}": v for k, v in (self.meta_head or {}).items()})
        if self.lrs is not None:
            tensors.update({f"lr.{k}": v for k, v in self.lrs.items()})
        save_checkpoint(path, self.method, tensors, {
            "config": asdict(self.config), "label_names": self.label_names,
            "spatial_ndim": self.spatial_ndim, "in_channels": self.in_channels, "t_f": self.t_f,
            "best_step": self.best_step, "history": self.history, "tf_curve": self.tf_curve,
            "num_params": self.num_params, "timings": self.timings})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "MetaSeg":
        """Read a checkpoint written by :meth:`save` onto ``device``."""
        tensors, meta = load_checkpoint(path, cls.method)
        cfg_dict = dict(meta["config"])
        cfg_dict["tf_candidates"] = tuple(cfg_dict["tf_candidates"])
        known = MetaSegConfig.__dataclass_fields__
        obj = cls(meta["label_names"], meta["spatial_ndim"], meta["in_channels"],
                  MetaSegConfig(**{k: v for k, v in cfg_dict.items() if k in known}), device=device)
        params = {k: v.to(obj.device) for k, v in tensors.items() if not k.startswith(("lr.", "meta_head."))}
        want = {k: tuple(v.shape) for k, v in obj.params.items()}
        got = {k: tuple(v.shape) for k, v in params.items()}
        if obj.context_points > 1 and got.get("g.0.weight") == (want["g.0.weight"][0],
                                                                 want["g.0.weight"][1] * obj.context_points):
            want["g.0.weight"] = got["g.0.weight"]         # phase 2 kept a context head
        if got != want:
            diff = sorted(set(want.items()) ^ set(got.items()))[:2]
            raise InputError(path, f"weights do not match the stored config (e.g. {diff})")
        obj.params = params
        obj.meta_head = {k[len("meta_head."):]: v.to(obj.device) for k, v in tensors.items()
                         if k.startswith("meta_head.")} or None
        lrs = {k[3:]: v.to(obj.device) for k, v in tensors.items() if k.startswith("lr.")}
        obj.lrs = lrs or None
        obj.t_f = int(meta["t_f"])
        obj.best_step, obj.history = meta.get("best_step"), meta.get("history", [])
        obj.tf_curve, obj.timings = meta.get("tf_curve", []), meta.get("timings", {})
        return obj


def metaseg_config(preset: str, paper: bool = False, **overrides):
    """MetaSegConfig of a preset; ``paper=True`` selects the published (GPU-sized) settings:
    every pixel in every inner/outer/test step, Adam lr 1e-4 throughout and constant, the joint
    inner loss (labels in the inner loop), 5,000 outer steps. The CPU defaults keep the recipe
    but use random 2,048-pixel subsets inside meta-training, 4,096-pixel test-time steps and a
    warmed-up cosine outer lr; the 2D 5-class preset's phase-2 head reads neighbouring features
    and trains faster (docs/findings/metaseg.md)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    cfg = MetaSegConfig(**PRESETS[preset])
    if paper:
        cfg = replace(cfg, points_per_task=None, fit_points=None, inner_lr=1e-4, outer_lr=1e-4,
                      inner_loss="joint", steps=5000, phase2_lr=1e-4, phase2_steps=300, head_context=0.0,
                      phase2_max_cases=None,
                      outer_schedule="constant", outer_warmup=0, val_every=50)
    return replace(cfg, **overrides)
