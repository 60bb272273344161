"""The U-Net / SegResNet config, its presets and recipes (``inrseg train unet|segresnet``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from inrseg.methods.cnn import cnn_config
from inrseg.methods.configs import Recipe

__all__ = ["PRESETS", "SEGRESNET_RECIPE", "UNET_RECIPE", "UNetConfig", "build_config"]

#: preset -> fields: MONAI U-Net widths, and SegResNet
PRESETS: dict[str, dict] = {
    "unet-small": dict(arch="unet", channels=(16, 32, 64, 128, 256), mirror=True),   # 1.6M parameters
    "unet-paper": dict(arch="unet", channels=(32, 64, 128, 256, 512), mirror=True),  # 6.5M, the MetaSeg paper's
    "segresnet": dict(arch="segresnet", init_filters=16, mirror=True),  # 4.7M, the MetaSeg paper's 3D baseline
}


@dataclass
class UNetConfig:
    """Hyper-parameters of a U-Net or SegResNet (saved in the checkpoint)."""

    arch: str = "unet"                      # network: "unet" (MONAI UNet) | "segresnet" (MONAI SegResNet)
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)   # U-Net feature maps per level
    num_res_units: int = 2                  # U-Net residual units per block
    init_filters: int = 16                  # SegResNet width (filters of its first level)
    steps: int = 2000                       # optimiser steps T
    batch_size: int = 8                     # slices (2D) or crops (3D) per step and rank
    patch_size: tuple[int, ...] | None = None  # 3D training crop (voxels); None: 96^3 capped at the volume
    lr: float = 1e-3                        # AdamW peak learning rate
    weight_decay: float = 1e-5              # AdamW weight decay
    warmup: int = 50                        # linear lr warm-up steps before the cosine decay
    val_every: int = 100                    # validation (and resume-state) interval in steps
    budget_minutes: float | None = None     # stop training after this wall time
    fit_schedule_to_budget: bool = True     # lr schedule over the steps the budget allows
    augment: bool = True                    # random intensity scale / shift of training crops
    mirror: bool = False                    # random mirroring of crops along every axis (presets: on, as nnU-Net)
    foreground_fraction: float = 0.33       # crops forced to contain foreground (nnU-Net: 1/3)
    normalization: str = "zscore"           # image intensity normalisation (inrseg.data.preprocess)
    seed: int = 0                           # initial weights and every random draw of training

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (the network's total down-sampling)."""
        return 2 ** (len(self.channels) - 1) if self.arch == "unet" else 8


def build_config(preset: str, spatial_ndim: int, overrides: Mapping[str, Any]) -> UNetConfig:
    """The :class:`UNetConfig` of ``preset`` for ``spatial_ndim``-D data: 3D gets batches of 2
    crops; ``overrides`` replace fields; an explicit ``steps`` caps ``val_every``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    cfg = cnn_config(UNetConfig, PRESETS[preset], spatial_ndim, overrides)
    if "steps" in overrides and "val_every" not in overrides:
        cfg.val_every = max(1, min(cfg.val_every, cfg.steps))
    return cfg


UNET_RECIPE = Recipe(UNetConfig, {k: v for k, v in PRESETS.items() if v["arch"] == "unet"},
                     lambda spatial_ndim: "unet-small", build_config)
SEGRESNET_RECIPE = Recipe(UNetConfig, {"segresnet": PRESETS["segresnet"]}, lambda spatial_ndim: "segresnet",
                          build_config)
