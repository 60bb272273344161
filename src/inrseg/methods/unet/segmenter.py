"""MONAI U-Net (2D / 3D) and SegResNet on the shared CNN trainer (:mod:`inrseg.methods.cnn`)."""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from monai.networks.nets import SegResNet, UNet

from inrseg.methods.cnn import CNNSegmenter
from inrseg.methods.unet.config import PRESETS, UNetConfig

__all__ = ["SegResNetSegmenter", "UNetSegmenter"]


class UNetSegmenter(CNNSegmenter):
    """A MONAI U-Net (or SegResNet, ``config.arch``), 2D or 3D: ``(B, C_in, *S) -> (B, K, *S)``
    logits, trained with DiceCE, AdamW, a linear warm-up and a cosine decay. Constructor
    arguments: :class:`~inrseg.methods.base.Segmenter`'s, ``config`` a :class:`UNetConfig`."""

    method: ClassVar[str] = "unet"
    config_class: ClassVar[type] = UNetConfig

    def build_network(self) -> torch.nn.Module:
        cfg, nd, k = self.config, self.spatial_ndim, self.num_classes
        if cfg.arch == "unet":
            return UNet(nd, self.in_channels, k, channels=tuple(cfg.channels),
                        strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units)
        if cfg.arch == "segresnet":
            return SegResNet(spatial_dims=nd, init_filters=cfg.init_filters, in_channels=self.in_channels,
                             out_channels=k)
        raise ValueError(f"unknown architecture {cfg.arch!r} (unet, segresnet)")

    @property
    def divisor(self) -> int:
        return self.config.divisor


class SegResNetSegmenter(UNetSegmenter):
    """MONAI SegResNet (default config: the ``segresnet`` preset)."""

    method: ClassVar[str] = "segresnet"

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: UNetConfig | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(label_names, spatial_ndim, in_channels,
                         config if config is not None else UNetConfig(**PRESETS["segresnet"]), device)
