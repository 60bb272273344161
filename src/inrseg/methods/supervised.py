"""Supervised baselines: MONAI U-Net (2D / 3D) and SegResNet, behind the Segmenter protocol.

These are the references MetaSeg, NISF and MORSE are measured against. The networks are
MONAI's; this file holds the training step (the loop, budget, validation cadence, resume state
and DDP are the engine's, :mod:`inrseg.engine`), sliding-window inference for volumes larger
than the training patch, and checkpointing.

Training: DiceCE loss (MONAI's; ignored voxels of a dataset with an ignore label count
nowhere, :class:`inrseg.losses.DiceCELoss`), AdamW with a linear warm-up and cosine decay, random patches
(3D) or whole slices (2D) padded to a multiple of the network's down-sampling factor, optional
intensity augmentation. With a budget that allows fewer steps than ``steps``, the warm-up and
cosine decay run over the steps it allows (timed at the start) instead of being cut off at a high
lr. The best state on the validation subjects (mean foreground Dice) is kept. Resumable: a
training state is written every ``val_every`` steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet, UNet

from inrseg.engine.checkpoints import load_checkpoint, save_checkpoint
from inrseg.methods.base import check_spatial_ndim
from inrseg.data.grids import resampled_affine, resampled_shape
from inrseg.data.io import Volume
from inrseg.data.layouts import Case
from inrseg.data.preprocess import check_input, normalize
from inrseg.data.sampling import (PatchSampler, has_ignored, load_training_tensors, pad_to_multiple, plain,
                                  training_patch)
from inrseg.losses import IGNORE, DiceCELoss
from inrseg.metrics import case_metrics
from inrseg.engine import (SCHEDULE_STEPS_KEY, Budget, LoopSettings, TrainTask, as_budget, resolve_device,
                             run_training, timed_schedule_steps, use_bf16, world, wrap_ddp)

PRESETS: dict[str, dict] = {
    # MONAI UNet 16-256 channels, 1.6M parameters: the CPU-friendly default.
    "unet-small": dict(arch="unet", channels=(16, 32, 64, 128, 256)),
    # 32-512 channels, 6.5M parameters: close to the 7.7M U-Net of the MetaSeg paper.
    "unet-paper": dict(arch="unet", channels=(32, 64, 128, 256, 512)),
    # SegResNet with 16 initial filters, 4.7M parameters (the MetaSeg paper's 3D baseline).
    "segresnet": dict(arch="segresnet", init_filters=16),
}


@dataclass
class SupervisedConfig:
    """Hyper-parameters of a supervised baseline (saved in the checkpoint)."""

    arch: str = "unet"                      # "unet" | "segresnet"
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)   # U-Net feature maps per level
    num_res_units: int = 2                  # U-Net residual units per block
    init_filters: int = 16                  # SegResNet width
    steps: int = 2000                       # optimiser steps
    batch_size: int = 8                     # slices (2D) or patches (3D) per step
    patch_size: tuple[int, ...] | None = None  # 3D training crop (voxels); None: 96^3 capped
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup: int = 50
    val_every: int = 100
    budget_minutes: float | None = None     # stop training after this wall time
    fit_schedule_to_budget: bool = True     # lr schedule over the steps the budget allows
    augment: bool = True                    # random intensity scale / shift
    foreground_fraction: float = 0.33       # crops forced to contain foreground (nnU-Net: 1/3)
    normalization: str = "zscore"
    seed: int = 0

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (the network's total down-sampling)."""
        return 2 ** (len(self.channels) - 1) if self.arch == "unet" else 8


