"""MetaSeg's phase 2: head retraining on fitted features, and the choice of ``T_f``.

After meta-training, ``theta*`` is fitted (MSE only, as at test time) to training and
validation images; the head inputs (:meth:`~inrseg.methods.metaseg.fitting.TestTimeFit.head_inputs`)
at each candidate step count ``t`` in ``tf_candidates`` are stored on random pixel subsets
(:func:`snapshot_features`). For every ``t`` a head is retrained from ``phi*`` on the training
features (:class:`HeadTask`: focal loss, best on validation kept) and scored on the validation
features; the ``(t, head)`` with the best validation Dice becomes ``(T_f, phi)``
(:func:`select_tf_and_head`). A head with context (``head_context > 0``) starts as ``phi*`` with
zero weights on the neighbours' features. Validation Dice here is computed on ``val_points``
random pixels per image (an estimate). Only labelled pixels train and score the head.

:func:`meta_training_share` splits a wall-time budget between meta-training and phase 2.

Shapes: ``M`` stored feature rows, ``P`` :attr:`context_points`, ``h`` the SIREN width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from inrseg.core.progress import status
from inrseg.core.seeding import step_rng, torch_generator
from inrseg.data.volume import IGNORE
from inrseg.engine import Budget, LoopSettings, StepOutput, TrainTask, run_training, seconds_per_call
from inrseg.methods.metaseg.config import MetaSegConfig
from inrseg.methods.metaseg.fitting import PreparedImage
from inrseg.methods.metaseg.inner import focal_loss
from inrseg.metrics import case_metrics
from inrseg.nn.siren import Params, head_forward

if TYPE_CHECKING:
    from inrseg.methods.metaseg.segmenter import MetaSeg

__all__ = ["META_SHARE_BOUNDS", "PHASE2_OVERHEAD", "PHASE2_SEED", "HeadTask", "Phase2Result", "meta_training_share",
           "retrain_head", "select_tf_and_head", "snapshot_features", "subset_dice", "tf_candidates"]

#: offset of phase 2's random draws from meta-training's (both are functions of the seed)
PHASE2_SEED = 17
#: meta-training gets ``1 - (estimated phase-2 time) / (time left)`` of the time left when the
#: fit starts, kept within these bounds
META_SHARE_BOUNDS = (0.25, 0.95)
#: phase-2 time over the time of its timed parts (test-time steps, head gradient steps): the
#: Adam updates, feature extraction and head validations come on top
PHASE2_OVERHEAD = 1.25


def tf_candidates(cfg: MetaSegConfig, with_val: bool) -> list[int]:
    """The T_f values tried (ascending), or ``default_tf`` alone without validation data."""
    return sorted({int(t) for t in cfg.tf_candidates if t >= 0}) if with_val else [cfg.default_tf]


def _labelled_pixels(im: PreparedImage, n: int, gen: torch.Generator) -> torch.Tensor:
    """``min(n, N)`` random pixel indices of ``im`` among its labelled ones (with replacement if
    it has fewer than that; any pixels if it has none), on ``gen``'s device."""
    N = im.coords.shape[0]
    n = min(n, N)
    cand = torch.nonzero(im.labelled)[:, 0].to(gen.device)
    if cand.numel() == 0:
        return torch.randperm(N, generator=gen, device=gen.device)[:n]
    if cand.numel() >= n:
        return cand[torch.randperm(cand.numel(), generator=gen, device=gen.device)[:n]]
    return cand[torch.randint(cand.numel(), (n,), generator=gen, device=gen.device)]


