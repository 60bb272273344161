"""How uncertainty relates to error (``inrseg evaluate --probabilities DIR``).

Of the class probabilities a model gave a case (the ``<case>.npz`` files of ``inrseg segment
--save-probabilities``, :func:`~inrseg.eval.ensemble.read_probabilities`) against its ground
truth, per case and then averaged over the cases:

* the **expected calibration error** of the max probability: voxels binned by their confidence
  ``max_k p_k`` into :data:`ECE_BINS` equal-width bins of [0, 1]; the voxel-weighted mean over
  the bins of ``|accuracy - mean confidence|`` (accuracy: the argmax is the true class). 0 for
  calibrated probabilities; 1 at most;
* the **mean foreground Dice of the most certain** :data:`CERTAIN_FRACTION` (90 %) of the voxels,
  those of lowest entropy (:func:`~inrseg.methods.tta.entropy`), the others ignored, next to the
  Dice of all voxels: both of the probabilities' argmax (the labels ``segment`` writes beside
  them), by the project's one definition (:func:`~inrseg.metrics.score_case`, no distances).
  Where errors are uncertain, the first is the higher.

Voxels the ground truth leaves unlabelled (the dataset's ignore value) count nowhere. Numpy only.
Shapes: probabilities ``(K, *S)``, ground truth ``(*S)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from inrseg.core.errors import InputError
from inrseg.core.progress import progress
from inrseg.data.nifti import load_labels
from inrseg.eval.ensemble import AFFINE_ATOL, PROBABILITY_SUFFIX, read_probabilities
from inrseg.eval.evaluate import label_files
from inrseg.methods.tta import entropy
from inrseg.metrics import score_case

__all__ = ["CERTAIN_FRACTION", "ECE_BINS", "calibration_of_dirs", "calibration_table", "case_calibration",
           "expected_calibration_error", "most_certain", "summarize_calibration"]

#: equal-width confidence bins of the expected calibration error
ECE_BINS = 15
#: the share of a case's labelled voxels, the most certain, whose Dice is reported
CERTAIN_FRACTION = 0.9


def _labelled(gt: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """``(*S)`` bool: the voxels the ground truth labels."""
    return np.ones(gt.shape, bool) if ignore_label is None else np.asarray(gt) != ignore_label


def expected_calibration_error(probabilities: np.ndarray, gt: np.ndarray, ignore_label: int | None = None,
                               bins: int = ECE_BINS) -> float:
    """The expected calibration error of the max probability of ``probabilities`` ``(K, *S)``
    against the labels ``gt`` ``(*S)`` over the labelled voxels, in ``bins`` equal-width bins
    (module doc); NaN without a labelled voxel."""
    keep = _labelled(gt, ignore_label)
    p = np.asarray(probabilities)[:, keep]                                   # (K, N)
    if p.shape[1] == 0:
        return float("nan")
    conf = p.max(0).astype(np.float64)
    correct = (p.argmax(0) == np.asarray(gt)[keep]).astype(np.float64)
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    gap = np.bincount(idx, weights=correct - conf, minlength=bins)           # per bin: sum(acc - conf)
    return float(np.abs(gap).sum() / p.shape[1])


def most_certain(probabilities: np.ndarray, fraction: float = CERTAIN_FRACTION,
                 among: np.ndarray | None = None) -> np.ndarray:
    """``(*S)`` bool: the ``ceil(fraction * N)`` voxels of lowest entropy among the ``N`` voxels
    of ``among`` (default all), ties broken by voxel order (C order)."""
    h = entropy(probabilities)
    among = np.ones(h.shape, bool) if among is None else among
    flat = np.flatnonzero(among)
    order = np.argsort(h.reshape(-1)[flat], kind="stable")
    out = np.zeros(h.size, bool)
    out[flat[order[:math.ceil(fraction * flat.size)]]] = True
    return out.reshape(h.shape)


def case_calibration(probabilities: np.ndarray, gt: np.ndarray, ignore_label: int | None = None,
                     fraction: float = CERTAIN_FRACTION, bins: int = ECE_BINS) -> dict[str, float]:
    """One case's figures: ``ece``, ``dice_most_certain`` (the ``fraction`` of labelled voxels of
    lowest entropy), ``dice_all`` (every labelled voxel), ``mean_entropy`` (nats, labelled voxels).
    ``probabilities`` ``(K, *S)``; ``gt`` ``(*S)`` with values ``0 .. K-1`` or ``ignore_label``."""
    gt = np.asarray(gt).astype(np.int64)
    k = probabilities.shape[0]
    labelled = _labelled(gt, ignore_label)
    pred = probabilities.argmax(0)
    left_out = k if ignore_label is None else int(ignore_label)               # a value no class has
    certain = most_certain(probabilities, fraction, labelled)

    def dice(mask: np.ndarray) -> float:
        return score_case(pred, np.where(mask, gt, left_out), k, distances=False,
                          ignore_label=left_out).mean_foreground_dice

    h = entropy(probabilities)[labelled]
    return {"ece": expected_calibration_error(probabilities, gt, ignore_label, bins),
            "dice_most_certain": dice(certain), "dice_all": dice(labelled),
            "mean_entropy": float(h.mean()) if h.size else float("nan")}


def summarize_calibration(per_case: Sequence[tuple[str, dict[str, float]]], source: str | Path = "",
                          fraction: float = CERTAIN_FRACTION, bins: int = ECE_BINS) -> dict:
    """``summary.json``'s ``"calibration"``: each figure of :func:`case_calibration` averaged over
    the cases (NaN-mean), the settings, and ``per_case``."""
    keys = ("ece", "dice_most_certain", "dice_all", "mean_entropy")
    mean = {k: float(np.nanmean([m[k] for _, m in per_case])) if any(math.isfinite(m[k]) for _, m in per_case)
            else float("nan") for k in keys}
    return {"probabilities": str(source), "ece_bins": bins, "certain_fraction": fraction,
            "n_cases": len(per_case), **mean, "per_case": {cid: m for cid, m in per_case}}


def calibration_of_dirs(prob_dir: str | Path, gt_dir: str | Path, label_names: Sequence[str],
                        ignore_label: int | None = None) -> dict:
    """:func:`summarize_calibration` of every ground-truth case of ``gt_dir`` (the folders of
    :func:`~inrseg.eval.evaluate.evaluate_dirs`) against ``prob_dir/<case>.npz``. A missing file,
    or probabilities of other classes, another grid (shape or affine) than the ground truth's,
    is an error naming the file."""
    prob_dir = Path(prob_dir)
    if not prob_dir.is_dir():
        raise InputError(prob_dir, "--probabilities is not a folder (of `inrseg segment --save-probabilities` "
                                   "output)")
    gts = label_files(Path(gt_dir), "ground-truth")
    per_case = []
    for cid in progress(sorted(gts), desc="calibration"):
        path = prob_dir / f"{cid}{PROBABILITY_SUFFIX}"
        if not path.is_file():
            raise InputError(path, f"missing probabilities (every ground-truth case needs its {PROBABILITY_SUFFIX})")
        pf = read_probabilities(path)
        gt = load_labels(gts[cid], allowed=range(len(label_names)), ignore_label=ignore_label)
        if len(pf.label_names) != len(label_names):
            raise InputError(path, f"probabilities of {len(pf.label_names)} classes ({', '.join(pf.label_names)}); "
                                   f"the ground truth has {len(label_names)}")
        if pf.shape[1:] != gt.shape or not np.allclose(pf.affine, gt.affine, atol=AFFINE_ATOL):
            raise InputError(path, f"probabilities on a grid of {pf.shape[1:]} voxels (affine included) that is "
                                   f"not the ground truth's ({gts[cid].name}, {gt.shape})")
        per_case.append((cid, case_calibration(pf.probabilities, gt.data, ignore_label)))
    return summarize_calibration(per_case, prob_dir)


def calibration_table(calibration: dict) -> str:
    """The printed lines of ``summary["calibration"]``."""
    def f(v: float) -> str:
        return "   nan" if v is None or not math.isfinite(v) else f"{v:.4f}"

    pct = f"{100 * calibration['certain_fraction']:g} %"
    return "\n".join([
        "-" * 70,
        f"{'calibration error (ECE, max probability, ' + str(calibration['ece_bins']) + ' bins)':<58} "
        f"{f(calibration['ece']):>7}",
        f"{'mean foreground Dice, most certain ' + pct + ' of voxels':<58} {f(calibration['dice_most_certain']):>7}",
        f"{'mean foreground Dice, all voxels (argmax of probabilities)':<58} {f(calibration['dice_all']):>7}",
        f"{'mean entropy (nats)':<58} {f(calibration['mean_entropy']):>7}"])
