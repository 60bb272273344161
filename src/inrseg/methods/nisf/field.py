"""NISF's network as a field over continuous coordinates: images as points, the one chunked
forward pass, and the Dice every NISF score uses.

Coordinates: :func:`inrseg.data.grids.coordinate_grid`, cell-centred; with ``keep_aspect`` the
largest physical axis (mm) spans [-1, 1] and the others are scaled by their extent, so voxels
keep their true shape; time (3D + t) is a fourth axis in [-1, 1]. A grid of shape ``S`` is
``N = prod(S)`` points flattened in C order (for 3D + t, time is the fastest axis).

Devices: the network lives on :attr:`NISFField.device`; image data stays on the CPU and moves
to the device chunk by chunk; results come back on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.data.grids import coordinate_grid
from inrseg.data.preprocess import normalize
from inrseg.data.volume import IGNORE, Volume, label_array
from inrseg.methods.base import Segmenter
from inrseg.methods.nisf.config import NISFConfig, build_network
from inrseg.metrics import score_case

__all__ = ["NISFField", "Subject", "load_pair", "mean_dice", "point_weights"]


@dataclass
class Subject:
    """One image prepared for NISF: ``N = prod(S)`` points (or the observed ones), C order.

    Attributes:
        coords: ``(N, d)`` float32 coordinates.
        intensity: ``(N, C_in)`` float32 intensities normalised to [0, 1].
        labels: ``(N,)`` int64, ``IGNORE`` (-1) where unlabelled; ``None`` without labels.
        shape: grid shape ``S`` of the image (``d = len(S)``).
        spacing: mm per voxel of the spatial axes.
        affine: ``(4, 4)`` voxel -> world (mm).
        time_step: frame interval of a 3D + t image, else ``None``.
        path: the image file, if any.
    """

    coords: torch.Tensor
    intensity: torch.Tensor
    labels: torch.Tensor | None
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    time_step: float | None
    path: Path | None = None


def load_pair(item: Any) -> tuple[Volume, Volume | None]:
    """``(image, labels)`` of a :class:`~inrseg.data.cases.Case` or of an ``(image, labels)``
    pair of Volumes."""
    if hasattr(item, "load"):
        return item.load()
    image, labels = item
    return image, labels


def point_weights(sizes: Sequence[int]) -> torch.Tensor:
    """``(B, max n_b)`` on the CPU: ``1 / n_b`` on the ``n_b`` points of item ``b``, 0 on its
    padding, so a weighted sum over points is each item's own mean."""
    w = torch.zeros(len(sizes), max(sizes), device="cpu")
    for b, n in enumerate(sizes):
        w[b, :n] = 1.0 / n
    return w


def mean_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int,
              ignore_label: int | None = None) -> tuple[np.ndarray, float]:
    """Per-class Dice ``(C,)`` and mean foreground Dice of label maps of one shape:
    :func:`inrseg.metrics.score_case` without distances (3D + t ``(X, Y, Z, T)``: the mean over
    the annotated frames; a 1D array is scored as ``(n, 1)``), voxels of ``gt`` equal to
    ``ignore_label`` excluded."""
    def as_grid(a: np.ndarray) -> np.ndarray:
        return a[:, None] if a.ndim == 1 else a

    m = score_case(as_grid(pred), as_grid(gt), num_classes, distances=False, ignore_label=ignore_label)
    return m.dice, m.mean_foreground_dice


