"""3D volumes as 2D slices, for 2D methods on 3D data (as nnU-Net's ``2d`` configuration).

A :class:`SliceCase` is one slice of a 3D case along an axis: a 2D :class:`~inrseg.data.cases.Case`
that any 2D method trains on, split by the subject of its volume (a slice never lands in
another split than its volume). Slices whose experts drew nothing are kept as background, as
the datasets' READMEs define them (ACDC: "the apical and basal slices without labels are
background where the experts drew nothing"); unlabelled voxels stay unlabelled (the ignore value).

The slice axis (:func:`choose_slice_axis`) is nnU-Net's choice for its ``2d`` configuration:
the axis of the coarsest spacing (the thick slices of a short-axis stack), ties broken by the
fewest voxels, then the last axis. A slice ``k`` along axis ``a`` of a volume with affine ``A``
is a 2D grid over the two other axes ``(p, q)`` (in order) whose affine has the columns
``A[:, p], A[:, q], A[:, a]`` and the origin ``A @ (k e_a)``: it overlays the volume exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from inrseg.core.errors import InputError
from inrseg.data.cases import Case
from inrseg.data.volume import Volume

__all__ = ["SliceCase", "choose_slice_axis", "in_plane_axes", "slice_affine", "slice_cases", "slice_of",
           "stack_slices"]


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The two grid axes of a slice along ``axis`` of a 3D grid, in order."""
    return tuple(a for a in range(3) if a != axis)  # type: ignore[return-value]


def slice_affine(affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The affine of slice ``index`` along ``axis`` (see the module doc)."""
    p, q = in_plane_axes(axis)
    out = np.eye(4)
    out[:, 0], out[:, 1], out[:, 2] = affine[:, p], affine[:, q], affine[:, axis]
    out[3, :3] = 0.0
    out[:3, 3] = affine[:3, 3] + index * affine[:3, axis]
    return out


def slice_of(volume: Volume, axis: int, index: int) -> Volume:
    """Slice ``index`` along grid ``axis`` of a 3D image ``(C, X, Y, Z)`` or label map: a 2D
    Volume ``(C, *S_pq)`` / ``(*S_pq)`` with :func:`slice_affine`."""
    if volume.spatial_ndim != 3:
        raise ValueError(f"slices are taken of 3D volumes, not {volume.spatial_ndim}D")
    lead = volume.data.ndim - 3
    data = np.ascontiguousarray(np.take(volume.data, index, axis=lead + axis))
    return Volume(data, slice_affine(volume.affine, axis, index), 2, None, volume.dtype, volume.path,
                  dict(volume.meta))


def stack_slices(slices: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Per-slice arrays ``(..., *S_pq)`` (slice order) stacked back into ``(..., X, Y, Z)``."""
    lead = slices[0].ndim - 2
    return np.stack(slices, axis=lead + axis)


@dataclass(frozen=True)
class SliceCase(Case):
    """Slice ``index`` along ``axis`` of the 3D case ``source`` (its subject, files and labels);
    ``case_id`` is ``<source id>_a<axis>s<index>``."""

    source: Case | None = None
    axis: int = 2
    index: int = 0

    def load_image(self) -> Volume:
        return slice_of(_loaded(self.source)[0], self.axis, self.index)

    def load_labels(self) -> Volume:
        labels = _loaded(self.source)[1]
        if labels is None:
            raise InputError(self.image_paths[0], f"case {self.case_id} has no label map")
        return slice_of(labels, self.axis, self.index)

    def load(self) -> tuple[Volume, Volume | None]:
        image, labels = _loaded(self.source)
        return (slice_of(image, self.axis, self.index),
                None if labels is None else slice_of(labels, self.axis, self.index))

    def grid_shape(self) -> tuple[int, ...]:
        shape = self.source.grid_shape()
        return tuple(shape[a] for a in in_plane_axes(self.axis))


@functools.lru_cache(maxsize=2)
def _loaded(case: Case) -> tuple[Volume, Volume | None]:
    """The volume a run of slices comes from, read once for all of them (slices of a case are
    asked for in order; two volumes cached: a training and a validation case)."""
    return case.load()


def choose_slice_axis(cases: Sequence[Case]) -> int:
    """nnU-Net's slicing axis for ``cases`` (3D): the axis of the largest median spacing, ties
    (within 1 %) broken by the fewest median voxels, then the last axis."""
    if not cases:
        raise ValueError("no cases to choose a slice axis from")
    spacings, shapes = [], []
    for case in cases:
        labels = case.load_labels() if case.label_path is not None else case.load_image()
        if labels.spatial_ndim != 3:
            raise InputError(case.image_paths[0], f"is {labels.spatial_ndim}D: slices are taken of 3D volumes")
        spacings.append(labels.spacing)
        shapes.append(labels.shape)
    sp, sh = np.median(spacings, axis=0), np.median(shapes, axis=0)
    coarse = [a for a in range(3) if sp[a] >= 0.99 * sp.max()]
    fewest = [a for a in coarse if sh[a] == min(sh[b] for b in coarse)]
    return int(fewest[-1])


def slice_cases(cases: Sequence[Case], axis: int) -> list[SliceCase]:
    """Every slice along ``axis`` of every 3D case, case by case, in slice order."""
    out = []
    for case in cases:
        n = case.grid_shape()[axis]
        out += [SliceCase(f"{case.case_id}_a{axis}s{k:03d}", case.subject_id, case.image_paths, case.label_path, 2,
                          case.label_values, case.ignore_label, source=case, axis=axis, index=k) for k in range(n)]
    return out
