"""Evaluation reports (``per_case.csv``, ``summary.json``, a printed table) and PNG overlays
(a prediction on its image, and an image and labels rendered on an oblique plane)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from inrseg.core.files import atomic_path, text_of, write_text
from inrseg.data.entries import files_by_case
from inrseg.data.nifti import load_labels, strip_nifti_suffix
from inrseg.data.schemas import read_dataset_json
from inrseg.data.layouts import (UKBB_IMAGE, UKBB_LABELS, find_nifti, nifti_files, ukbb_subject_dirs,
                                 ignore_label_from_json, label_names_from_json)
from inrseg.core.errors import InputError
from inrseg.metrics import CaseMetrics, region_metrics, score_case, summarize, summarize_regions
from inrseg.core.progress import progress


def label_files(folder: Path, what: str) -> dict[str, Path]:
    """``{case id: file}`` of the NIfTI files in ``folder``; for a ground-truth folder of UK
    Biobank subjects (``<subject>/seg_sa.nii.gz``, no NIfTI files of its own) ``{subject: its
    seg_sa}``."""
    if not folder.exists():
        raise InputError(folder, f"{what} directory does not exist")
    if not folder.is_dir():
        raise InputError(folder, f"{what} is not a directory")
    # every NIfTI-named entry a regular file; two files for one case (x.nii and x.nii.gz) refused
    files = {cid: by_channel[None] for cid, by_channel in
             files_by_case(nifti_files(folder), lambda p: (strip_nifti_suffix(p.name), None)).items()}
    if not files and what == "ground-truth":
        files = {d.name: find_nifti(d, UKBB_LABELS) for d in ukbb_subject_dirs(folder) if find_nifti(d, UKBB_LABELS)}
    if not files:
        raise InputError(folder, f"empty: no .nii or .nii.gz {what} files")
    return files


def default_images_dir(gt_dir: Path) -> Path | None:
    """The image folder beside an nnU-Net ground-truth folder: ``labelsTs`` -> ``imagesTs``,
    ``labelsTr`` -> ``imagesTr`` (``None`` for another name)."""
    gt_dir = Path(gt_dir)
    return gt_dir.parent / ("images" + gt_dir.name[len("labels"):]) if gt_dir.name.startswith("labels") else None


def find_images(gt_dir: Path, case_ids: Sequence[str], images_dir: Path | None = None) -> dict[str, list[Path] | None]:
    """The image files (one per channel) of each case, for overlays: ``images_dir`` (or, for an
    nnU-Net ``labelsTs`` / ``labelsTr`` folder, its sibling ``imagesTs`` / ``imagesTr``) holding
    ``CASE_0000.nii.gz`` ... or ``CASE.nii.gz``; a UK Biobank subject's ``sa.nii.gz`` beside its
    ``seg_sa``. ``None`` for a case whose image is not found."""
    folder = images_dir if images_dir is not None else default_images_dir(gt_dir)
    if images_dir is not None and not images_dir.is_dir():
        raise InputError(images_dir, "images directory does not exist")
    out: dict[str, list[Path] | None] = {}
    for cid in case_ids:
        found = None
        if folder is not None and folder.is_dir():
            channels = [find_nifti(folder, f"{cid}_{k:04d}") for k in range(16)]
            channels = channels[:channels.index(None)] if None in channels else channels
            found = channels or ([find_nifti(folder, cid)] if find_nifti(folder, cid) else None)
        if found is None and (gt_dir / cid).is_dir() and find_nifti(gt_dir / cid, UKBB_IMAGE):
            found = [find_nifti(gt_dir / cid, UKBB_IMAGE)]
        out[cid] = found
    return out


def find_label_info(gt_dir: Path, labels_json: Path | None) -> tuple[list[str] | None, int | None]:
    """Label names and ignore value (``"ignore"``, or nnU-Net v2's ``labels`` -> ``ignore``) from
    an explicit ``dataset.json`` or one in the GT folder or its parent; ``(None, None)`` without
    one."""
    candidates = [labels_json] if labels_json else [gt_dir / "dataset.json", gt_dir.parent / "dataset.json"]
    for c in candidates:
        if c is not None and c.exists():
            meta = read_dataset_json(c, required=("labels",))
            names = label_names_from_json(meta["labels"], c)
            return names, ignore_label_from_json(meta, c, len(names))
    if labels_json is not None:
        raise InputError(labels_json, "no such file")
    return None, None


def find_label_names(gt_dir: Path, labels_json: Path | None) -> list[str] | None:
    """Label names from an explicit ``dataset.json`` or one in the GT folder or its parent."""
    return find_label_info(gt_dir, labels_json)[0]


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path, labels_json: str | Path | None = None,
                  distances: bool = True, ignore_label: int | None = None,
                  regions: dict[str, Sequence[int]] | None = None
                  ) -> tuple[list[tuple[str, CaseMetrics]], dict, list[str]]:
    """Score every ground-truth case of ``gt_dir`` against the same-named file in ``pred_dir``.

    ``gt_dir`` holds ``CASE.nii.gz`` label maps, or UK Biobank subject folders
    (``<subject>/seg_sa.nii.gz``, paired with ``pred_dir/<subject>.nii.gz``). Distances are in
    mm from the ground truth's affine. The class list and the ignore value come from a
    ``dataset.json`` (given, or found in ``gt_dir`` / its parent), else from the largest label
    value present (and ``ignore_label``). Ground-truth voxels with the ignore value are left
    out of every metric; 3D + t cases are scored per annotated frame
    (:func:`inrseg.metrics.score_case`). A prediction whose grid (shape or affine) differs from
    its ground truth, or a missing prediction, is an error naming the file. With ``regions``
    (e.g. :data:`inrseg.metrics.BRATS_REGIONS`), ``summary["regions"]`` also scores each union
    of labels as one binary structure (:func:`inrseg.metrics.region_metrics`).

    Returns:
        ``(per_case, summary, label_names)`` with ``per_case = [(case_id, CaseMetrics)]``.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gts = label_files(gt_dir, "ground-truth")
    preds = label_files(pred_dir, "prediction")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise InputError(pred_dir / f"{missing[0]}.nii.gz",
                         f"missing prediction ({len(missing)} of {len(gts)} ground-truth cases have none)")
    names, found_ignore = find_label_info(gt_dir, Path(labels_json) if labels_json else None)
    if ignore_label is None:
        ignore_label = found_ignore
    allowed = None if names is None else range(len(names))
    loaded = []
    for cid in progress(sorted(gts), desc="reading label maps"):
        gt = load_labels(gts[cid], allowed=allowed, ignore_label=ignore_label)
        pred = load_labels(preds[cid], allowed=allowed)
        if pred.shape != gt.shape:
            raise InputError(preds[cid], f"prediction shape {pred.shape} does not match ground truth "
                                         f"{gts[cid].name} shape {gt.shape}")
        if not np.allclose(pred.affine, gt.affine, atol=1e-3):
            raise InputError(preds[cid], f"prediction affine does not match ground truth {gts[cid].name}")
        loaded.append((cid, pred, gt))
    if names is None:
        def top_of(g: np.ndarray) -> int:
            known = g if ignore_label is None else g[g != ignore_label]
            return int(known.max()) if known.size else 0

        top = max(max(int(p.data.max()), top_of(g.data)) for _, p, g in loaded)
        names = ["background"] + [f"class-{i}" for i in range(1, top + 1)]
    per_case, per_region = [], []
    for cid, pred, gt in progress(loaded, desc="scoring"):
        # the project's one definition: 2D / 3D per case, 3D + t per annotated frame, averaged
        m = score_case(pred.data, gt.data, len(names), gt.spacing, distances, ignore_label)
        per_case.append((cid, m))
        if regions:
            per_region.append((cid, region_metrics(pred.data, gt.data, regions, gt.spacing, distances,
                                                   ignore_label)))
    summary = summarize([m for _, m in per_case], names)
    if regions:
        summary["regions"] = summarize_regions(per_region)
    return per_case, summary, names


def json_safe(x):
    """JSON-safe: NaN / inf -> null, numpy scalars -> Python, tuples -> lists, keys -> str,
    file-system names -> text (:func:`text_of`)."""
    if isinstance(x, str):
        return text_of(x)
    if isinstance(x, dict):
        return {text_of(str(k)): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(obj: dict, path: str | Path) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN written as null)."""
    return write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def write_report(out_dir: str | Path, per_case: list[tuple[str, CaseMetrics]], summary: dict,
                 names: Sequence[str]) -> tuple[Path, Path]:
    """Write ``per_case.csv`` and ``summary.json`` into ``out_dir`` (atomically, each)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    regions = summary.get("regions", {})
    rows = [{"case": cid, **m.to_row(names),
             **{f"{k}_{r.replace(' ', '_')}": regions[r]["per_case"][cid][k] for r in regions
                for k in ("dice", "hd95_mm")}} for cid, m in per_case]
    csv_path = out_dir / "per_case.csv"
    with atomic_path(csv_path) as tmp:
        write_csv(tmp, rows)
    return csv_path, write_json(summary, out_dir / "summary.json")


def write_csv(path: str | Path, rows: Sequence[dict]) -> None:
    """Write ``rows`` (one dict per row, the first one's keys as the header) to ``path`` as
    UTF-8 CSV whatever the locale; floats with 6 significant digits, names as text
    (:func:`text_of`)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else text_of(v) if isinstance(v, str) else v)
                             for k, v in r.items()})


def format_table(summary: dict) -> str:
    """A plain-text table of the per-class and headline figures."""
    def f(v, nd=4):
        return "   nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"

    lines = [f"{'class':<28} {'Dice':>7} {'Jaccard':>8} {'HD95 mm':>9} {'ASD mm':>8} {'cases':>6}"]
    for name, m in summary["per_class"].items():
        lines.append(f"{name:<28} {f(m['dice']):>7} {f(m['jaccard']):>8} {f(m['hd95_mm'], 2):>9} "
                     f"{f(m['asd_mm'], 2):>8} {m['n_cases']:>6}")
    lines.append("-" * 70)
    lines.append(f"{'mean foreground':<28} {f(summary['mean_foreground_dice']):>7} "
                 f"{f(summary['jaccard']):>8} {f(summary['hd95_mm'], 2):>9} {f(summary['asd_mm'], 2):>8} "
                 f"{summary['n_cases']:>6}")
    lines.append(f"generalized Dice (MetaSeg's, bg incl.): {f(summary['generalized_dice'])}")
    if summary.get("regions"):
        lines.append("-" * 70)
        for name, m in summary["regions"].items():
            lines.append(f"{'region: ' + name:<28} {f(m['dice']):>7} {'':>8} {f(m['hd95_mm'], 2):>9} "
                         f"{f(m['asd_mm'], 2):>8} {m['n_cases']:>6}")
    return "\n".join(lines)