def snapshot_features(model: "MetaSeg", images: Sequence[PreparedImage], n_points: int, snaps: Sequence[int],
                      gen: torch.Generator, budget: Budget) -> tuple[dict[int, torch.Tensor], torch.Tensor, int]:
    """Fit labelled ``images`` up to ``max(snaps)`` steps, ``fit_batch`` of one shape at a time.

    Returns:
        the head inputs ``{t: (M, P * h)}`` at ``n_points`` random pixels per image (the same
        pixels for every ``t``; drawn by ``gen``), their labels ``(M,)``, and the number of
        images fitted. Once ``budget`` has expired no further block of images is started (the
        first always is), and within the first block the fits stop at the first snapshot
        reached after the deadline (the longer ``t`` are dropped). An image with unlabelled
        pixels gives labelled pixels only (drawn with replacement when it has fewer than
        ``n_points``).
    """
    # one preallocated store per t, filled block by block (a list of concatenated blocks would
    # hold every feature twice at the peak)
    total = sum(min(n_points, im.coords.shape[0]) for im in images)
    feats: dict[int, torch.Tensor | None] = {t: None for t in snaps}
    labels = []
    filled = 0
    groups: dict[tuple[int, ...], list[PreparedImage]] = {}
    for im in images:
        groups.setdefault(im.shape, []).append(im)
    fb = model.config.fit_batch
    blocks = [group[s:s + fb] for group in groups.values() for s in range(0, len(group), fb)]
    fitted, limit = 0, max(snaps)
    P, width = model.context_points, model.context_points * model.config.hidden
    for block in blocks:
        if fitted and budget.expired():
            status(f"time budget reached: features of {fitted} of {len(images)} images")
            break
        N = block[0].coords.shape[0]
        idx = torch.stack([torch.randperm(N, generator=gen, device=gen.device)[:n_points]
                           if im.labelled is None else _labelled_pixels(im, n_points, gen)
                           for im in block]).to(model.device)                      # (B, n)
        q = block[0].coords[idx]                                                  # (B, n, d)
        labels.append(torch.stack([im.labels[i] for im, i in zip(block, idx)]).reshape(-1))
        voxel = torch.stack([im.step for im in block])                            # (B, d)
        for t, theta in model.fit_theta(block, limit, [s for s in snaps if s <= limit], gen):
            if t in feats:
                x = model.head_inputs(theta, q, voxel, P).reshape(-1, width)
                if feats[t] is None:
                    feats[t] = torch.empty(total, width, dtype=x.dtype, device=x.device)
                feats[t][filled:filled + x.shape[0]] = x
            if not fitted and t < limit and budget.expired():
                # out of time within the first block: stop at this snapshot, drop longer fits
                status(f"time budget reached: fits stop at {t} steps")
                limit = t
                break
        fitted += len(block)
        filled += idx.numel()
    return ({t: v[:filled] for t, v in feats.items() if t <= limit and v is not None}, torch.cat(labels), fitted)


def subset_dice(head: Params, feats: torch.Tensor, labels: torch.Tensor, n_images: int, num_classes: int) -> float:
    """Mean over images of the mean foreground Dice of ``head`` on stored pixel subsets: head
    inputs ``(n_images * n, w)``, labels ``(n_images * n,)`` (``IGNORE`` skipped); a head that
    reads fewer columns (the meta-learned head beside context inputs) reads the first ones
    (the point's own)."""
    with torch.no_grad():
        pred = head_forward(head, feats[:, :head["g.0.weight"].shape[1]]).argmax(-1).reshape(n_images, -1).cpu()
    lab = labels.reshape(n_images, -1).cpu()
    scores = [case_metrics(p[None].numpy(), g[None].numpy(), num_classes, distances=False,
                           ignore_label=IGNORE).mean_foreground_dice for p, g in zip(pred, lab)]
    return float(np.nanmean(scores))


class HeadTask(TrainTask):
    """Phase 2 for candidate ``t``: Adam (``phase2_lr``) on the focal loss of ``head`` (leaf
    tensors, trained in place) over stored features ``feats`` ``(M, w)`` with labels ``(M,)``,
    batches of ``min(phase2_batch, M)`` rows drawn from ``step_rng(seed + PHASE2_SEED, i, t)``.
    Validation (with ``n_val`` > 0): :func:`subset_dice` on ``val_feats`` / ``val_labels``."""

    def __init__(self, model: "MetaSeg", t: int, head: dict[str, torch.Tensor], feats: torch.Tensor,
                 labels: torch.Tensor, val_feats: torch.Tensor | None, val_labels: torch.Tensor | None,
                 n_val: int, bf16: bool = False) -> None:
        cfg = model.config
        self.cfg, self.t, self.head, self.feats, self.labels = cfg, t, head, feats, labels
        self.val_feats, self.val_labels, self.n_val = val_feats, val_labels, n_val
        self.num_classes = len(model.label_names)
        self.batch = min(cfg.phase2_batch, feats.shape[0])
        super().__init__(name=f"metaseg head (T_f = {t})", method=model.method,
                         optimizers=[torch.optim.Adam(head.values(), lr=cfg.phase2_lr)],
                         params=list(head.values()), grad_sync="none", bf16=bf16, validates=bool(n_val))

    def step(self, i: int) -> StepOutput:
        rng = step_rng(self.cfg.seed + PHASE2_SEED, i, self.t)
        idx = torch.from_numpy(rng.integers(self.feats.shape[0], size=self.batch)).to(self.feats.device)   # (n,)
        return focal_loss(head_forward(self.head, self.feats[idx]), self.labels[idx], self.cfg.focal_gamma), {}

    def validate(self) -> dict[str, float]:
        return {"val_dice": subset_dice(self.head, self.val_feats, self.val_labels, self.n_val, self.num_classes)}

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.head)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.head.items():
                v.copy_(state[k])


