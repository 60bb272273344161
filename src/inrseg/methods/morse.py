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
``lambda_t = lambda_rend * 1{t > T/2} * (t - T/2) / T`` (``lambda_rend = 0.1``). AdamW 5e-4 with
polynomial decay ``(1 - t/T)**0.9``. 2D: whole slices padded to the backbone's multiple;
3D: random crops, sliding-window inference on larger volumes (and on any image for UNETR's
fixed input size).

Coordinates of points are ``[-1, 1]`` over the network's input frame (the padded slice, the
training crop or the sliding window), cell-centred (:mod:`inrseg.nn.point_sampling`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from inrseg.checkpoints import load_checkpoint, save_checkpoint, save_train_state
from inrseg.data.grids import resampled_affine, resampled_shape
from inrseg.data.io import Volume
from inrseg.data.layouts import Case
from inrseg.data.preprocess import check_input, normalize
from inrseg.errors import InputError
from inrseg.methods.supervised import (load_training_tensors, pad_to_multiple, restore_training,
                                       sample_patch_batch, training_patch)
from inrseg.metrics import case_metrics
from inrseg.nn.backbones import BACKBONES, SegBackbone, build_backbone
from inrseg.nn.fourier import GaussianFourierFeatures
from inrseg.nn.point_sampling import most_uncertain_points, point_sample, sample_training_points
from inrseg.progress import progress, status

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
    "paper": dict(moe_dim=256, gate_dim=256, point_width=512),
    "cpu": dict(moe_dim=32, gate_dim=32, point_width=256),
}


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
# modules
# ============================================================================================

