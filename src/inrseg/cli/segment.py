"""``inrseg segment``, ``inrseg info`` and ``inrseg figures``: using a trained model.

What only some methods can do (held-out slices, planes, fit diagnostics) is asked of the model as a
capability (:mod:`inrseg.methods.base`), never by its method name.
"""

from __future__ import annotations

import contextlib
import json
import math
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from inrseg.cli.app import DEVICE_HELP, app, check_output_dir, parse_shape, positive_at_most, run_on
from inrseg.core.errors import InputError
from inrseg.core.progress import progress, status
from inrseg.core.files import atomic_dir, claim_output, refuse_overlap
from inrseg.core.memory import check_memory
from inrseg.data.dicom_seg import SEG_SUFFIX, require_highdicom, write_dicom_seg
from inrseg.data.nifti import IMAGE_SUFFIXES, load_image, save_image, save_labels
from inrseg.data.planes import heldout_mask
from inrseg.data.postprocess import apply_postprocessing, describe_postprocessing, postprocess_classes
from inrseg.data.sitk_io import is_sitk_file, save_sitk_labels
from inrseg.data.volume import Volume
from inrseg.data.layouts import case_id_of, image_files, open_dataset
from inrseg.engine import barrier, broadcast_object, is_main, resolve_device, shard
from inrseg.engine.checkpoints import read_metadata
from inrseg.eval.ensemble import write_probabilities
from inrseg.eval.evaluate import write_json
from inrseg.methods.base import FitDiagnostics, HeldOutSlices, PlaneRendering
from inrseg.methods.registry import load_segmenter
from inrseg.methods.tta import DEFAULT_REFITS, entropy, tta_probabilities
from inrseg.viz.figures import feature_pca_png, plot_step_curves
from inrseg.viz.overlays import save_overlay, save_plane_png

#: the largest ``--scale`` (the memory an output grid needs is checked as well)
MAX_SCALE = 256.0
#: the largest ``--plane-mm``
MAX_PLANE_MM = 1000.0

#: the largest ``--tta-members``
MAX_TTA_MEMBERS = 64



class OutputFormat(str, Enum):
    """``segment --output-format``: how each label map is written."""

    nifti = "nifti"
    input = "input"
    dicom_seg = "dicom-seg"


#: a parsed ``--plane``: ``"lax"``, or the centre and two in-plane directions (world mm)
PlaneSpec = str | tuple[list[float], list[float], list[float]]


