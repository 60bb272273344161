"""Segmentation losses that skip unlabelled voxels (the ignore label).

Inside the trainers an unlabelled voxel carries :data:`~inrseg.data.volume.IGNORE` (-1; a dataset's
own ignore value, e.g. 255, is mapped to it when the labels are loaded, see
:func:`inrseg.data.volume.label_array`). Such a voxel contributes nothing to a loss: neither its
value nor its gradient (the gradient of the loss with respect to the logits at an ignored
voxel is exactly 0).

:class:`DiceCELoss` is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` (Dice + cross
entropy, equal weights) with a mask:

* Dice: the softmax probabilities and the one-hot labels are both zeroed at ignored voxels,
  then MONAI's :class:`~monai.losses.DiceLoss` (per image and class, background included,
  smooth 1e-5) is applied. A zeroed voxel adds 0 to the intersection and to both sums, so this
  *is* the soft Dice over the annotated voxels alone. An image with no annotated voxel has Dice
  loss 0 for every class.
* Cross entropy: the mean over the annotated voxels of the batch (0 if there is none).

With ``ignore_index=None`` (a dataset without an ignore label) it is MONAI's loss itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as _MonaiDiceCELoss
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn

from inrseg.data.volume import IGNORE

__all__ = ["DiceCELoss", "masked_cross_entropy"]


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                         ignore_index: int | None = IGNORE) -> torch.Tensor:
    """Cross entropy of ``logits`` ``(N, C, ...)`` and int64 ``target`` ``(N, ...)``: the mean
    over the points whose target is not ``ignore_index`` (0 when every point is ignored).
    ``ignore_index=None``: plain ``F.cross_entropy`` (mean over all points)."""
    if ignore_index is None:
        return F.cross_entropy(logits, target)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


class DiceCELoss(nn.Module):
    """MONAI Dice + cross-entropy loss on ``(B, C, *S)`` logits and ``(B, 1, *S)`` int labels
    that skips voxels labelled ``ignore_index`` (module doc). ``ignore_index=None``: MONAI's
    ``DiceCELoss(to_onehot_y=True, softmax=True)`` unchanged."""

    def __init__(self, ignore_index: int | None = IGNORE) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.plain = _MonaiDiceCELoss(to_onehot_y=True, softmax=True)
        # the Dice part of the above, fed with masked probabilities and one-hot labels
        self.dice = DiceLoss(include_background=True, to_onehot_y=False, softmax=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.ignore_index is None:
            return self.plain(logits, target)
        if target.dim() != logits.dim() or target.shape[1] != 1:
            raise ValueError(f"expected (B, 1, *S) labels for (B, C, *S) logits, got {tuple(target.shape)} "
                             f"and {tuple(logits.shape)}")
        target = target.long()
        valid = target != self.ignore_index                                    # (B, 1, *S)
        clean = torch.where(valid, target, torch.zeros_like(target))
        keep = valid.to(logits.dtype)
        probs = torch.softmax(logits, 1) * keep                                # as MONAI: softmax first
        onehot = one_hot(clean, logits.shape[1], dim=1, dtype=probs.dtype) * keep
        dice = self.dice(probs, onehot)
        ce = masked_cross_entropy(logits, target[:, 0], self.ignore_index)
        return dice + ce
