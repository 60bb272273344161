"""What a fitted NISF latent renders: labels, probabilities and reconstructed intensities on the
image grid or any resampling of it, slices held out of the fit, and arbitrary planes.

A :class:`~inrseg.methods.nisf.latents.LatentFit` is a continuous field: the grid of ``scale``
(``S' = round(S * scale)``, one factor for every grid axis or one per axis; for 3D + t time
is an axis too) covers the fitted image's field of view, with the affine of
:func:`~inrseg.data.grids.resampled_affine`. Planes are given in world mm (the image affine's
frame); their points are mapped to the model's coordinates with
:func:`~inrseg.data.grids.world_to_coords`, and points outside the fitted field of view are
extrapolated by the network (no masking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.data.grids import resampled_affine, resampled_shape, world_to_coords
from inrseg.data.planes import PlaneView, heldout_mask, plane_points
from inrseg.data.volume import IGNORE, Volume, label_array
from inrseg.methods.nisf.field import mean_dice
from inrseg.methods.nisf.latents import LatentFit, LatentFitting

__all__ = ["HeldOutResult", "Rendering"]


@dataclass
class HeldOutResult:
    """Segmentation of slices the latent never saw.

    Attributes:
        labels: full-grid prediction ``(*S,)`` (observed and held-out slices), image affine.
        reconstruction: intensities ``(C_in, *S)`` in the normalised [0, 1] range.
        axis: grid axis of the held-out slices; ``indices``: their positions along it, sorted.
        heldout_dice: per-class Dice ``(C,)`` on the held-out slices (``None`` without labels).
        heldout_mean_foreground_dice / observed_mean_foreground_dice: mean foreground Dice on
            the held-out and on the observed slices (``NaN`` without labels).
    """

    labels: Volume
    reconstruction: Volume
    axis: int
    indices: list[int]
    heldout_dice: np.ndarray | None = None
    heldout_mean_foreground_dice: float = float("nan")
    observed_mean_foreground_dice: float = float("nan")


class Rendering(LatentFitting):
    """Outputs of fitted latents (see the module doc)."""

    def check_fit(self, fit: LatentFit) -> None:
        """Raise ``ValueError`` unless ``fit`` is a latent of this model's size and grid axes."""
        if fit.spatial_ndim != self.spatial_ndim or fit.latent.shape != (self.config.latent_dim,):
            raise ValueError("this LatentFit does not belong to this model")

    def grid_geometry(self, fit: LatentFit, scale: float | Sequence[float]
                      ) -> tuple[tuple[int, ...], np.ndarray, float | None]:
        """Shape ``S'``, affine and time step (3D + t; scaled with the frames) of ``fit``'s grid
        resampled by ``scale``."""
        new_shape = resampled_shape(fit.shape, scale)
        affine = fit.affine if new_shape == tuple(fit.shape) else resampled_affine(fit.affine, fit.shape, new_shape)
        ts = fit.time_step
        if self.spatial_ndim == 4 and ts is not None and new_shape[3] != fit.shape[3]:
            ts = ts * fit.shape[3] / new_shape[3]
        return new_shape, affine, ts

    def render(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> tuple[Volume, Volume]:
        """``(labels (*S',) int64, intensities (C_in, *S') in [0, 1])`` of ``fit`` on the grid of
        ``scale``, both with that grid's affine and time step."""
        self.check_fit(fit)
        new_shape, affine, ts = self.grid_geometry(fit, scale)
        coords = self.grid_coords(fit.shape, fit.spacing, scale)
        out = self.query(coords[None], fit.latent[None])
        labels = Volume(out["labels"][0].numpy().reshape(new_shape), affine, self.spatial_ndim, ts,
                        path=fit.path)
        image = Volume(out["image"][0].T.numpy().reshape((self.in_channels,) + new_shape),
                       affine, self.spatial_ndim, ts, path=fit.path)
        return labels, image

    def segment(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map ``(*S',)`` int64 of a fitted latent on the grid of ``scale``."""
        return self.render(fit, scale)[0]

    def reconstruct(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Reconstructed intensities ``(C_in, *S')`` in the normalised [0, 1] range."""
        return self.render(fit, scale)[1]

    def probabilities(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Softmax class probabilities ``(K, *S')`` float32 of a fitted latent on the grid of
        :meth:`segment` (whose labels are their argmax)."""
        return self._grid_output(fit, scale, "probs")

    def field_logits(self, fit: LatentFit, scale: float | Sequence[float] = 1.0) -> Volume:
        """Class logits ``(K, *S')`` float32 of a fitted latent on the grid of :meth:`segment`."""
        return self._grid_output(fit, scale, "logits")

    def _grid_output(self, fit: LatentFit, scale: float | Sequence[float], key: str) -> Volume:
        self.check_fit(fit)
        new_shape, affine, ts = self.grid_geometry(fit, scale)
        out = self.query(self.grid_coords(fit.shape, fit.spacing, scale)[None], fit.latent[None],
                         want_image=False, want_probs=key == "probs", want_logits=key == "logits")
        data = out[key][0].T.numpy().reshape((self.num_classes,) + new_shape).astype(np.float32)
        return Volume(data, affine, self.spatial_ndim, ts, path=fit.path)

    # ------------------------------------------------------------------ held-out slices
    def predict_heldout(self, image: Volume, axis: int, indices: Sequence[int],
                        labels: Volume | None = None, steps: int | None = None) -> HeldOutResult:
        """Fit the latent without the slices ``indices`` along grid ``axis`` (``steps``: default
        :attr:`infer_steps`), then segment the whole grid; with ``labels``, report Dice on the
        held-out and on the observed slices (unlabelled voxels excluded).

        Raises:
            ValueError: ``axis`` or ``indices`` out of range, or every slice held out.
            InputError: ``labels`` on another grid.
        """
        mask = heldout_mask(image.shape, axis, indices)
        fit = self.fit_latents([image], steps=steps, observed=[mask])[0]
        lab_vol, rec_vol = self.render(fit, 1.0)
        res = HeldOutResult(lab_vol, rec_vol, axis, sorted({int(i) for i in indices}))
        if labels is not None:
            gt = label_array(labels)                      # unlabelled voxels -> IGNORE, excluded
            if gt.shape != image.shape:
                raise InputError(labels.path, "label shape does not match the image")
            idx = res.indices
            rest = [i for i in range(image.shape[axis]) if i not in set(idx)]
            pred = lab_vol.data
            res.heldout_dice, res.heldout_mean_foreground_dice = mean_dice(
                np.take(pred, idx, axis), np.take(gt, idx, axis), self.num_classes, IGNORE)
            res.observed_mean_foreground_dice = mean_dice(
                np.take(pred, rest, axis), np.take(gt, rest, axis), self.num_classes, IGNORE)[1]
        return res

    # ------------------------------------------------------------------ planes
    def render_plane(self, fit: LatentFit, centre_mm: Sequence[float], u: Sequence[float],
                     v: Sequence[float], size: tuple[int, int],
                     pixel_mm: float | tuple[float, float] = 1.0, frame: float = 0.0) -> PlaneView:
        """Image and labels of a fitted latent on an arbitrary plane (world mm).

        Args:
            fit: a latent fitted to a 3D or 3D + t image.
            centre_mm: ``(3,)`` plane centre in the image's world space (mm).
            u, v: ``(3,)`` in-plane directions (world; normalised, ``v`` orthogonalised).
            size: ``(nu, nv)`` pixels.
            pixel_mm: pixel size(s) in mm.
            frame: time frame for 3D + t (fractional frames interpolate in time).

        Returns:
            :class:`~inrseg.data.planes.PlaneView` with ``(nu, nv)`` arrays and the plane's
            affine.

        Raises:
            ValueError: a 2D model, a ``fit`` of another model, or degenerate directions.
        """
        self.check_fit(fit)
        if self.spatial_ndim == 2:
            raise ValueError("oblique planes need a 3D or 3D + t model")
        pts, affine = plane_points(centre_mm, u, v, size, pixel_mm)
        spatial = fit.shape[:3]
        c = world_to_coords(pts, fit.affine, spatial, fit.spacing if self.config.keep_aspect else None,
                            keep_aspect=self.config.keep_aspect).float()
        fr = None
        if self.spatial_ndim == 4:
            T = fit.shape[3]
            fr = float(frame)
            t = torch.full((c.shape[0], 1), (2 * fr + 1) / T - 1, device="cpu")
            c = torch.cat([c, t], 1)
        out = self.query(c[None], fit.latent[None])
        nu, nv = int(size[0]), int(size[1])
        return PlaneView(out["image"][0, :, 0].numpy().reshape(nu, nv),
                         out["labels"][0].numpy().reshape(nu, nv), affine, fr)

    def render_plane_of(self, image: Volume, centre_mm: Sequence[float], u: Sequence[float],
                        v: Sequence[float], size: tuple[int, int],
                        pixel_mm: float | tuple[float, float] = 1.0, frame: float = 0.0) -> PlaneView:
        """:meth:`render_plane` of ``image``'s latent, fitted once for :attr:`infer_steps` steps
        (``segment --plane``)."""
        return self.render_plane(self.fit_latents([image])[0], centre_mm, u, v, size, pixel_mm, frame)