class NISFField(Segmenter):
    """The network ``f(c, h) -> (class logits, intensity logits)`` of a NISF model and the
    plumbing every phase shares (see :class:`~inrseg.methods.nisf.NISF` for the arguments).

    Attributes:
        net: the :class:`~inrseg.nn.nisf.NISFNet`, initialised from ``config.seed`` (the same
            weights on every rank; the global RNG is left as it was).
    """

    config: NISFConfig

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: NISFConfig | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(label_names, int(spatial_ndim), int(in_channels), config, device)
        cuda = [self.device.index] if self.device.type == "cuda" else []
        with torch.device(self.device), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.config.seed)  # the same initial weights on every rank
            self.net = build_network(self.config, self.spatial_ndim, self.num_classes, self.in_channels)

    # ------------------------------------------------------------------ images as points
    def grid_coords(self, shape: Sequence[int], spacing: Sequence[float],
                    scale: float | Sequence[float] = 1.0) -> torch.Tensor:
        """Coordinates ``(N', d)`` (CPU) of the grid of an image of ``shape`` and ``spacing``
        (mm), resampled by ``scale`` (``S' = round(S * scale)``, the same field of view)."""
        return coordinate_grid(shape, spacing if self.config.keep_aspect else None,
                               keep_aspect=self.config.keep_aspect, scale=scale, flatten=True)

    def prepare(self, image: Volume, labels: Volume | None = None,
                observed: np.ndarray | None = None) -> Subject:
        """Coordinates, normalised intensities and labels of an image's voxels.

        With ``observed`` (boolean ``(*S,)``), only the observed voxels are kept, and the
        intensity normalisation is computed from them alone, so nothing of the unobserved
        voxels reaches the fit.

        Raises:
            InputError: the image's grid axes or channels, or the labels' shape or values, do
                not fit the model.
            ValueError: ``observed`` has another shape or selects no voxel.
        """
        if image.spatial_ndim != self.spatial_ndim:
            raise InputError(image.path, f"has {image.spatial_ndim} grid axes, the model expects "
                                         f"{self.spatial_ndim}")
        if image.data.shape[0] != self.in_channels:
            raise InputError(image.path, f"has {image.data.shape[0]} channels, the model expects "
                                         f"{self.in_channels}")
        coords = self.grid_coords(image.shape, image.spacing)               # (N, d)
        data = image.data.reshape(self.in_channels, -1)                     # (C_in, N)
        sel = None
        if observed is not None:
            m = np.asarray(observed, bool)
            if m.shape != image.shape:
                raise ValueError(f"observed mask shape {m.shape} != image shape {image.shape}")
            sel = np.flatnonzero(m.reshape(-1))
            if sel.size == 0:
                raise ValueError("observed mask selects no voxel")
            coords, data = coords[torch.from_numpy(sel)], data[:, sel]
        x = normalize(data, self.config.normalization)                      # (C_in, n) in [0, 1]
        inten = torch.from_numpy(np.ascontiguousarray(x.T))                 # (n, C_in)
        lab = None
        if labels is not None:
            if labels.shape != image.shape:
                raise InputError(labels.path, f"label shape {labels.shape} does not match image "
                                              f"shape {image.shape}")
            la = label_array(labels).reshape(-1)        # the ignore value (if any) -> IGNORE
            known = la[la != IGNORE]
            if known.size and (known.min() < 0 or known.max() >= self.num_classes):
                raise InputError(labels.path, f"label values must lie in [0, {self.num_classes - 1}]")
            lab = torch.from_numpy(la if sel is None else la[sel])
        return Subject(coords, inten, lab, image.shape, image.spacing,
                       np.asarray(image.affine, float), image.time_step, image.path)

    # ------------------------------------------------------------------ the forward pass
    def chunks(self, n: int, b: int) -> Iterator[slice]:
        """Slices of ``n`` points such that ``b`` images x one slice hold at most ``config.chunk``
        points."""
        step = max(1, self.config.chunk // max(b, 1))
        for s in range(0, n, step):
            yield slice(s, min(n, s + step))

    @torch.no_grad()
    def query(self, coords: torch.Tensor, latents: torch.Tensor, want_image: bool = True,
              want_probs: bool = False, want_logits: bool = False) -> dict[str, torch.Tensor]:
        """The field at ``coords (B, N, d)`` under ``latents (B, L)``, chunked (network in eval
        mode, no gradients): ``"labels"`` ``(B, N)`` int64 (argmax of the class logits) and as
        asked ``"image"`` ``(B, N, C_in)`` intensities in [0, 1], ``"probs"`` ``(B, N, C)``
        softmax probabilities, ``"logits"`` ``(B, N, C)`` class logits; all on the CPU. Every
        label NISF outputs or scores comes from here."""
        self.net.eval()
        B, N = coords.shape[:2]
        labels = torch.empty(B, N, dtype=torch.int64, device="cpu")
        image = torch.empty(B, N, self.in_channels, device="cpu") if want_image else None
        probs = torch.empty(B, N, self.num_classes, device="cpu") if want_probs else None
        logits = torch.empty(B, N, self.num_classes, device="cpu") if want_logits else None
        for sl in self.chunks(N, B):
            seg, rec = self.net(coords[:, sl].to(self.device), latents.to(self.device))
            labels[:, sl] = seg.argmax(-1).cpu()
            if image is not None:
                image[:, sl] = torch.sigmoid(rec).cpu()
            if probs is not None:
                probs[:, sl] = torch.softmax(seg, -1).cpu()
            if logits is not None:
                logits[:, sl] = seg.cpu()
        out = {"labels": labels}
        for key, value in (("image", image), ("probs", probs), ("logits", logits)):
            if value is not None:
                out[key] = value
        return out
