"""Continuous coordinates for implicit neural representations.

Convention: **cell-centred coordinates in [-1, 1] per axis**. Voxel ``i`` of an axis of length
``n`` sits at ``(2 i + 1) / n - 1``, the centre of its cell when the axis' field of view is mapped
onto [-1, 1] (PyTorch's ``align_corners=False``). This makes resolution changes physically
consistent: a 2x grid of the same field of view samples the centres of the half-size voxels, and
its affine is given by :func:`resampled_affine`, so a label map predicted at 2x overlays the
1x image in any viewer.

With ``keep_aspect=True`` the axes are scaled by their physical extent (``n * spacing`` in mm)
relative to the largest one, so one unit of coordinate is the same number of mm along every axis
(the largest axis spans [-1, 1], the others a proportionally shorter interval). Use it for
anisotropic voxels (e.g. 1.8 x 1.8 x 8 mm cine stacks) so that an INR sees true shapes.

Time, when present (3D + t), is a grid axis like the others: frame ``t`` of ``T`` maps to
``(2 t + 1) / T - 1``; it is never aspect-scaled.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def axis_scales(shape: Sequence[int], spacing: Sequence[float] | None = None,
                keep_aspect: bool = False) -> np.ndarray:
    """Per-axis multipliers ``(d,)`` applied to the [-1, 1] coordinates.

    All ones unless ``keep_aspect``; then ``extent_a / max(extent)`` for the spatial axes
    (``extent = n * spacing`` in mm) and 1 for any axis beyond ``len(spacing)`` (time).
    """
    d = len(shape)
    scales = np.ones(d)
    if keep_aspect:
        if spacing is None:
            raise ValueError("keep_aspect needs the voxel spacing")
        k = min(len(spacing), d)
        extent = np.asarray(shape[:k], float) * np.asarray(spacing[:k], float)
        scales[:k] = extent / extent.max()
    return scales


def axis_coords(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Cell-centred coordinates ``(n,)`` of an axis of ``n`` voxels, in (-1, 1), on ``device``."""
    return (2 * torch.arange(n, dtype=torch.float32, device=device) + 1) / n - 1


def coordinate_grid(shape: Sequence[int], spacing: Sequence[float] | None = None,
                    keep_aspect: bool = False, scale: float | Sequence[float] = 1.0,
                    flatten: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """Coordinates of every voxel of a grid, at the native or any other resolution.

    Args:
        shape: grid shape ``S`` (d axes) of the image the coordinates describe.
        spacing: voxel size in mm of that grid (needed with ``keep_aspect``).
        keep_aspect: scale axes to keep physical aspect (see module docstring).
        scale: resolution factor per axis (or one for all): 2 samples a 2x finer grid of the
            same field of view; 0.5 a coarser one. The result has ``round(n * scale)`` points
            per axis.
        flatten: return ``(N, d)`` (``N = prod``) instead of ``(*S', d)``.
        device: where the coordinates are made.

    Returns:
        float32 tensor of coordinates, last axis ordered like ``shape``.
    """
    new_shape = resampled_shape(shape, scale)
    s = axis_scales(shape, spacing, keep_aspect)
    axes = [axis_coords(n, device) * float(s[i]) for i, n in enumerate(new_shape)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return grid.reshape(-1, len(shape)) if flatten else grid


def resampled_shape(shape: Sequence[int], scale: float | Sequence[float]) -> tuple[int, ...]:
    """Grid shape after resampling by ``scale`` (a number or one per axis); at least 1 voxel."""
    scales = [scale] * len(shape) if np.isscalar(scale) else list(scale)
    if len(scales) != len(shape):
        raise ValueError(f"scale {scale} does not match a {len(shape)}-axis grid")
    return tuple(max(1, int(round(n * float(f)))) for n, f in zip(shape, scales))


def voxel_to_coords(index: torch.Tensor | np.ndarray, shape: Sequence[int],
                    spacing: Sequence[float] | None = None, keep_aspect: bool = False) -> torch.Tensor:
    """Continuous voxel indices ``(N, d)`` (may be fractional) -> coordinates ``(N, d)`` on the
    device of ``index`` (the CPU for an array)."""
    dev = index.device if isinstance(index, torch.Tensor) else torch.device("cpu")
    index = torch.as_tensor(index, dtype=torch.float32, device=dev)
    n = torch.as_tensor(list(shape), dtype=torch.float32, device=dev)
    s = torch.as_tensor(axis_scales(shape, spacing, keep_aspect), dtype=torch.float32, device=dev)
    return ((2 * index + 1) / n - 1) * s


def coords_to_voxel(coords: torch.Tensor, shape: Sequence[int],
                    spacing: Sequence[float] | None = None, keep_aspect: bool = False) -> torch.Tensor:
    """Inverse of :func:`voxel_to_coords`: coordinates ``(N, d)`` -> fractional voxel indices."""
    n = torch.as_tensor(list(shape), dtype=torch.float32, device=coords.device)
    s = torch.as_tensor(axis_scales(shape, spacing, keep_aspect), dtype=torch.float32, device=coords.device)
    return ((coords / s + 1) * n - 1) / 2


def world_to_coords(points_mm: torch.Tensor | np.ndarray, affine: np.ndarray, shape: Sequence[int],
                    spacing: Sequence[float] | None = None, keep_aspect: bool = False) -> torch.Tensor:
    """World points ``(N, 3)`` in mm (scanner space of ``affine``) -> coordinates ``(N, d)``.

    For 2D grids (``d = 2``) the through-plane voxel coordinate is dropped.
    """
    pts = np.asarray(points_mm, dtype=np.float64)
    inv = np.linalg.inv(affine)
    vox = pts @ inv[:3, :3].T + inv[:3, 3]
    return voxel_to_coords(vox[:, : min(len(shape), 3)], shape[: min(len(shape), 3)],
                           spacing, keep_aspect)


def resampled_affine(affine: np.ndarray, shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of a grid of ``new_shape`` covering the same field of view as ``shape``.

    Cell-centred: voxel ``j`` of the new grid is at old fractional index
    ``(j + 0.5) * n / m - 0.5``. Only the first three (spatial) axes enter the affine.
    """
    k = min(len(shape), 3)
    f = np.ones(3)
    f[:k] = np.asarray(shape[:k], float) / np.asarray(new_shape[:k], float)
    m = np.eye(4)
    m[:3, :3] = np.diag(f)
    m[:3, 3] = 0.5 * f - 0.5
    m[:3, 3][k:] = 0.0
    return np.asarray(affine, float) @ m
