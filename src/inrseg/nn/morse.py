"""MORSE's networks: the stochastic mixture of experts, the point head and the model around a
backbone (You et al., MICCAI 2023).

Shapes: images ``(B, C_in, *S)`` with ``S = (H, W)`` or ``(D, H, W)``; point coordinates
``(B, P, d)`` in ``[-1, 1]``, cell-centred, in the order of the spatial axes
(:mod:`inrseg.nn.point_sampling`).

Random draws (expert dropout, training points) take one :class:`torch.Generator` per image when
given, on the device of the maps, so an image's draws do not depend on the batch it is in (nor
on the rank of a distributed run that holds it).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from inrseg.nn.backbones import SegBackbone, upsample
from inrseg.nn.fourier import GaussianFourierFeatures
from inrseg.nn.point_sampling import most_uncertain_points, point_sample, sample_training_points

__all__ = ["MorseNet", "MorseOutput", "PointHead", "StochasticMoE"]


def _conv(nd: int) -> type[nn.Module]:
    return nn.Conv2d if nd == 2 else nn.Conv3d


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

    ``dropout_scale`` (attribute, default 1) scales the drop rate during a warm-up: Bernoulli
    drops each expert with probability ``alpha * dropout_scale``; "count" applies its rule to an
    image with probability ``dropout_scale`` and keeps every expert otherwise.
    """

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], dim: int = 256,
                 gate_dim: int = 256, expert_dropout: str = "bernoulli", alpha: float = 0.7,
                 renormalize: bool = True) -> None:
        super().__init__()
        conv, n = _conv(spatial_dims), len(in_channels)
        self.num_experts, self.expert_dropout, self.alpha = n, expert_dropout, alpha
        self.renormalize = renormalize
        self.dropout_scale = 1.0
        self.experts = nn.ModuleList([nn.Sequential(conv(c, dim, 1), nn.ReLU(inplace=True),
                                                    conv(dim, dim, 1)) for c in in_channels])
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.gate = nn.Sequential(conv(n * dim, gate_dim, 3, padding=1), bn(gate_dim),
                                  nn.ReLU(inplace=True), conv(gate_dim, n, 3, padding=1))
        self.fuse = nn.Sequential(conv(dim, dim, 1), nn.ReLU(inplace=True), conv(dim, dim, 1))

    def expert_mask(self, batch: int, device: torch.device | str = "cpu",
                    generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """``(B, N)`` 0/1 mask of the active experts of each image (all ones in eval mode).

        ``generators``: one per image (on ``device``), drawing that image's row; ``None``: the
        global RNG of ``device``.
        """
        n = self.num_experts
        if not self.training or self.expert_dropout == "none" or n == 1:
            return torch.ones(batch, n, device=device)
        gens = list(generators) if generators is not None else [None] * batch
        if len(gens) != batch:
            raise ValueError(f"{len(gens)} generators for a batch of {batch}")
        return torch.stack([self._row_mask(device, g) for g in gens])

    def _row_mask(self, device: torch.device | str, generator: torch.Generator | None) -> torch.Tensor:
        """``(N,)`` 0/1 mask of one image's active experts (at least one)."""
        n = self.num_experts
        if self.expert_dropout == "bernoulli":
            mask = (torch.rand(n, device=device, generator=generator) >= self.alpha * self.dropout_scale).float()
        else:  # "count": drop a random number (0..N-1) of random experts
            k = torch.randint(0, n, (), device=device, generator=generator)
            rank = torch.rand(n, device=device, generator=generator).argsort().argsort()
            apply = torch.rand((), device=device, generator=generator) < self.dropout_scale
            mask = torch.where(apply, (rank >= k).float(), torch.ones(n, device=device))
        # keep one random expert where all were dropped (drawn always: no host synchronisation)
        keep = torch.randint(0, n, (), device=device, generator=generator)
        return torch.where(mask.sum() == 0, F.one_hot(keep, n).to(mask.dtype), mask)

    def forward(self, features: Sequence[torch.Tensor],
                generators: Sequence[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse decoder features ``[(B, c_i, *S_i)]`` (coarsest first, last at the finest size).

        ``generators``: one per image, for the expert dropout (see :meth:`expert_mask`).

        Returns:
            ``x_out`` ``(B, D, *S)`` and the gate weights ``W`` ``(B, N, *S)`` (sum 1 over N).
        """
        size = features[-1].shape[2:]
        experts = [upsample(mlp(f), size) for mlp, f in zip(self.experts, features)]
        scores = self.gate(torch.cat(experts, dim=1))                      # (B, N, *S)
        mask = self.expert_mask(scores.shape[0], scores.device, generators)
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
                self.predictor.weight[:, -num_classes:, 0] = torch.eye(
                    num_classes, device=self.predictor.weight.device)
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
    (``None`` without a point head) and SMoE ``gates`` ``(B, N, *S)`` (``None`` without SMoE);
    with training points (``MorseNet(x, num_points=P)``) their ``coords`` ``(B, P, d)`` and the
    point head's ``points`` logits there ``(B, C, P)``."""

    coarse: torch.Tensor
    fine: torch.Tensor | None
    gates: torch.Tensor | None
    coords: torch.Tensor | None = None
    points: torch.Tensor | None = None


class MorseNet(nn.Module):
    """Backbone + optional SMoE + optional point head (with optional Fourier features of the
    point's coordinate).

    Args:
        backbone: the encoder-decoder (:mod:`inrseg.nn.backbones`).
        num_classes: ``C``.
        use_smoe: fuse the decoder features with a :class:`StochasticMoE`; its fused features
            ``(B, moe_dim, *S)`` make the coarse logits through a 1x1 head (else the backbone's
            own head does).
        use_points: a :class:`PointHead` on the fine features (the fused ones, else the finest
            decoder block's) and the coarse logits at points.
        use_fourier: the point head also reads Gaussian Fourier features of the point's coordinate.
        num_experts: the ``N`` finest decoder blocks the SMoE mixes (``None``: the backbone's
            ``default_experts``).
        moe_dim, gate_dim, expert_dropout, alpha, renormalize: the :class:`StochasticMoE`'s.
        point_width, point_layers, point_identity_init: the :class:`PointHead`'s.
        fourier_frequencies, fourier_sigma, fourier_trainable: ``L``, the frequencies' std (cycles
            per coordinate unit) and whether they train (:class:`~inrseg.nn.fourier.GaussianFourierFeatures`).
        oversample, importance: ``k`` and ``rho`` of the training points
            (:func:`~inrseg.nn.point_sampling.sample_training_points`).
        seed: seeds the Fourier frequencies.
    """

    def __init__(self, backbone: SegBackbone, num_classes: int, *, use_smoe: bool = True,
                 use_points: bool = True, use_fourier: bool = True, num_experts: int | None = None,
                 moe_dim: int = 256, gate_dim: int = 256, expert_dropout: str = "bernoulli",
                 alpha: float = 0.7, renormalize: bool = True, point_width: int = 512,
                 point_layers: int = 3, point_identity_init: bool = True, fourier_frequencies: int = 128,
                 fourier_sigma: float = 1.0, fourier_trainable: bool = True, oversample: float = 3.0,
                 importance: float = 0.75, seed: int = 0) -> None:
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes
        nd = backbone.spatial_dims
        self.smoe: StochasticMoE | None = None
        self.seg_head: nn.Module | None = None
        if use_smoe:
            n = min(num_experts or backbone.default_experts, len(backbone.feature_channels))
            self.smoe = StochasticMoE(nd, backbone.feature_channels[-n:], moe_dim, gate_dim,
                                      expert_dropout, alpha, renormalize)
            self.seg_head = _conv(nd)(moe_dim, num_classes, 1)
        self.fourier: GaussianFourierFeatures | None = None
        self.point_head: PointHead | None = None
        if use_points:
            fine = moe_dim if use_smoe else backbone.feature_channels[-1]
            if use_fourier:
                self.fourier = GaussianFourierFeatures(nd, fourier_frequencies, fourier_sigma,
                                                       fourier_trainable, seed=seed)
                fine += self.fourier.out_dim
            self.point_head = PointHead(fine, num_classes, point_width, point_layers, point_identity_init)
        self.oversample, self.importance = oversample, importance

    def forward(self, x: torch.Tensor, num_points: int = 0,
                generators: Sequence[torch.Generator] | None = None) -> MorseOutput:
        """``(B, C_in, *S)`` -> :class:`MorseOutput` on the grid ``S``.

        ``num_points > 0`` (training with ``L_rend``; needs a point head): also the point-head
        logits at that many uncertainty-biased training points per image
        (:func:`~inrseg.nn.point_sampling.sample_training_points` with the configured
        over-sampling and importance), inside the forward pass, where DDP sees every parameter
        used. ``generators``: one per image, for its expert dropout and training points.
        """
        logits, feats = self.backbone(x)
        if self.smoe is None:
            out = MorseOutput(logits, feats[-1] if self.point_head is not None else None, None)
        else:
            n = self.smoe.num_experts
            fused, gates = self.smoe(feats[-n:], generators)
            out = MorseOutput(upsample(self.seg_head(fused), x.shape[2:]), fused, gates)
        if num_points <= 0:
            return out
        if self.point_head is None:
            raise ValueError("this network has no point head")
        if generators is None:
            coords = sample_training_points(out.coarse, num_points, self.oversample, self.importance)
        else:
            coords = torch.cat([sample_training_points(out.coarse[j:j + 1], num_points, self.oversample,
                                                       self.importance, generator=g)
                                for j, g in enumerate(generators)])
        return out._replace(coords=coords, points=self.point_logits(out.fine, out.coarse, coords))

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
            return upsample(logits, shape)
        src = logits.shape[2:]
        steps = max(0, math.ceil(math.log2(max(t / s for t, s in zip(shape, src)) - 1e-9)))
        plan = [tuple(min(s * 2 ** k, t) for s, t in zip(src, shape)) for k in range(1, steps)]
        plan.append(shape)
        b, c = logits.shape[:2]
        for size in plan:
            logits = upsample(logits, size).clone()
            idx, coords = most_uncertain_points(logits, num_points)
            pe = coords
            if coord_scale is not None:
                pe = coords * coord_scale + coord_offset
            pts = self.point_logits(out.fine, out.coarse, coords, pe)           # (B, C, P)
            flat = logits.reshape(b, c, -1)
            flat.scatter_(2, idx[:, None].expand(-1, c, -1), pts)
            logits = flat.reshape(b, c, *size)
        return logits

