"""The nnU-Net adapter's config and presets (``inrseg train nnunet``, ``nnunet:PRESET`` in bench)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from inrseg.methods.configs import Recipe

__all__ = ["CONFIGURATIONS", "PRESETS", "RECIPE", "NNUNetConfig"]

#: the nnU-Net configurations the adapter trains
CONFIGURATIONS = ("2d", "3d_fullres")

#: preset -> fields. ``*-cpu``: nnU-Net's own plan with the batch and the widths reduced through
#: the plans (a configuration inheriting from nnU-Net's, see :func:`inrseg.methods.nnunet.workspace.cpu_plan`)
#: and shorter epochs, so that a CPU trains hundreds of iterations in minutes, not one
PRESETS: dict[str, dict] = {
    "2d": dict(configuration="2d", plan="default"),
    "3d_fullres": dict(configuration="3d_fullres", plan="default"),
    "2d-cpu": dict(configuration="2d", plan="cpu", iterations_per_epoch=50, val_iterations_per_epoch=10),
    "3d_fullres-cpu": dict(configuration="3d_fullres", plan="cpu", iterations_per_epoch=50,
                           val_iterations_per_epoch=10),
}


@dataclass
class NNUNetConfig:
    """Settings of an nnU-Net run (saved in the checkpoint with the plans nnU-Net made)."""

    configuration: str = "3d_fullres"       # nnU-Net configuration: 2d (slice by slice) | 3d_fullres
    plan: str = "default"                   # default: nnU-Net's plan as made; cpu: batch / widths reduced (cpu_*)
    cpu_batch_size: int = 8                 # cpu plan: batch size
    cpu_width_divisor: int = 2              # cpu plan: nnU-Net's features per stage divided by this (min 8)
    epochs: int = 1000                      # nnU-Net epochs (its default 1000)
    iterations_per_epoch: int = 250         # training iterations per epoch (nnU-Net: 250)
    val_iterations_per_epoch: int = 50      # pseudo-Dice validation batches per epoch (nnU-Net: 50)
    steps: int | None = None                # stop after this many training iterations (None: epochs x iterations)
    budget_minutes: float | None = None     # wall time of the whole fit: planning, preprocessing, training
    fit_schedule_to_budget: bool = True     # poly lr over the epochs the budget allows (timed on the first)
    use_mirroring: bool = True              # nnU-Net's test-time mirroring (its default; segment --tta is the same)
    tile_step_size: float = 0.5             # sliding-window step as a fraction of the patch (nnU-Net: 0.5)
    data_workers: int = -1                  # augmentation processes; -1: 0 on a CPU, nnU-Net's own choice on CUDA
    channel_kinds: tuple[str, ...] = ()     # nnU-Net channel names choosing its normalisation ("CT"); (): z-score
    seed: int = 0                           # torch / numpy / random seeds of training

    def __post_init__(self) -> None:
        if self.configuration not in CONFIGURATIONS:
            raise ValueError(f"unknown nnU-Net configuration {self.configuration!r} ({', '.join(CONFIGURATIONS)})")
        if self.plan not in ("default", "cpu"):
            raise ValueError(f"unknown plan {self.plan!r} (default, cpu)")
        for name in ("cpu_batch_size", "cpu_width_divisor", "epochs", "iterations_per_epoch",
                     "val_iterations_per_epoch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < float(self.tile_step_size) <= 1.0:
            raise ValueError(f"tile_step_size must lie in (0, 1], got {self.tile_step_size}")
        self.channel_kinds = tuple(str(c) for c in self.channel_kinds)

    @property
    def plan_name(self) -> str:
        """What a table calls the plan: ``nnU-Net 2d`` or ``nnU-Net 2d, CPU plan (batch 8, widths / 2)``."""
        if self.plan == "default":
            return f"nnU-Net {self.configuration}, default plan"
        return (f"nnU-Net {self.configuration}, CPU plan (batch {self.cpu_batch_size}, widths / "
                f"{self.cpu_width_divisor}, {self.iterations_per_epoch} iterations per epoch)")


def build_config(preset: str, spatial_ndim: int, overrides: Mapping[str, Any]) -> NNUNetConfig:
    """The preset's fields, then ``overrides``; 2D data allows only the ``2d`` configuration."""
    cfg = NNUNetConfig(**{**PRESETS[preset], **overrides})
    if spatial_ndim == 2 and cfg.configuration != "2d":
        raise ValueError(f"2D data: nnU-Net trains its 2d configuration only, not {cfg.configuration}")
    return cfg


RECIPE = Recipe(NNUNetConfig, PRESETS, lambda spatial_ndim: "2d" if spatial_ndim == 2 else "3d_fullres",
                build_config)
