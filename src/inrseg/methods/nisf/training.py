"""NISF's prior training: the network and one latent per training case, learnt jointly with
labels, as a :class:`~inrseg.engine.TrainTask` for :func:`~inrseg.engine.run_training`.

Loss of a step (per image of the batch, averaged over the batch; :func:`prior_loss`)
    ``BCE(softmax, one-hot) + softDice(softmax, one-hot; background included)
    + alpha * BCE(sigmoid, intensity in [0, 1]) + latent_reg * mean(h^2)``, plus
    ``weight_reg * sum(p^2)`` over the backbone (heads excluded) once per step. Each image's
    terms are means over its own points; with unlabelled (``IGNORE``) points the two
    segmentation terms cover the labelled ones only (an image drawn without any has
    segmentation loss 0) and the reconstruction term every point.

Draws of a step (:func:`sample_points`; a pure function of ``(seed, step, rank)``, so a resumed
run reproduces an uninterrupted one)
    ``subjects_per_step`` of the rank's cases; of each, for 3D + t one frame (for a sparsely
    labelled cine, with probability ``annotated_frame_fraction`` one of its annotated frames),
    then all its voxels or ``points_per_step`` random ones, with Gaussian coordinate jitter of
    std ``coord_jitter``. The step's cases are stacked (zero-padded to the largest) into one
    ``(B, N, d)`` forward pass.

Optimisers: Adam for the network, Adam for the latents; constant lr, or ``lr_schedule="cosine"``
(both decay to 0 over ``steps``). Latent table: ``(n * (1 + augment), L)``, the cases first,
then ``augment`` blocks of ``n`` augmented copies (row ``c * n + i``: copy ``c`` of case ``i``).

Under torchrun the network trains under DDP and rank ``r`` owns the cases ``r::world`` and their
copies: it loads and draws only those, so only their rows of the latent table receive gradients
(the others have zero gradient and zero Adam moments and never move); the table and its Adam
moments are gathered (:func:`gather_rows`) for the resume state and the checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from inrseg.core.errors import InputError
from inrseg.core.progress import progress
from inrseg.data.augment import augmented_pair, copy_seed
from inrseg.data.volume import IGNORE
from inrseg.engine import StepOutput, TrainTask, all_reduce_sum_, shard, step_rng, use_bf16, world, wrap_ddp
from inrseg.methods.nisf.config import NISFConfig
from inrseg.methods.nisf.field import NISFField, Subject, load_pair, point_weights

__all__ = ["PriorTraining", "annotated_frames", "gather_rows", "initial_train_latents", "load_training_subjects",
           "prior_loss", "sample_points", "seg_weights", "soft_dice_loss"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


# ============================================================================================
# pure pieces
# ============================================================================================

def soft_dice_loss(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Per-image soft Dice loss ``(B,)`` of class probabilities and one-hot labels ``(B, C, N)``.

    ``1 - mean_c (2 sum_n p y + 1) / (sum_n p + sum_n y + 1)``, background included: MONAI's
    :class:`~monai.losses.DiceLoss` with smooth 1 in numerator and denominator. Points where
    ``p = y = 0`` (padding) add nothing.
    """
    loss = DiceLoss(include_background=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")
    with torch.device(probs.device):  # MONAI's losses make tensors without a device
        return loss(probs, onehot).flatten(1).mean(1)


def seg_weights(labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` weights of the segmentation loss: ``1 / M_b`` on the ``M_b`` labelled points
    (label not ``IGNORE``, weight > 0) of item ``b``, 0 elsewhere (all 0 if it has none)."""
    labelled = ((labels != IGNORE) & (weight > 0)).to(weight.dtype)
    return labelled / labelled.sum(-1, keepdim=True).clamp(min=1.0)


def prior_loss(seg_logits: torch.Tensor, rec_logits: torch.Tensor, labels: torch.Tensor,
               intensity: torch.Tensor, weight: torch.Tensor, latents: torch.Tensor,
               seg_weight: torch.Tensor | None = None, *, alpha: float, latent_reg: float
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the ``B`` images of a step of each image's loss (see the module doc), in fp32
    (autocast off).

    Args:
        seg_logits: ``(B, N, C)``; rec_logits: ``(B, N, C_in)``.
        labels: ``(B, N)`` int64 (``IGNORE`` where unlabelled); intensity: ``(B, N, C_in)``
            in [0, 1].
        weight: ``(B, N)``: ``1 / N_b`` on the ``N_b`` points of image ``b``, 0 on padding
            (:func:`~inrseg.methods.nisf.field.point_weights`).
        latents: ``(B, L)``.
        seg_weight: ``(B, N)`` weights of the segmentation terms (:func:`seg_weights`);
            ``None``: ``weight`` (every point labelled).
        alpha, latent_reg: the weights of the reconstruction and latent terms.

    Returns:
        the scalar loss and the batch means of its ``bce``, ``dice`` and ``rec`` terms.
    """
    seg_weight = weight if seg_weight is None else seg_weight
    with torch.autocast(seg_logits.device.type, enabled=False):  # losses in fp32 under bf16
        p = torch.softmax(seg_logits.float(), -1)                                  # (B, N, C)
        onehot = F.one_hot(labels.clamp(min=0), seg_logits.shape[-1]).to(p.dtype)  # IGNORE -> 0, masked
        valid = (seg_weight > 0).to(p.dtype)[..., None]                            # (B, N, 1)
        bce = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), onehot, reduction="none")
        bce_seg = (bce.mean(-1) * seg_weight).sum(-1)                              # (B,)
        dice = soft_dice_loss((p * valid).transpose(1, 2), (onehot * valid).transpose(1, 2))
        rec = F.binary_cross_entropy_with_logits(rec_logits.float(), intensity, reduction="none")
        rec = (rec.mean(-1) * weight).sum(-1)
        lat = latent_reg * latents.float().pow(2).mean(-1)
        total = (bce_seg + dice + alpha * rec + lat).mean()
    return total, {"bce": bce_seg.mean().item(), "dice": dice.mean().item(), "rec": rec.mean().item()}


def gather_rows(table: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The whole ``(n, ...)`` table on every rank, each row from the rank that owns it.

    ``own (n,)`` bool marks this rank's rows; every row has exactly one owner, so the sum over
    ranks of ``table`` with the other rows zeroed is the owners' rows. A copy (detached).
    """
    mask = own.reshape(-1, *([1] * (table.dim() - 1))).to(table.dtype)
    return all_reduce_sum_(table.detach() * mask)


def initial_train_latents(cfg: NISFConfig, n: int) -> torch.Tensor:
    """The seeded prior-training initialisation ``(n, L) ~ N(0, latent_init_std^2)``, CPU."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    return torch.randn(n, cfg.latent_dim, generator=gen, device="cpu") * cfg.latent_init_std


def annotated_frames(s: Subject) -> np.ndarray | None:
    """The frames of a 3D + t case (4 grid axes) that hold an annotated voxel, ``(k,)`` int64,
    when the case has ignored voxels; ``None`` otherwise (not 3D + t, no labels, or fully
    labelled: frames are then drawn uniformly)."""
    if len(s.shape) != 4 or s.labels is None:
        return None
    known = (s.labels != IGNORE).reshape(-1, s.shape[3])        # C order: time fastest
    if bool(known.all()):
        return None
    return np.flatnonzero(known.any(0).numpy()).astype(np.int64)


def sample_points(s: Subject, rng: np.random.Generator, cfg: NISFConfig,
                  frames: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training sample of a case: a random frame (3D + t), all or ``points_per_step`` of its
    voxels, with coordinate jitter. Returns ``coords (n, d)``, ``intensity (n, C_in)``,
    ``labels (n,)``, on the CPU.

    ``frames`` (:func:`annotated_frames`; a sparsely labelled cine): with probability
    ``annotated_frame_fraction`` the frame is one of them, else any frame. With ``None`` (or an
    empty array, or a fraction of 0) no extra number is drawn, so the draws are those of a
    fully labelled case."""
    if len(s.shape) == 4:
        T = s.shape[3]
        if (frames is not None and frames.size and
                cfg.annotated_frame_fraction > 0 and rng.random() < cfg.annotated_frame_fraction):
            t = int(frames[rng.integers(frames.size)])
        else:
            t = int(rng.integers(T))
        idx = torch.arange(t, s.coords.shape[0], T, device="cpu")   # C order: time is the fastest axis
    else:
        idx = None
    n_all = s.coords.shape[0] if idx is None else idx.numel()
    if cfg.points_per_step is not None and cfg.points_per_step < n_all:
        sub = torch.from_numpy(rng.choice(n_all, size=cfg.points_per_step, replace=False))
        idx = sub if idx is None else idx[sub]
    coords = s.coords if idx is None else s.coords[idx]
    inten = s.intensity if idx is None else s.intensity[idx]
    labs = s.labels if idx is None else s.labels[idx]
    if cfg.coord_jitter > 0:
        noise = rng.standard_normal(coords.shape).astype(np.float32) * cfg.coord_jitter
        coords = coords + torch.from_numpy(noise)
    return coords, inten, labs


def load_training_subjects(model: NISFField, train: Sequence[Any]) -> dict[int, Subject]:
    """This rank's training cases ``r::world`` and their ``config.augment`` augmented copies
    (:func:`inrseg.data.augment.augmented_pair`, seeded by ``(seed, case, copy)``), prepared,
    by latent row (copy ``c`` of case ``i``: row ``c * n + i``).

    Raises:
        InputError: a case without labels.
    """
    cfg, n = model.config, len(train)
    subjects: dict[int, Subject] = {}
    for i in progress(shard(range(n)), desc="loading training cases"):
        img, lab = load_pair(train[i])
        if lab is None:
            raise InputError(img.path, "NISF prior training needs labelled cases")
        subjects[i] = model.prepare(img, lab)
        for c in range(1, cfg.augment + 1):
            subjects[c * n + i] = model.prepare(*augmented_pair(
                img, lab, copy_seed(cfg.seed, i, c), cfg.augment_rotate, cfg.augment_scale,
                cfg.augment_translate, cfg.augment_elastic))
    return subjects


# ============================================================================================
# the task
# ============================================================================================

class PriorTraining(TrainTask):
    """The prior's training task: the network of ``model`` and a latent table of ``rows`` rows,
    of which this rank owns (and draws from) the rows of ``subjects``.

    Args:
        model: the NISF model whose ``net`` trains (in place).
        subjects: this rank's prepared cases by latent row (:func:`load_training_subjects`).
        rows: rows of the whole latent table (cases and copies of every rank).
        state_path: the resume file (named in errors).
        precision: ``auto``, ``fp32`` or ``bf16`` (:func:`~inrseg.engine.use_bf16`).

    Attributes:
        latents: the ``(rows, L)`` table (a parameter on the model's device).
        own: ``(rows,)`` bool, this rank's rows.
    """

    def __init__(self, model: NISFField, subjects: dict[int, Subject], rows: int, *,
                 state_path: Path | None = None, precision: str = "auto") -> None:
        cfg, dev = model.config, model.device
        self.model, self.cfg, self.subjects, self.rows = model, cfg, subjects, rows
        self.state_path = state_path
        self.rank = world()[0]
        self.mine = sorted(subjects)
        # with unlabelled (ignored) points the segmentation terms are means over the labelled ones
        self.sparse = any(bool((s.labels == IGNORE).any()) for s in subjects.values())
        self.frames_of = {i: annotated_frames(s) for i, s in subjects.items()}
        self.own = torch.as_tensor(np.isin(np.arange(rows), self.mine), device=dev)      # (rows,) bool
        self.latents = nn.Parameter(initial_train_latents(cfg, rows).to(dev))            # (rows, L)
        opt_net = torch.optim.Adam(model.net.parameters(), lr=cfg.lr)
        self.opt_lat = torch.optim.Adam([self.latents], lr=cfg.latent_lr if cfg.latent_lr is not None else cfg.lr)
        schedulers = []
        if cfg.lr_schedule == "cosine":
            total = max(1, cfg.steps)
            schedulers = [torch.optim.lr_scheduler.LambdaLR(
                o, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
                for o in (opt_net, self.opt_lat)]
        self.train_net = wrap_ddp(model.net, dev)
        super().__init__(name="nisf prior", method=model.method, optimizers=[opt_net, self.opt_lat],
                         schedulers=schedulers, params=[*model.net.parameters(), self.latents],
                         modules=[model.net], grad_sync="ddp",
                         bf16=use_bf16(dev, precision, model.bf16_safe))

    def step(self, i: int) -> StepOutput:
        """Draw step ``i``'s cases and points (:func:`sample_points`) and return the loss of
        :func:`prior_loss` plus the backbone's weight decay."""
        cfg, dev = self.cfg, self.model.device
        rng = step_rng(cfg.seed, i, self.rank)
        k = min(cfg.subjects_per_step, len(self.mine))
        picks = [int(j) for j in rng.choice(self.mine, size=k, replace=False)]
        samples = [sample_points(self.subjects[j], rng, cfg, self.frames_of[j]) for j in picks]
        coords, inten, labs = (pad_sequence([s[c] for s in samples], batch_first=True).to(dev)
                               for c in range(3))                   # (B, N, d), (B, N, C_in), (B, N)
        weight = point_weights([s[0].shape[0] for s in samples]).to(dev)      # (B, N)
        h = self.latents[torch.as_tensor(picks, device=dev)]                  # (B, L)
        seg, rec = self.train_net(coords, h)
        seg_w = seg_weights(labs, weight) if self.sparse else None
        loss, parts = prior_loss(seg, rec, labs, inten, weight, h, seg_w, alpha=cfg.alpha,
                                 latent_reg=cfg.latent_reg)
        if cfg.weight_reg > 0:
            loss = loss + cfg.weight_reg * sum(p.pow(2).sum() for p in self.model.net.backbone_parameters())
        return loss, parts

    def trained_latents(self) -> torch.Tensor:
        """The whole latent table ``(rows, L)`` on the CPU, every row from its owner."""
        return gather_rows(self.latents, self.own).cpu()

    def weights(self) -> dict[str, torch.Tensor]:
        return {**{f"net.{k}": v for k, v in self.model.net.state_dict().items()},
                "latents": gather_rows(self.latents, self.own)}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["latents"].shape) != (self.rows, self.cfg.latent_dim):
            raise InputError(self.state_path, f"training state has {state['latents'].shape[0]} latents, "
                                              f"the training set {self.rows} cases")
        self.model.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        with torch.no_grad():  # own rows only: the others stay as an uninterrupted run left them
            self.latents.copy_(torch.where(self.own[:, None], state["latents"].to(self.model.device),
                                           self.latents))

    def extra_state(self) -> dict[str, Any]:
        """The latents' Adam moments, gathered (each rank holds its own rows')."""
        st = self.opt_lat.state[self.latents]
        return {f"latent_{k}": gather_rows(st[k], self.own) for k in _MOMENTS}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        st = self.opt_lat.state[self.latents]  # rank 0's, loaded by the engine: own rows only here
        for k in _MOMENTS:
            st[k].copy_(state[f"latent_{k}"].to(self.model.device) * self.own[:, None])
