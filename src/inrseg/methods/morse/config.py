"""The MORSE config, its presets and recipe (``inrseg train morse``, ``morse:VARIANT:BACKBONE``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from inrseg.methods.cnn import cnn_config
from inrseg.methods.configs import Recipe
from inrseg.nn.backbones import BACKBONES

__all__ = ["EXPERT_DROPOUT", "HEAD_PRESETS", "RECIPE", "VARIANTS", "MorseConfig", "build_config", "morse_config"]

#: ``baseline``: the backbone alone; ``pointrend``: + a point head on [finest decoder feature,
#: coarse logits]; ``smoe``: + the stochastic mixture of decoder experts; ``iar``: the point head
#: also reads Fourier features of the point's coordinate; ``morse``: SMoE + IAR
VARIANTS = ("baseline", "pointrend", "smoe", "iar", "morse")
EXPERT_DROPOUT = ("bernoulli", "count", "none")


@dataclass
class MorseConfig:
    """Hyper-parameters of a MORSE model (saved in the checkpoint).

    ``steps`` is the ``T`` of the ``L_rend`` schedule and of the learning-rate decay: a
    ``budget_minutes`` that stops training before ``T / 2`` leaves the point head untrained (the
    model then predicts with its coarse head). :func:`morse_config` applies a preset's widths.
    """

    backbone: str = "unet"                  # unet | unet3d | transunet | unetr (inrseg.nn.backbones)
    variant: str = "morse"                  # baseline | pointrend | smoe | iar | morse
    backbone_preset: str = "cpu"            # backbone widths: "cpu" or "paper" (inrseg.nn.backbones)
    backbone_overrides: dict = field(default_factory=dict)  # backbone constructor args, e.g. {"channels": [8, 16, 32]}
    # --- SMoE
    num_experts: int | None = None          # the N finest decoder blocks mixed; None: the backbone's default
    moe_dim: int = 256                      # expert feature width D
    gate_dim: int = 256                     # gate hidden width
    expert_dropout: str = "bernoulli"       # bernoulli (paper) | count (official code) | none
    alpha: float = 0.7                      # drop probability per expert (bernoulli)
    # expert-dropout warm-up: the drop rate rises linearly from 0 to its full value over this many
    # steps (counted in steps, not as a share of T); 0: the full rate from step 0 (paper)
    dropout_warmup_steps: int = 5000
    renormalize: bool = True                # the surviving experts' gate weights re-sum to 1
    # --- IAR / point head
    point_width: int = 512                  # point-head hidden width
    point_layers: int = 3                   # point-head hidden layers
    fourier_frequencies: int = 128          # L (2 L Fourier features of the coordinate)
    fourier_sigma: float = 1.0              # std of the frequencies (cycles per coordinate unit)
    fourier_trainable: bool = True          # paper: trainable; official code: fixed
    train_points: int = 2048                # N_p, training points per image
    oversample: float = 3.0                 # k_p: candidates per training point
    importance: float = 0.75                # rho: share of training points that are the most uncertain
    test_points: int = 8192                 # N_p at inference, per subdivision step
    point_identity_init: bool = True        # point head starts as the identity on the coarse logits
    lambda_rend: float = 0.1                # weight of L_rend (lambda_t ramps to lambda_rend / 2 at T)
    # --- optimisation
    steps: int = 2000                       # T: optimiser steps
    batch_size: int = 4                     # 2D slices / 3D crops per step and rank (paper: 4 / 2)
    patch_size: tuple[int, ...] | None = None  # 3D crop and UNETR input; None: 96^3 (2D UNETR 192^2)
    optimizer: str = "adamw"                # adamw (paper, lr 5e-4) | sgd (official code, lr 0.01, momentum 0.9)
    lr: float = 5e-4                        # initial learning rate
    weight_decay: float = 1e-4              # optimiser weight decay
    poly_power: float = 0.9                 # lr = lr0 * (1 - t/T) ** poly_power
    # with a time budget that ends training before T steps, run the schedules (lr decay, L_rend
    # from T/2) over the steps that fit the budget (a step timed on a throwaway copy)
    fit_schedule_to_budget: bool = True
    val_every: int = 100                    # validation (and resume-state) interval in steps
    budget_minutes: float | None = None     # stop training after this wall time
    augment: bool = True                    # random intensity scale / shift of training crops
    mirror: bool = False                    # random mirroring of crops along every axis (presets: on, as nnU-Net)
    foreground_fraction: float = 0.33       # 3D crops forced to contain foreground (nnU-Net: 1/3)
    normalization: str = "zscore"           # image intensity normalisation (inrseg.data.preprocess)
    seed: int = 0                           # initial weights and every random draw of training

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

    def network_args(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~inrseg.nn.morse.MorseNet` for this variant."""
        return dict(use_smoe=self.uses_smoe, use_points=self.uses_points, use_fourier=self.uses_fourier,
                    num_experts=self.num_experts, moe_dim=self.moe_dim, gate_dim=self.gate_dim,
                    expert_dropout=self.expert_dropout, alpha=self.alpha, renormalize=self.renormalize,
                    point_width=self.point_width, point_layers=self.point_layers,
                    point_identity_init=self.point_identity_init, fourier_frequencies=self.fourier_frequencies,
                    fourier_sigma=self.fourier_sigma, fourier_trainable=self.fourier_trainable,
                    oversample=self.oversample, importance=self.importance, seed=self.seed)


#: Head widths and the dropout warm-up: "paper" as published; "cpu" small enough for minutes-long
#: CPU training (the SMoE gate, a 3x3 convolution on N x D channels at full resolution, is the
#: dominant cost of a step)
HEAD_PRESETS: dict[str, dict] = {
    "paper": dict(moe_dim=256, gate_dim=256, point_width=512, dropout_warmup_steps=0, mirror=True),
    "cpu": dict(moe_dim=16, gate_dim=16, point_width=256, dropout_warmup_steps=5000, mirror=True),
}


def morse_config(backbone: str | None = None, variant: str = "morse", spatial_ndim: int = 2,
                 preset: str = "cpu", **overrides: Any) -> MorseConfig:
    """The :class:`MorseConfig` of ``variant`` on ``backbone`` for ``spatial_ndim``-D data.

    ``backbone`` ``None``: ``"unet3d"`` on 3D data, ``"unet"`` on 2D. ``preset`` ("cpu" or
    "paper") sets the backbone widths (``backbone_preset``) and :data:`HEAD_PRESETS`; 3D gets
    batches of 2 crops; ``overrides`` replace any field.
    """
    if preset not in HEAD_PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(HEAD_PRESETS)})")
    if backbone is None:
        backbone = "unet3d" if spatial_ndim == 3 else "unet"
    base = dict(backbone=backbone, variant=variant, backbone_preset=preset, **HEAD_PRESETS[preset])
    return cnn_config(MorseConfig, base, spatial_ndim, overrides)


def build_config(preset: str, spatial_ndim: int, overrides: Mapping[str, Any]) -> MorseConfig:
    """:func:`morse_config` as a :class:`~inrseg.methods.registry.Recipe`'s ``build``: ``overrides``
    may set ``backbone`` and ``variant`` (the ``morse:VARIANT:BACKBONE`` parts)."""
    return morse_config(spatial_ndim=spatial_ndim, preset=preset, **overrides)


RECIPE = Recipe(MorseConfig, {p: dict(HEAD_PRESETS[p], backbone_preset=p) for p in HEAD_PRESETS},
                lambda spatial_ndim: "cpu", build_config)
