"""``inrseg data phantom``, ``inrseg data check`` and ``inrseg evaluate``: datasets and scoring."""

from __future__ import annotations

import datetime as _dt
import json
import re
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from inrseg.cli.app import (SEED_MAX, SEED_MIN, app, check_output_dir, check_replaceable, command_line, data_app,
                            parse_shape)
from inrseg.core.errors import InputError
from inrseg.core.progress import progress, status
from inrseg.core.files import atomic_dir, claim_output, refuse_overlap, write_text
from inrseg.data.layouts import open_dataset
from inrseg.data.phantoms.datasets import write_phantom_dataset
from inrseg.eval.calibration import calibration_of_dirs, calibration_table
from inrseg.eval.evaluate import (default_images_dir, evaluate_dirs, find_images, find_label_info, format_table,
                                  label_files, write_report)
from inrseg.eval.provenance import library_versions
from inrseg.metrics import REGION_SETS, annotation_stats
from inrseg.viz.html_report import evaluation_report

class PhantomKind(str, Enum):
    brain2d = "brain2d"
    brain3d = "brain3d"
    cardiac = "cardiac"


class Layout(str, Enum):
    nnunet = "nnunet"
    ukbb = "ukbb"


#: what ``data phantom`` writes at the top of its folder (nnU-Net or UK Biobank layout)
_PHANTOM_ENTRIES = {"dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs", "train", "test"}
#: a phantom subject folder of the UK Biobank layout
_PHANTOM_SUBJECT = re.compile(r"heart\d{3,}")


def phantom_written(out: Path) -> bool:
    """Whether the folder ``out`` holds only what ``inrseg data phantom`` writes: the nnU-Net
    folders beside a ``dataset.json`` that describes an inrseg phantom, or ``heartNNN`` subject
    folders (in ``train`` / ``test``)."""
    for p in out.iterdir():
        if p.name in ("train", "test") and p.is_dir():
            if not all(_PHANTOM_SUBJECT.fullmatch(q.name) for q in p.iterdir()):
                return False
        elif not (p.name in _PHANTOM_ENTRIES or (_PHANTOM_SUBJECT.fullmatch(p.name) and p.is_dir())):
            return False
    meta = out / "dataset.json"
    if not meta.is_file():
        return not any((out / d).exists() for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"))
    try:
        description = json.loads(meta.read_text(encoding="utf-8")).get("description", "")
    except (ValueError, OSError, AttributeError):
        return False
    return isinstance(description, str) and description.startswith("inrseg synthetic")


@data_app.command("phantom")
def data_phantom(kind: PhantomKind = typer.Option(..., help="Which phantom."),
                 n: int = typer.Option(6, "--n", min=1, max=10000, help="Training subjects (imagesTr)."),
                 n_test: int = typer.Option(0, "--n-test", min=0, max=10000, help="Test subjects (imagesTs)."),
                 seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX, help="Seed: the same seed gives the same "
                                                                              "data."),
                 out: Path = typer.Option(..., help="Output dataset directory."),
                 layout: Layout = typer.Option(Layout.nnunet, help="nnunet, or ukbb (cardiac only)."),
                 shape: Optional[str] = typer.Option(None, help="Grid shape, e.g. 160,192 (2D), 80,96,112 "
                                                              "(3D) or 96,96,10 (cardiac X,Y,Z)."),
                 frames: int = typer.Option(12, min=2, max=1000, help="Cardiac: frames per cycle."),
                 force: bool = typer.Option(False, help="Replace an earlier phantom dataset at --out.")) -> None:
    """Write a synthetic dataset (brain 2D/3D, or 3D+t cardiac cine) in nnU-Net or UK Biobank
    layout. ``--force`` replaces only a folder that this command wrote, never other data."""
    if layout is Layout.ukbb and kind is not PhantomKind.cardiac:
        raise InputError(out, "--layout ukbb is for --kind cardiac only")
    check_replaceable(out, force, phantom_written, "inrseg data phantom")
    write_phantom_dataset(kind.value, out, n_train=n, n_test=n_test, seed=seed, layout=layout.value,
                          shape=parse_shape(shape), frames=frames)
    status(f"wrote {n} training + {n_test} test {kind.value} phantoms to {out} ({layout.value} layout)")


