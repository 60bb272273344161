"""Augmented copies of labelled training volumes (small affine + intensity changes).

Used where a method learns one code per training case and so cannot draw a fresh augmentation
each step: NISF's auto-decoder gives every copy its own latent (``NISFConfig.augment``), so the
prior sees more anatomies than there are subjects. The transforms are MONAI's; this module only
decides which axes may rotate, keeps the grid and affine, and handles 3D + t.

* **Geometry**: a random affine about the grid centre, the same for every channel and every
  frame of a cine: rotation up to ``rotate`` rad, scaling by up to ``1 +- scale`` per axis;
  the image is interpolated bilinearly, the labels by nearest neighbour (so an ignore value
  stays an ignore value), borders replicate the edge. In a volume whose coarsest axis is more
  than twice its finest (short-axis cine stacks: 1-2 mm in plane, 8-10 mm between slices)
  only the in-plane rotation is drawn: a tilt would interpolate across thick slices. An
  optional shift (``translate``, a fraction of the grid's extent; none across thick slices)
  moves the anatomy in the field of view.
* **Elastic** (optional, ``elastic`` > 0): a smooth random displacement field on top of the
  affine, so that copies differ in shape, not only in pose. ``elastic`` is the field's RMS
  displacement in voxels. Near-isotropic 3D grids get MONAI's ``Rand3DElastic`` (Gaussian-
  smoothed noise, sigma = 1/8 of the largest axis); 2D grids, and thick-slice stacks and cines
  slice by slice (one in-plane field for every slice and frame), get ``Rand2DElastic`` (normal
  offsets on control points 1/4 of the largest in-plane axis apart, interpolated bicubically).
* **Intensity**: random scaling by ``1 +- 0.1`` and a gamma in ``[0.8, 1.25]``.

A copy is a pure function of ``seed``: the same seed gives the same copy on every rank, in a
resumed run and on another machine.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from monai.transforms import Rand2DElastic, Rand3DElastic, RandAdjustContrast, RandAffine, RandScaleIntensity

from inrseg.data.volume import Volume

__all__ = ["augmented_pair", "copy_seed"]

_ANISOTROPY = 2.0   # coarsest / finest spacing above which a 3D grid rotates in plane only
_SIGMA_FRACTION = 1 / 8      # 3D elastic: smoothing sigma / largest axis (voxels)
_CONTROL_FRACTION = 1 / 4    # 2D elastic: control-point spacing / largest in-plane axis (pixels)


def copy_seed(seed: int, case: int, copy: int) -> int:
    """The seed of augmented copy ``copy`` (1, 2, ...) of training case ``case``."""
    return int(np.random.SeedSequence([int(seed), int(case), int(copy)]).generate_state(1)[0])


def _rotate_range(spacing: tuple[float, ...], rotate: float) -> tuple[float, ...]:
    """MONAI's ``rotate_range`` for a grid: one angle in 2D; in 3D the angles about axes 0, 1, 2,
    all of them for a near-isotropic grid, else only the one about the coarsest axis."""
    if len(spacing) == 2:
        return (rotate,)
    sp = np.asarray(spacing, float)
    if sp.max() > _ANISOTROPY * sp.min():
        rng = [0.0, 0.0, 0.0]
        rng[int(np.argmax(sp))] = rotate
        return tuple(rng)
    return (rotate,) * 3


def _translate_range(shape: tuple[int, ...], spacing: tuple[float, ...], translate: float) -> tuple[float, ...]:
    """MONAI's ``translate_range`` (voxels): ``translate`` x the grid's extent along each axis,
    except along the coarsest axis of an anisotropic 3D grid (no shift across thick slices)."""
    out = [translate * n for n in shape]
    sp = np.asarray(spacing, float)
    if len(shape) == 3 and sp.max() > _ANISOTROPY * sp.min():
        out[int(np.argmax(sp))] = 0.0
    return tuple(out)


def _smoothed_noise_rms(sigma: float, ndim: int = 3) -> float:
    """RMS of uniform(-1, 1) noise after MONAI's ``GaussianFilter(ndim, sigma, truncated=3)``
    (``Rand3DElastic``'s offsets before ``magnitude``): ``sqrt(1/3 * (sum g^2)^ndim)`` with
    ``g`` the normalised 1D kernel."""
    r = int(3.0 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    return float(np.sqrt((g ** 2).sum() ** ndim / 3.0))


def _elastic_2d(img: np.ndarray, lab: np.ndarray, seed: int, axes: tuple[int, int],
                rotate: float, scale: float, translate: float, elastic: float) -> tuple[np.ndarray, np.ndarray]:
    """``Rand2DElastic`` in the plane of spatial ``axes`` of ``img (C, *S)`` / ``lab (1, *S)``,
    the same field for every position along the other spatial axes (thick slices, frames)."""
    S = img.shape[1:]
    rest = [a for a in range(len(S)) if a not in axes]
    perm = rest + list(axes)                       # spatial axes: others first, the plane last

    def to2d(x: np.ndarray) -> np.ndarray:        # (c, *S) -> (c * prod(rest), P, Q)
        y = np.transpose(x, [0] + [1 + a for a in perm])
        return y.reshape(-1, S[axes[0]], S[axes[1]])

    def back(y: np.ndarray, c: int) -> np.ndarray:
        y = np.asarray(y).reshape(c, *[S[a] for a in perm])
        return np.transpose(y, [0] + [1 + perm.index(a) for a in range(len(S))])

    plane = (S[axes[0]], S[axes[1]])
    ctrl = max(2, int(round(max(plane) * _CONTROL_FRACTION)))
    geo = Rand2DElastic(spacing=(ctrl, ctrl), magnitude_range=(elastic, elastic), prob=1.0,
                        rotate_range=(rotate,), scale_range=(scale, scale),
                        translate_range=tuple(translate * n for n in plane), padding_mode="border",
                        device=torch.device("cpu"))

    def apply(x: np.ndarray, mode: str) -> np.ndarray:
        geo.set_random_state(seed=seed)   # the same draws for image and labels
        return np.asarray(geo(x, mode=mode))

    return back(apply(to2d(img), "bilinear"), img.shape[0]), back(apply(to2d(lab), "nearest"), lab.shape[0])


def augmented_pair(image: Volume, labels: Volume, seed: int, rotate: float = 0.1,
                   scale: float = 0.1, translate: float = 0.0, elastic: float = 0.0) -> tuple[Volume, Volume]:
    """One augmented copy of ``image (C, *S)`` and ``labels (*S,)`` on the same grid and affine.

    ``S`` is 2D, 3D or 3D + t (the last axis: frames, all moved alike). ``rotate``: radians,
    ``scale``: relative, ``translate``: shift up to this fraction of the grid's extent per axis
    (none across thick slices), ``elastic``: RMS displacement (voxels) of a smooth random field
    (in plane for thick slices; 0: affine only). Returns new Volumes (float32 image, labels in
    their own dtype) whose ``meta`` is a copy of the inputs' (the ignore value included).
    """
    if labels.shape != image.shape:
        raise ValueError(f"label shape {labels.shape} != image shape {image.shape}")
    if elastic < 0:
        raise ValueError(f"elastic must be >= 0, got {elastic}")
    nd = image.spatial_ndim
    C = image.data.shape[0]
    img = image.data.astype(np.float32)
    lab = labels.data.astype(np.float32)[None]                               # (1, *S)
    if nd == 4:  # frames as channels: one spatial transform for the whole cine
        T = image.shape[-1]
        img = np.moveaxis(img, -1, 1).reshape(C * T, *image.shape[:3])       # (C*T, X, Y, Z)
        lab = np.moveaxis(lab[0], -1, 0)                                     # (T, X, Y, Z)
    spacing = tuple(image.spacing[:3] if nd == 4 else image.spacing)
    grid = tuple(image.shape[:3] if nd == 4 else image.shape)
    sp = np.asarray(spacing, float)
    thick = len(grid) == 3 and sp.max() > _ANISOTROPY * sp.min()
    if elastic > 0 and (len(grid) == 2 or thick):
        coarse = int(np.argmax(sp)) if thick else -1
        plane = tuple(a for a in range(len(grid)) if a != coarse)
        img_t, lab_t = _elastic_2d(img, lab, seed, plane, rotate, scale, translate, elastic)
    else:
        if elastic > 0:
            sigma = max(grid) * _SIGMA_FRACTION
            geo = Rand3DElastic(sigma_range=(sigma, sigma),
                                magnitude_range=(elastic / _smoothed_noise_rms(sigma),) * 2, prob=1.0,
                                rotate_range=_rotate_range(spacing, rotate), scale_range=(scale,) * 3,
                                translate_range=_translate_range(grid, spacing, translate),
                                padding_mode="border", device=torch.device("cpu"))
        else:
            geo = RandAffine(prob=1.0, rotate_range=_rotate_range(spacing, rotate),
                             scale_range=(scale,) * len(spacing),
                             translate_range=_translate_range(grid, spacing, translate),
                             padding_mode="border", device=torch.device("cpu"))

        def apply(x: np.ndarray, mode: str) -> np.ndarray:
            geo.set_random_state(seed=seed)   # the same draws for image and labels
            return np.asarray(geo(x, mode=mode))

        img_t, lab_t = apply(img, "bilinear"), apply(lab, "nearest")
    inten_seed = (seed + 1) % (2 ** 32)
    gain = RandScaleIntensity(factors=0.1, prob=1.0)
    gain.set_random_state(seed=inten_seed)
    gamma = RandAdjustContrast(gamma=(0.8, 1.25), prob=1.0)
    gamma.set_random_state(seed=(inten_seed + 1) % (2 ** 32))
    img_t = np.asarray(gamma(gain(img_t)), dtype=np.float32)
    lab_t = np.rint(np.asarray(lab_t, dtype=np.float32))
    if nd == 4:
        img_t = np.moveaxis(img_t.reshape(C, T, *image.shape[:3]), 1, -1)  # (C, X, Y, Z, T)
        lab_t = np.moveaxis(lab_t, 0, -1)                                   # (X, Y, Z, T)
    else:
        lab_t = lab_t[0]
    return (dataclasses.replace(image, data=np.ascontiguousarray(img_t), meta=dict(image.meta)),
            dataclasses.replace(labels, data=np.ascontiguousarray(lab_t).astype(labels.data.dtype),
                                meta=dict(labels.meta)))