@app.command()
def segment(model: Path = typer.Option(..., help="Checkpoint (.safetensors) of any method."),
            input: Path = typer.Option(..., "--input", help="An image file (.nii.gz, .nii, .nrrd, .mha, .mhd) or "
                                                           "a directory of them (nnU-Net channel files are "
                                                           "grouped), a DICOM series folder (one series) or a "
                                                           "directory of such folders, or UK Biobank subject "
                                                           "folder(s): <subject>/sa.nii.gz -> "
                                                           "OUTPUT/<subject>.nii.gz."),
            output: Path = typer.Option(..., help="Output directory for the label maps."),
            scale: float = typer.Option(1.0, callback=positive_at_most(MAX_SCALE),
                                        help="Resolution factor of the output grid (2 = twice as fine; at most 256)."),
            method: Optional[str] = typer.Option(None, help="Refuse a checkpoint of another method."),
            overlays: bool = typer.Option(False, help="Also write a PNG overlay per case."),
            save_probabilities: bool = typer.Option(False, help="Also write OUTPUT/<case>.npz: the class "
                                                                "probabilities (C, *S) float32, as nnU-Net does."),
            tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: the class probabilities of "
                                     "several predictions, averaged. U-Net, SegResNet, MORSE: the image mirrored "
                                     "over every subset of its axes, 4 forward passes in 2D, 8 in 3D (4 / 8 x the "
                                     "time); MetaSeg, NISF: K repeated test-time fits (default "
                                     f"{DEFAULT_REFITS}) with seeds seed+k and T_f / inference steps x 1, 0.75, "
                                     "1.25, 1.5 (4.5 x the time of one fit for K = 4)."),
            tta_members: Optional[int] = typer.Option(None, min=1, max=MAX_TTA_MEMBERS,
                                                      help="With --tta: how many members: MetaSeg / NISF test-time "
                                                           f"fits (default {DEFAULT_REFITS}); CNN methods: the "
                                                           "first N mirrorings (default all: 4 in 2D, 8 in 3D)."),
            save_uncertainty: bool = typer.Option(False, help="Also write OUTPUT/<case>_entropy.nii.gz (entropy "
                                                              "of the class probabilities, nats) and, with --tta, "
                                                              "<case>_variance.nii.gz (variance of the "
                                                              "probabilities across the members, mean over the "
                                                              "classes), on the label map's grid."),
            heldout: Optional[str] = typer.Option(None, help="NISF: fit without these slices and predict "
                                                            "them, 'AXIS:i,j,..' e.g. '2:3,4'."),
            plane: Optional[str] = typer.Option(None, help="NISF (3D, 3D+t): also render a plane: 'lax' (through "
                                                          "the centre, spanned by the first and through-plane "
                                                          "axes) or 'cx,cy,cz;ux,uy,uz;vx,vy,vz' in world mm."),
            plane_size: str = typer.Option("160,160", help="Plane size in pixels 'NU,NV'."),
            plane_mm: float = typer.Option(1.0, callback=positive_at_most(MAX_PLANE_MM),
                                           help="Plane pixel size in mm."),
            frame: float = typer.Option(0.0, min=0.0, help="3D+t: time frame of the plane (0 to the last)."),
            postprocess: bool = typer.Option(True, help="Apply the post-processing training chose on validation "
                                                        "(keep the largest component of some classes; `inrseg "
                                                        "info` shows it); --no-postprocess: the raw labels."),
            output_format: OutputFormat = typer.Option(
                OutputFormat.nifti, "--output-format",
                help="Label map files: nifti (OUTPUT/<case>.nii.gz); input (each in its input's format: .nrrd -> "
                     ".nrrd, .mha / .mhd -> .mha, NIfTI -> NIfTI; a DICOM series -> NIfTI); dicom-seg (DICOM "
                     "series inputs only, --scale 1: OUTPUT/<case>.dcm, a DICOM SEG referencing the series, one "
                     "segment per foreground class named by the model's labels; needs pip install "
                     "'inrseg[dicom]'). Geometry is kept in every format."),
            device: str = typer.Option("auto", help=DEVICE_HELP),
            force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder.")) -> None:
    """Label images with a trained model; label maps carry the input's affine (or its resampled
    version for --scale != 1). Models with the capability (NISF) can also predict held-out slices
    and render planes. --tta averages test-time augmented predictions (CNNs: mirrorings; MetaSeg,
    NISF: repeated test-time fits), --save-uncertainty writes per-voxel uncertainty maps. Under
    torchrun the inputs are split across the ranks; each output is written once."""
    refuse_overlap({"--output": output}, {"--input": input, "--model": model})
    check_output_dir(output, force)
    heldout_spec = _parse_heldout(heldout) if heldout else None
    plane_spec = _parse_plane(plane) if plane else None
    plane_shape = _parse_plane_size(plane_size) if plane else None
    with run_on(device) as dev:
        seg = load_segmenter(model, method, device=dev)
        seg.postprocessing = seg.postprocessing if postprocess else None  # what _segment_into applies
        if postprocess_classes(seg.postprocessing):
            status(f"post-processing chosen on validation: "
                   f"{describe_postprocessing(seg.postprocessing, seg.label_names)} (--no-postprocess: the raw labels)")
        for flag, given, capability, what in (("--heldout", heldout, HeldOutSlices, "predict held-out slices"),
                                              ("--plane", plane, PlaneRendering, "render planes")):
            if given and not isinstance(seg, capability):
                raise InputError(model, f"{flag} needs an implicit model that can {what} (NISF); this is a "
                                        f"{seg.method!r} checkpoint")
        if plane and seg.spatial_ndim == 2:
            raise InputError(model, "--plane renders a plane through a 3D or 3D+t image; this model segments "
                                    "2D images")
        if save_probabilities and heldout_spec is not None:
            raise typer.BadParameter("is not available with --heldout", param_hint="'--save-probabilities'")
        _check_tta(seg, tta, tta_members, save_uncertainty, heldout_spec is not None)
        groups = image_files(input)
        refuse_overlap({"--output": output}, {"--input": [f for files in groups for f in files]})
        _check_output_format(output_format, groups, scale)
        # Validate every input before writing anything, so a bad file leaves no partial output.
        for files in progress(groups, desc="checking inputs"):
            image = load_image(files, expect_ndim=seg.spatial_ndim)
            seg.check_image_size(image.shape, Path(files[0]))
            _check_output_memory(Path(files[0]), image.shape, scale, len(seg.label_names), tta)
            _check_image_options(Path(files[0]), image, heldout, heldout_spec, plane, frame)
        # The label maps go to a fresh folder that becomes OUTPUT in one rename at the end: a
        # failure half-way, or a second run writing OUTPUT at the same time, never leaves a mix;
        # the hidden folder a killed run left is removed (and named) first.
        with claim_output(output) if is_main() else contextlib.nullcontext():
            with atomic_dir(output, force) if is_main() else contextlib.nullcontext() as tmp:
                _segment_into(Path(broadcast_object(str(tmp) if is_main() else None)), seg, groups, scale,
                              heldout_spec, plane_spec, plane_shape, plane_mm, frame, overlays, dev,
                              save_probabilities, tta=tta, tta_members=tta_members,
                              save_uncertainty=save_uncertainty, output_format=output_format)
    status(f"wrote {len(groups)} label maps to {output}")


