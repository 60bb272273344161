"""MORSE: implicit anatomical rendering with stochastic experts (You et al., MICCAI 2023).

A plug-in for encoder-decoder segmentation backbones (:mod:`inrseg.nn.backbones`), in five
variants that share one model and one training loop, so that they compare like for like:

=============  ==========================================================================
``baseline``   the backbone alone (its own head, DiceCE loss)
``pointrend``  + a PointRend point head on [finest decoder feature, coarse logits] at points
``smoe``       + stochastic mixture of experts: the decoder blocks' features, mixed per pixel
               by a gate, make the (coarse) prediction
``iar``        + implicit anatomical rendering: the point head also reads Fourier features
               of the point's continuous coordinate
``morse``      SMoE + IAR: the point head reads the SMoE's fused features
=============  ==========================================================================

SMoE (paper eqs. 1-2, official code's layers). Expert ``i`` is a per-pixel MLP
``c_i -> D -> D`` (ReLU) on decoder block ``i``'s features, up-sampled to the finest decoder
resolution: ``F_i`` ``(B, D, *S)``. A gate ``conv3x3-BN-ReLU -> conv3x3`` on ``[F_1..F_N]``
gives ``(B, N, *S)`` scores, soft-maxed over experts so that the weights sum to 1 per pixel.
``x_out = MLP(sum_i W_i F_i)``; a 1x1 head makes the coarse logits. In training, experts are
dropped per image: each with probability ``alpha`` (paper: Bernoulli(alpha = 0.7)), or a random
number of them (official code); at least one expert always survives and the weights of the
survivors are renormalised to sum to 1. At inference all experts are on.

IAR. Training points per image: ``k * N`` uniform candidates, the ``rho * N`` most uncertain
(second-largest minus largest coarse logit) kept, the rest uniform (N = 2048, k = 3, rho = 0.75).
The point head (3 layers, coarse logits re-concatenated at each layer, PointRend's design) reads
``[fine features at the point, gamma(coordinate)]``, with ``gamma`` Gaussian Fourier features
(L = 128; trainable as in the paper, or fixed as in the official code). ``L_rend`` is the
cross-entropy on the points. At inference the 8192 most uncertain points are re-predicted,
PointRend-style: for each 2x subdivision step the logits are up-sampled and their most uncertain
points re-predicted from the features at the points' continuous coordinates. The coarse logits
are at full input resolution here (every backbone's finest decoder block is), so a prediction
at the image's own resolution is one refinement pass, and ``predict(scale=2)`` is one 2x
subdivision step: the rendering head is queried at the finer grid's coordinates.

Loss: ``L_sup`` (MONAI DiceCE, equal weights) on the coarse logits ``+ lambda_t * L_rend`` with
``lambda_t = lambda_rend * 1{t > T/2} * (t - T/2) / T`` (``lambda_rend = 0.1``); ``L_rend`` is the
cross entropy at the rendered points. Voxels and points with the ignore label count in neither
(:mod:`inrseg.losses`). AdamW 5e-4 with
polynomial decay ``(1 - t/T)**0.9``. 2D: whole slices padded to the backbone's multiple;
3D: random crops, sliding-window inference on larger volumes (and on any image for UNETR's
fixed input size).

Coordinates of points are ``[-1, 1]`` over the network's input frame (the padded slice, the
training crop or the sliding window), cell-centred (:mod:`inrseg.nn.point_sampling`).

The networks (SMoE, point head, the model around a backbone) are :mod:`inrseg.nn.morse`; this
file holds the configuration, the training step and validation (the loop, seeding, budget,
best state, resume state and DDP are the engine's, :mod:`inrseg.engine`), inference and
checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from inrseg.engine.checkpoints import load_checkpoint, save_checkpoint
from inrseg.methods.base import check_spatial_ndim
from inrseg.data.grids import resampled_affine, resampled_shape
from inrseg.data.io import Volume
from inrseg.data.layouts import Case
from inrseg.data.preprocess import check_input, normalize
from inrseg.data.sampling import (PatchSampler, has_ignored, load_training_tensors, pad_to_multiple, plain,
                                  training_patch)
from inrseg.losses import IGNORE, DiceCELoss, masked_cross_entropy
from inrseg.core.errors import InputError
from inrseg.metrics import case_metrics
from inrseg.nn.backbones import BACKBONES, build_backbone
from inrseg.nn.morse import MorseNet, MorseOutput, PointHead, StochasticMoE, _upsample
from inrseg.nn.point_sampling import point_sample
from inrseg.engine import (SCHEDULE_STEPS_KEY, Budget, LoopSettings, TrainTask, as_budget, resolve_device,
                             run_training, step_rng, torch_generator, use_bf16, world, wrap_ddp)

__all__ = ["EXPERT_DROPOUT", "HEAD_PRESETS", "MORSE", "VARIANTS", "MorseConfig", "MorseNet", "MorseOutput",
           "PointHead", "StochasticMoE", "morse_config", "rend_weight"]

VARIANTS = ("baseline", "pointrend", "smoe", "iar", "morse")
EXPERT_DROPOUT = ("bernoulli", "count", "none")


# ============================================================================================
# configuration
# ============================================================================================

@dataclass
class MorseConfig:
    """Hyper-parameters of a MORSE model (saved in the checkpoint).

    Defaults are the paper's, except: backbone widths ``"cpu"``; the point head starts as the
    identity on the coarse logits (``point_identity_init``); ``fourier_sigma`` (unpublished)
    is 1 cycle per coordinate unit. :func:`morse_config` gives CPU-sized SMoE / point-head
    widths. ``steps`` is the T of the ``L_rend`` schedule and of the learning-rate decay: with a
    ``budget_minutes`` that stops training before ``T / 2``, the point head is never trained
    and the model predicts with its coarse head.
    """

    backbone: str = "unet"                  # unet | unet3d | transunet | unetr
    variant: str = "morse"                  # baseline | pointrend | smoe | iar | morse
    backbone_preset: str = "cpu"            # widths: "cpu" or "paper" (see nn.backbones)
    backbone_overrides: dict = field(default_factory=dict)  # e.g. {"channels": [8, 16, 32]}
    # --- SMoE
    num_experts: int | None = None          # the N finest decoder blocks; None: backbone's default
    moe_dim: int = 256                      # expert feature width D
    gate_dim: int = 256                     # gate hidden width
    expert_dropout: str = "bernoulli"       # bernoulli (paper) | count (official code) | none
    alpha: float = 0.7                      # drop probability per expert (bernoulli)
    # expert-dropout warm-up: the drop rate rises linearly from 0 to its full value (alpha, or
    # the "count" rule's) over this many steps; 0 = full dropout from step 0 (paper). Counted in
    # steps, not as a share of T: a short run never reaches the full rate, which costs 0.2-0.5
    # Dice in CPU-length runs, a long one reaches it early (docs/findings/morse.md).
    dropout_warmup_steps: int = 5000
    renormalize: bool = True                # survivors' gate weights re-sum to 1
    # --- IAR / point head
    point_width: int = 512
    point_layers: int = 3
    fourier_frequencies: int = 128          # L (2 L features)
    fourier_sigma: float = 1.0              # std of the frequencies (cycles per coordinate unit)
    fourier_trainable: bool = True          # paper: trainable; official code: fixed
    train_points: int = 2048                # N_p in training
    oversample: float = 3.0                 # k_p
    importance: float = 0.75                # rho
    test_points: int = 8192                 # N_p at inference, per subdivision step
    point_identity_init: bool = True        # point head starts as the identity on coarse logits
    lambda_rend: float = 0.1
    # --- optimisation
    steps: int = 2000                       # T
    batch_size: int = 4                     # 2D slices / 3D crops per step (paper: 4 / 2)
    patch_size: tuple[int, ...] | None = None  # 3D crop, UNETR input; None: 96^3 (2D UNETR 192^2)
    optimizer: str = "adamw"                # adamw (paper, lr 5e-4) | sgd (official code, lr 0.01)
    lr: float = 5e-4
    weight_decay: float = 1e-4
    poly_power: float = 0.9                 # lr = lr0 * (1 - t/T) ** poly_power
    # with a time budget that ends training before T steps, run the schedules (lr decay, L_rend
    # from T/2) over the steps that fit the budget (timed on a throwaway copy)
    fit_schedule_to_budget: bool = True
    val_every: int = 100
    budget_minutes: float | None = None
    augment: bool = True
    foreground_fraction: float = 0.33       # 3D crops forced to contain foreground (nnU-Net: 1/3)
    normalization: str = "zscore"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r} ({', '.join(BACKBONES)})")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r} ({', '.join(VARIANTS)})")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r} (adamw, sgd)")
        if self.expert_dropout not in EXPERT_DROPOUT:
            raise ValueError(f"unknown expert_dropout {self.expert_dropout!r} ({', '.join(EXPERT_DROPOUT)})")
        if self.dropout_warmup_steps < 0:
            raise ValueError(f"dropout_warmup_steps {self.dropout_warmup_steps} is negative")
        if self.patch_size is not None:
            self.patch_size = tuple(int(n) for n in self.patch_size)
        self.backbone_overrides = {k: tuple(v) if isinstance(v, list) else v
                                   for k, v in dict(self.backbone_overrides).items()}

    @property
    def uses_smoe(self) -> bool:
        return self.variant in ("smoe", "morse")

    @property
    def uses_points(self) -> bool:
        return self.variant in ("pointrend", "iar", "morse")

    @property
    def uses_fourier(self) -> bool:
        return self.variant in ("iar", "morse")


#: Head widths: "paper" as published; "cpu" small enough for minutes-long CPU training (the
#: SMoE gate is a 3x3 convolution on N * D channels at full resolution: the dominant cost).
HEAD_PRESETS: dict[str, dict] = {
    "paper": dict(moe_dim=256, gate_dim=256, point_width=512, dropout_warmup_steps=0),
    # the gate (a 3x3 convolution on N x D channels at full resolution) dominates a CPU step:
    # D = 16 is 4x cheaper than 32 (docs/findings/morse.md)
    "cpu": dict(moe_dim=16, gate_dim=16, point_width=256, dropout_warmup_steps=5000),
}


def dropout_ramp(step: int, warmup_steps: int) -> float:
    """Share of the full expert-dropout rate used at 0-based ``step``: rises linearly from 0 at
    step 0 to 1 at ``warmup_steps``, then stays 1 (``warmup_steps`` 0: always 1)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def morse_config(backbone: str = "unet", variant: str = "morse", spatial_ndim: int = 2,
                 preset: str = "cpu", **overrides) -> MorseConfig:
    """A :class:`MorseConfig` for ``inrseg train morse --backbone B --variant V``.

    ``preset`` sets backbone and head widths ("cpu" or "paper"); 3D gets the paper's batch of 2
    crops; ``overrides`` replace any field (``steps=``, ``batch_size=``, ``budget_minutes=``...).
    """
    if preset not in HEAD_PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(HEAD_PRESETS)})")
    base = dict(backbone=backbone, variant=variant, backbone_preset=preset, **HEAD_PRESETS[preset])
    if spatial_ndim == 3:
        base["batch_size"] = 2
    return MorseConfig(**{**base, **overrides})


