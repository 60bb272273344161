"""Segmentation metrics for one case and dataset summaries.

All per-case metrics are computed per class on integer label maps of shape ``(H, W)`` or
``(X, Y, Z)``, *including* the background at class index 0.  Overlap and distance metrics come
from MONAI (``monai.metrics``); only the bookkeeping MONAI leaves undefined (empty classes,
dataset aggregation) is written here.

Conventions
-----------
Let ``P_c`` and ``G_c`` be the predicted and ground-truth masks of class ``c``.

Dice / Jaccard (``monai.metrics.compute_dice`` / ``compute_iou`` with ``ignore_empty=False``)
    * ``P_c`` and ``G_c`` both empty -> ``NaN`` (the class is undefined in this case and is
      excluded from every mean).  MONAI itself returns 1.0 here.
    * exactly one of them empty -> ``0.0`` (a missed or hallucinated structure).  Note that with
      its default ``ignore_empty=True`` MONAI would return NaN for "GT empty, prediction not",
      silently forgiving hallucinations; we do not use that mode.

HD95 / ASD in millimetres (MONAI's edge extraction and surface distances,
``monai.metrics.utils.get_edge_surface_distance``, with ``spacing=`` = mm per voxel, array axis
``i`` <-> ``spacing[i]``; 2D and 3D)
    * both empty -> ``NaN``.
    * exactly one empty -> the diagonal of the image extent in mm,
      ``sqrt(sum_i (shape[i] * spacing[i])**2)``, an upper bound on any distance inside the field
      of view, so a missed or hallucinated structure is penalised instead of silently dropped.
      (MONAI returns NaN for HD95 and ``inf`` for the surface distance here, with warnings.)
    * both present -> MONAI's value.  Boundary voxels are ``mask & ~binary_erosion(mask)``
      (scipy, cross-shaped structuring element, outside of the image counts as background);
      HD95 is the maximum of the two directed 95th percentiles (``torch.quantile``, linear
      interpolation) of boundary-to-nearest-boundary distances, ASD is the symmetric average
      surface distance, i.e. the mean over the union of both directed distance sets.
      The two directed distance sets are computed once and shared by HD95 and ASD (calling
      ``compute_hausdorff_distance`` and ``compute_average_surface_distance`` separately would
      compute them twice); the values are identical to those two MONAI functions.

Generalized Dice (``monai.metrics.compute_generalized_dice``, ``weight_type="simple"``,
``sum_over_classes=True``; the MetaSeg evaluation)
    ``GD = 2 * sum_c w_c |P_c & G_c| / sum_c w_c (|P_c| + |G_c|)`` over all classes including the
    background, for this one image, with ``w_c = 1 / |G_c|``.  A class absent from the ground
    truth has an infinite weight; MONAI (like torchmetrics) replaces it with the largest finite
    weight of the image, ``max_{c: |G_c|>0} 1/|G_c|`` (i.e. 1 / size of the smallest present GT
    class).  Such a class adds ``w_max * |P_c|`` to the denominator only, so a hallucinated class
    lowers the score and a class empty in both maps has no influence.

Mean foreground Dice of a case
    ``nanmean(dice[1:])``; NaN if every foreground class is empty in both maps.

Dataset summary (:func:`summarize`)
    * per class: the mean over cases *ignoring NaN* (nnU-Net convention: a case where the class
      is absent from both prediction and GT does not count); ``n_cases`` is the number of cases
      where the class' Dice is defined.  A class NaN in every case has NaN means and n_cases 0.
    * headline ``mean_foreground_dice`` = mean over the foreground classes of those per-class
      means (classes NaN in every case excluded).  ``jaccard``, ``hd95_mm`` and ``asd_mm`` are
      aggregated the same way (foreground only).
    * ``mean_case_foreground_dice`` = mean over cases of each case's mean foreground Dice
      (NaN cases ignored), a second figure that weights cases, not classes, equally.
    * ``generalized_dice`` = mean over cases of the per-image generalized Dice.

Label values must lie in ``[0, num_classes)``; anything else is a ``ValueError``, except the
``ignore_label`` in the ground truth.

Ignored voxels (``ignore_label``; a dataset's ``dataset.json`` ``"ignore"``, e.g. 255)
    Voxels whose ground truth is ``ignore_label`` are left out of every metric: the prediction
    and the ground truth are both restricted to the annotated voxels (their one-hot maps are
    zeroed elsewhere) before Dice, Jaccard and the generalized Dice are computed, and a class is
    "present" only if it occurs on annotated voxels.  HD95 / ASD are computed between the
    prediction restricted to the annotated voxels (predicted voxels elsewhere count as
    background) and the ground truth: when the annotation is a set of whole slices or frames
    (the usual case: a sparsely labelled cine), this is exactly the distance measured on the
    annotated slices/frames alone, in the volume's physical geometry.  The "one map empty"
    penalty stays the diagonal of the whole image.  A case without any annotated voxel has NaN
    metrics (it drops out of every mean).  Without ignored voxels nothing changes.

3D + t (cine) label maps ``(X, Y, Z, T)``: one definition, :func:`cine_metrics`
    A subject's cine is **one case**.  Each *annotated* frame (a frame with at least one voxel
    that is not ignored) is scored as a 3D volume with :func:`case_metrics` (distances in mm of
    the spatial spacing); frames without any annotated voxel are skipped.  The case's value of
    every per-class metric is the mean over its scored frames, ignoring frames where it is NaN
    (the class absent from both maps in that frame); its generalized Dice is the mean over
    frames, and its mean foreground Dice the mean over foreground classes of those per-class
    means.  :func:`score_case` applies this to 4D maps and :func:`case_metrics` to 2D / 3D ones;
    ``inrseg evaluate``, the benchmark harness and NISF's choice of inference steps all use it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_generalized_dice, compute_iou
from monai.metrics.utils import get_edge_surface_distance
from monai.networks.utils import one_hot

__all__ = ["CaseMetrics", "case_metrics", "cine_metrics", "score_case", "summarize", "image_diagonal_mm",
           "annotation_stats"]


@dataclass
class CaseMetrics:
    """Metrics of one case.  Per-class arrays have shape ``(C,)``, background at index 0."""

    dice: np.ndarray
    jaccard: np.ndarray
    hd95_mm: np.ndarray
    asd_mm: np.ndarray
    generalized_dice: float
    mean_foreground_dice: float
    gt_present: np.ndarray | None = field(default=None)  # (C,) bool: class present in the GT
    pred_present: np.ndarray | None = field(default=None)  # (C,) bool: class present in the prediction
    frames: tuple[int, ...] | None = field(default=None)  # 3D+t: the annotated frames scored

    @property
    def num_classes(self) -> int:
        return int(self.dice.shape[0])

    @property
    def mean_foreground_jaccard(self) -> float:
        return _nanmean(self.jaccard[1:])

    @property
    def mean_foreground_hd95_mm(self) -> float:
        return _nanmean(self.hd95_mm[1:])

    @property
    def mean_foreground_asd_mm(self) -> float:
        return _nanmean(self.asd_mm[1:])

    def to_row(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Flat ``{column: value}`` dict for one CSV row (NaN where undefined)."""
        names = _check_names(class_names, self.num_classes)
        row: dict[str, float] = {
            "mean_foreground_dice": float(self.mean_foreground_dice),
            "generalized_dice": float(self.generalized_dice),
            "mean_foreground_jaccard": self.mean_foreground_jaccard,
            "mean_foreground_hd95_mm": self.mean_foreground_hd95_mm,
            "mean_foreground_asd_mm": self.mean_foreground_asd_mm,
        }
        for key in ("dice", "jaccard", "hd95_mm", "asd_mm"):
            values = getattr(self, key)
            for name, v in zip(names, values):
                row[f"{key}_{name}"] = float(v)
        return row


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _check_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return names


