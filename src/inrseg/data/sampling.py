"""Training data plumbing shared by the CNN trainers (U-Net / SegResNet baselines and MORSE).

Loading cases into tensors, the training crop of a network, MONAI's padding, foreground-
oversampled cropping and intensity augmentation, and batches whose items are reproducible
random draws of ``(seed, step, item)`` - so that a resumed run, a 1-process run and a
2-rank run (each rank drawing its own items of the global batch) see the same data.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (Compose, DivisiblePad, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd,
                              RandShiftIntensityd, SpatialPadd)

from inrseg.data.volume import IGNORE, Volume, label_array
from inrseg.data.cases import Case
from inrseg.core.progress import progress
from inrseg.core.seeding import step_rng

#: intensity augmentation of training crops: x * (1 + U(-0.1, 0.1)) + U(-0.1, 0.1)
AUG_SCALE = 0.1
AUG_SHIFT = 0.1


def plain(t: torch.Tensor) -> torch.Tensor:
    """A MONAI ``MetaTensor`` as a plain tensor (same storage and device); others unchanged.

    (``torch.as_tensor`` would also do it, but moves the tensor to the default device.)
    """
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def load_training_tensors(cases: Sequence[Case], prepare: Callable[[Volume], torch.Tensor]
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Load every case: images through ``prepare`` (``Volume -> (C, *S)`` float tensor) and
    label maps as int64 ``(*S,)`` tensors, ignored voxels as :data:`~inrseg.data.volume.IGNORE`
    (-1), all in host memory (batches move to the device)."""
    images, labels = [], []
    for case in progress(cases, desc="loading training cases"):
        img, lab = case.load()
        images.append(prepare(img))
        labels.append(torch.from_numpy(label_array(lab)))
    return images, labels


def has_ignored(labels: Sequence[torch.Tensor]) -> bool:
    """Whether any of the label tensors holds an ignored voxel (:data:`IGNORE`)."""
    return any(bool((lab == IGNORE).any()) for lab in labels)


def _pos_neg_indices(d: dict) -> dict:
    """Add the flat crop-centre indices of ``d["label"]`` ``(1, *S)`` for RandCropByPosNegLabeld:
    ``fg_indices`` (label > 0) and ``bg_indices`` (label == 0); ignored voxels (:data:`IGNORE`)
    are neither, unless nothing is annotated (then every voxel is background)."""
    lab = plain(d["label"])[0].reshape(-1)
    fg = torch.nonzero(lab > 0)[:, 0].numpy()
    bg = torch.nonzero(lab == 0)[:, 0].numpy()
    if fg.size == 0 and bg.size == 0:
        bg = np.arange(lab.numel())
    return {**d, "fg_indices": fg, "bg_indices": bg}