def _check_output_memory(path: Path, shape: tuple[int, ...], scale: float, num_classes: int,
                         tta: bool = False) -> None:
    """Refuse ``--scale`` values whose output grid would not fit in memory, before allocating:
    per output voxel, class scores (float32, twice: logits and softmax; with ``tta`` twice more:
    the members' running mean and sum of squares), the label and the coordinates."""
    voxels = math.prod(max(1, round(n * scale)) for n in shape[:3]) * math.prod(shape[3:])
    check_memory(path, voxels * (8 * num_classes * (2 if tta else 1) + 8 + 4 * len(shape)),
                 f"--scale {scale:g} (an output grid of {voxels:.3g} voxels)")


def _check_tta(seg, tta: bool, tta_members: Optional[int], save_uncertainty: bool, heldout: bool) -> None:
    """``--tta``, ``--tta-members`` and ``--save-uncertainty`` checked against the model and the
    other options before anything is read: members the method has, no held-out slices."""
    if tta_members is not None and not tta:
        raise typer.BadParameter("needs --tta", param_hint="'--tta-members'")
    for flag, given in (("--tta", tta), ("--save-uncertainty", save_uncertainty)):
        if given and heldout:
            raise typer.BadParameter("is not available with --heldout", param_hint=f"'{flag}'")
    if tta:
        try:
            seg.tta_members(tta_members)
        except ValueError as exc:
            raise typer.BadParameter(f"{exc} ({seg.method})", param_hint="'--tta-members'") from None


def _check_output_format(fmt: OutputFormat, groups: list[list[Path]], scale: float) -> None:
    """``--output-format`` checked against the inputs before anything is read: ``dicom-seg``
    needs highdicom, DICOM series inputs only and their own grid (``--scale 1``); ``input``
    says once that DICOM series get NIfTI label maps."""
    dicom = [Path(files[0]).is_dir() for files in groups]
    if fmt is OutputFormat.dicom_seg:
        if scale != 1.0:
            raise typer.BadParameter("writes each label map on its DICOM series' own grid: not with --scale",
                                     param_hint="'--output-format dicom-seg'")
        if not all(dicom):
            raise InputError(groups[dicom.index(False)][0], "--output-format dicom-seg is for DICOM series inputs "
                                                            "(a folder of slices) only: use nifti or input here")
        require_highdicom()
    elif fmt is OutputFormat.input and any(dicom):
        status("DICOM series inputs: their label maps are written as NIfTI (--output-format dicom-seg writes "
               "DICOM SEG)")


def _save_label_map(labels: Volume, output: Path, cid: str, source: Path, fmt: OutputFormat, seg) -> None:
    """Write ``labels`` as ``output/<cid>`` in the ``--output-format`` ``fmt``; ``source``: the
    case's first input file (or DICOM series folder)."""
    if fmt is OutputFormat.dicom_seg:
        write_dicom_seg(labels, source, output / f"{cid}{SEG_SUFFIX}", seg.label_names, f"inrseg {seg.method}")
        return
    suffix = ".nii.gz"
    if fmt is OutputFormat.input and not source.is_dir():  # .mhd -> .mha: one file, not a header and its data
        suffix = ".mha" if source.name.endswith(".mhd") else next(s for s in IMAGE_SUFFIXES if source.name.endswith(s))
    path = output / f"{cid}{suffix}"
    (save_sitk_labels if is_sitk_file(path) else save_labels)(labels.data, path, like=labels)