def _conv(nd: int) -> type[nn.Module]:
    return nn.Conv2d if nd == 2 else nn.Conv3d


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class StochasticMoE(nn.Module):
    """SMoE: decoder-block features as experts, mixed per pixel by a softmax gate.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each expert's decoder feature (coarsest first).
        dim: expert feature width ``D`` (paper 256).
        gate_dim: gate hidden width (paper 256).
        expert_dropout: ``"bernoulli"`` (drop each expert with probability ``alpha``),
            ``"count"`` (drop a uniformly random number ``0..N-1`` of random experts) or ``"none"``.
        renormalize: renormalise the surviving experts' weights to sum to 1 (else their
            softmax weights are only zeroed for the dropped experts).
    """

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], dim: int = 256,
                 gate_dim: int = 256, expert_dropout: str = "bernoulli", alpha: float = 0.7,
                 renormalize: bool = True) -> None:
        super().__init__()
        conv, n = _conv(spatial_dims), len(in_channels)
        self.num_experts, self.expert_dropout, self.alpha = n, expert_dropout, alpha
        self.renormalize = renormalize
        self.experts = nn.ModuleList([nn.Sequential(conv(c, dim, 1), nn.ReLU(inplace=True),
                                                    conv(dim, dim, 1)) for c in in_channels])
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.gate = nn.Sequential(conv(n * dim, gate_dim, 3, padding=1), bn(gate_dim),
                                  nn.ReLU(inplace=True), conv(gate_dim, n, 3, padding=1))
        self.fuse = nn.Sequential(conv(dim, dim, 1), nn.ReLU(inplace=True), conv(dim, dim, 1))

    def expert_mask(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(B, N)`` 0/1 mask of the active experts of each image (all ones in eval mode)."""
        n = self.num_experts
        if not self.training or self.expert_dropout == "none" or n == 1:
            return torch.ones(batch, n, device=device)
        if self.expert_dropout == "bernoulli":
            mask = (torch.rand(batch, n, device=device) >= self.alpha).float()
        else:  # "count": drop a random number (0..N-1) of random experts
            k = torch.randint(0, n, (batch, 1), device=device)
            rank = torch.rand(batch, n, device=device).argsort(dim=1).argsort(dim=1)
            mask = (rank >= k).float()
        dead = mask.sum(1) == 0  # keep one random expert where all were dropped
        if dead.any():
            keep = torch.randint(0, n, (int(dead.sum()),), device=device)
            mask[dead.nonzero()[:, 0], keep] = 1.0
        return mask

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse decoder features ``[(B, c_i, *S_i)]`` (coarsest first, last at the finest size).

        Returns:
            ``x_out`` ``(B, D, *S)`` and the gate weights ``W`` ``(B, N, *S)`` (sum 1 over N).
        """
        size = features[-1].shape[2:]
        experts = [_upsample(mlp(f), size) for mlp, f in zip(self.experts, features)]
        scores = self.gate(torch.cat(experts, dim=1))                      # (B, N, *S)
        mask = self.expert_mask(scores.shape[0], scores.device)
        mask = mask.reshape(*mask.shape, *([1] * (scores.dim() - 2)))
        if self.renormalize:
            weights = torch.softmax(scores.masked_fill(mask == 0, float("-inf")), dim=1)
        else:
            weights = torch.softmax(scores, dim=1) * mask
        mixed = sum(weights[:, i:i + 1] * e for i, e in enumerate(experts))
        return self.fuse(mixed), weights


class PointHead(nn.Module):
    """PointRend's point head: per-point MLP with the coarse logits re-concatenated at each layer.

    ``(B, F, P)`` point features + ``(B, C, P)`` coarse logits -> ``(B, C, P)`` logits.

    ``identity_init``: the predictor starts with zero weights on the hidden features and the
    identity on the re-concatenated coarse logits, so an untrained head returns the coarse
    logits (a no-op refinement) and training only moves it where ``L_rend`` asks; PointRend
    initialises the predictor with N(0, 0.001) instead (``identity_init=False``).
    """

    def __init__(self, in_dim: int, num_classes: int, width: int = 512, num_layers: int = 3,
                 identity_init: bool = True) -> None:
        super().__init__()
        dims = [in_dim] + [width] * num_layers
        self.fcs = nn.ModuleList([nn.Conv1d(d + num_classes, width, 1) for d in dims[:-1]])
        self.predictor = nn.Conv1d(dims[-1] + num_classes, num_classes, 1)
        if identity_init:  # start as the coarse prediction: refinement is a no-op until trained
            with torch.no_grad():
                self.predictor.weight.zero_()
                self.predictor.bias.zero_()
                self.predictor.weight[:, -num_classes:, 0] = torch.eye(num_classes)
        else:
            nn.init.normal_(self.predictor.weight, std=0.001)
            nn.init.zeros_(self.predictor.bias)

    def forward(self, feats: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        h = feats
        for fc in self.fcs:
            h = F.relu(fc(torch.cat([h, coarse], dim=1)))
        return self.predictor(torch.cat([h, coarse], dim=1))


class MorseOutput(NamedTuple):
    """A forward pass: ``coarse`` logits ``(B, C, *S)``, ``fine`` point features ``(B, F, *S)``
    (``None`` without a point head) and SMoE ``gates`` ``(B, N, *S)`` (``None`` without SMoE)."""

    coarse: torch.Tensor
    fine: torch.Tensor | None
    gates: torch.Tensor | None


class MorseNet(nn.Module):
    """Backbone + optional SMoE + optional point head (the variant decides; see module doc)."""

    def __init__(self, backbone: SegBackbone, num_classes: int, cfg: MorseConfig) -> None:
        super().__init__()
        self.backbone, self.num_classes, self.variant = backbone, num_classes, cfg.variant
        nd = backbone.spatial_dims
        self.smoe: StochasticMoE | None = None
        self.seg_head: nn.Module | None = None
        if cfg.uses_smoe:
            n = min(cfg.num_experts or backbone.default_experts, len(backbone.feature_channels))
            self.smoe = StochasticMoE(nd, backbone.feature_channels[-n:], cfg.moe_dim, cfg.gate_dim,
                                      cfg.expert_dropout, cfg.alpha, cfg.renormalize)
            self.seg_head = _conv(nd)(cfg.moe_dim, num_classes, 1)
        self.fourier: GaussianFourierFeatures | None = None
        self.point_head: PointHead | None = None
        if cfg.uses_points:
            fine = cfg.moe_dim if cfg.uses_smoe else backbone.feature_channels[-1]
            if cfg.uses_fourier:
                self.fourier = GaussianFourierFeatures(nd, cfg.fourier_frequencies, cfg.fourier_sigma,
                                                       cfg.fourier_trainable, seed=cfg.seed)
                fine += self.fourier.out_dim
            self.point_head = PointHead(fine, num_classes, cfg.point_width, cfg.point_layers,
                                        cfg.point_identity_init)

    def forward(self, x: torch.Tensor) -> MorseOutput:
        """``(B, C_in, *S)`` -> :class:`MorseOutput` on the grid ``S``."""
        logits, feats = self.backbone(x)
        if self.smoe is None:
            return MorseOutput(logits, feats[-1] if self.point_head is not None else None, None)
        n = self.smoe.num_experts
        fused, gates = self.smoe(feats[-n:])
        coarse = _upsample(self.seg_head(fused), x.shape[2:])
        return MorseOutput(coarse, fused, gates)

    def point_logits(self, fine: torch.Tensor, coarse: torch.Tensor, coords: torch.Tensor,
                     pe_coords: torch.Tensor | None = None) -> torch.Tensor:
        """Point-head logits ``(B, C, P)`` at ``coords`` ``(B, P, d)`` (``[-1, 1]`` of the maps).

        ``pe_coords``: the coordinates given to the Fourier features, when the maps are a crop
        of the frame the network was trained on (default: ``coords``).
        """
        feats = point_sample(fine, coords)
        if self.fourier is not None:
            pe = self.fourier(coords if pe_coords is None else pe_coords)   # (B, P, 2L)
            feats = torch.cat([feats, pe.transpose(1, 2)], dim=1)
        return self.point_head(feats, point_sample(coarse, coords))

    @torch.no_grad()
    def render(self, out: MorseOutput, shape: Sequence[int], num_points: int,
               coord_scale: torch.Tensor | None = None,
               coord_offset: torch.Tensor | None = None) -> torch.Tensor:
        """Refined logits ``(B, C, *shape)`` by PointRend-style adaptive subdivision.

        Each step up-samples the logits 2x (the last one to ``shape`` exactly; a single step at
        ``shape`` when it is not larger than the coarse grid) and re-predicts the ``num_points``
        most uncertain voxels with the point head. ``coord_scale``/``coord_offset`` ``(d,)``
        map the maps' coordinates to the Fourier coordinates (``pe = coords * scale + offset``).
        """
        shape = tuple(int(n) for n in shape)
        logits = out.coarse
        if self.point_head is None:
            return _upsample(logits, shape)
        src = logits.shape[2:]
        steps = max(0, math.ceil(math.log2(max(t / s for t, s in zip(shape, src)) - 1e-9)))
        plan = [tuple(min(s * 2 ** k, t) for s, t in zip(src, shape)) for k in range(1, steps)]
        plan.append(shape)
        b, c = logits.shape[:2]
        for size in plan:
            logits = _upsample(logits, size).clone()
            idx, coords = most_uncertain_points(logits, num_points)
            pe = coords
            if coord_scale is not None:
                pe = coords * coord_scale + coord_offset
            pts = self.point_logits(out.fine, out.coarse, coords, pe)           # (B, C, P)
            flat = logits.reshape(b, c, -1)
            flat.scatter_(2, idx[:, None].expand(-1, c, -1), pts)
            logits = flat.reshape(b, c, *size)
        return logits


# ============================================================================================
# the Segmenter
# ============================================================================================

class MORSE:
    """MORSE (and its ablation variants) behind the :class:`~inrseg.segmenter.Segmenter` protocol.

    Args:
        label_names: class names indexed by label value.
        spatial_ndim: 2 or 3.
        in_channels: image channels.
        config: hyper-parameters, including ``backbone`` and ``variant``.
    """

    method: ClassVar[str] = "morse"

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int,
                 config: MorseConfig | None = None) -> None:
        self.config = config or MorseConfig()
        if spatial_ndim not in (2, 3):
            raise InputError(None, f"MORSE segments 2D or 3D images, not {spatial_ndim}D")
        self.label_names = list(label_names)
        self.spatial_ndim, self.in_channels = spatial_ndim, in_channels
        cfg = self.config
        with torch.random.fork_rng():  # seeded initialisation, global RNG state untouched
            torch.manual_seed(cfg.seed)
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
        self.rend_steps = 0  # optimiser steps with L_rend active: refinement is used only after

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
        check_input(image, self.in_channels, self.spatial_ndim)
        return torch.from_numpy(normalize(image.data, self.config.normalization))

    def _patch_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Training patch (and sliding window) for images of grid ``shape``."""
        fixed = self.net.backbone.fixed_size
        if fixed is not None:
            return fixed
        return training_patch(shape, self.config.patch_size, self.net.backbone.divisor)

    # ------------------------------------------------------------------ training
    def _losses(self, x: torch.Tensor, y: torch.Tensor, weight: float,
                loss_fn: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss of a batch ``x`` ``(B, C_in, *S)``, ``y`` ``(B, 1, *S)``, and its parts."""
        cfg = self.config
        out = self.net(x)
        loss = loss_fn(out.coarse, y)
        parts = {"sup": float(loss.item())}
        if self.net.point_head is not None and weight > 0:
            coords = sample_training_points(out.coarse, cfg.train_points, cfg.oversample,
                                            cfg.importance)
            pts = self.net.point_logits(out.fine, out.coarse, coords)           # (B, C, P)
            target = point_sample(y.float(), coords, mode="nearest")[:, 0].long()  # (B, P)
            rend = F.cross_entropy(pts, target)
            loss = loss + weight * rend
            parts["rend"] = float(rend.item())
        return loss, parts

    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None) -> None:
        """Train on ``train`` cases; keep the best weights on ``val`` (mean foreground Dice of the
        final, refined prediction). Resumable from ``state_path``; stops at ``budget_minutes``."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        images, labels = load_training_tensors(train, self._prepare)
        val_data = [c.load() for c in (val or [])]
        patch = self._patch_size(np.max([x.shape[1:] for x in images], axis=0))
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=0.9,
                                  weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: max(0.0, 1 - min(s, cfg.steps) / cfg.steps) ** cfg.poly_power)
        start, best_score, best_state = 0, -1.0, None
        st = restore_training(state_path, self.method, self.net, opt, sched)
        if st is not None:
            start, best_score = int(st["step"]), float(st["best_score"])
            best_state = st.get("best_model")
            self.history, self.best_step = list(st["history"]), st["best_step"]
            self.rend_steps = int(st["rend_steps"])
            rng = np.random.default_rng([cfg.seed, start])
            torch.manual_seed(cfg.seed + start)
        t0 = time.perf_counter()
        bar = progress(total=cfg.steps, desc=f"training morse/{cfg.variant}", initial=start)
        for step in range(start, cfg.steps):
            self.net.train()
            x, y = sample_patch_batch(images, labels, patch, cfg.batch_size, rng, cfg.augment,
                                      cfg.foreground_fraction)
            weight = rend_weight(step + 1, cfg.steps, cfg.lambda_rend)
            loss, parts = self._losses(x, y, weight, loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            self.rend_steps += int("rend" in parts)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            over_budget = cfg.budget_minutes is not None and time.perf_counter() - t0 > 60 * cfg.budget_minutes
            last = step + 1 == cfg.steps or over_budget
            if (step + 1) % cfg.val_every == 0 or last:
                entry = {"step": step + 1, "loss": float(loss.item()), **{f"loss_{k}": v for k, v in parts.items()},
                         "lambda_rend": weight}
                if val_data:
                    entry.update(self._validate(val_data))
                    score = entry["val_dice"]
                else:
                    score = -float(loss.item())
                self.history.append(entry)
                if score > best_score:
                    best_score, self.best_step = score, step + 1
                    best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                    best_state["__rend_steps__"] = torch.tensor(self.rend_steps)
                if state_path is not None:
                    save_train_state(state_path, self.method, {
                        "model": self.net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "step": step + 1, "best_score": best_score,
                        "best_step": self.best_step, "best_model": best_state, "history": self.history,
                        "rend_steps": self.rend_steps})
            if over_budget:
                status(f"time budget of {cfg.budget_minutes} min reached at step {step + 1}")
                break
        bar.close()
        if best_state is not None:
            best_state = dict(best_state)
            self.rend_steps = int(best_state.pop("__rend_steps__"))
            self.net.load_state_dict(best_state)

    @torch.no_grad()
    def _validate(self, val_data: list[tuple[Volume, Volume]]) -> dict[str, float]:
        """Mean foreground Dice of the final (``val_dice``) and the coarse (``val_dice_coarse``)
        predictions on the validation cases."""
        n = len(self.label_names)
        final, coarse = [], []
        for img, lab in val_data:
            final.append(case_metrics(self.predict(img).data, lab.data, n,
                                      distances=False).mean_foreground_dice)
            if self.net.point_head is not None:
                coarse.append(case_metrics(self.predict(img, refine=False).data, lab.data, n,
                                           distances=False).mean_foreground_dice)
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
            scale = torch.tensor([(c.stop - c.start) / n for c, n in zip(crop, full)])
            offset = torch.tensor([(c.stop + c.start) / n - 1 for c, n in zip(crop, full)])
            out = MorseOutput(out.coarse[sl], None if out.fine is None else out.fine[sl], None)
        else:
            scale = offset = None
        if not refine or self.net.point_head is None:
            return _upsample(out.coarse, shape)
        return self.net.render(out, shape, self.config.test_points, scale, offset)

    @torch.no_grad()
    def predict_logits(self, image: Volume, scale: float | Sequence[float] = 1.0,
                       refine: bool | None = None) -> torch.Tensor:
        """Class logits ``(num_classes, *S')`` on the image grid resampled by ``scale``.

        ``refine``: use the rendering head (default: when the variant has one and it has been
        trained, i.e. training passed ``T/2``); ``False`` gives the coarse prediction.
        """
        self.net.eval()
        if refine is None:
            refine = self.rend_steps > 0
        x = self._prepare(image)[None]
        shape = tuple(image.shape)
        new_shape = resampled_shape(shape, scale)
        patch = self._patch_size(shape)
        fixed = self.net.backbone.fixed_size is not None
        if fixed or (self.spatial_ndim == 3 and any(n > p for n, p in zip(shape, patch))):
            zoom = [t / s for t, s in zip(new_shape, shape)]

            def predictor(w: torch.Tensor) -> torch.Tensor:
                return self._infer(w, [max(1, round(n * z)) for n, z in zip(w.shape[2:], zoom)], refine)

            logits = sliding_window_inference(x, patch, sw_batch_size=1, predictor=predictor,
                                              overlap=0.25, mode="gaussian")
            logits = _upsample(logits, new_shape)
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
        labels = logits.argmax(0).numpy().astype(np.int64)
        return Volume(labels, affine, self.spatial_ndim, image.time_step, path=image.path)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        cfg = asdict(self.config)
        cfg["backbone_overrides"] = {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in cfg["backbone_overrides"].items()}
        save_checkpoint(path, self.method, self.net.state_dict(), {
            "config": cfg, "label_names": self.label_names, "spatial_ndim": self.spatial_ndim,
            "in_channels": self.in_channels, "best_step": self.best_step, "history": self.history,
            "num_params": self.num_params, "rend_steps": self.rend_steps})

    @classmethod
    def load(cls, path: str | Path) -> "MORSE":
        tensors, meta = load_checkpoint(path, cls.method)
        try:
            cfg = MorseConfig(**meta["config"])
        except (TypeError, ValueError) as exc:
            raise InputError(path, f"unusable MORSE configuration ({exc})") from None
        obj = cls(meta["label_names"], meta["spatial_ndim"], meta["in_channels"], cfg)
        obj.net.load_state_dict(tensors)
        obj.best_step, obj.history = meta.get("best_step"), meta.get("history", [])
        obj.rend_steps = int(meta.get("rend_steps", 0))
        return obj
