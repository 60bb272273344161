"""Supervised baselines: MONAI U-Net (2D / 3D) and SegResNet, behind the Segmenter protocol.

These are the references MetaSeg, NISF and MORSE are measured against. The networks are
MONAI's; this file holds the training loop (visible top to bottom in :meth:`fit`), sliding-window
inference for volumes larger than the training patch, and checkpointing.

Training: DiceCE loss (MONAI), AdamW with a linear warm-up and cosine decay, random patches
(3D) or whole slices (2D) padded to a multiple of the network's down-sampling factor, optional
intensity augmentation. The best state on the validation subjects (mean foreground Dice) is
kept. Resumable: a training state is written every ``val_every`` steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNet, UNet

from inrseg.checkpoints import load_checkpoint, load_train_state, save_checkpoint, save_train_state
from inrseg.data.grids import resampled_affine, resampled_shape
from inrseg.data.io import Volume
from inrseg.data.layouts import Case
from inrseg.data.preprocess import check_input, normalize
from inrseg.metrics import case_metrics
from inrseg.progress import progress, status

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
    augment: bool = True                    # random intensity scale / shift
    foreground_fraction: float = 0.33       # crops forced to contain foreground (nnU-Net: 1/3)
    normalization: str = "zscore"
    seed: int = 0

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (the network's total down-sampling)."""
        return 2 ** (len(self.channels) - 1) if self.arch == "unet" else 8


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


def load_training_tensors(cases: Sequence[Case], prepare) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Load every case: images through ``prepare`` (``Volume -> (C, *S)`` tensor) and label maps
    as int64 ``(*S,)`` tensors."""
    images, labels = [], []
    for case in progress(cases, desc="loading training cases"):
        img, lab = case.load()
        images.append(prepare(img))
        labels.append(torch.from_numpy(lab.data.astype(np.int64)))
    return images, labels


def restore_training(state_path: Path | None, method: str, net: torch.nn.Module,
                     opt: torch.optim.Optimizer, sched) -> dict | None:
    """Resume: if ``state_path`` exists, load the network, optimizer and scheduler states saved
    there and return the whole state (step, best score, history, method-specific keys); else
    ``None``."""
    if state_path is None or not Path(state_path).exists():
        return None
    st = load_train_state(state_path, method)
    net.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    status(f"resuming from step {int(st['step'])} ({state_path})")
    return st


def pad_to_multiple(x: torch.Tensor, k: int, spatial_ndim: int) -> tuple[torch.Tensor, list[slice]]:
    """Zero-pad the last ``spatial_ndim`` axes of ``x`` up to multiples of ``k`` (symmetric).

    Returns the padded tensor and the slices that crop it back.
    """
    shape = x.shape[-spatial_ndim:]
    pads, crop = [], []
    for n in shape:
        extra = (-n) % k
        lo = extra // 2
        pads.append((lo, extra - lo))
        crop.append(slice(lo, lo + n))
    flat = [p for pair in reversed(pads) for p in pair]
    return F.pad(x, flat), crop


def training_patch(shape: Sequence[int], want: Sequence[int] | None, divisor: int) -> tuple[int, ...]:
    """Training crop (and sliding window) for images of grid ``shape`` (voxels).

    2D: the whole slice. 3D: ``want`` (default 96^3) capped at the volume. Every edge is rounded
    up to a multiple of the network's total down-sampling ``divisor`` and is at least twice it
    (a 1-voxel bottleneck cannot be instance-normalised); the sampler zero-pads where the image
    is smaller.
    """
    if len(shape) == 2:
        return tuple(int(math.ceil(n / divisor) * divisor) for n in shape)
    want = want or (96,) * 3
    return tuple(max(2 * divisor, int(math.ceil(min(w, n) / divisor) * divisor))
                 for w, n in zip(want, shape))


def sample_patch_batch(images: list[torch.Tensor], labels: list[torch.Tensor],
                       patch: tuple[int, ...], batch_size: int, rng: np.random.Generator,
                       augment: bool = True,
                       foreground_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random training batch: ``(B, C, *patch)`` images and ``(B, 1, *patch)`` labels.

    Each item is a random training case (``images[i]``: ``(C, *S_i)``, ``labels[i]``: ``(*S_i)``),
    zero-padded (symmetrically) up to ``patch`` where smaller, then cropped to ``patch``: with
    probability ``foreground_fraction`` the crop contains a random foreground voxel (label > 0)
    at a random position inside it (nnU-Net's foreground oversampling, 1/3 there), otherwise it
    is uniform. Small structures (a tumour in a 240 x 240 x 155 volume) are then seen often
    enough by short trainings. With ``augment``, intensities get a random scale (0.9-1.1) and
    shift (+-0.1).
    """
    xs, ys = [], []
    for _ in range(batch_size):
        i = int(rng.integers(len(images)))
        x, y = images[i], labels[i][None]
        # pad up to the patch, then take a crop of it
        pad = [max(0, p - n) for p, n in zip(patch, x.shape[1:])]
        if any(pad):
            flat = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
            x, y = F.pad(x, flat), F.pad(y, flat)
        shape = x.shape[1:]
        starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch)]
        cropped = any(n > p for n, p in zip(shape, patch))
        if cropped and foreground_fraction > 0 and rng.random() < foreground_fraction:
            fg = torch.nonzero(y[0] > 0)
            if len(fg):
                centre = fg[int(rng.integers(len(fg)))].tolist()
                # a start that keeps the voxel inside the crop, uniform over those allowed
                starts = [int(rng.integers(max(0, c - p + 1), min(c, n - p) + 1))
                          for c, n, p in zip(centre, shape, patch)]
        sl = tuple(slice(s, s + p) for s, p in zip(starts, patch))
        x, y = x[(slice(None),) + sl], y[(slice(None),) + sl]
        if augment:
            scale = float(rng.uniform(0.9, 1.1))
            shift = float(rng.uniform(-0.1, 0.1))
            x = x * scale + shift
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