def retrain_head(model: "MetaSeg", t: int, feats: torch.Tensor, labels: torch.Tensor,
                 val_feats: torch.Tensor | None, val_labels: torch.Tensor | None, n_val: int, budget: Budget,
                 bf16: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """Retrain the head for candidate ``t`` from ``phi*`` (the model's head) in this process
    alone (:class:`HeadTask`, an engine run that stops at ``budget``'s deadline).

    Returns:
        the best head on the ``n_val`` images' features ``val_feats`` ``(n_val * n, w)``
        (``phi*`` itself unless a step beats it) and its score; without validation images, the
        last head and ``-inf``.
    """
    cfg = model.config
    C = len(model.label_names)
    head = {k: v.detach().clone() for k, v in model.params.items() if k.startswith("g.")}
    start = ({k: v.clone() for k, v in head.items()},
             subset_dice(head, val_feats, val_labels, n_val, C) if n_val else -math.inf)
    w = head["g.0.weight"]
    if feats.shape[1] > w.shape[1]:  # a context head: phi* with zero weights on the neighbours
        head["g.0.weight"] = torch.cat([w, w.new_zeros(w.shape[0], feats.shape[1] - w.shape[1])], 1)
    head = {k: v.requires_grad_(True) for k, v in head.items()}
    labelled = labels != IGNORE
    if not bool(labelled.all()):  # only labelled pixels train the head
        feats, labels = feats[labelled], labels[labelled]
        if feats.shape[0] == 0:
            return start
    res = run_training(HeadTask(model, t, head, feats, labels, val_feats, val_labels, n_val, bf16),
                       LoopSettings(steps=cfg.phase2_steps, val_every=cfg.phase2_val_every, budget=budget,
                                    seed=cfg.seed, device=model.device, solo=True))
    if n_val and not res.best_score > start[1]:
        return start
    return {k: v.detach() for k, v in head.items()}, res.best_score if n_val else -math.inf


@dataclass
class Phase2Result:
    """What phase 2 chose: ``t_f``; the ``head`` (``g.*``) to use with it, the meta-learned head it
    replaces and the T_f curve ``[{"t_f", "val_dice_meta_head"?, "val_dice_phase2"?}]`` (``None``:
    phase 2 did not run, keep them)."""

    t_f: int
    head: dict[str, torch.Tensor] | None = None
    meta_head: dict[str, torch.Tensor] | None = None
    tf_curve: list[dict] | None = None


def select_tf_and_head(model: "MetaSeg", train: Sequence[PreparedImage], val: Sequence[PreparedImage],
                       budget: Budget | None = None, bf16: bool = False) -> Phase2Result:
    """Phase 2 (a head retrained per candidate T_f on ``train``) and the choice of T_f on
    ``val`` (labelled, prepared images); ``model`` is not changed.

    Ends by ``budget``'s deadline (default: none) where it can: once it has passed, no further
    images are fitted (one block of training and one of validation images always are, and their
    fits stop at the first candidate step count reached after the deadline, dropping the longer
    candidates), a head being retrained stops with its best so far, and the candidates left
    (ascending; the first is always tried) are skipped.
    """
    cfg = model.config
    budget = budget if budget is not None else Budget(None)
    gen = torch_generator(cfg.seed + PHASE2_SEED)
    cands = tf_candidates(cfg, bool(val))
    phase2 = cfg.phase2_steps > 0 and len(train) > 0
    if not val and not phase2:
        return Phase2Result(cfg.default_tf)
    tr_feats = tr_labels = None
    if phase2:
        chosen = list(train)
        if cfg.phase2_max_cases is not None and len(chosen) > cfg.phase2_max_cases:
            order = torch.randperm(len(chosen), generator=gen, device=gen.device)[:cfg.phase2_max_cases]
            chosen = [chosen[int(i)] for i in order]
        status(f"phase 2: fitting {len(chosen)} training images for up to {max(cands)} steps")
        tr_feats, tr_labels, _ = snapshot_features(model, chosen, cfg.phase2_points, cands, gen, budget)
    va_feats = va_labels = None
    n_val = 0
    if val:
        status(f"choosing T_f among {cands} on {len(val)} validation images")
        va_feats, va_labels, n_val = snapshot_features(model, val, cfg.val_points, cands, gen, budget)
    # candidates whose fits the budget cut short are dropped (the smallest is always kept)
    cands = [t for t in cands if (tr_feats is None or t in tr_feats) and (va_feats is None or t in va_feats)]
    meta_head = {k: v for k, v in model.params.items() if k.startswith("g.")}
    kept_meta_head = {k: v.detach().clone() for k, v in meta_head.items()}
    curve: list[dict] = []
    best = None
    for t in cands:
        if best is not None and budget.expired():
            status(f"time budget reached: T_f candidates {cands[len(curve):]} skipped")
            break
        entry: dict = {"t_f": t}
        if val:
            entry["val_dice_meta_head"] = subset_dice(meta_head, va_feats[t], va_labels, n_val, len(model.label_names))
        head, score = meta_head, entry.get("val_dice_meta_head", -math.inf)
        if phase2:
            head, score = retrain_head(model, t, tr_feats[t], tr_labels, None if va_feats is None else va_feats[t],
                                       va_labels, n_val, budget, bf16)
            entry["val_dice_phase2"] = score
        curve.append(entry)
        if best is None or score > best[1]:
            best = (t, score, head)
    status(f"T_f = {best[0]} (validation Dice {best[1]:.4f})")
    return Phase2Result(best[0], {k: v.detach().clone() for k, v in best[2].items()}, kept_meta_head, curve)


def meta_training_share(model: "MetaSeg", train: Sequence[PreparedImage], val: Sequence[PreparedImage],
                        budget: Budget) -> float:
    """Meta-training's share of the time ``budget`` has left (1 without a limit).

    Phase 2 fits each of its images (at most ``phase2_max_cases`` training images, and the
    validation images) for ``max(tf_candidates)`` test-time steps, then retrains one head per
    candidate for ``phase2_steps``. Its time is estimated from a few timed test-time steps and
    head gradient steps (x :data:`PHASE2_OVERHEAD`), plus one meta-training validation (the last
    one runs after meta-training's deadline). Meta-training gets the rest of the time left,
    within :data:`META_SHARE_BOUNDS`; phase 2 then runs against the whole budget's deadline and
    cuts itself short where the estimate was low (:func:`select_tf_and_head`).
    """
    if not budget.limited:
        return 1.0
    cfg = model.config
    fb = cfg.fit_batch
    fitting = model.fit_theta([im for im in train if im.shape == train[0].shape][:fb], 4, range(1, 5))
    per_fit_step = seconds_per_call(lambda: next(fitting), model.device)
    n_train = 0 if cfg.phase2_steps <= 0 else (
        len(train) if cfg.phase2_max_cases is None else min(len(train), cfg.phase2_max_cases))
    cands = tf_candidates(cfg, bool(val))
    fit_steps = (math.ceil(n_train / fb) + math.ceil(len(val) / fb)) * max(cands)
    head_s = 0.0
    if n_train:
        P = model.context_points
        head = {k: v.detach().clone().requires_grad_(True) for k, v in model.params.items() if k.startswith("g.")}
        rows = torch.zeros(min(cfg.phase2_batch, n_train * cfg.phase2_points), cfg.hidden * P, device=model.device)
        head["g.0.weight"] = head["g.0.weight"].detach().repeat(1, P).requires_grad_(True)
        labels = torch.zeros(rows.shape[0], dtype=torch.int64, device=model.device)
        head_s = cfg.phase2_steps * len(cands) * seconds_per_call(lambda: torch.autograd.grad(
            focal_loss(head_forward(head, rows), labels, cfg.focal_gamma), list(head.values())), model.device)
    last_val_s = math.ceil(min(len(val), cfg.val_max_cases) / fb) * cfg.val_fit_steps * per_fit_step
    estimate = PHASE2_OVERHEAD * (fit_steps * per_fit_step + head_s) + last_val_s
    lo, hi = META_SHARE_BOUNDS
    return min(hi, max(lo, 1.0 - estimate / max(budget.remaining_s(), 1e-9)))