def supervised_config(preset: str = "unet-small", spatial_ndim: int = 2, **overrides) -> SupervisedConfig:
    """The :class:`SupervisedConfig` of ``inrseg train unet|segresnet``: a :data:`PRESETS` entry,
    3D data gets batches of 2 crops, ``steps`` caps ``val_every``; ``overrides`` replace fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    base = dict(PRESETS[preset], batch_size=2) if spatial_ndim == 3 else dict(PRESETS[preset])
    cfg = SupervisedConfig(**{**base, **overrides})
    if "steps" in overrides and "val_every" not in overrides:
        cfg.val_every = max(1, min(cfg.val_every, cfg.steps))
    return cfg


def build_network(cfg: SupervisedConfig, spatial_ndim: int, in_channels: int,
                  num_classes: int) -> torch.nn.Module:
    """MONAI U-Net or SegResNet, ``(B, C_in, *S) -> (B, num_classes, *S)`` logits."""
    if cfg.arch == "unet":
        return UNet(spatial_ndim, in_channels, num_classes, channels=tuple(cfg.channels),
                    strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units)
    if cfg.arch == "segresnet":
        return SegResNet(spatial_dims=spatial_ndim, init_filters=cfg.init_filters,
                         in_channels=in_channels, out_channels=num_classes)
    raise ValueError(f"unknown architecture {cfg.arch!r} (unet, segresnet)")


class SupervisedSegmenter:
    """A supervised CNN baseline (MONAI U-Net or SegResNet), 2D or 3D.

    Args:
        label_names: class names indexed by label value.
        spatial_ndim: 2 or 3.
        in_channels: image channels.
        config: hyper-parameters.
        device: where the network lives and trains (``"cpu"``, ``"cuda:0"``, ``"auto"``...).
    """

    method: ClassVar[str] = "unet"
    #: grid dimensionalities it segments
    spatial_ndims: ClassVar[tuple[int, ...]] = (2, 3)
    #: bf16 autocast is safe for CNNs (``--precision auto`` uses it on CUDA)
    bf16_safe: ClassVar[bool] = True

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int,
                 config: SupervisedConfig | None = None, device: str | torch.device = "cpu") -> None:
        check_spatial_ndim(type(self), spatial_ndim)
        self.config = config or SupervisedConfig()
        self.label_names = list(label_names)
        self.spatial_ndim = spatial_ndim
        self.in_channels = in_channels
        self.device = resolve_device(device)
        with torch.device(self.device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # the same initial weights on every rank
            self.net = build_network(self.config, spatial_ndim, in_channels, len(self.label_names))
        self.history: list[dict] = []
        self.schedule_steps = self.config.steps  # T of the last fit's lr schedule (fitted to its budget)
        self.best_step: int | None = None

    def to(self, device: str | torch.device) -> "SupervisedSegmenter":
        """Move the network to ``device``."""
        self.device = resolve_device(device)
        self.net.to(self.device)
        return self

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    # ------------------------------------------------------------------ data
    def _prepare(self, image: Volume) -> torch.Tensor:
        """Normalised ``(C, *S)`` float32 tensor on the CPU."""
        check_input(image, self.in_channels, self.spatial_ndim)
        return torch.from_numpy(normalize(image.data, self.config.normalization))

    def _patch_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        return training_patch(shape, self.config.patch_size, self.config.divisor)

    # ------------------------------------------------------------------ training
    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Train on ``train`` cases; keep the best weights on ``val`` (mean foreground Dice).

        Under torchrun each rank draws its own ``batch_size`` items of every step's global
        batch (``world_size x batch_size``) and DDP averages the gradients. ``budget`` bounds
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
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        mine = range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        val_data: list[tuple[Volume, Volume]] = []
        resuming = state_path is not None and Path(state_path).exists()
        T = [cfg.steps]  # the schedule length; a resumed run's comes back with its weights
        if cfg.fit_schedule_to_budget and budget.limited and not resuming:
            T[0] = self._steps_within(budget, sampler, mine, loss_fn, val)
        self.schedule_steps = T[0]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, T[0]) / T[0])))
        train_net = wrap_ddp(self.net, self.device)

        def step(i: int):
            x, y = sampler.batch(i, mine, self.device)
            logits = train_net(x)
            with torch.device(self.device):  # MONAI's losses make tensors without a device
                return loss_fn(logits, y), {}

        def validate() -> dict[str, float]:
            if not val_data:
                val_data.extend(c.load() for c in val)
            return {"val_dice": self._validate(val_data)}

        def weights() -> dict[str, torch.Tensor]:
            return {**self.net.state_dict(),
                    SCHEDULE_STEPS_KEY: torch.tensor(T[0], dtype=torch.int64, device=self.device)}

        def load_weights(state: dict[str, torch.Tensor]) -> None:
            state = dict(state)
            T[0] = self.schedule_steps = int(state.pop(SCHEDULE_STEPS_KEY, T[0]))
            self.net.load_state_dict(state)

        res = run_training(
            TrainTask(name=self.method, method=self.method, step=step, optimizers=[opt],
                      schedulers=[sched], params=list(self.net.parameters()),
                      weights=weights, load_weights=load_weights,
                      validate=validate if val else None, modules=[self.net], grad_sync="ddp",
                      bf16=use_bf16(self.device, precision, self.bf16_safe)),
            LoopSettings(steps=cfg.steps, val_every=cfg.val_every, budget=budget, seed=cfg.seed,
                         state_path=state_path, log_path=log_path, device=self.device))
        self.history, self.best_step = res.history, res.best_step

    def _steps_within(self, budget: Budget, sampler: PatchSampler, mine: Sequence[int], loss_fn: torch.nn.Module,
                      val: Sequence[Case] | None) -> int:
        """The schedule length that fits ``budget``: two training steps and one validation
        prediction (x the validation cases every ``val_every`` steps) timed on rank 0
        (:func:`inrseg.engine.timed_schedule_steps`)."""
        cfg = self.config

        def loss_of(net: torch.nn.Module, i: int) -> torch.Tensor:
            x, y = sampler.batch(i, mine, self.device)
            with torch.device(self.device):  # MONAI's losses make tensors without a device
                return loss_fn(net(x), y)

        return timed_schedule_steps(
            budget, cfg.steps, self.net, lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
            loss_of, self.device, self.predict, val, cfg.val_every, self.method)

    @torch.no_grad()
    def _validate(self, val_data: list[tuple[Volume, Volume]]) -> float:
        scores = [case_metrics(self.predict(img).data, lab.data, len(self.label_names), distances=False,
                               ignore_label=lab.meta.get("ignore_label")).mean_foreground_dice
                  for img, lab in val_data]
        return float(np.nanmean(scores))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_logits(self, image: Volume) -> torch.Tensor:
        """Class logits ``(num_classes, *S)`` on the image grid, on the model's device."""
        self.net.eval()
        x = self._prepare(image)[None].to(self.device)
        patch = self._patch_size(image.shape)
        if self.spatial_ndim == 3 and any(n > p for n, p in zip(image.shape, patch)):
            with torch.device(self.device):  # MONAI's inferer makes tensors without a device
                logits = sliding_window_inference(x, patch, sw_batch_size=1, predictor=self.net,
                                                  overlap=0.25, mode="gaussian")
        else:
            xp, crop = pad_to_multiple(x, self.config.divisor, self.spatial_ndim)
            logits = self.net(xp)[(slice(None), slice(None)) + tuple(crop)]
        return plain(logits)[0]

    def _scaled_logits(self, image: Volume, scale: float | Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
        """Logits ``(num_classes, *S')`` resampled (bi/trilinear) to the grid of ``scale`` and
        that grid's affine."""
        logits = self.predict_logits(image)
        new_shape = resampled_shape(image.shape, scale)
        affine = image.affine
        if new_shape != image.shape:
            mode = "bilinear" if self.spatial_ndim == 2 else "trilinear"
            logits = F.interpolate(logits[None], size=new_shape, mode=mode, align_corners=False)[0]
            affine = resampled_affine(image.affine, image.shape, new_shape)
        return logits, affine

    @torch.no_grad()
    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map of ``image``; ``scale`` != 1 resamples the logits (trilinear) to a finer or
        coarser grid of the same field of view, with the matching affine."""
        logits, affine = self._scaled_logits(image, scale)
        labels = logits.argmax(0).cpu().numpy().astype(np.int64)
        return Volume(labels, affine, self.spatial_ndim, image.time_step, path=image.path)

    @torch.no_grad()
    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Softmax class probabilities ``(num_classes, *S')`` float32 on the grid of
        :meth:`predict` (their argmax is its label map)."""
        logits, affine = self._scaled_logits(image, scale)
        probs = torch.softmax(logits.float(), 0).cpu().numpy().astype(np.float32)
        return Volume(probs, affine, self.spatial_ndim, image.time_step, path=image.path)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        save_checkpoint(path, self.method, self.net.state_dict(), {
            "config": asdict(self.config), "label_names": self.label_names,
            "spatial_ndim": self.spatial_ndim, "in_channels": self.in_channels,
            "best_step": self.best_step, "history": self.history, "num_params": self.num_params,
            "schedule_steps": self.schedule_steps})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SupervisedSegmenter":
        tensors, meta = load_checkpoint(path, cls.method)
        cfg_dict = dict(meta["config"])
        for k in ("channels", "patch_size"):
            if cfg_dict.get(k) is not None:
                cfg_dict[k] = tuple(cfg_dict[k])
        obj = cls(meta["label_names"], meta["spatial_ndim"], meta["in_channels"],
                  SupervisedConfig(**cfg_dict), device=device)
        obj.net.load_state_dict(tensors)
        obj.best_step, obj.history = meta.get("best_step"), meta.get("history", [])
        obj.schedule_steps = int(meta.get("schedule_steps", obj.config.steps))
        return obj


class SegResNetSegmenter(SupervisedSegmenter):
    """MONAI SegResNet baseline (the MetaSeg paper's 3D reference)."""

    method: ClassVar[str] = "segresnet"

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int,
                 config: SupervisedConfig | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(label_names, spatial_ndim, in_channels,
                         config or SupervisedConfig(**PRESETS["segresnet"]), device)
