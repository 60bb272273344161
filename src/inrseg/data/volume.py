"""An image or a label map on a voxel grid, in memory.

Conventions
-----------
* A :class:`Volume` holds an image as ``(C, *S)`` float32 (channels first) or a label map as
  ``(*S,)`` integers, where ``S`` is the grid shape in the file's voxel order: ``(H, W)`` for a
  2D slice, ``(X, Y, Z)`` for a volume, ``(X, Y, Z, T)`` for 3D + time (cine MRI).
* ``affine`` is the 4 x 4 voxel-index -> world (mm) matrix of the NIfTI header. A label map
  written by inrseg carries its source image's affine, so it overlays in 3D Slicer / ITK-SNAP.
* Inside the trainers an unlabelled voxel carries :data:`IGNORE`; :func:`label_array` maps a
  dataset's own ignore value to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inrseg.core.errors import InputError

__all__ = ["IGNORE", "Volume", "check_same_grid", "label_array"]

#: label of voxels without a label inside the trainers (a dataset's own ignore value, e.g.
#: 255, is mapped to it by :func:`label_array`); no loss or metric counts such a voxel
IGNORE = -1


@dataclass
class Volume:
    """An image or a label map on a voxel grid.

    Attributes:
        data: image ``(C, *S)`` float32, or label map ``(*S,)`` integer.
        affine: ``(4, 4)`` float64, voxel index -> world coordinates in mm.
        spatial_ndim: number of grid axes ``len(S)``: 2 (slice), 3 (volume) or 4 (3D + time).
        time_step: seconds (or the file's time unit) between frames for 4D data, else ``None``.
        dtype: the on-disk data type, reused when the volume is written back.
        path: the file it was read from (the first channel's for multi-channel images).
        meta: further facts about the data, e.g. ``"ignore_label"``: the value of a label
            map's unlabelled voxels as stored.
    """

    data: np.ndarray
    affine: np.ndarray
    spatial_ndim: int
    time_step: float | None = None
    dtype: np.dtype | None = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """Grid shape ``S`` (no channel axis)."""
        return tuple(self.data.shape[-self.spatial_ndim:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial grid axis (time excluded), from the affine."""
        n = min(self.spatial_ndim, 3)
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :n], axis=0))

    @property
    def is_label(self) -> bool:
        """Whether this is a label map (no channel axis)."""
        return self.data.ndim == self.spatial_ndim

    def with_data(self, data: np.ndarray, affine: np.ndarray | None = None) -> "Volume":
        """A copy carrying ``data`` (and optionally a new affine) with the same metadata."""
        grid_ndim = self.spatial_ndim
        return Volume(data=data, affine=self.affine.copy() if affine is None else affine,
                      spatial_ndim=grid_ndim, time_step=self.time_step, dtype=None, path=self.path,
                      meta=dict(self.meta))


def label_array(labels: Volume) -> np.ndarray:
    """The int64 label array of a label :class:`Volume` with its ignored voxels (value
    ``labels.meta["ignore_label"]``, if any) set to :data:`IGNORE` (-1): the form every trainer
    works with. A copy."""
    data = np.asarray(labels.data).astype(np.int64)
    ignore = labels.meta.get("ignore_label") if labels.meta else None
    if ignore is not None:
        data[data == int(ignore)] = IGNORE
    return data


def check_same_grid(image: Volume, labels: Volume, atol: float = 1e-3) -> None:
    """Raise :class:`InputError` (naming the label file) if the grids of image and labels differ."""
    if image.shape != labels.shape:
        raise InputError(labels.path, f"label shape {labels.shape} does not match image "
                                      f"{image.path.name if image.path else ''} shape {image.shape}")
    if not np.allclose(image.affine, labels.affine, atol=atol):
        raise InputError(labels.path, "label affine does not match image "
                                      f"{image.path.name if image.path else ''} affine")