def _check_image_options(path: Path, image: Volume, heldout: Optional[str],
                         heldout_spec: Optional[tuple[int, list[int]]], plane: Optional[str], frame: float) -> None:
    """The options that depend on an image, checked against it before anything is written:
    ``--heldout`` (an axis of its grid, slices within it, not every slice) and ``--frame`` of a
    3D+t image's plane (one of its frames)."""
    if heldout_spec is not None:
        try:
            heldout_mask(image.shape, *heldout_spec)
        except ValueError as exc:
            raise InputError(path, f"--heldout {heldout}: {exc}") from None
    if plane and image.spatial_ndim == 4 and frame > image.shape[3] - 1:
        raise InputError(path, f"--frame {frame:g}: the image has {image.shape[3]} frames (0 to "
                               f"{image.shape[3] - 1})")


def _segment_into(output: Path, seg, groups, scale: float, heldout_spec, plane: Optional[PlaneSpec],
                  plane_size: Optional[tuple[int, int]], plane_mm: float, frame: float, overlays: bool, dev,
                  save_probabilities: bool = False, *, tta: bool = False, tta_members: Optional[int] = None,
                  save_uncertainty: bool = False, output_format: OutputFormat = OutputFormat.nifti) -> None:
    """Segment every input group into ``output``; under torchrun each rank segments its share
    of the inputs and writes only those. With ``save_probabilities``, ``tta`` or
    ``save_uncertainty`` the labels are the argmax of the class probabilities (one test-time fit
    for the INR methods; with ``tta`` the mean over ``tta_members`` members,
    :func:`~inrseg.methods.tta.tta_probabilities`), written beside them as ``<case>.npz``
    (``save_probabilities``) and as ``<case>_entropy.nii.gz`` / ``<case>_variance.nii.gz``
    uncertainty maps on the label map's grid (``save_uncertainty``; the variance with ``tta``)."""
    for files in progress(shard(groups), desc=f"segmenting ({seg.method}, {dev})"):
        image = load_image(files, expect_ndim=seg.spatial_ndim)
        cid = case_id_of(files)
        if heldout_spec is not None:
            labels = seg.predict_heldout(image, heldout_spec[0], heldout_spec[1]).labels
        elif save_probabilities or tta or save_uncertainty:
            probs, variance = (tta_probabilities(seg, image, scale, tta_members) if tta
                               else (seg.predict_probabilities(image, scale=scale), None))
            labels = Volume(probs.data.argmax(0).astype(np.int64), probs.affine, probs.spatial_ndim,
                            probs.time_step, path=probs.path)
            if save_probabilities:
                write_probabilities(output / f"{cid}.npz", probs.data, seg.label_names, probs.affine,
                                    probs.time_step)
            if save_uncertainty:
                save_image(entropy(probs.data), output / f"{cid}_entropy.nii.gz", like=labels)
                if variance is not None:
                    save_image(variance.data, output / f"{cid}_variance.nii.gz", like=labels)
        else:
            labels = seg.predict(image, scale=scale)
        if heldout_spec is None:  # the post-processing chosen on validation (none with --no-postprocess)
            labels.data = apply_postprocessing(labels.data, seg.postprocessing)
        _save_label_map(labels, output, cid, Path(files[0]), output_format, seg)
        if plane:
            _render_plane(seg, image, plane, plane_size, plane_mm, frame, output / cid)
        if overlays and scale == 1.0:
            save_overlay(image, labels.data, output / f"{cid}.png", title=cid, names=seg.label_names)
    barrier()


