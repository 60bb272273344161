"""Intensity normalisation shared by all methods.

Written by hand (a few lines) rather than with MONAI transforms because the methods work on
whole in-memory arrays and need the exact inverse-free mapping stored in their checkpoints.

The statistics are computed in float32, as they always were (so a model retrained from an old
checkpoint's config sees the same numbers, bit for bit), except where float32 arithmetic cannot
give the right answer: where a statistic overflows (a voxel of 3e38, a uint64 image whose squares
exceed float32's range) or a channel's spread is below float32's resolution. There they are
computed in float64 on a copy scaled to [-1, 1], which gives the exact map, never all zeros.
"""

from __future__ import annotations

import math

import numpy as np

from inrseg.core.errors import InputError

#: a z-score spread (or min-max range) at or below this is taken for a constant channel
_TINY_SPREAD = 1e-8


def normalize(image: np.ndarray, mode: str = "zscore") -> np.ndarray:
    """Normalise each channel of an image ``(C, *S)`` independently; returns float32.

    Modes:
        ``"zscore"``: zero mean, unit std over the non-zero voxels of the channel (the whole
            channel when it has no zeros) - nnU-Net's MRI scheme for skull-stripped images;
            the statistics ignore the background, which is mapped like any voxel.
        ``"minmax"``: linear map of the 0.5 / 99.5 percentiles onto [0, 1], clipped (NISF and
            MetaSeg fit intensities in [0, 1]).

    ``image`` must be finite (the NIfTI reader refuses NaN / Inf voxels and values beyond float32's
    range). A channel whose statistics overflow float32, or whose spread is too small for it, is
    normalised in float64 (see the module doc); a constant channel is only shifted (z-score: to 0)
    or mapped to 0 (min-max).
    """
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        x = image[c].astype(np.float32)
        if mode == "zscore":
            out[c] = _zscore(x)
        elif mode == "minmax":
            out[c] = _minmax(x)
        else:
            raise ValueError(f"unknown normalisation {mode!r} (zscore, minmax)")
    return out


def _zscore(x: np.ndarray) -> np.ndarray:
    """Z-score of one float32 channel (see :func:`normalize`)."""
    mask = x != 0
    vals = x[mask] if mask.sum() > 0.05 * x.size else x.ravel()
    with np.errstate(over="ignore", invalid="ignore"):
        mu, sd = float(vals.mean()), float(vals.std())
    if math.isfinite(mu) and math.isfinite(sd) and (sd > _TINY_SPREAD or vals.min() == vals.max()):
        return (x - mu) / (sd if sd > _TINY_SPREAD else 1.0)
    # float32 overflowed, or the spread is below its resolution: exact, on a copy in [-1, 1]
    scale = _abs_max(x)
    xs, vs = x.astype(np.float64) / scale, vals.astype(np.float64) / scale
    mu64, sd64 = vs.mean(), vs.std()
    return ((xs - mu64) / (sd64 if sd64 > 0 else 1.0)).astype(np.float32)


def _minmax(x: np.ndarray) -> np.ndarray:
    """Min-max map of one float32 channel (see :func:`normalize`)."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    with np.errstate(over="ignore", invalid="ignore"):
        spread = float(np.float32(x.max()) - np.float32(x.min()))  # bounds every |x - lo|
        span = hi - lo
    if math.isfinite(spread) and math.isfinite(float(span)) and (span > _TINY_SPREAD or span == 0):
        return np.clip((x - lo) / (span if span > _TINY_SPREAD else 1.0), 0.0, 1.0)
    scale = _abs_max(x)
    xs = x.astype(np.float64) / scale
    lo64, hi64 = np.percentile(xs, [0.5, 99.5])
    return np.clip((xs - lo64) / (hi64 - lo64 if hi64 > lo64 else 1.0), 0.0, 1.0).astype(np.float32)


def _abs_max(x: np.ndarray) -> float:
    """The largest ``|x|`` as a float64 (1 for an all-zero channel), the scale of the exact path."""
    m = float(np.max(np.abs(x.astype(np.float64)))) if x.size else 0.0
    return m if m > 0 else 1.0


def check_input(image, in_channels: int, spatial_ndim: int) -> None:
    """Raise :class:`~inrseg.core.errors.InputError` (naming the image's file) unless ``image`` (a
    :class:`~inrseg.data.volume.Volume`) has the channel count and dimensionality a model expects."""
    if image.data.shape[0] != in_channels:
        raise InputError(image.path, f"has {image.data.shape[0]} channels, the model expects {in_channels}")
    if image.spatial_ndim != spatial_ndim:
        raise InputError(image.path, f"is {image.spatial_ndim}D, the model is {spatial_ndim}D")
