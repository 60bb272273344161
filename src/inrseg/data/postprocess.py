"""Post-processing of predicted label maps: keep the largest connected component per class.

A post-processing *spec* is what training chose on validation and the checkpoint stores
(:func:`inrseg.methods.postprocess.choose_postprocessing`):

* ``None`` (or ``{"keep_largest": []}``): the labels stay as predicted;
* ``{"keep_largest": [c, ...]}``: for each class ``c`` listed, only the largest connected
  component of its voxels is kept and the others become background (0), as nnU-Net's
  ``remove_all_but_largest_component`` does.

Connectivity is full (every voxel sharing a face, an edge or a corner: 8 neighbours in 2D, 26
in 3D, ``scipy.ndimage.generate_binary_structure(ndim, ndim)``). A 3D + t map ``(X, Y, Z, T)``
is processed frame by frame: components are connected in space, never across time. Of two
largest components of equal size the first in C (raster) order is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from inrseg.core.errors import InputError

__all__ = ["KEEP_LARGEST", "apply_postprocessing", "check_postprocessing", "describe_postprocessing",
           "keep_largest_component", "postprocess_classes"]

#: the spec key of the classes whose largest connected component alone is kept
KEEP_LARGEST = "keep_largest"
#: the largest number of spatial grid axes whose components are connected (a 4th axis is time)
_MAX_SPATIAL_AXES = 3


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest fully connected component of the boolean ``mask`` (``mask`` itself when it
    has at most one component)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    return components == int(np.argmax(sizes)) + 1


def keep_largest_component(labels: np.ndarray, classes: Iterable[int], background: int = 0) -> np.ndarray:
    """A copy of the label map ``labels`` (``(H, W)``, ``(X, Y, Z)`` or ``(X, Y, Z, T)``, integer)
    in which each class of ``classes`` keeps only its largest connected component; its other
    voxels become ``background``. Classes absent from the map change nothing."""
    labels = np.asarray(labels)
    out = labels.copy()
    frames = [(...,)] if labels.ndim <= _MAX_SPATIAL_AXES else [(..., t) for t in range(labels.shape[-1])]
    for c in classes:
        for frame in frames:
            mask = labels[frame] == c
            if mask.any():
                view = out[frame]
                view[mask & ~_largest_component(mask)] = background
    return out


def postprocess_classes(spec: Mapping[str, Any] | None) -> list[int]:
    """The classes ``spec`` keeps the largest component of (``[]`` for ``None``)."""
    return [] if spec is None else [int(c) for c in spec.get(KEEP_LARGEST, [])]


def describe_postprocessing(spec: Mapping[str, Any] | None, label_names: Sequence[str]) -> str:
    """``spec`` in words: ``"keep the largest component of LV, RV"``, or ``"none"``."""
    classes = postprocess_classes(spec)
    return ("keep the largest component of " + ", ".join(label_names[c] for c in classes)) if classes else "none"


def check_postprocessing(spec: Any, num_classes: int, path: Path | str | None = None) -> dict[str, list[int]] | None:
    """``spec`` as read from a checkpoint header, checked: ``None``, or ``{"keep_largest":
    [foreground class ids]}`` with ids in ``[1, num_classes)``, each once. Raises
    :class:`InputError` naming ``path`` otherwise (e.g. a spec of a newer version with other
    steps, or ids beyond the model's classes)."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or set(spec) - {KEEP_LARGEST}:
        raise InputError(path, f"post-processing {spec!r} is not understood (expected "
                               f"{{\"{KEEP_LARGEST}\": [class ids]}})")
    classes = spec.get(KEEP_LARGEST, [])
    if (not isinstance(classes, list) or any(isinstance(c, bool) or not isinstance(c, int) for c in classes)
            or any(not 1 <= c < num_classes for c in classes) or len(set(classes)) != len(classes)):
        raise InputError(path, f"post-processing {KEEP_LARGEST} {classes!r}: expected distinct foreground "
                               f"class ids from 1 to {num_classes - 1}")
    return {KEEP_LARGEST: list(classes)}


def apply_postprocessing(labels: np.ndarray, spec: Mapping[str, Any] | None) -> np.ndarray:
    """``labels`` post-processed as ``spec`` says (module docstring); ``labels`` itself, untouched,
    when ``spec`` asks for nothing."""
    classes = postprocess_classes(spec)
    return keep_largest_component(labels, classes) if classes else labels
