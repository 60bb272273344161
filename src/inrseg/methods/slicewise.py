"""A 2D method on 3D volumes, slice by slice (``METHOD@2d``), as nnU-Net's ``2d`` configuration.

:class:`SliceWise` wraps any 2D :class:`~inrseg.methods.base.Segmenter`: ``fit`` trains it on
the slices of the training volumes along one axis (:mod:`inrseg.data.slices`; the validation
cases' slices for what it chooses on validation), and every 3D prediction is the stack of its
per-slice predictions on the volume's own grid and affine, so that scoring, post-processing
(chosen on the validation *volumes*), TTA, ensembles and uncertainty maps work in 3D as for a
3D method. The slice axis is chosen from the training volumes (:func:`~inrseg.data.slices.choose_slice_axis`)
and saved in the checkpoint (``slice_axis``); :func:`inrseg.methods.registry.load_segmenter`
wraps such a checkpoint again.

Shapes: an image ``(C, X, Y, Z)`` Volume; logits / probabilities ``(K, X', Y', Z)`` (``scale``
resamples the in-plane axes only; a scale on the slice axis must be 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.core.progress import status
from inrseg.data.cases import Case
from inrseg.data.slices import choose_slice_axis, in_plane_axes, slice_cases, slice_of, stack_slices
from inrseg.data.volume import Volume
from inrseg.engine import Budget
from inrseg.methods.base import Segmenter, TTAMember

__all__ = ["SliceWise"]

#: what the wrapper hands through to the 2D model unchanged
_SHARED = ("method", "config", "config_class", "label_names", "num_classes", "in_channels", "device", "history",
           "best_step", "num_params", "bf16_safe", "chosen_settings", "modules", "tensors", "state_tensors",
           "steps_curve")


class SliceWise:
    """The 2D segmenter ``inner`` applied to 3D volumes slice by slice along ``slice_axis``
    (``None``: chosen by :meth:`fit`). Duck-types :class:`~inrseg.methods.base.Segmenter` for 3D
    data: ``fit``, ``predict``, ``predict_probabilities``, ``logits``, ``tta_members``, ``save``,
    ``to``, ``postprocessing``; the rest is the inner model's."""

    spatial_ndim = 3
    spatial_ndims = (3,)

    def __init__(self, inner: Segmenter, slice_axis: int | None = None) -> None:
        if inner.spatial_ndim != 2:
            raise ValueError(f"slice-wise segmentation wraps a 2D model, not a {inner.spatial_ndim}D one")
        self.inner = inner
        if slice_axis is not None:
            inner.slice_axis = int(slice_axis)

    def __getattr__(self, name: str) -> Any:
        if name in _SHARED:
            return getattr(self.inner, name)
        raise AttributeError(f"{type(self.inner).__name__}@2d has no {name!r} (a slice-wise model segments "
                             f"volumes slice by slice only)")

    @property
    def slice_axis(self) -> int | None:
        return self.inner.slice_axis

    @property
    def postprocessing(self) -> Any:
        return self.inner.postprocessing

    @postprocessing.setter
    def postprocessing(self, value: Any) -> None:
        self.inner.postprocessing = value

    def to(self, device: str | torch.device) -> "SliceWise":
        self.inner.to(device)
        return self

    # ------------------------------------------------------------------ training
    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None, state_path: Path | None = None, *,
            budget: Budget | None = None, log_path: Path | None = None, precision: str = "auto") -> None:
        """Train the 2D model on the slices of ``train`` (and choose on those of ``val``)."""
        if self.inner.slice_axis is None:
            self.inner.slice_axis = choose_slice_axis(list(train))
        axis = self.inner.slice_axis
        tr, va = slice_cases(train, axis), slice_cases(val or [], axis)
        status(f"{self.inner.method}@2d: {len(tr)} training slices of {len(train)} volumes, {len(va)} validation "
               f"slices, along axis {axis}")
        self.inner.fit(tr, va, state_path, budget=budget, log_path=log_path, precision=precision)

    def check_image_size(self, shape: Sequence[int], path: Path | None = None) -> None:
        axis = 2 if self.slice_axis is None else self.slice_axis
        self.inner.check_image_size([shape[a] for a in in_plane_axes(axis)], path)

    def check_case_sizes(self, cases: Sequence[Case]) -> None:
        for case in cases:
            self.check_image_size(case.grid_shape(), case.image_paths[0])

    # ------------------------------------------------------------------ inference
    def _axis(self, image: Volume) -> int:
        if self.slice_axis is None:
            raise RuntimeError("a slice-wise model predicts after fit or load")
        if image.spatial_ndim != 3:
            raise InputError(image.path, f"is {image.spatial_ndim}D: {self.inner.method}@2d segments 3D volumes")
        return self.slice_axis

    def _in_plane_scale(self, scale: float | Sequence[float], axis: int, path: Path | None) -> Any:
        if np.isscalar(scale):
            if not math.isclose(float(scale), 1.0):
                raise InputError(path, "a slice-wise model rescales the in-plane axes only: give --scale per axis "
                                       "with 1 on the slice axis")
            return 1.0
        scale = [float(s) for s in scale]
        if not math.isclose(scale[axis], 1.0):
            raise InputError(path, f"a slice-wise model keeps its slices: the scale of axis {axis} must be 1")
        return [scale[a] for a in in_plane_axes(axis)]

    def _stacked(self, fn: Any, image: Volume, scale: float | Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
        """``fn(slice, scale)`` -> ``(logits (K, *S_pq'), affine)`` of every slice, stacked."""
        axis = self._axis(image)
        s2 = self._in_plane_scale(scale, axis, image.path)
        outs, affine0 = [], None
        for k in range(image.shape[axis]):
            out, aff = fn(slice_of(image, axis, k), s2)
            outs.append(out.detach().float().cpu().numpy())
            if affine0 is None:
                affine0 = aff
        stacked = torch.from_numpy(stack_slices(outs, axis))
        p, q = in_plane_axes(axis)
        affine = image.affine.copy()
        affine[:, p], affine[:, q] = affine0[:, 0], affine0[:, 1]
        affine[:3, 3] = affine0[:3, 3]  # slice 0's origin is the volume's (with the in-plane grid's shift)
        return stacked, affine

    def logits(self, image: Volume, scale: float | Sequence[float] = 1.0) -> tuple[torch.Tensor, np.ndarray]:
        """Logits ``(K, *S')`` of the volume: the 2D model's logits of each slice, stacked."""
        return self._stacked(self.inner.logits, image, scale)

    @torch.no_grad()
    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Per-slice probabilities of the 2D model (its own ``predict_probabilities``), stacked."""
        def probs(sl: Volume, s: Any) -> tuple[torch.Tensor, np.ndarray]:
            v = self.inner.predict_probabilities(sl, s)
            return torch.from_numpy(np.asarray(v.data)), v.affine
        out, affine = self._stacked(probs, image, scale)
        return Volume(out.numpy().astype(np.float32), affine, 3, image.time_step, path=image.path)

    @torch.no_grad()
    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map ``(*S',)``: the argmax of :meth:`predict_probabilities`."""
        probs = self.predict_probabilities(image, scale)
        return Volume(probs.data.argmax(0).astype(np.int64), probs.affine, 3, image.time_step, path=image.path)

    def tta_members(self, n: int | None = None) -> list[TTAMember]:
        """The 2D model's members (mirrorings in plane, or repeated fits), each applied slice by slice."""
        return [TTAMember(m.name, lambda image, scale=1.0, _f=m.logits: self._stacked(_f, image, scale))
                for m in self.inner.tta_members(n)]

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        """The 2D model's checkpoint, its ``slice_axis`` in the header."""
        if self.slice_axis is None:
            raise RuntimeError("a slice-wise model is saved after fit")
        self.inner.save(path)
