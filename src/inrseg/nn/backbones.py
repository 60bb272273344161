"""Encoder-decoder segmentation backbones that expose their decoder-block features.

MORSE plugs into any encoder-decoder network: it needs the class logits *and* the feature map
of every decoder block (its "experts"). Every backbone here returns both::

    logits, features = backbone(x)
    # x:        (B, C_in, *S)                 S = (H, W) or (D, H, W), multiples of `divisor`
    # logits:   (B, num_classes, *S)
    # features: [(B, c_i, *S / 2**k_i), ...]  decoder features, coarsest first, finest = full res

Backbones (2D and 3D alike, chosen by ``spatial_dims``):

* :class:`UNetBackbone`: a compact U-Net built from MONAI blocks in the layout of MONAI's
  ``UNet`` (strided residual units down, transposed convolution + residual unit up, skip
  concatenation). Written out instead of hooking ``monai.networks.nets.UNet`` because that net's
  top decoder block emits the class logits directly, so its finest "decoder feature" would have
  only ``num_classes`` channels; here the top block emits ``channels[0]`` features and a 1x1
  head makes the logits. Experts: the bottleneck plus every up block (5 for 5 levels, as the
  MORSE paper's U-Net). The "3D U-Net" is the same class with ``spatial_dims=3``.
* :class:`TransUNetBackbone`: TransUNet's design (a CNN stem down to 1/16 whose 1/2, 1/4 and 1/8
  maps are skips, a ViT on the 1/16 map, a cascaded up-sampler) from MONAI blocks, trained from
  scratch (no pretrained R50-ViT-B/16 is downloaded). The learned position embedding is
  interpolated to the token grid, so any input size that is a multiple of 16 works.
  Experts: the 4 decoder blocks.
* :class:`UNETRBackbone`: ``monai.networks.nets.UNETR`` with forward hooks on its decoder blocks
  ``decoder5 .. decoder2`` (1/8 .. full resolution). UNETR has a fixed input size
  (``fixed_size``); larger or smaller images go through sliding windows.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, TransformerBlock
from monai.networks.nets import UNETR
from torch import nn

__all__ = ["BACKBONES", "BACKBONE_PRESETS", "SegBackbone", "TransUNetBackbone", "UNETRBackbone", "UNetBackbone",
           "build_backbone", "upsample"]

BACKBONES = ("unet", "unet3d", "transunet", "unetr")


class SegBackbone(nn.Module):
    """Base class: ``forward(x) -> (logits, features)`` (see module docstring).

    Attributes:
        spatial_dims: 2 or 3.
        feature_channels: channels of each decoder feature, coarsest first.
        divisor: input sizes must be multiples of this.
        fixed_size: the only input size accepted (``None``: any multiple of ``divisor``).
        default_experts: how many of the finest decoder features MORSE uses by default (the
            paper's N: U-Net 5, TransUNet 3, 3D U-Net 3, UNETR 3).
    """

    spatial_dims: int
    feature_channels: tuple[int, ...]
    divisor: int = 16
    fixed_size: tuple[int, ...] | None = None
    default_experts: int = 3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *S)`` maps resampled (bi/trilinear, ``align_corners=False``) to ``(B, C, *size)``;
    ``x`` itself where ``S == size``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class UNetBackbone(SegBackbone):
    """Compact U-Net (MONAI ``UNet`` layout) returning its decoder features.

    Args:
        spatial_dims: 2 or 3.
        in_channels, num_classes: input channels and output classes.
        channels: feature maps per level; level ``i`` runs at ``1 / 2**(i+1)`` of the input
            (the bottleneck at ``1 / 2**(L-1)``), so inputs must be multiples of ``2**(L-1)``.
        num_res_units: convolutions per residual unit (>= 1).
        norm, act: MONAI layer names (MONAI ``UNet`` defaults: instance norm, PReLU).
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), num_res_units: int = 2,
                 norm: str = "INSTANCE", act: str = "PRELU") -> None:
        super().__init__()
        c = list(channels)
        if len(c) < 2:
            raise ValueError("a U-Net needs at least 2 levels")
        self.spatial_dims, self.divisor = spatial_dims, 2 ** (len(c) - 1)
        self.default_experts = 5 if spatial_dims == 2 else 3
        units = max(1, num_res_units)
        kw = dict(norm=norm, act=act)
        self.downs = nn.ModuleList([
            ResidualUnit(spatial_dims, in_channels if i == 0 else c[i - 1], c[i], strides=2,
                         subunits=units, **kw) for i in range(len(c) - 1)])
        self.bottom = ResidualUnit(spatial_dims, c[-2], c[-1], strides=1, subunits=units, **kw)
        ups = []
        for i in range(len(c) - 1):
            below = c[-1] if i == len(c) - 2 else c[i]
            out = c[i - 1] if i > 0 else c[0]
            ups.append(nn.Sequential(
                Convolution(spatial_dims, c[i] + below, out, strides=2, kernel_size=3,
                            is_transposed=True, **kw),
                ResidualUnit(spatial_dims, out, out, strides=1, subunits=1, **kw)))
        self.ups = nn.ModuleList(ups)
        self.head = Convolution(spatial_dims, c[0], num_classes, kernel_size=1, conv_only=True)
        self.feature_channels = (c[-1],) + tuple(c[i - 1] if i > 0 else c[0]
                                                for i in reversed(range(len(c) - 1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, C_in, *S) -> (B, num_classes, *S), [bottleneck, up_{L-2}, ..., up_0]``."""
        skips, h = [], x
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.bottom(h)
        feats = [h]
        for i in reversed(range(len(self.ups))):
            h = self.ups[i](torch.cat([skips[i], h], dim=1))
            feats.append(h)
        return self.head(h), feats


class TransUNetBackbone(SegBackbone):
    """TransUNet-style hybrid CNN + ViT encoder with a cascaded up-sampler, from MONAI blocks.

    Args:
        spatial_dims: 2 (as in the paper) or 3.
        in_channels, num_classes: input channels and output classes.
        cnn_channels: the 4 CNN stages (strided residual units) at 1/2, 1/4, 1/8, 1/16; the first
            three are skip connections, the last is tokenised with a 1x1 projection (the hybrid
            "patch size 1" on the 1/16 map).
        hidden_size, num_layers, num_heads, mlp_dim: the ViT (MONAI ``TransformerBlock``).
        decoder_channels: the 4 decoder blocks (1/8, 1/4, 1/2, 1); each up-samples 2x,
            concatenates the skip (none for the last) and applies two conv-BN-ReLU.
        img_size: nominal input size; the position embedding is learned on its 1/16 grid and
            interpolated to other grids.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int,
                 cnn_channels: Sequence[int] = (32, 64, 128, 256), hidden_size: int = 192,
                 num_layers: int = 4, num_heads: int = 4, mlp_dim: int = 384,
                 decoder_channels: Sequence[int] = (128, 64, 32, 16),
                 img_size: Sequence[int] | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if len(cnn_channels) != 4 or len(decoder_channels) != 4:
            raise ValueError("TransUNet has 4 CNN stages and 4 decoder blocks")
        sd, self.spatial_dims, self.divisor, self.default_experts = spatial_dims, spatial_dims, 16, 3
        cc, dc = list(cnn_channels), list(decoder_channels)
        self.cnn = nn.ModuleList([
            ResidualUnit(sd, in_channels if i == 0 else cc[i - 1], cc[i], strides=2, subunits=2,
                         norm="BATCH", act="RELU") for i in range(4)])
        self.proj = Convolution(sd, cc[3], hidden_size, kernel_size=1, conv_only=True)
        img_size = tuple(img_size) if img_size is not None else (256,) * sd if sd == 2 else (96,) * 3
        grid = tuple(max(1, n // 16) for n in img_size)
        self.pos = nn.Parameter(torch.zeros(1, hidden_size, *grid))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([TransformerBlock(hidden_size, mlp_dim, num_heads, dropout)
                                     for _ in range(num_layers)])
        self.norm = nn.LayerNorm(hidden_size)
        cbr = dict(norm="BATCH", act="RELU")
        self.conv_more = Convolution(sd, hidden_size, cc[3], kernel_size=3, **cbr)
        skips = [cc[2], cc[1], cc[0], 0]
        ins = [cc[3]] + dc[:3]
        self.decoder = nn.ModuleList([nn.Sequential(
            Convolution(sd, ins[i] + skips[i], dc[i], kernel_size=3, **cbr),
            Convolution(sd, dc[i], dc[i], kernel_size=3, **cbr)) for i in range(4)])
        self.head = Convolution(sd, dc[3], num_classes, kernel_size=1, conv_only=True)
        self.feature_channels = tuple(dc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, C_in, *S) -> (B, num_classes, *S), [1/8, 1/4, 1/2, 1 decoder features]``."""
        skips, h = [], x
        for stage in self.cnn:
            h = stage(h)
            skips.append(h)
        t = self.proj(h)                                          # (B, hidden, *S/16)
        grid = t.shape[2:]
        pos = self.pos if tuple(self.pos.shape[2:]) == tuple(grid) else upsample(self.pos, grid)
        tokens = (t + pos).flatten(2).transpose(1, 2)            # (B, prod(S/16), hidden)
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.norm(tokens)
        h = tokens.transpose(1, 2).reshape(t.shape)
        h = self.conv_more(h)
        feats = []
        for i, block in enumerate(self.decoder):
            h = upsample(h, [2 * n for n in h.shape[2:]])
            if i < 3:
                h = torch.cat([h, skips[2 - i]], dim=1)
            h = block(h)
            feats.append(h)
        return self.head(h), feats


class UNETRBackbone(SegBackbone):
    """MONAI ``UNETR`` with forward hooks collecting its decoder-block outputs.

    Args:
        spatial_dims: 2 or 3.
        in_channels, num_classes: input channels and output classes.
        img_size: the fixed input size (multiples of 16).
        feature_size, hidden_size, mlp_dim, num_heads: as ``monai.networks.nets.UNETR``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int,
                 img_size: Sequence[int], feature_size: int = 16, hidden_size: int = 768,
                 mlp_dim: int = 3072, num_heads: int = 12, dropout: float = 0.0) -> None:
        super().__init__()
        self.spatial_dims, self.divisor, self.default_experts = spatial_dims, 16, 3
        self.fixed_size = tuple(int(n) for n in img_size)
        if any(n % 16 for n in self.fixed_size):
            raise ValueError(f"UNETR input size {self.fixed_size} must be multiples of 16")
        self.net = UNETR(in_channels, num_classes, self.fixed_size, feature_size=feature_size,
                         hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
                         dropout_rate=dropout, spatial_dims=spatial_dims)
        self._feats: list[torch.Tensor] = []
        for name in ("decoder5", "decoder4", "decoder3", "decoder2"):
            getattr(self.net, name).register_forward_hook(self._collect)
        f = feature_size
        self.feature_channels = (8 * f, 4 * f, 2 * f, f)

    def _collect(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._feats.append(output)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, C_in, *fixed_size) -> (B, num_classes, *S), [1/8, 1/4, 1/2, 1 features]``."""
        if tuple(x.shape[2:]) != self.fixed_size:
            raise ValueError(f"UNETR expects inputs of size {self.fixed_size}, got {tuple(x.shape[2:])}")
        self._feats = []
        try:
            logits = self.net(x)
            feats = list(self._feats)
        finally:
            self._feats = []
        return logits, feats


#: Width presets. "cpu": small enough to train on a laptop CPU in minutes; "paper": the sizes
#: of the published backbones (TransUNet's R50 stem replaced by residual units of equal widths).
BACKBONE_PRESETS: dict[str, dict[str, dict]] = {
    "cpu": {
        "unet": dict(channels=(16, 32, 64, 128, 256), num_res_units=2),
        "transunet": dict(cnn_channels=(16, 32, 64, 128), hidden_size=128, num_layers=4,
                          num_heads=4, mlp_dim=256, decoder_channels=(64, 32, 16, 16)),
        "unetr": dict(feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4),
    },
    "paper": {
        "unet": dict(channels=(16, 32, 64, 128, 256), num_res_units=2),
        "transunet": dict(cnn_channels=(64, 256, 512, 1024), hidden_size=768, num_layers=12,
                          num_heads=12, mlp_dim=3072, decoder_channels=(256, 128, 64, 16)),
        "unetr": dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12),
    },
}


def build_backbone(name: str, spatial_dims: int, in_channels: int, num_classes: int,
                   img_size: Sequence[int] | None = None, preset: str = "cpu",
                   **overrides) -> SegBackbone:
    """A backbone by name (``unet``, ``unet3d``, ``transunet``, ``unetr``).

    Args:
        img_size: training patch size (required for ``unetr``; nominal for ``transunet``).
        preset: ``"cpu"`` or ``"paper"`` widths (:data:`BACKBONE_PRESETS`); ``overrides``
            replace single entries (e.g. ``channels=(8, 16, 32)``).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r} ({', '.join(BACKBONES)})")
    if name == "unet3d" and spatial_dims != 3:
        raise ValueError("unet3d needs 3D images (use 'unet' for 2D)")
    key = "unet" if name == "unet3d" else name
    kw = {**BACKBONE_PRESETS[preset][key], **overrides}
    if key == "unet":
        return UNetBackbone(spatial_dims, in_channels, num_classes, **kw)
    if key == "transunet":
        return TransUNetBackbone(spatial_dims, in_channels, num_classes, img_size=img_size, **kw)
    if img_size is None:
        raise ValueError("unetr needs a fixed img_size")
    return UNETRBackbone(spatial_dims, in_channels, num_classes, img_size=img_size, **kw)
