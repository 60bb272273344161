"""Post-processing chosen on validation, as nnU-Net does: after training, keep the largest
connected component of a class only where that raises the class' validation Dice.

For every foreground class ``c``: the validation cases are predicted once; the class' Dice
(inrseg's :func:`~inrseg.metrics.score_case`, the mean over cases ignoring those where ``c`` is
absent from both maps, as :func:`~inrseg.metrics.summarize` defines it) is computed on the raw
labels and on the labels where ``c`` keeps only its largest component
(:func:`~inrseg.data.postprocess.keep_largest_component`). ``c`` is post-processed only if the
second is strictly higher: a class whose Dice it lowers or leaves unchanged keeps its labels,
so by construction the choice never lowers any class' validation Dice. A class' Dice depends on
its own voxels alone, so the classes are decided independently and one pass scores them all.

``inrseg train`` and ``inrseg bench`` both call :func:`choose_postprocessing` after ``fit`` and
store the result as the model's ``postprocessing`` (saved in the checkpoint); ``segment`` and
``bench`` apply it with :func:`~inrseg.data.postprocess.apply_postprocessing`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from inrseg.core.progress import status
from inrseg.data.cases import Case
from inrseg.data.postprocess import KEEP_LARGEST, keep_largest_component
from inrseg.data.volume import Volume
from inrseg.engine import Budget
from inrseg.methods.base import Segmenter
from inrseg.metrics import CaseMetrics, score_case, summarize

__all__ = ["choose_from_predictions", "choose_postprocessing"]

#: ``keep(case_id, probabilities (K, *S))``: receives each validation case's probabilities
ProbabilitySink = Callable[[str, np.ndarray], None]


def _score_candidates(pred: np.ndarray, labels: Volume, num_classes: int) -> tuple[CaseMetrics, CaseMetrics]:
    """Dice of one validation case's predicted label map ``pred`` (``(*S,)``) against ``labels``
    (its ground-truth Volume), raw and with every foreground class reduced to its largest
    component (no surface distances: Dice is what is compared)."""
    ignore = labels.meta.get("ignore_label")
    processed = keep_largest_component(pred, range(1, num_classes))
    return (score_case(pred, labels.data, num_classes, labels.spacing, False, ignore),
            score_case(processed, labels.data, num_classes, labels.spacing, False, ignore))


def _decide(raw: Sequence[CaseMetrics], processed: Sequence[CaseMetrics], label_names: Sequence[str],
            who: str) -> dict[str, list[int]]:
    """The spec ``{"keep_largest": [classes]}`` from the per-case scores of
    :func:`_score_candidates`: the classes whose mean validation Dice post-processing raises
    (strictly). States in one line which classes get it and the validation Dice gain."""
    if not raw:
        status(f"{who}: no validation cases, no post-processing")
        return {KEEP_LARGEST: []}
    before = summarize(raw, label_names)["per_class"]
    after = summarize(processed, label_names)["per_class"]
    chosen, gains, others = [], [], []
    for c, name in enumerate(label_names[1:], start=1):
        b, a = before[name]["dice"], after[name]["dice"]
        if not (math.isfinite(a) and math.isfinite(b)):
            continue
        if a > b:
            chosen.append(c)
            gains.append(f"{name} (Dice {b:.4f} -> {a:.4f}, {a - b:+.4f})")
        else:
            others.append(f"{name} {a - b:+.4f}")
    if gains:
        said = f"keep the largest component of {', '.join(gains)}" + (f"; not of {', '.join(others)}" if others else "")
    else:
        said = "none (keeping the largest component alone raises no class' Dice" + (
            f": {', '.join(others)})" if others else ")")
    status(f"{who}: post-processing chosen on {len(raw)} validation cases: {said}")
    return {KEEP_LARGEST: chosen}


def choose_from_predictions(predictions: Iterable[tuple[np.ndarray, Volume]], label_names: Sequence[str],
                            who: str) -> dict[str, list[int]]:
    """The post-processing of predicted validation label maps: ``predictions`` yields
    ``(pred (*S,), ground-truth Volume)`` per case; ``who`` names the model in the status line.
    Returns ``{"keep_largest": [class ids]}`` (module docstring)."""
    raw, processed = [], []
    for pred, labels in predictions:
        r, p = _score_candidates(np.asarray(pred), labels, len(label_names))
        raw.append(r)
        processed.append(p)
    return _decide(raw, processed, label_names, who)


def _validation_predictions(model: Segmenter, val_cases: Sequence[Case],
                            keep: ProbabilitySink | None) -> Iterator[tuple[np.ndarray, Volume]]:
    """``(model's label map, ground truth)`` of each validation case (see
    :func:`choose_postprocessing` for ``keep``)."""
    for case in val_cases:
        image, labels = case.load()
        if keep is None:
            yield model.predict(image).data, labels
        else:
            probs = model.predict_probabilities(image).data
            keep(case.case_id, probs)
            yield probs.argmax(0), labels


def choose_postprocessing(model: Segmenter, val_cases: Sequence[Case], keep: ProbabilitySink | None = None,
                          budget: Budget | None = None) -> dict[str, list[int]]:
    """Predict every validation case with ``model`` and choose its post-processing (module
    docstring): ``{"keep_largest": [class ids]}``, ``[]`` where no class gains (or there is
    no validation case). With ``keep``, the cases are predicted by
    ``model.predict_probabilities`` (whose argmax are :meth:`~Segmenter.predict`'s labels) and
    each case's probabilities go to ``keep`` (``bench`` averages them over seeds). A ``budget``
    that has run out (the command's, after ``fit``) chooses none, so the choice never runs past it
    (with ``keep``, the validation cases are still predicted for it)."""
    if budget is not None and budget.expired():
        status(f"{model.method}: no time left in the budget to choose post-processing on validation: none")
        if keep is not None:
            for _ in _validation_predictions(model, val_cases, keep):
                pass
        return {KEEP_LARGEST: []}
    return choose_from_predictions(_validation_predictions(model, val_cases, keep), model.label_names,
                                   model.method)
