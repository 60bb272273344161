"""Slices held out of a grid and arbitrary planes through world space (pure geometry).

:func:`heldout_mask` marks the voxels a model may see when whole slices are held out (NISF fits
a latent without them and segments them anyway); :func:`plane_points` gives the world points
of an oblique plane's pixels and the plane's affine, and :class:`PlaneView` is an image and a
label map rendered on such a plane (drawn by :func:`inrseg.viz.overlays.save_plane_png`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from inrseg.data.volume import Volume

__all__ = ["PlaneView", "heldout_mask", "plane_points"]


@dataclass
class PlaneView:
    """An image and label map rendered on an arbitrary plane.

    Attributes:
        image: ``(nu, nv)`` reconstructed intensity (first channel, normalised [0, 1]).
        labels: ``(nu, nv)`` int64 labels.
        affine: ``(4, 4)``: pixel ``(i, j, 0)`` -> world mm; columns are ``du * u``, ``dv * v``
            and the unit normal ``u x v`` (1 mm), so ``Volume(labels, affine, 2)`` writes a 2D
            NIfTI that overlays the source image in a viewer.
        frame: the (possibly fractional) time frame it was rendered at (4D), else ``None``.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    frame: float | None = None

    def as_volumes(self) -> tuple[Volume, Volume]:
        """``(image (1, nu, nv), labels (nu, nv))`` as 2D :class:`Volume` objects."""
        return (Volume(self.image[None].astype(np.float32), self.affine, 2),
                Volume(self.labels, self.affine, 2))


def heldout_mask(shape: Sequence[int], axis: int, indices: Sequence[int]) -> np.ndarray:
    """Boolean ``(*S,)`` mask, ``True`` where a voxel is observed (not in a held-out slice)."""
    if not 0 <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for a {len(shape)}-axis grid")
    idx = sorted({int(i) for i in indices})
    if not idx or idx[0] < 0 or idx[-1] >= shape[axis]:
        raise ValueError(f"held-out indices {list(indices)} must be a non-empty subset of "
                         f"[0, {shape[axis] - 1}]")
    if len(idx) == shape[axis]:
        raise ValueError("cannot hold out every slice")
    keep = np.ones(shape[axis], bool)
    keep[idx] = False
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(keep.reshape(view), tuple(shape)).copy()


def plane_points(centre_mm: Sequence[float], u: Sequence[float], v: Sequence[float],
                 size: tuple[int, int], pixel_mm: float | tuple[float, float]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """World points of a plane's pixel centres and the plane's affine.

    Args:
        centre_mm: ``(3,)`` world position of the plane's centre (mm).
        u, v: in-plane directions ``(3,)`` (normalised here; ``v`` is orthogonalised to ``u``).
        size: ``(nu, nv)`` pixels along ``u`` and ``v``.
        pixel_mm: pixel size in mm (one value or ``(du, dv)``).

    Returns:
        ``(points (nu * nv, 3) mm, row-major over (i, j)``, ``affine (4, 4))``.
    """
    c = np.asarray(centre_mm, float)
    u = np.asarray(u, float)
    v = np.asarray(v, float)
    if c.shape != (3,) or u.shape != (3,) or v.shape != (3,):
        raise ValueError("centre and directions must be 3-vectors (world mm)")
    u = u / np.linalg.norm(u)
    v = v - (v @ u) * u
    if np.linalg.norm(v) < 1e-6:
        raise ValueError("the plane's directions u and v are parallel")
    v = v / np.linalg.norm(v)
    du, dv = (float(pixel_mm),) * 2 if np.isscalar(pixel_mm) else tuple(float(p) for p in pixel_mm)
    nu, nv = int(size[0]), int(size[1])
    origin = c - 0.5 * (nu - 1) * du * u - 0.5 * (nv - 1) * dv * v
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = du * u, dv * v, np.cross(u, v), origin
    i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    pts = origin + i.reshape(-1, 1) * du * u + j.reshape(-1, 1) * dv * v
    return pts, affine