def _parse_heldout(text: str) -> tuple[int, list[int]]:
    """``"2:3,4"`` -> ``(2, [3, 4])``: an axis and at least one slice, counted from 0 (checked
    against each image by :func:`_check_image_options`)."""
    try:
        axis, idx = text.split(":")
        spec = int(axis), [int(i) for i in idx.split(",") if i.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected 'AXIS:i,j,..' e.g. '2:3,4'", param_hint="'--heldout'") from None
    if spec[0] < 0 or not spec[1] or min(spec[1]) < 0:
        raise typer.BadParameter(f"{text!r}: the axis and the slices count from 0, and at least one slice is "
                                 f"held out", param_hint="'--heldout'")
    return spec


def _parse_plane(spec: str) -> PlaneSpec:
    """``"lax"``, or ``"cx,cy,cz;ux,uy,uz;vx,vy,vz"`` -> (centre, u, v): finite, with ``u`` and
    ``v`` spanning a plane."""
    if spec == "lax":
        return spec
    bad = typer.BadParameter(f"{spec!r}: expected 'lax' or 'cx,cy,cz;ux,uy,uz;vx,vy,vz' (finite numbers, u "
                             f"and v not parallel)", param_hint="'--plane'")
    try:
        centre, u, v = ([float(x) for x in part.split(",")] for part in spec.split(";"))
    except ValueError:
        raise bad from None
    if any(len(p) != 3 for p in (centre, u, v)) or not np.isfinite([*centre, *u, *v]).all():
        raise bad
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0 or np.linalg.norm(np.cross(u, v)) <= 1e-6 * nu * nv:
        raise bad
    return centre, u, v


def _parse_plane_size(text: str) -> tuple[int, int]:
    """``--plane-size "NU,NV"``: two pixel counts."""
    size = parse_shape(text, "--plane-size")
    if size is None or len(size) != 2:
        raise typer.BadParameter(f"{text!r}: expected two pixel counts 'NU,NV'", param_hint="'--plane-size'")
    return size


def _render_plane(seg, image, spec: PlaneSpec, size: tuple[int, int], pixel_mm: float, frame: float,
                  stem: Path) -> None:
    """Render the plane (one test-time fit), write ``<stem>_plane.nii.gz`` (labels),
    ``<stem>_plane_image.nii.gz`` and ``<stem>_plane.png``."""
    if spec == "lax":
        axes = image.affine[:3, :3]
        centre = image.affine[:3, :3] @ ((np.asarray(image.shape[:3]) - 1) / 2) + image.affine[:3, 3]
        u, v = axes[:, 0], axes[:, 2]
    else:
        centre, u, v = spec
    view = seg.render_plane_of(image, centre, u, v, size, pixel_mm, frame)
    img_vol, lab_vol = view.as_volumes()
    save_labels(lab_vol.data, f"{stem}_plane.nii.gz", like=lab_vol)
    save_image(img_vol, f"{stem}_plane_image.nii.gz")
    save_plane_png(view, f"{stem}_plane.png")



@app.command()
def info(model: Path = typer.Argument(..., help="Checkpoint file.")) -> None:
    """Print a checkpoint's JSON description (method, version, resolved config, classes, what
    training chose)."""
    meta = read_metadata(model)
    meta.pop("history", None)
    print(json.dumps(meta, indent=2))



@app.command()
def figures(model: Path = typer.Option(..., help="A checkpoint of a method with fit diagnostics (MetaSeg)."),
            data: Path = typer.Option(..., help="Dataset whose test cases (else training cases) are shown."),
            out: Path = typer.Option(..., help="Output directory for the PNGs."),
            cases: int = typer.Option(3, min=1, max=10000, help="How many cases."),
            max_steps: int = typer.Option(500, min=0, max=100000, help="Longest test-time fit on the Dice/PSNR "
                                                                      "curve."),
            device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Test-time fit figures (MetaSeg): Dice and PSNR against test-time steps (paper Fig. 2),
    image / prediction / ground-truth overlays, and the PCA of the fitted INR's features (Fig. 4)."""
    refuse_overlap({"--out": out}, {"--model": model, "--data": data}, contains=False)
    seg = load_segmenter(model, device=resolve_device(device))
    if not isinstance(seg, FitDiagnostics):
        raise InputError(model, f"figures needs a model with fit diagnostics (MetaSeg); this is a "
                                f"{seg.method!r} checkpoint")
    t_f = seg.chosen_settings().get("t_f")
    ds = open_dataset(data)
    chosen = (ds.test or ds.train)[:cases]
    curves = {}
    steps = [s for s in (0, 1, 2, 5, 10, 25, 50, 100, 200, 300, 500, 1000, 2000) if s <= max_steps]
    for case in progress(chosen, desc="figures"):
        image, labels = case.load()
        curves[case.case_id] = seg.step_curve(image, labels, steps)
        save_overlay(image, seg.predict(image).data, out / f"{case.case_id}_overlay.png", gt=labels.data,
                     names=seg.label_names, title=f"{case.case_id} ({seg.method}, T_f = {t_f})")
        rgb, pred = seg.feature_components(image)
        feature_pca_png(image, rgb, pred, out / f"{case.case_id}_features_pca.png")
    plot_step_curves(curves, out / "dice_psnr_vs_steps.png", t_f=t_f)
    write_json(curves, out / "dice_psnr_vs_steps.json")
    status(f"wrote figures for {len(chosen)} cases to {out}")
