"""``inrseg data phantom``, ``inrseg data check`` and ``inrseg evaluate``: datasets and scoring."""

from __future__ import annotations

import datetime as _dt
import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from inrseg.cli.app import app, check_output_dir, command_line, data_app, parse_shape
from inrseg.core.errors import InputError
from inrseg.core.progress import progress, status
from inrseg.core.files import atomic_dir
from inrseg.data.layouts import open_dataset
from inrseg.data.phantoms.datasets import write_phantom_dataset
from inrseg.eval.evaluate import evaluate_dirs, find_images, find_label_info, format_table, label_files, write_report
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


@data_app.command("phantom")
def data_phantom(kind: PhantomKind = typer.Option(..., help="Which phantom."),
                 n: int = typer.Option(6, "--n", min=1, help="Training subjects (imagesTr)."),
                 n_test: int = typer.Option(0, "--n-test", min=0, help="Test subjects (imagesTs)."),
                 seed: int = typer.Option(0, help="Seed: the same seed gives the same data."),
                 out: Path = typer.Option(..., help="Output dataset directory."),
                 layout: Layout = typer.Option(Layout.nnunet, help="nnunet, or ukbb (cardiac only)."),
                 shape: Optional[str] = typer.Option(None, help="Grid shape, e.g. 160,192 (2D), 80,96,112 "
                                                              "(3D) or 96,96,10 (cardiac X,Y,Z)."),
                 frames: int = typer.Option(12, min=2, help="Cardiac: frames per cycle."),
                 force: bool = typer.Option(False, help="Replace an existing output directory.")) -> None:
    """Write a synthetic dataset (brain 2D/3D, or 3D+t cardiac cine) in nnU-Net or UK Biobank layout."""
    if layout is Layout.ukbb and kind is not PhantomKind.cardiac:
        raise InputError(out, "--layout ukbb is for --kind cardiac only")
    check_output_dir(out, force)
    write_phantom_dataset(kind.value, out, n_train=n, n_test=n_test, seed=seed, layout=layout.value,
                          shape=parse_shape(shape), frames=frames)
    status(f"wrote {n} training + {n_test} test {kind.value} phantoms to {out} ({layout.value} layout)")


@data_app.command("check")
def data_check(root: Path = typer.Argument(..., help="Dataset directory."),
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
                                                             "beside a labelsTs --gt, or UK Biobank sa.nii.gz).")
             ) -> None:
    """Score predictions against ground truth: Dice, Jaccard, generalized Dice, HD95 and ASD (mm).
    Ground-truth voxels with the dataset's ignore value are skipped; a 3D+t case (one subject) is
    the mean over its annotated frames of the per-frame 3D metrics."""
    if regions is not None and regions not in REGION_SETS:
        raise typer.BadParameter(f"unknown region set {regions!r} ({', '.join(REGION_SETS)})", param_hint="'--regions'")
    check_output_dir(out, force)
    per_case, summary, names = evaluate_dirs(pred, gt, labels, distances,
                                             regions=REGION_SETS[regions] if regions else None)
    with atomic_dir(out, force) as tmp:  # the report folder appears whole, or not at all
        files = write_report(tmp, per_case, summary, names)
        if html:
            files += (_evaluation_html(tmp / "report.html", pred, gt, images, labels, per_case, summary, names),)
    print(format_table(summary))
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
    path.write_text(page)
    return path
