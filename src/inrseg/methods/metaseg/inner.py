"""MetaSeg's losses and inner loop: pure functions of a parameter dict (second-order MAML).

The parameters are the flat dict of :mod:`inrseg.nn.siren` (``"f.{i}.weight"``, ...,
``"g.{j}.bias"``): ``theta`` = the ``f.*`` entries (the SIREN), ``phi`` = the ``g.*`` entries
(the head). Every function here is differentiable to second order in them
(``torch.autograd.grad(create_graph=True)``).

Shapes: ``N`` points, ``d`` coordinate axes, ``C`` image channels, ``K`` classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses.focal_loss import softmax_focal_loss

from inrseg.methods.metaseg.config import MetaSegConfig
from inrseg.nn.siren import Params, full_forward, siren_forward

__all__ = ["ADAM_BETAS", "ADAM_EPS", "Task", "adam_direction", "focal_loss", "inner_adapt", "meta_loss", "task_loss",
           "weighted_mse"]

#: Adam's moment decay rates (inner loop and test time), those of ``torch.optim.Adam``
ADAM_BETAS = (0.9, 0.999)
#: Adam's epsilon, that of ``torch.optim.Adam``
ADAM_EPS = 1e-8


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float,
               labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over points of the focal loss ``-(1 - p_t)^gamma log p_t`` (``p_t``: softmax
    probability of the target class); logits ``(N, K)``, target ``(N,)`` int64. Scalar, in the
    logits' dtype, twice differentiable.

    ``labelled`` ``(N,)`` bool: the mean is over the labelled points only (0 if there is none;
    the target of the others, e.g. ``IGNORE``, is never read); ``None``: every point.

    MONAI's ``softmax_focal_loss`` (the function behind its ``FocalLoss``) on a one-hot target,
    summed over classes; not the ``FocalLoss`` module, whose forward casts the logits to float32.
    """
    if labelled is None:
        onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)            # (N, K)
        return softmax_focal_loss(logits, onehot, gamma).sum(-1).mean()
    onehot = F.one_hot(torch.where(labelled, target, 0), logits.shape[-1]).to(logits.dtype)
    keep = labelled.to(logits.dtype)
    return (softmax_focal_loss(logits, onehot, gamma).sum(-1) * keep).sum() / keep.sum().clamp(min=1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over points (and channels) of ``weight * (pred - target)^2``; ``pred`` / ``target``
    ``(..., N, C)``, ``weight`` ``(..., N)`` or ``None``. Returns the mean over all leading axes."""
    err = (pred - target).pow(2).mean(-1)
    if weight is not None:
        err = err * weight
    return err.mean()


@dataclass
class Task:
    """Pixels of one image (or a subset of them), on one device.

    Attributes:
        coords: ``(N, d)`` coordinates in [-1, 1].
        pixels: ``(N, C)`` intensities in [0, 1].
        labels: ``(N,)`` int64 class indices (``IGNORE`` where unlabelled).
        weight: ``(N,)`` MSE weights (background down-weighting), or ``None``.
        labelled: ``(N,)`` bool, the pixels with a label; ``None``: all of them.
    """

    coords: torch.Tensor
    pixels: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor | None = None
    labelled: torch.Tensor | None = None

    def subset(self, n: int | None, rng: np.random.Generator) -> "Task":
        """``n`` random points (without replacement, drawn by ``rng``), or ``self`` when ``n`` is
        None / >= N."""
        N = self.coords.shape[0]
        if n is None or n >= N:
            return self
        idx = torch.from_numpy(rng.choice(N, size=n, replace=False)).to(self.coords.device)   # (n,)
        return Task(self.coords[idx], self.pixels[idx], self.labels[idx],
                    None if self.weight is None else self.weight[idx],
                    None if self.labelled is None else self.labelled[idx])


def task_loss(params: Params, task: Task, cfg: MetaSegConfig) -> torch.Tensor:
    """MSE on the pixels + ``seg_weight`` x focal loss on the labelled pixels (scalar)."""
    out, logits = full_forward(params, task.coords, cfg.w0)
    return weighted_mse(out, task.pixels, task.weight) + cfg.seg_weight * focal_loss(
        logits, task.labels, cfg.focal_gamma, task.labelled)


def adam_direction(m: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
    """Adam's update direction ``m_hat / (sqrt(v_hat) + eps)`` after ``t`` steps, with the
    bias-corrected moments of ``m`` and ``v`` (any shape, returned shape). ``+ 1e-30`` inside the
    square root keeps its derivative finite where a gradient is exactly 0."""
    b1, b2 = ADAM_BETAS
    return (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t) + 1e-30).sqrt() + ADAM_EPS)


def inner_adapt(params: Params, support: Sequence[Task], cfg: MetaSegConfig,
                lrs: Params | None = None, create_graph: bool = True) -> dict[str, torch.Tensor]:
    """The inner loop: one step of differentiable Adam (or SGD, ``inner_optimizer``) per support
    task, moments starting at 0.

    ``cfg.inner_loss == "pixels"``: MSE on the pixels, ``theta`` only (the test-time fit);
    ``"joint"``: MSE + focal loss, ``theta`` and ``phi``. ``lrs``: a learning rate per parameter
    (Meta-SGD, same keys and shapes as ``params``); ``None``: ``cfg.inner_lr``.

    With ``create_graph`` the result is differentiable to second order in ``params`` (MAML);
    without it the gradients are constants (first-order MAML: the result still depends on
    ``params`` through the identity, and on ``lrs`` through the update).

    Returns:
        adapted parameters (same keys and shapes as ``params``).
    """
    b1, b2 = ADAM_BETAS
    if cfg.inner_loss not in ("pixels", "joint"):
        raise ValueError(f"unknown inner_loss {cfg.inner_loss!r} (pixels, joint)")
    joint = cfg.inner_loss == "joint"
    keys = [k for k in params if joint or k.startswith("f.")]
    m = {k: torch.zeros_like(params[k]) for k in keys}
    v = {k: torch.zeros_like(params[k]) for k in keys}
    cur = dict(params)
    for t, task in enumerate(support, 1):
        if joint:
            loss = task_loss(cur, task, cfg)
        else:
            loss = weighted_mse(siren_forward(cur, task.coords, cfg.w0)[0], task.pixels, task.weight)
        grads = torch.autograd.grad(loss, [cur[k] for k in keys], create_graph=create_graph)
        new = dict(cur)
        for k, g in zip(keys, grads):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            lr = lrs[k] if lrs is not None else cfg.inner_lr
            new[k] = cur[k] - lr * (g if cfg.inner_optimizer == "sgd" else adam_direction(m[k], v[k], t))
        cur = new
    return cur


def meta_loss(params: Params, support: Sequence[Task], query: Task, cfg: MetaSegConfig,
              lrs: Params | None = None, create_graph: bool = True) -> torch.Tensor:
    """The MAML objective of one task: :func:`task_loss` on ``query`` after :func:`inner_adapt`
    on ``support`` (scalar)."""
    return task_loss(inner_adapt(params, support, cfg, lrs, create_graph), query, cfg)