class SupervisedSegmenter:
    """A supervised CNN baseline (MONAI U-Net or SegResNet), 2D or 3D."""

    method: ClassVar[str] = "unet"

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int,
                 config: SupervisedConfig | None = None) -> None:
        self.config = config or SupervisedConfig()
        self.label_names = list(label_names)
        self.spatial_ndim = spatial_ndim
        self.in_channels = in_channels
        self.net = build_network(self.config, spatial_ndim, in_channels, len(self.label_names))
        self.history: list[dict] = []
        self.best_step: int | None = None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    # ------------------------------------------------------------------ data
    def _prepare(self, image: Volume) -> torch.Tensor:
        check_input(image, self.in_channels, self.spatial_ndim)
        return torch.from_numpy(normalize(image.data, self.config.normalization))

    def _patch_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        return training_patch(shape, self.config.patch_size, self.config.divisor)

    def _sample_batch(self, images: list[torch.Tensor], labels: list[torch.Tensor],
                      patch: tuple[int, ...], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_patch_batch(images, labels, patch, self.config.batch_size, rng,
                                  self.config.augment, self.config.foreground_fraction)

    # ------------------------------------------------------------------ training
    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None) -> None:
        """Train on ``train`` cases; keep the best weights on ``val`` (mean foreground Dice)."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        images, labels = load_training_tensors(train, self._prepare)
        val_data = [c.load() for c in (val or [])]
        patch = self._patch_size(np.max([x.shape[1:] for x in images], axis=0))
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
        start, best_score, best_state = 0, -1.0, None
        st = restore_training(state_path, self.method, self.net, opt, sched)
        if st is not None:
            start, best_score = int(st["step"]), float(st["best_score"])
            best_state = st.get("best_model")
            self.history, self.best_step = list(st["history"]), st["best_step"]
            rng = np.random.default_rng([cfg.seed, start])
        t0 = time.perf_counter()
        bar = progress(total=cfg.steps, desc=f"training {self.method}", initial=start)
        step = start
        for step in range(start, cfg.steps):
            self.net.train()
            x, y = self._sample_batch(images, labels, patch, rng)
            loss = loss_fn(self.net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            over_budget = cfg.budget_minutes is not None and time.perf_counter() - t0 > 60 * cfg.budget_minutes
            last = step + 1 == cfg.steps or over_budget
            if (step + 1) % cfg.val_every == 0 or last:
                score = self._validate(val_data) if val_data else -float(loss.item())
                self.history.append({"step": step + 1, "loss": float(loss.item()), "val_dice": score})
                if score > best_score:
                    best_score, self.best_step = score, step + 1
                    best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                if state_path is not None:
                    save_train_state(state_path, self.method, {
                        "model": self.net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "step": step + 1, "best_score": best_score,
                        "best_step": self.best_step, "best_model": best_state, "history": self.history})
            if over_budget:
                status(f"time budget of {cfg.budget_minutes} min reached at step {step + 1}")
                break
        bar.close()
        if best_state is not None:
            self.net.load_state_dict(best_state)

    @torch.no_grad()
    def _validate(self, val_data: list[tuple[Volume, Volume]]) -> float:
        scores = [case_metrics(self.predict(img).data, lab.data, len(self.label_names),
                               distances=False).mean_foreground_dice for img, lab in val_data]
        return float(np.nanmean(scores))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_logits(self, image: Volume) -> torch.Tensor:
        """Class logits ``(num_classes, *S)`` on the image grid."""
        self.net.eval()
        x = self._prepare(image)[None]
        patch = self._patch_size(image.shape)
        if self.spatial_ndim == 3 and any(n > p for n, p in zip(image.shape, patch)):
            logits = sliding_window_inference(x, patch, sw_batch_size=1, predictor=self.net,
                                              overlap=0.25, mode="gaussian")
        else:
            xp, crop = pad_to_multiple(x, self.config.divisor, self.spatial_ndim)
            logits = self.net(xp)[(slice(None), slice(None)) + tuple(crop)]
        return logits[0]

    @torch.no_grad()
    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map of ``image``; ``scale`` != 1 resamples the logits (trilinear) to a finer or
        coarser grid of the same field of view, with the matching affine."""
        logits = self.predict_logits(image)
        new_shape = resampled_shape(image.shape, scale)
        affine = image.affine
        if new_shape != image.shape:
            mode = "bilinear" if self.spatial_ndim == 2 else "trilinear"
            logits = F.interpolate(logits[None], size=new_shape, mode=mode, align_corners=False)[0]
            affine = resampled_affine(image.affine, image.shape, new_shape)
        labels = logits.argmax(0).numpy().astype(np.int64)
        return Volume(labels, affine, self.spatial_ndim, image.time_step, path=image.path)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        save_checkpoint(path, self.method, self.net.state_dict(), {
            "config": asdict(self.config), "label_names": self.label_names,
            "spatial_ndim": self.spatial_ndim, "in_channels": self.in_channels,
            "best_step": self.best_step, "history": self.history, "num_params": self.num_params})

    @classmethod
    def load(cls, path: str | Path) -> "SupervisedSegmenter":
        tensors, meta = load_checkpoint(path, cls.method)
        cfg_dict = dict(meta["config"])
        for k in ("channels", "patch_size"):
            if cfg_dict.get(k) is not None:
                cfg_dict[k] = tuple(cfg_dict[k])
        obj = cls(meta["label_names"], meta["spatial_ndim"], meta["in_channels"],
                  SupervisedConfig(**cfg_dict))
        obj.net.load_state_dict(tensors)
        obj.best_step, obj.history = meta.get("best_step"), meta.get("history", [])
        return obj


class SegResNetSegmenter(SupervisedSegmenter):
    """MONAI SegResNet baseline (the MetaSeg paper's 3D reference)."""

    method: ClassVar[str] = "segresnet"

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int,
                 config: SupervisedConfig | None = None) -> None:
        super().__init__(label_names, spatial_ndim, in_channels,
                         config or SupervisedConfig(**PRESETS["segresnet"]))