def rend_weight(t: int, total: int, lambda_rend: float = 0.1) -> float:
    """The adaptive weight of ``L_rend`` at iteration ``t`` of ``total`` (paper):
    ``lambda_rend * 1{t > T/2} * (t - T/2) / T`` (0 in the first half, ``lambda_rend / 2`` at T)."""
    half = total / 2
    return lambda_rend * (t - half) / total if t > half else 0.0


# ============================================================================================
# the Segmenter
# ============================================================================================

#: key of the rend_steps counter in the weights the engine keeps (best state, resume state)
_REND_STEPS = "__rend_steps__"


class MORSE:
    """MORSE (and its ablation variants) behind the :class:`~inrseg.methods.base.Segmenter` protocol.

    Args:
        label_names: class names indexed by label value.
        spatial_ndim: 2 or 3.
        in_channels: image channels.
        config: hyper-parameters, including ``backbone`` and ``variant``.
        device: where the network lives and trains (``"cpu"``, ``"cuda:0"``, ``"auto"``...).
    """

    method: ClassVar[str] = "morse"
    #: grid dimensionalities it segments
    spatial_ndims: ClassVar[tuple[int, ...]] = (2, 3)
    #: bf16 autocast is safe for the CNN backbones and heads (``--precision auto`` uses it on CUDA)
    bf16_safe: ClassVar[bool] = True

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int,
                 config: MorseConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or MorseConfig()
        check_spatial_ndim(type(self), spatial_ndim)
        self.label_names = list(label_names)
        self.spatial_ndim, self.in_channels = spatial_ndim, in_channels
        self.device = resolve_device(device)
        cfg = self.config
        with torch.device(self.device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same initial weights on every rank
            try:
                backbone = build_backbone(cfg.backbone, spatial_ndim, in_channels,
                                          len(self.label_names), img_size=self._net_size(),
                                          preset=cfg.backbone_preset, **cfg.backbone_overrides)
            except (ValueError, TypeError) as exc:
                raise InputError(None, f"cannot build the {cfg.backbone} backbone for "
                                       f"{spatial_ndim}D images: {exc}") from None
            self.net = MorseNet(backbone, len(self.label_names), cfg)
        self.history: list[dict] = []
        self.best_step: int | None = None
        self.schedule_steps = self.config.steps  # T of the last fit (fitted to its budget)
        self.rend_steps = 0  # optimiser steps with L_rend active: refinement is used only after

    def to(self, device: str | torch.device) -> "MORSE":
        """Move the network to ``device``."""
        self.device = resolve_device(device)
        self.net.to(self.device)
        return self

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def _net_size(self) -> tuple[int, ...] | None:
        """The input size of fixed-size backbones (UNETR), the nominal one of TransUNet."""
        cfg, nd = self.config, self.spatial_ndim
        if cfg.patch_size is not None:
            return cfg.patch_size
        if cfg.backbone == "unetr":
            return (192, 192) if nd == 2 else (96, 96, 96)
        return None

    # ------------------------------------------------------------------ data
    def _prepare(self, image: Volume) -> torch.Tensor:
        """Normalised ``(C, *S)`` float32 tensor on the CPU."""
        check_input(image, self.in_channels, self.spatial_ndim)
        return torch.from_numpy(normalize(image.data, self.config.normalization))

    def _patch_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Training patch (and sliding window) for images of grid ``shape``."""
        fixed = self.net.backbone.fixed_size
        if fixed is not None:
            return fixed
        return training_patch(shape, self.config.patch_size, self.net.backbone.divisor)

    # ------------------------------------------------------------------ training
    def _losses(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, weight: float,
                loss_fn: torch.nn.Module, generators: Sequence[torch.Generator] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss of a batch ``x`` ``(B, C_in, *S)``, ``y`` ``(B, 1, *S)`` (on the model's
        device) through ``net`` (:attr:`net` or its DDP wrapper), and its parts for the log.

        ``weight``: ``lambda_t`` of ``L_rend`` (0: the point head is not run); ``generators``:
        one per image, for its random draws (see :class:`~inrseg.nn.morse.MorseNet`).
        """
        rend_on = self.net.point_head is not None and weight > 0
        out = net(x, self.config.train_points if rend_on else 0, generators)
        with torch.device(self.device):  # MONAI's losses make tensors without a device
            loss = loss_fn(out.coarse, y)
        parts = {"loss_sup": float(loss.detach()), "lambda_rend": weight}
        if rend_on:
            target = point_sample(y.float(), out.coords, mode="nearest")[:, 0].long()  # (B, P)
            # ignored points (IGNORE) count nowhere; without an ignore label, plain cross entropy
            rend = masked_cross_entropy(out.points, target, getattr(loss_fn, "ignore_index", None))
            loss = loss + weight * rend
            parts["loss_rend"] = float(rend.detach())
        return loss, parts

    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Train on ``train`` cases; keep the best weights on ``val`` (mean foreground Dice of the
        final, refined prediction), with the ``rend_steps`` count that belongs to them.

        Under torchrun each rank draws its own ``batch_size`` items of every step's global
        batch (``world_size x batch_size``); an item's crop, expert dropout and training points
        are draws of ``(seed, step, item)``, and DDP averages the gradients. ``budget`` bounds
        the whole call (default: ``config.budget_minutes`` from now).
        """
        cfg = self.config
        budget = as_budget(budget, cfg.budget_minutes)
        rank, _ = world()
        images, labels = load_training_tensors(train, self._prepare)
        patch = self._patch_size(np.max([x.shape[1:] for x in images], axis=0))
        ignore = has_ignored(labels)
        sampler = PatchSampler(images, labels, patch, cfg.foreground_fraction, cfg.augment, cfg.seed,
                               ignore=ignore)
        loss_fn = DiceCELoss(IGNORE if ignore else None)  # MONAI's DiceCELoss without ignored voxels
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=0.9,
                                  weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        mine = range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)

        def gens_of(i: int) -> list[torch.Generator]:
            # per item, a stream of (seed, step, item) apart from the sampler's: dropout, points
            return [torch_generator(int(step_rng(cfg.seed, i, j, 1).integers(2 ** 63)), self.device) for j in mine]

        resuming = state_path is not None and Path(state_path).exists()
        total = cfg.steps
        if cfg.fit_schedule_to_budget and budget.limited and not resuming:
            total = self.steps_within(budget, sampler, mine, loss_fn, gens_of, val)
        T = [total]  # the schedule length; a resumed run's comes back with its weights
        self.schedule_steps = total
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: max(0.0, 1 - min(s, T[0]) / T[0]) ** cfg.poly_power)
        # the point head is unused in the first half of training (and by the baseline / smoe)
        train_net = wrap_ddp(self.net, self.device, find_unused_parameters=True)
        val_data: list[tuple[Volume, Volume]] = []

        def step(i: int):
            if self.net.smoe is not None:  # the expert-dropout warm-up (1 = full rate)
                self.net.smoe.dropout_scale = dropout_ramp(i, cfg.dropout_warmup_steps)
            x, y = sampler.batch(i, mine, self.device)
            loss, parts = self._losses(train_net, x, y, rend_weight(i + 1, T[0], cfg.lambda_rend), loss_fn,
                                       gens_of(i))
            self.rend_steps += int("loss_rend" in parts)
            return loss, parts

        def weights() -> dict[str, torch.Tensor]:
            # the rend_steps count and the schedule travel with the weights (best and resume state)
            return {**self.net.state_dict(),
                    _REND_STEPS: torch.tensor(self.rend_steps, dtype=torch.int64, device=self.device),
                    SCHEDULE_STEPS_KEY: torch.tensor(T[0], dtype=torch.int64, device=self.device)}

        def load_weights(state: dict[str, torch.Tensor]) -> None:
            state = dict(state)
            self.rend_steps = int(state.pop(_REND_STEPS))
            T[0] = self.schedule_steps = int(state.pop(SCHEDULE_STEPS_KEY, T[0]))
            self.net.load_state_dict(state)

        def validate() -> dict[str, float]:
            if not val_data:
                val_data.extend(c.load() for c in val)
            return self._validate(val_data)

        res = run_training(
            TrainTask(name=f"{self.method}/{cfg.variant}", method=self.method, step=step, optimizers=[opt],
                      schedulers=[sched], params=list(self.net.parameters()), weights=weights,
                      load_weights=load_weights, validate=validate if val else None,
                      modules=[self.net], grad_sync="ddp",
                      bf16=use_bf16(self.device, precision, self.bf16_safe)),
            LoopSettings(steps=total, val_every=cfg.val_every, budget=budget, seed=cfg.seed,
                         state_path=state_path, log_path=log_path, device=self.device))
        self.history, self.best_step = res.history, res.best_step

    def steps_within(self, budget: Budget, sampler: PatchSampler, mine: Sequence[int], loss_fn: torch.nn.Module,
                     gens_of, val: Sequence[Case] | None) -> int:
        """The schedule length T that fits the time left in ``budget``: ``config.steps``, or fewer
        where the budget would stop training sooner. Timed on a throwaway copy of the network
        (2 timed steps with the point head on, the dearest kind, after an untimed warm-up one)
        plus one validation prediction x the validation cases every ``val_every`` steps
        (:func:`inrseg.engine.timed_schedule_steps`). The dropout warm-up counts steps and
        does not follow T."""
        from inrseg.engine import timed_schedule_steps

        cfg = self.config
        weight = cfg.lambda_rend if self.net.point_head is not None else 0.0

        def loss_of(net: torch.nn.Module, i: int) -> torch.Tensor:
            x, y = sampler.batch(i, mine, self.device)
            return self._losses(net, x, y, weight, loss_fn, gens_of(i))[0]

        return timed_schedule_steps(
            budget, cfg.steps, self.net, lambda p: torch.optim.AdamW(p, lr=cfg.lr), loss_of, self.device,
            self.predict, val, cfg.val_every, f"{self.method}/{cfg.variant}",
            "the schedules (lr decay, L_rend from T/2) run")

    @torch.no_grad()
    def _validate(self, val_data: list[tuple[Volume, Volume]]) -> dict[str, float]:
        """Mean foreground Dice of the final (``val_dice``) and the coarse (``val_dice_coarse``)
        predictions on the validation cases."""
        n = len(self.label_names)
        final, coarse = [], []
        for img, lab in val_data:
            ignore = lab.meta.get("ignore_label")
            final.append(case_metrics(self.predict(img).data, lab.data, n, distances=False,
                                      ignore_label=ignore).mean_foreground_dice)
            if self.net.point_head is not None:
                coarse.append(case_metrics(self.predict(img, refine=False).data, lab.data, n,
                                           distances=False, ignore_label=ignore).mean_foreground_dice)
        out = {"val_dice": float(np.nanmean(final))}
        if coarse:
            out["val_dice_coarse"] = float(np.nanmean(coarse))
        return out

    # ------------------------------------------------------------------ inference
    def _infer(self, x: torch.Tensor, shape: Sequence[int], refine: bool,
               crop: list[slice] | None = None) -> torch.Tensor:
        """Logits ``(B, C, *shape)`` of a network input ``x`` ``(B, C_in, *S)``, optionally
        cropped to ``crop`` (the un-padded image) before rendering at ``shape``."""
        out = self.net(x)
        if crop is not None:
            sl = (slice(None), slice(None)) + tuple(crop)
            full = x.shape[2:]
            scale = torch.tensor([(c.stop - c.start) / n for c, n in zip(crop, full)], device=x.device)
            offset = torch.tensor([(c.stop + c.start) / n - 1 for c, n in zip(crop, full)], device=x.device)
            out = MorseOutput(out.coarse[sl], None if out.fine is None else out.fine[sl], None)
        else:
            scale = offset = None
        if not refine or self.net.point_head is None:
            return _upsample(out.coarse, shape)
        return self.net.render(out, shape, self.config.test_points, scale, offset)

    @torch.no_grad()
    def predict_logits(self, image: Volume, scale: float | Sequence[float] = 1.0,
                       refine: bool | None = None) -> torch.Tensor:
        """Class logits ``(num_classes, *S')`` on the image grid resampled by ``scale``, on the
        model's device.

        ``refine``: use the rendering head (default: when the variant has one and it has been
        trained, i.e. training passed ``T/2``); ``False`` gives the coarse prediction.
        """
        self.net.eval()
        if refine is None:
            refine = self.rend_steps > 0
        x = self._prepare(image)[None].to(self.device)
        shape = tuple(image.shape)
        new_shape = resampled_shape(shape, scale)
        patch = self._patch_size(shape)
        fixed = self.net.backbone.fixed_size is not None
        if fixed or (self.spatial_ndim == 3 and any(n > p for n, p in zip(shape, patch))):
            zoom = [t / s for t, s in zip(new_shape, shape)]

            def predictor(w: torch.Tensor) -> torch.Tensor:
                return self._infer(w, [max(1, round(n * z)) for n, z in zip(w.shape[2:], zoom)], refine)

            with torch.device(self.device):  # MONAI's inferer makes tensors without a device
                logits = sliding_window_inference(x, patch, sw_batch_size=1, predictor=predictor,
                                                  overlap=0.25, mode="gaussian")
            logits = _upsample(plain(logits), new_shape)
        else:
            xp, crop = pad_to_multiple(x, self.net.backbone.divisor, self.spatial_ndim)
            logits = self._infer(xp, new_shape, refine, crop)
        return logits[0]

    @torch.no_grad()
    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0,
                refine: bool | None = None) -> Volume:
        """Label map of ``image``; ``scale`` != 1 renders a finer or coarser grid of the same
        field of view (the point head is queried at the new grid's coordinates), with the
        matching affine."""
        logits = self.predict_logits(image, scale, refine)
        new_shape = tuple(logits.shape[1:])
        affine = image.affine
        if new_shape != tuple(image.shape):
            affine = resampled_affine(image.affine, image.shape, new_shape)
        labels = logits.argmax(0).cpu().numpy().astype(np.int64)
        return Volume(labels, affine, self.spatial_ndim, image.time_step, path=image.path)

    @torch.no_grad()
    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0,
                              refine: bool | None = None) -> Volume:
        """Softmax class probabilities ``(num_classes, *S')`` float32 on the grid of
        :meth:`predict` (their argmax is its label map)."""
        logits = self.predict_logits(image, scale, refine)
        new_shape = tuple(logits.shape[1:])
        affine = image.affine if new_shape == tuple(image.shape) else resampled_affine(image.affine, image.shape,
                                                                                         new_shape)
        probs = torch.softmax(logits.float(), 0).cpu().numpy().astype(np.float32)
        return Volume(probs, affine, self.spatial_ndim, image.time_step, path=image.path)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        cfg = asdict(self.config)
        cfg["backbone_overrides"] = {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in cfg["backbone_overrides"].items()}
        save_checkpoint(path, self.method, self.net.state_dict(), {
            "config": cfg, "label_names": self.label_names, "spatial_ndim": self.spatial_ndim,
            "in_channels": self.in_channels, "best_step": self.best_step, "history": self.history,
            "num_params": self.num_params, "rend_steps": self.rend_steps,
            "schedule_steps": self.schedule_steps})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "MORSE":
        tensors, meta = load_checkpoint(path, cls.method)
        try:
            cfg = MorseConfig(**meta["config"])
        except (TypeError, ValueError) as exc:
            raise InputError(path, f"unusable MORSE configuration ({exc})") from None
        obj = cls(meta["label_names"], meta["spatial_ndim"], meta["in_channels"], cfg, device=device)
        obj.net.load_state_dict(tensors)
        obj.best_step, obj.history = meta.get("best_step"), meta.get("history", [])
        obj.rend_steps = int(meta.get("rend_steps", 0))
        obj.schedule_steps = int(meta.get("schedule_steps", obj.config.steps))
        return obj
