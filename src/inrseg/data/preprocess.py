"""Intensity normalisation shared by all methods.

Written by hand (a few lines) rather than with MONAI transforms because the methods work on
whole in-memory arrays and need the exact inverse-free mapping stored in their checkpoints.
"""

from __future__ import annotations

import numpy as np

from inrseg.core.errors import InputError


def normalize(image: np.ndarray, mode: str = "zscore") -> np.ndarray:
    """Normalise each channel of an image ``(C, *S)`` independently; returns float32.

    Modes:
        ``"zscore"``: zero mean, unit std over the non-zero voxels of the channel (the whole
            channel when it has no zeros) - nnU-Net's MRI scheme for skull-stripped images;
            the statistics ignore the background, which is mapped like any voxel.
        ``"minmax"``: linear map of the 0.5 / 99.5 percentiles onto [0, 1], clipped (NISF and
            MetaSeg fit intensities in [0, 1]).
    """
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        x = image[c].astype(np.float32)
        if mode == "zscore":
            mask = x != 0
            vals = x[mask] if mask.sum() > 0.05 * x.size else x.ravel()
            mu, sd = float(vals.mean()), float(vals.std())
            out[c] = (x - mu) / (sd if sd > 1e-8 else 1.0)
        elif mode == "minmax":
            lo, hi = np.percentile(x, [0.5, 99.5])
            out[c] = np.clip((x - lo) / (hi - lo if hi - lo > 1e-8 else 1.0), 0.0, 1.0)
        else:
            raise ValueError(f"unknown normalisation {mode!r} (zscore, minmax)")
    return out


def check_input(image, in_channels: int, spatial_ndim: int) -> None:
    """Raise :class:`~inrseg.core.errors.InputError` (naming the image's file) unless ``image`` (a
    :class:`~inrseg.data.volume.Volume`) has the channel count and dimensionality a model expects."""
    if image.data.shape[0] != in_channels:
        raise InputError(image.path, f"has {image.data.shape[0]} channels, the model expects {in_channels}")
    if image.spatial_ndim != spatial_ndim:
        raise InputError(image.path, f"is {image.spatial_ndim}D, the model is {spatial_ndim}D")
