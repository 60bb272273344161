"""Random fields on fixed physical lattices and small geometry helpers shared by the phantoms.

A lattice covers a fixed physical extent in mm whatever the sampling grid, and fields are drawn
from it in a fixed order, so a phantom is the same subject at any resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["ellipsoid", "normalised", "random_grid", "rotation", "sample_lattice", "voxel_centres_mm"]


def voxel_centres_mm(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Open (broadcastable) grids of voxel-centre coordinates in mm, centred on the grid centre.

    Returns ``len(shape)`` arrays; array ``k`` has shape ``(1, .., n_k, .., 1)``.
    """
    axes = [(np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return list(np.ix_(*axes))


def random_grid(
    rng: np.random.Generator, ndim: int, half_extent_mm: float, step_mm: float, n_fields: int = 1
) -> np.ndarray:
    """White Gaussian noise on a fixed physical lattice covering ``[-half_extent, half_extent]^ndim``.

    Returns float64 array of shape ``(n_fields, m, ..., m)`` with ``m = 2 * round(half/step) + 1``
    (odd, so that the lattice is symmetric about 0). Its size never depends on the sampling grid,
    which is what makes the phantoms resolution independent.
    """
    m = 2 * int(round(half_extent_mm / step_mm)) + 1
    return rng.standard_normal((n_fields,) + (m,) * ndim)


def sample_lattice(
    lattice: np.ndarray, half_extent_mm: float, points_mm: Sequence[np.ndarray], order: int
) -> np.ndarray:
    """Interpolate a field given on the symmetric lattice of :func:`random_grid` at points (mm).

    ``lattice``: shape ``(m,) * d``; ``points_mm``: ``d`` arrays that broadcast to a common shape
    ``S``. Returns float64 array of shape ``S`` (constant extrapolation outside the lattice).
    """
    m = lattice.shape[0]
    pts = np.broadcast_arrays(*points_mm)
    scale = (m - 1) / (2.0 * half_extent_mm)
    idx = np.stack([(p + half_extent_mm) * scale for p in pts]).reshape(len(pts), -1)
    out = ndi.map_coordinates(lattice, idx, order=order, mode="nearest", prefilter=order > 1)
    return out.reshape(pts[0].shape)


def rotation(ndim: int, angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation matrix: 2D -> angle[0] about the normal; 3D -> x-y-z Euler angles (rad)."""
    if ndim == 2:
        c, s = np.cos(angles_rad[0]), np.sin(angles_rad[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, a in enumerate(angles_rad[:3]):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = r @ rot
    return rot


def ellipsoid(q: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean mask of the (axis aligned) ellipsoid ``sum(((q - c) / r)^2) < 1`` over ``len(q)`` dims."""
    return sum(((qi - ci) / ri) ** 2 for qi, ci, ri in zip(q, centre, radii)) < 1.0


def normalised(field: np.ndarray) -> np.ndarray:
    """Rescale a field to zero mean and max |value| = 1."""
    field = field - field.mean()
    return field / max(float(np.abs(field).max()), 1e-12)