def _as_labels(x: np.ndarray, name: str, num_classes: int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(np.int64)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must hold integer labels, got non-integer values")
        a = a.astype(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label map, got dtype {a.dtype}")
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D (H, W) or 3D (X, Y, Z), got shape {a.shape}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} has label values in [{lo}, {hi}], expected [0, {num_classes - 1}]")
    return a


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image extent in mm: the penalty distance for a class empty in one map only."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _surface_distances(pred_c: np.ndarray, gt_c: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(HD95, symmetric ASD) in mm for two non-empty boolean masks, via MONAI.

    Same computation as ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance(symmetric=True)``, sharing the distance sets.
    """
    _, dists, _ = get_edge_surface_distance(
        pred_c, gt_c, distance_metric="euclidean", spacing=list(spacing), symmetric=True, warn_empty=False
    )
    dists = [torch.as_tensor(d, dtype=torch.float32).reshape(-1) for d in dists]
    hd95 = max(float(torch.quantile(d, 0.95)) for d in dists)
    asd = float(torch.cat(dists).mean())
    return hd95, asd


def _annotated(gt: np.ndarray, ignore_label: int | None) -> np.ndarray | None:
    """Boolean map of the annotated voxels of ``gt``, or ``None`` when none is ignored."""
    if ignore_label is None:
        return None
    ignored = np.asarray(gt) == ignore_label
    return ~ignored if ignored.any() else None


def case_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None,
                 distances: bool = True, ignore_label: int | None = None) -> CaseMetrics:
    """Per-class metrics of one predicted label map against its ground truth (see module docstring).

    ``spacing`` is mm per voxel along each array axis (default 1.0); with ``distances=False``
    HD95 and ASD are skipped (all NaN), which is much faster. Voxels where ``gt`` equals
    ``ignore_label`` are left out of every metric (module docstring).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    annotated = _annotated(gt, ignore_label)
    if annotated is not None:
        gt = np.where(annotated, np.asarray(gt), 0)
    pred = _as_labels(pred, "pred", num_classes)
    gt = _as_labels(gt, "gt", num_classes)
    if annotated is not None and not annotated.any():
        if pred.shape != gt.shape:
            raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
        return _empty_metrics(int(num_classes))  # nothing annotated: every metric undefined
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    if spacing is None:
        spacing = (1.0,) * gt.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != gt.ndim:
        raise ValueError(f"spacing {spacing} does not match a {gt.ndim}D image")
    if any(not (s > 0 and math.isfinite(s)) for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}")

    C = int(num_classes)
    p_oh = one_hot(torch.from_numpy(pred)[None, None], C, dim=1, dtype=torch.float32)  # (1, C, *spatial)
    g_oh = one_hot(torch.from_numpy(gt)[None, None], C, dim=1, dtype=torch.float32)
    if annotated is not None:  # both maps restricted to the annotated voxels
        keep = torch.from_numpy(annotated)[None, None].to(torch.float32)
        p_oh, g_oh = p_oh * keep, g_oh * keep
    reduce = tuple(range(2, p_oh.ndim))
    pred_present = (p_oh.sum(dim=reduce)[0] > 0).numpy()
    gt_present = (g_oh.sum(dim=reduce)[0] > 0).numpy()
    both_empty = ~pred_present & ~gt_present

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = compute_dice(p_oh, g_oh, include_background=True, ignore_empty=False)[0].double().numpy()
        jac = compute_iou(p_oh, g_oh, include_background=True, ignore_empty=False)[0].double().numpy()
        gd = float(
            compute_generalized_dice(p_oh, g_oh, include_background=True, weight_type="simple", sum_over_classes=True)
            .reshape(-1)[0]
            .item()
        )
    dice = dice.copy()
    jac = jac.copy()
    dice[both_empty] = np.nan  # MONAI returns 1.0 here
    jac[both_empty] = np.nan

    hd95 = np.full(C, np.nan)
    asd = np.full(C, np.nan)
    if distances:
        diag = image_diagonal_mm(gt.shape, spacing)
        with warnings.catch_warnings():
            # MONAI warns of a deprecation (always_return_as_numpy) on every call
            warnings.simplefilter("ignore")
            for c in range(C):
                if both_empty[c]:
                    continue
                if pred_present[c] != gt_present[c]:
                    # Handled here: MONAI gives NaN (HD) / inf (ASD).
                    hd95[c] = asd[c] = diag
                    continue
                if annotated is None:
                    hd95[c], asd[c] = _surface_distances(pred == c, gt == c, spacing)
                else:
                    hd95[c], asd[c] = _surface_distances((pred == c) & annotated, (gt == c) & annotated,
                                                         spacing)

    return CaseMetrics(
        dice=dice,
        jaccard=jac,
        hd95_mm=hd95,
        asd_mm=asd,
        generalized_dice=gd,
        mean_foreground_dice=_nanmean(dice[1:]),
        gt_present=gt_present,
        pred_present=pred_present,
    )


def _empty_metrics(num_classes: int, frames: tuple[int, ...] | None = None) -> CaseMetrics:
    nan = np.full(num_classes, np.nan)
    none = np.zeros(num_classes, bool)
    return CaseMetrics(nan.copy(), nan.copy(), nan.copy(), nan.copy(), float("nan"), float("nan"),
                       none, none.copy(), frames)


def cine_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None,
                 distances: bool = True, ignore_label: int | None = None) -> CaseMetrics:
    """Metrics of one 3D + t case ``(X, Y, Z, T)``: the mean over its annotated frames of the
    3D per-frame metrics (module docstring; frames without an annotated voxel are skipped).

    ``spacing``: mm per voxel of the three spatial axes (a fourth, time, value is dropped).
    ``frames`` of the result lists the frames scored.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if gt.ndim != 4 or pred.shape != gt.shape:
        raise ValueError(f"cine_metrics needs two (X, Y, Z, T) maps of one shape, got {pred.shape} "
                         f"and {gt.shape}")
    sp = None if spacing is None else tuple(spacing)[:3]
    if ignore_label is None:
        frames = tuple(range(gt.shape[3]))
    else:
        annotated = (gt != ignore_label).reshape(-1, gt.shape[3]).any(0)
        frames = tuple(int(t) for t in np.flatnonzero(annotated))
    if not frames:
        return _empty_metrics(int(num_classes), frames)
    per = [case_metrics(pred[..., t], gt[..., t], num_classes, sp, distances, ignore_label) for t in frames]
    with warnings.catch_warnings():  # nanmean of all-NaN columns (class absent in every frame)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {k: np.nanmean(np.stack([getattr(f, k) for f in per]), 0)
                for k in ("dice", "jaccard", "hd95_mm", "asd_mm")}
        gd = float(np.nanmean([f.generalized_dice for f in per]))
    return CaseMetrics(mean["dice"], mean["jaccard"], mean["hd95_mm"], mean["asd_mm"], gd,
                       _nanmean(mean["dice"][1:]),
                       np.any([f.gt_present for f in per], 0), np.any([f.pred_present for f in per], 0),
                       frames)


def score_case(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None,
               distances: bool = True, ignore_label: int | None = None) -> CaseMetrics:
    """Metrics of one case of any kind: :func:`cine_metrics` for 3D + t ``(X, Y, Z, T)`` maps
    (one case per subject, the mean over its annotated frames), :func:`case_metrics` for 2D and
    3D maps. The one definition used by ``inrseg evaluate``, the benchmarks and NISF's choice of
    inference steps."""
    if np.ndim(gt) == 4:
        return cine_metrics(pred, gt, num_classes, spacing, distances, ignore_label)
    return case_metrics(pred, gt, num_classes, spacing, distances, ignore_label)


#: BraTS tumour regions as sets of label values: whole tumour, tumour core, enhancing tumour.
#: The same sets fit BraTS 2015 (1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing tumour)
#: and BraTS 2017-2021 (1 necrotic / non-enhancing core, 2 oedema, 4 enhancing; 3 unused).
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"whole tumour": (1, 2, 3, 4), "tumour core": (1, 3, 4),
                                             "enhancing tumour": (4,)}
#: region sets by the name ``inrseg evaluate --regions`` takes
REGION_SETS: dict[str, dict[str, tuple[int, ...]]] = {"brats": BRATS_REGIONS}


def region_metrics(pred: np.ndarray, gt: np.ndarray, regions: dict[str, Sequence[int]],
                   spacing: Sequence[float] | None = None, distances: bool = True,
                   ignore_label: int | None = None) -> dict[str, CaseMetrics]:
    """Per region (a union of label values), the metrics of the binary maps "in the region" of
    ``pred`` and ``gt`` (``{region: CaseMetrics}`` with 2 classes; index 1 is the region).
    Voxels of ``gt`` equal to ``ignore_label`` stay ignored; 3D + t as :func:`score_case`."""
    gt = np.asarray(gt)
    out = {}
    for name, values in regions.items():
        p = np.isin(pred, values).astype(np.int64)
        g = np.isin(gt, values).astype(np.int64)
        if ignore_label is not None:
            g = np.where(gt == ignore_label, ignore_label, g)
        out[name] = score_case(p, g, 2, spacing, distances, ignore_label)
    return out


def summarize_regions(per_case: Sequence[tuple[str, dict[str, CaseMetrics]]]) -> dict:
    """``{region: {dice, hd95_mm, asd_mm, n_cases, per_case: {case: {dice, hd95_mm}}}}`` from
    :func:`region_metrics` results; means ignore NaN (a region absent from both maps)."""
    names = list(per_case[0][1]) if per_case else []
    out = {}
    for r in names:
        ms = [(cid, m[r]) for cid, m in per_case]
        dice = np.array([m.dice[1] for _, m in ms], dtype=np.float64)
        out[r] = {"dice": _nanmean(dice), "hd95_mm": _nanmean(np.array([m.hd95_mm[1] for _, m in ms])),
                  "asd_mm": _nanmean(np.array([m.asd_mm[1] for _, m in ms])),
                  "n_cases": int((~np.isnan(dice)).sum()),
                  "per_case": {cid: {"dice": float(m.dice[1]), "hd95_mm": float(m.hd95_mm[1])} for cid, m in ms}}
    return out


def annotation_stats(gt: np.ndarray, ignore_label: int | None) -> dict[str, int]:
    """How much of a label map is annotated: ``voxels`` and ``annotated_voxels`` (not ignored);
    for 2D+ maps ``slices`` / ``annotated_slices`` (2D images along the third axis, per frame for
    3D + t: a slice counts when it holds an annotated voxel), and for 3D + t ``frames`` /
    ``annotated_frames``."""
    gt = np.asarray(gt)
    ann = np.ones(gt.shape, bool) if ignore_label is None else gt != ignore_label
    out = {"voxels": int(gt.size), "annotated_voxels": int(ann.sum())}
    if gt.ndim >= 3:
        per_slice = ann.reshape(gt.shape[0] * gt.shape[1], -1).any(0)
        out.update(slices=int(per_slice.size), annotated_slices=int(per_slice.sum()))
    else:
        out.update(slices=1, annotated_slices=int(ann.any()))
    if gt.ndim == 4:
        per_frame = ann.reshape(-1, gt.shape[3]).any(0)
        out.update(frames=int(gt.shape[3]), annotated_frames=int(per_frame.sum()))
    return out


def summarize(cases: Sequence[CaseMetrics], class_names: Sequence[str]) -> dict:
    """Dataset summary of per-case metrics (conventions in the module docstring).

    Returns a JSON-friendly dict with keys ``n_cases``, ``mean_foreground_dice`` (headline: mean
    over foreground classes of the per-class NaN-ignoring means), ``mean_case_foreground_dice``
    (mean over cases of each case's mean foreground Dice), ``generalized_dice`` (mean over cases),
    ``jaccard``, ``hd95_mm``, ``asd_mm`` (mean over foreground classes of per-class means) and
    ``per_class``: ``{name: {dice, jaccard, hd95_mm, asd_mm, n_cases}}`` for every class,
    background included.
    """
    cases = list(cases)
    if not cases:
        raise ValueError("summarize() needs at least one case")
    C = cases[0].num_classes
    if any(c.num_classes != C for c in cases):
        raise ValueError("all cases must have the same number of classes")
    names = _check_names(class_names, C)

    stacked = {k: np.stack([getattr(c, k) for c in cases]).astype(np.float64) for k in ("dice", "jaccard", "hd95_mm", "asd_mm")}
    per_class_means = {k: np.array([_nanmean(v[:, j]) for j in range(C)]) for k, v in stacked.items()}
    n_valid = (~np.isnan(stacked["dice"])).sum(axis=0)

    per_class = {
        name: {
            "dice": float(per_class_means["dice"][j]),
            "jaccard": float(per_class_means["jaccard"][j]),
            "hd95_mm": float(per_class_means["hd95_mm"][j]),
            "asd_mm": float(per_class_means["asd_mm"][j]),
            "n_cases": int(n_valid[j]),
        }
        for j, name in enumerate(names)
    }
    return {
        "n_cases": len(cases),
        "mean_foreground_dice": _nanmean(per_class_means["dice"][1:]),
        "mean_case_foreground_dice": _nanmean(np.array([c.mean_foreground_dice for c in cases])),
        "generalized_dice": _nanmean(np.array([c.generalized_dice for c in cases])),
        "jaccard": _nanmean(per_class_means["jaccard"][1:]),
        "hd95_mm": _nanmean(per_class_means["hd95_mm"][1:]),
        "asd_mm": _nanmean(per_class_means["asd_mm"][1:]),
        "per_class": per_class,
    }