@data_app.command("check")
def data_check(root: Path = typer.Argument(..., help="Dataset directory (NIfTI files, or .nrrd / .mha / .mhd "
                                                     "ones where dataset.json's file_ending says so)."),
               layout: str = typer.Option("auto", help="auto, nnunet, oasis or ukbb."),
               splits: Optional[Path] = typer.Option(None, help="Splits JSON (subjects / train / val / test).")) -> None:
    """Load every case of a dataset, validate it (readable, finite, matching grids, known label
    values, the ignore value of dataset.json accepted) and print a summary; with an ignore
    value, also how much of the data is annotated."""
    ds = open_dataset(root, layout, splits)
    totals: dict[str, int] = {}
    unannotated = []
    for case in progress(ds.train + ds.test, desc="checking cases"):
        _, labels = case.load()
        if labels is not None and ds.ignore_label is not None:
            stats = annotation_stats(labels.data, ds.ignore_label)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
            if stats["annotated_voxels"] == 0:
                unannotated.append(case.case_id)
    info = ds.info()
    if ds.ignore_label is not None and totals:
        ann = {"ignore_label": ds.ignore_label,
               "annotated_voxel_fraction": round(totals["annotated_voxels"] / max(totals["voxels"], 1), 6),
               "annotated_voxels": totals["annotated_voxels"], "voxels": totals["voxels"]}
        if ds.spatial_ndim == 4:
            ann.update(annotated_frames=totals["annotated_frames"], frames=totals["frames"])
        if ds.spatial_ndim in (3, 4):  # 2D images along the third axis (per frame for 3D + t)
            ann.update(annotated_slices=totals["annotated_slices"], slices=totals["slices"])
        else:
            ann.update(annotated_images=totals["annotated_slices"], images=totals["slices"])
        ann["cases_without_annotation"] = unannotated
        info["annotation"] = ann
    print(json.dumps(info, indent=2))


@app.command()
def evaluate(pred: Path = typer.Option(..., help="Directory of predicted label maps."),
             gt: Path = typer.Option(..., help="Directory of ground-truth label maps (same names), or of "
                                               "UK Biobank subjects (<subject>/seg_sa.nii.gz vs PRED/<subject>.nii.gz)."),
             out: Path = typer.Option(..., help="Report directory: per_case.csv, summary.json."),
             labels: Optional[Path] = typer.Option(None, help="dataset.json giving the label names and the "
                                                             "ignore value (default: found next to --gt)."),
             distances: bool = typer.Option(True, help="Compute HD95 / ASD (slower in 3D)."),
             force: bool = typer.Option(False, "--force", help="Replace a non-empty report folder."),
             regions: Optional[str] = typer.Option(None, help="Also score unions of labels as regions: 'brats' "
                                                              "(whole tumour 1-4, tumour core 1,3,4, enhancing 4)."),
             html: bool = typer.Option(False, "--html", help="Also write OUT/report.html: a self-contained page "
                                                              "with the table, per-class bars and the best, "
                                                              "median and worst case as overlays."),
             images: Optional[Path] = typer.Option(None, help="Images for the --html overlays (default: imagesTs "
                                                             "beside a labelsTs --gt, or UK Biobank sa.nii.gz)."),
             probabilities: Optional[Path] = typer.Option(None, "--probabilities",
                                                          help="Folder of the predictions' class probabilities "
                                                               "(<case>.npz of segment --save-probabilities): also "
                                                               "report how uncertainty relates to error: the "
                                                               "expected calibration error of the max probability "
                                                               "(15 bins), and the mean foreground Dice of the most "
                                                               "certain 90 % of voxels (lowest entropy) next to "
                                                               "that of all voxels (summary.json 'calibration').")
             ) -> None:
    """Score predictions against ground truth: Dice, Jaccard, generalized Dice, HD95 and ASD (mm).
    Ground-truth voxels with the dataset's ignore value are skipped; a 3D+t case (one subject) is
    the mean over its annotated frames of the per-frame 3D metrics."""
    refuse_overlap({"--out": out}, {"--pred": pred, "--gt": gt, "--images": images, "--labels": labels,
                                    "--probabilities": probabilities,
                                    "(the images beside --gt)": default_images_dir(gt)})
    refuse_overlap({"--out": out}, {"--pred": list(label_files(pred, "prediction").values()),
                                    "--gt": list(label_files(gt, "ground-truth").values())})
    if regions is not None and regions not in REGION_SETS:
        raise typer.BadParameter(f"unknown region set {regions!r} ({', '.join(REGION_SETS)})", param_hint="'--regions'")
    check_output_dir(out, force)
    per_case, summary, names = evaluate_dirs(pred, gt, labels, distances,
                                             regions=REGION_SETS[regions] if regions else None)
    if probabilities is not None:
        summary["calibration"] = calibration_of_dirs(probabilities, gt, names, find_label_info(gt, labels)[1])
    # the report folder appears whole, or not at all; what a killed run left is removed first
    with claim_output(out), atomic_dir(out, force) as tmp:
        files = write_report(tmp, per_case, summary, names)
        if html:
            files += (_evaluation_html(tmp / "report.html", pred, gt, images, labels, per_case, summary, names),)
    print(format_table(summary))
    if "calibration" in summary:
        print(calibration_table(summary["calibration"]))
    status(f"wrote {' and '.join(str(out / f.name) for f in files)}")


def _evaluation_html(path: Path, pred: Path, gt: Path, images: Optional[Path], labels: Optional[Path],
                     per_case, summary: dict, names: list[str]) -> Path:
    """Write ``report.html`` of ``inrseg evaluate --html``."""
    ids = [cid for cid, _ in per_case]
    _, ignore = find_label_info(gt, labels)
    prov = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "predictions": str(pred.resolve()), "ground truth": str(gt.resolve()),
            "command": command_line(),
            "libraries": library_versions()}
    page = evaluation_report(per_case, summary, names, label_files(pred, "prediction"),
                             label_files(gt, "ground-truth"), find_images(gt, ids, images), prov, ignore)
    return write_text(path, page)
