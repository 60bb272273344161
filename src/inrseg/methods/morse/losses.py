"""MORSE's loss and its schedules: ``L_sup + lambda_t * L_rend`` and the expert-dropout warm-up.

Shapes: coarse logits ``(B, K, *S)``, labels ``(B, 1, *S)`` int64, training points ``(B, P, d)``
in ``[-1, 1]`` with their point-head logits ``(B, K, P)``.
"""

from __future__ import annotations

from typing import Any

import torch

from inrseg.losses import masked_cross_entropy
from inrseg.nn.point_sampling import point_sample

__all__ = ["dropout_ramp", "morse_losses", "rend_weight"]


def rend_weight(t: int, total: int, lambda_rend: float = 0.1) -> float:
    """The adaptive weight of ``L_rend`` at iteration ``t`` of ``total`` (paper):
    ``lambda_rend * 1{t > T/2} * (t - T/2) / T`` (0 in the first half, ``lambda_rend / 2`` at T)."""
    half = total / 2
    return lambda_rend * (t - half) / total if t > half else 0.0


def dropout_ramp(step: int, warmup_steps: int) -> float:
    """Share of the full expert-dropout rate used at 0-based ``step``: rises linearly from 0 at
    step 0 to 1 at ``warmup_steps``, then stays 1 (``warmup_steps`` 0: always 1)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def morse_losses(out: Any, y: torch.Tensor, weight: float, loss_fn: torch.nn.Module
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_sup + weight * L_rend`` of a forward pass ``out`` (a :class:`~inrseg.nn.morse.MorseOutput`:
    ``coarse``, and ``coords`` / ``points`` where training points were drawn) against ``y``, and
    its parts for the log (``loss_sup``, ``lambda_rend``, ``loss_rend`` where points were drawn).

    ``L_sup`` is ``loss_fn`` on the coarse logits; ``L_rend`` the cross entropy of the point logits
    against the nearest label at each point, without the points labelled ``loss_fn.ignore_index``
    (plain cross entropy where it has none).
    """
    with torch.device(out.coarse.device):  # MONAI's losses make tensors without a device
        loss = loss_fn(out.coarse, y)
    parts = {"loss_sup": float(loss.detach()), "lambda_rend": weight}
    if out.points is not None:
        target = point_sample(y.float(), out.coords, mode="nearest")[:, 0].long()  # (B, P)
        rend = masked_cross_entropy(out.points, target, getattr(loss_fn, "ignore_index", None))
        loss = loss + weight * rend
        parts["loss_rend"] = float(rend.detach())
    return loss, parts