def pad_to_multiple(x: torch.Tensor, k: int, spatial_ndim: int) -> tuple[torch.Tensor, list[slice]]:
    """Zero-pad the last ``spatial_ndim`` axes of ``x`` up to multiples of ``k`` (symmetric,
    MONAI's ``DivisiblePad``). Returns the padded tensor and the slices that crop it back."""
    shape = tuple(x.shape[-spatial_ndim:])
    lead = tuple(x.shape[:-spatial_ndim])
    with torch.device(x.device):  # MONAI makes some tensors without a device
        padded = plain(DivisiblePad(k, method="symmetric")(x.reshape((-1,) + shape)))
    padded = padded.reshape(lead + tuple(padded.shape[1:]))
    crop = [slice(((-n) % k) // 2, ((-n) % k) // 2 + n) for n in shape]
    return padded, crop


def training_patch(shape: Sequence[int], want: Sequence[int] | None, divisor: int) -> tuple[int, ...]:
    """Training crop (and sliding window) for images of grid ``shape`` (voxels).

    2D: the whole slice. 3D: ``want`` (default 96^3) capped at the volume. Every edge is rounded
    up to a multiple of the network's total down-sampling ``divisor`` and is at least twice it
    (a 1-voxel bottleneck cannot be instance-normalised); the sampler zero-pads where the image
    is smaller.
    """
    if len(shape) == 2:
        return tuple(int(math.ceil(n / divisor) * divisor) for n in shape)
    want = want or (96,) * 3
    return tuple(max(2 * divisor, int(math.ceil(min(w, n) / divisor) * divisor))
                 for w, n in zip(want, shape))


class PatchSampler:
    """Random training crops of a list of cases, MONAI transforms per item.

    Each item: a random case, zero-padded (symmetric) up to ``patch`` where smaller, cropped to
    ``patch`` by ``RandCropByPosNegLabeld`` - centred on a foreground voxel (label > 0) with
    probability ``foreground_fraction`` (nnU-Net oversamples 1/3), else on a background voxel -
    then, with ``augment``, a random intensity scale ``1 +- 0.1`` and shift ``+- 0.1``, and with
    ``mirror`` a mirroring of image and labels along each spatial axis with probability 0.5 (as
    nnU-Net trains, so that its mirroring test-time augmentation sees familiar inputs).

    With ``ignore=True`` (labels holding :data:`~inrseg.data.volume.IGNORE`), crops are centred on
    *annotated* voxels only: foreground = label > 0, background = label 0 (the zero padding
    counts as background, as without ignore), given to MONAI as precomputed indices (its own
    rule, label != 0, would take ignored voxels for foreground); a case with no annotated voxel
    at all is cropped anywhere. ``ignore=False`` is the original sampler, draw for draw.

    Args:
        images: per case ``(C, *S_i)`` float tensors.
        labels: per case ``(*S_i)`` int64 tensors.
        patch: crop size (voxels), one per spatial axis.
        foreground_fraction: share of crops centred on foreground, in [0, 1].
        augment: intensity augmentation.
        mirror: random mirroring along every spatial axis (independently, p = 0.5 each).
        seed: the draws of item ``j`` of step ``s`` are a function of ``(seed, s, j)``.
        ignore: labels hold ignored voxels (see above).
    """

    def __init__(self, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                 patch: Sequence[int], foreground_fraction: float = 0.0, augment: bool = True,
                 seed: int = 0, ignore: bool = False, mirror: bool = False) -> None:
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must lie in [0, 1], got {foreground_fraction}")
        self.images, self.labels = list(images), list(labels)
        self.patch = tuple(int(p) for p in patch)
        self.seed = seed
        self.ignore = bool(ignore)
        if self.ignore:
            steps = [SpatialPadd(("image", "label"), self.patch, method="symmetric"),
                     _pos_neg_indices,
                     RandCropByPosNegLabeld(("image", "label"), "label", self.patch,
                                            pos=foreground_fraction, neg=1.0 - foreground_fraction,
                                            num_samples=1, fg_indices_key="fg_indices",
                                            bg_indices_key="bg_indices")]
        else:
            steps = [SpatialPadd(("image", "label"), self.patch, method="symmetric"),
                     RandCropByPosNegLabeld(("image", "label"), "label", self.patch,
                                            pos=foreground_fraction, neg=1.0 - foreground_fraction,
                                            num_samples=1)]
        if augment:
            steps += [RandScaleIntensityd("image", factors=AUG_SCALE, prob=1.0),
                      RandShiftIntensityd("image", offsets=AUG_SHIFT, prob=1.0)]
        if mirror:  # spatial axes of the channel-first crop: 0 .. d-1
            steps += [RandFlipd(("image", "label"), prob=0.5, spatial_axis=a) for a in range(len(self.patch))]
        self.transform = Compose(steps)

    def item(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index`` of the global batch of step ``step``: ``(C, *patch)`` image and
        ``(1, *patch)`` int64 labels, on the CPU."""
        rng = step_rng(self.seed, step, index)
        i = int(rng.integers(len(self.images)))
        self.transform.set_random_state(seed=int(rng.integers(2 ** 31)))
        # MONAI's transforms make some tensors without a device: pin them to the CPU, where the
        # data pipeline runs (batches move to the training device in :meth:`batch`)
        with warnings.catch_warnings(), torch.device("cpu"):
            warnings.simplefilter("ignore")  # a crop of a case without foreground: MONAI warns
            out = self.transform({"image": self.images[i], "label": self.labels[i][None]})[0]
        return plain(out["image"]).float(), plain(out["label"]).long()

    def batch(self, step: int, indices: Sequence[int], device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` of step ``step`` stacked: ``(B, C, *patch)`` images and
        ``(B, 1, *patch)`` labels on ``device``."""
        items = [self.item(step, j) for j in indices]
        x = torch.stack([a for a, _ in items]).to(device, non_blocking=True)
        y = torch.stack([b for _, b in items]).to(device, non_blocking=True)
        return x, y
