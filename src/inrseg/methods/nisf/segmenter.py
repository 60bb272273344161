"""The NISF segmenter: fit (prior training, then the validation steps curve), prediction through
a fitted latent, checkpoints.

Time budget (``budget`` / ``config.budget_minutes``) bounds the whole :meth:`NISF.fit`: prior
training gets the time that is left after the validation steps curve, whose cost is estimated
on the validation cases before training (:meth:`~inrseg.methods.nisf.latents.LatentFitting.curve_seconds`)
with a 50 % margin, but never less than half of the time; the curve stops at the deadline and
keeps the best step so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.core.progress import status
from inrseg.data.cases import Case
from inrseg.data.volume import Volume
from inrseg.engine import Budget, LoopSettings, as_budget, broadcast_object, run_training, world
from inrseg.methods.base import TTAMember
from inrseg.methods.nisf.config import NISFConfig
from inrseg.methods.nisf.field import Subject, load_pair
from inrseg.methods.nisf.rendering import Rendering
from inrseg.methods.nisf.training import PriorTraining, initial_train_latents, load_training_subjects
from inrseg.methods.tta import refit_members

__all__ = ["NISF"]

#: margin on the estimated cost of the validation steps curve when splitting the budget
_CURVE_MARGIN = 1.5
#: prior training gets at least this share of the budget left when it starts
_MIN_PRIOR_SHARE = 0.5


class NISF(Rendering):
    """Neural Implicit Segmentation Functions (Stolt-Anso et al., MICCAI 2023) for 2D, 3D and
    3D + t images: an auto-decoder whose network ``f(c, h) -> (class probabilities, intensity)``
    maps a coordinate ``c`` and a per-image latent ``h`` to labels and a reconstruction. At test
    time only a latent is fitted, to the intensities; labels are then read anywhere in
    continuous space (any grid, held-out slices, oblique planes).

    Args:
        label_names: class names indexed by label value (background first).
        spatial_ndim: grid axes of the images: 2, 3 or 4 (3D + t; time is a 4th coordinate).
        in_channels: image channels ``C_in`` (all are reconstructed).
        config: hyper-parameters (default: the paper's).
        device: where the network lives and trains (``"cpu"``, ``"cuda:0"``, ``"auto"``...).

    Attributes:
        net: the network (:class:`~inrseg.nn.nisf.NISFNet`).
        train_latents: ``(n_train * (1 + augment), L)`` CPU latents of the training cases and
            their copies after :meth:`fit` (``None`` before); not used at inference.
        infer_steps: latent-fitting steps of :meth:`predict` (chosen on validation).
        val_curve: the validation steps curve ``[{"step", "dice", "per_case"}]`` it was chosen on.
    """

    method: ClassVar[str] = "nisf"
    spatial_ndims: ClassVar[tuple[int, ...]] = (2, 3, 4)
    config_class: ClassVar[type] = NISFConfig
    #: Gabor / sine activations lose their phase in bf16
    bf16_safe: ClassVar[bool] = False
    #: ``--scale`` renders the continuous field on the finer grid
    continuous_scale: ClassVar[bool] = True
    saved_attributes: ClassVar[dict[str, Any]] = {"infer_steps": lambda m: m.config.infer_steps,
                                                  "val_curve": lambda m: []}

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: NISFConfig | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(label_names, spatial_ndim, in_channels, config, device)
        self.train_latents: torch.Tensor | None = None
        self.infer_steps: int = self.config.infer_steps
        self.val_curve: list[dict] = []

    # ------------------------------------------------------------------ training
    def initial_train_latents(self, n: int) -> torch.Tensor:
        """The seeded prior-training initialisation ``(n, L) ~ N(0, latent_init_std^2)``, CPU."""
        return initial_train_latents(self.config, n)

    def fit(self, train: Sequence[Case | tuple[Volume, Volume]], val: Sequence[Any] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Train the prior (network + one latent per training case,
        :class:`~inrseg.methods.nisf.training.PriorTraining`), then choose :attr:`infer_steps`
        on ``val`` (best mean foreground Dice of the steps curve; ``config.infer_steps`` without
        ``val``).

        ``train`` / ``val``: :class:`~inrseg.data.cases.Case` objects or ``(image, labels)``
        Volume pairs. ``state_path``: resumable training state, written every ``save_every``
        steps and at the end; if it exists, training continues from it. ``budget``: deadline of
        the whole call, prior training and steps curve (default: ``config.budget_minutes``
        from now; see the module doc for the split). ``log_path``: per-step metrics (JSON
        lines). ``precision``: ``auto`` (fp32: :attr:`bf16_safe` is off), ``fp32`` or ``bf16``.

        With ``config.augment = K`` every training case also gets K augmented copies, each with
        its own latent: :attr:`train_latents` holds ``n * (1 + K)`` rows, the cases first.

        Under torchrun every rank calls it: rank ``r`` loads and trains the cases ``r::world``
        (their latents, their copies'), DDP averages the network's gradients, rank 0 alone
        loads ``val`` and runs the steps curve, and every rank ends with the same model.

        Raises:
            ValueError: no training case. InputError: fewer cases than ranks, an unlabelled case.
        """
        cfg = self.config
        budget = as_budget(budget, cfg.budget_minutes)
        rank, size = world()
        n = len(train)
        if n == 0:
            raise ValueError("NISF.fit needs at least one training case")
        if n < size:
            raise InputError(None, f"{n} training cases for {size} ranks: NISF needs at least one "
                                   f"case per rank")
        subjects = load_training_subjects(self, train)
        val_subs = []
        if rank == 0:
            pairs = [load_pair(v) for v in (val or [])]
            val_subs = [self.prepare(img, lab) for img, lab in pairs if lab is not None]
        prior_budget = budget.share(self.prior_share(val_subs, budget))
        task = PriorTraining(self, subjects, n * (1 + cfg.augment), state_path=state_path, precision=precision)
        res = run_training(task, LoopSettings(steps=cfg.steps, val_every=cfg.save_every, budget=prior_budget,
                                              seed=cfg.seed, state_path=state_path, log_path=log_path,
                                              device=self.device))
        self.history = res.history
        self.train_latents = task.trained_latents()
        self.net.eval()

        chosen = self.infer_steps_curve(val_subs, budget) if val_subs else None
        chosen = broadcast_object(chosen)
        if chosen is None:
            self.infer_steps = cfg.infer_steps
        else:
            self.infer_steps, self.val_curve = chosen
            status(f"nisf: {self.infer_steps} inference steps chosen on {len(val_subs)} validation cases")

    def prior_share(self, val_subs: list[Subject], budget: Budget) -> float:
        """The share of ``budget``'s remaining time that prior training gets (the same on every
        rank: rank 0, which holds ``val_subs``, decides): all of it without a time limit or
        validation cases, else what the validation steps curve leaves (its estimated cost,
        :meth:`curve_seconds`, x 1.5), but at least half."""
        share = 1.0
        if budget.limited and val_subs:
            need = _CURVE_MARGIN * self.curve_seconds(val_subs)
            share = min(1.0, max(_MIN_PRIOR_SHARE, 1.0 - need / max(budget.remaining_s(), 1e-9)))
        return float(broadcast_object(share))

    # ------------------------------------------------------------------ inference
    def logits(self, image: Volume, scale: float | Sequence[float] = 1.0, *, steps: int | None = None,
               seed: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Class logits ``(K, *S')`` (CPU) of ``image``'s fitted latent on the grid of ``scale``,
        and that grid's affine; the latent fitted for ``steps`` (default :attr:`infer_steps`)
        from ``seed`` (its initialisation and point draws; default ``config.seed``)."""
        out = self.field_logits(self.fit_latents([image], steps, seed=seed)[0], scale)
        return torch.from_numpy(out.data), out.affine

    def tta_members(self, n: int | None = None) -> list[TTAMember]:
        """Test-time augmentation by ``n`` (default 4) repeated latent fits: seeds ``seed + k`` (the
        initial latent and the point draws), :attr:`infer_steps` x (1, 0.75, 1.25, 1.5) steps
        (:func:`~inrseg.methods.tta.refit_members`); the first is the plain prediction."""
        return refit_members(self.logits, self.infer_steps, self.config.seed, n)

    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map ``(*S',)`` int64 of ``image`` (``(C_in, *S)``): a latent fitted for
        :attr:`infer_steps` steps, labelled on the grid of ``scale`` (one factor for every grid
        axis, for 3D + t time included: 2 doubles the frames and halves the time step; or one
        per axis, e.g. ``(2, 2, 4, 1)``), with that grid's affine and time step."""
        return self.segment(self.fit_latents([image])[0], scale)

    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Class probabilities ``(K, *S')`` float32 on the grid of :meth:`predict` (one latent
        fit; softmax over the class axis of each chunk's logits)."""
        return self.probabilities(self.fit_latents([image])[0], scale)

    def predict_batch(self, images: Sequence[Volume], scale: float | Sequence[float] = 1.0) -> list[Volume]:
        """:meth:`predict` of several images, their latents fitted in one batch (each latent gets
        its own gradient, so the labels are those of one-by-one fits up to rounding)."""
        return [self.segment(f, scale) for f in self.fit_latents(images)]

    # ------------------------------------------------------------------ capabilities
    def steps_curve(self) -> list[tuple[int, float]]:
        """``[(latent-fitting steps, validation mean foreground Dice)]`` of :attr:`val_curve`."""
        return [(int(e["step"]), float(e["dice"])) for e in self.val_curve]

    def chosen_settings(self) -> dict[str, Any]:
        """The base's, plus ``infer_steps``."""
        return {**super().chosen_settings(), "infer_steps": self.infer_steps}

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``net.*`` (the network's state dict) and ``train_latents`` (after :meth:`fit`)."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.train_latents is not None:
            tensors["train_latents"] = self.train_latents
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        latents = tensors.get("train_latents")
        self.train_latents = None if latents is None else latents.cpu()
