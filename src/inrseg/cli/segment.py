"""``inrseg segment``, ``inrseg info`` and ``inrseg figures``: using a trained model.

What only some methods can do (held-out slices, planes, fit diagnostics) is asked of the model as a
capability (:mod:`inrseg.methods.base`), never by its method name.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from inrseg.cli.app import DEVICE_HELP, app, check_output_dir, parse_shape, positive, run_on
from inrseg.core.errors import InputError
from inrseg.core.progress import progress, status
from inrseg.core.files import atomic_dir, atomic_path
from inrseg.core.memory import check_memory
from inrseg.data.nifti import load_image, save_image, save_labels
from inrseg.data.volume import Volume
from inrseg.data.layouts import case_id_of, image_files, open_dataset
from inrseg.engine import barrier, broadcast_object, is_main, resolve_device, shard
from inrseg.engine.checkpoints import read_metadata
from inrseg.eval.evaluate import write_json
from inrseg.methods.base import FitDiagnostics, HeldOutSlices, PlaneRendering
from inrseg.methods.registry import load_segmenter
from inrseg.viz.figures import feature_pca_png, plot_step_curves
from inrseg.viz.overlays import save_overlay, save_plane_png

@app.command()
def segment(model: Path = typer.Option(..., help="Checkpoint (.safetensors) of any method."),
            input: Path = typer.Option(..., "--input", help="A NIfTI file or a directory of them "
                                                           "(nnU-Net channel files are grouped), or UK "
                                                           "Biobank subject folder(s): <subject>/sa.nii.gz "
                                                           "-> OUTPUT/<subject>.nii.gz."),
            output: Path = typer.Option(..., help="Output directory for the label maps."),
            scale: float = typer.Option(1.0, callback=positive, help="Resolution factor of the output grid (2 = twice as fine)."),
            method: Optional[str] = typer.Option(None, help="Refuse a checkpoint of another method."),
            overlays: bool = typer.Option(False, help="Also write a PNG overlay per case."),
            save_probabilities: bool = typer.Option(False, help="Also write OUTPUT/<case>.npz: the class "
                                                                "probabilities (C, *S) float32, as nnU-Net does."),
            heldout: Optional[str] = typer.Option(None, help="NISF: fit without these slices and predict "
                                                            "them, 'AXIS:i,j,..' e.g. '2:3,4'."),
            plane: Optional[str] = typer.Option(None, help="NISF (3D, 3D+t): also render a plane: 'lax' (through "
                                                          "the centre, spanned by the first and through-plane "
                                                          "axes) or 'cx,cy,cz;ux,uy,uz;vx,vy,vz' in world mm."),
            plane_size: str = typer.Option("160,160", help="Plane size in pixels 'NU,NV'."),
            plane_mm: float = typer.Option(1.0, callback=positive, help="Plane pixel size in mm."),
            frame: float = typer.Option(0.0, min=0.0, help="3D+t: time frame of the plane."),
            device: str = typer.Option("auto", help=DEVICE_HELP),
            force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder.")) -> None:
    """Label images with a trained model; label maps carry the input's affine (or its resampled
    version for --scale != 1). Models with the capability (NISF) can also predict held-out slices
    and render planes. Under torchrun the inputs are split across the ranks; each output is written
    once."""
    check_output_dir(output, force)
    with run_on(device) as dev:
        seg = load_segmenter(model, method, device=dev)
        for flag, given, capability, what in (("--heldout", heldout, HeldOutSlices, "predict held-out slices"),
                                              ("--plane", plane, PlaneRendering, "render planes")):
            if given and not isinstance(seg, capability):
                raise InputError(model, f"{flag} needs an implicit model that can {what} (NISF); this is a "
                                        f"{seg.method!r} checkpoint")
        heldout_spec = _parse_heldout(heldout) if heldout else None
        if save_probabilities and heldout_spec is not None:
            raise typer.BadParameter("is not available with --heldout", param_hint="'--save-probabilities'")
        groups = image_files(input)
        # Validate every input before writing anything, so a bad file leaves no partial output.
        for files in progress(groups, desc="checking inputs"):
            image = load_image(files, expect_ndim=seg.spatial_ndim)
            _check_output_memory(Path(files[0]), image.shape, scale, len(seg.label_names))
        # The label maps go to a fresh folder that becomes OUTPUT in one rename at the end: a
        # failure half-way, or a second run writing OUTPUT at the same time, never leaves a mix.
        with atomic_dir(output, force) if is_main() else contextlib.nullcontext() as tmp:
            _segment_into(Path(broadcast_object(str(tmp) if is_main() else None)), seg, groups, scale,
                          heldout_spec, plane, plane_size, plane_mm, frame, overlays, dev, save_probabilities)
    status(f"wrote {len(groups)} label maps to {output}")


def _check_output_memory(path: Path, shape: tuple[int, ...], scale: float, num_classes: int) -> None:
    """Refuse ``--scale`` values whose output grid would not fit in memory, before allocating:
    per output voxel, class scores (float32, twice: logits and softmax), the label and the
    coordinates."""
    voxels = math.prod(max(1, round(n * scale)) for n in shape[:3]) * math.prod(shape[3:])
    check_memory(path, voxels * (8 * num_classes + 8 + 4 * len(shape)),
                 f"--scale {scale:g} (an output grid of {voxels:.3g} voxels)")


def _segment_into(output: Path, seg, groups, scale: float, heldout_spec, plane, plane_size: str,
                  plane_mm: float, frame: float, overlays: bool, dev, save_probabilities: bool = False) -> None:
    """Segment every input group into ``output``; under torchrun each rank segments its share
    of the inputs and writes only those. With ``save_probabilities`` the labels are the argmax
    of the probabilities written beside them (one test-time fit for the INR methods)."""
    for files in progress(shard(groups), desc=f"segmenting ({seg.method}, {dev})"):
        image = load_image(files, expect_ndim=seg.spatial_ndim)
        cid = case_id_of(files)
        if heldout_spec is not None:
            labels = seg.predict_heldout(image, heldout_spec[0], heldout_spec[1]).labels
        elif save_probabilities:
            probs = seg.predict_probabilities(image, scale=scale)
            labels = Volume(probs.data.argmax(0).astype(np.int64), probs.affine, probs.spatial_ndim,
                            probs.time_step, path=probs.path)
            with atomic_path(output / f"{cid}.npz") as tmp:
                np.savez_compressed(tmp, probabilities=probs.data, label_names=np.array(seg.label_names),
                                    affine=np.asarray(probs.affine))
        else:
            labels = seg.predict(image, scale=scale)
        save_labels(labels.data, output / f"{cid}.nii.gz", like=labels)
        if plane:
            _render_plane(seg, image, plane, parse_shape(plane_size), plane_mm, frame, output / cid)
        if overlays and scale == 1.0:
            save_overlay(image, labels.data, output / f"{cid}.png", title=cid, names=seg.label_names)
    barrier()


def _parse_heldout(text: str) -> tuple[int, list[int]]:
    try:
        axis, idx = text.split(":")
        return int(axis), [int(i) for i in idx.split(",") if i.strip()]
    except ValueError:
        raise typer.BadParameter(f"--heldout {text!r}: expected 'AXIS:i,j,..' e.g. '2:3,4'") from None


def _render_plane(seg, image, spec: str, size, pixel_mm: float, frame: float, stem: Path) -> None:
    """Render the plane (one test-time fit), write ``<stem>_plane.nii.gz`` (labels),
    ``<stem>_plane_image.nii.gz`` and ``<stem>_plane.png``."""
    if spec == "lax":
        axes = image.affine[:3, :3]
        centre = image.affine[:3, :3] @ ((np.asarray(image.shape[:3]) - 1) / 2) + image.affine[:3, 3]
        u, v = axes[:, 0], axes[:, 2]
    else:
        try:
            centre, u, v = ([float(x) for x in part.split(",")] for part in spec.split(";"))
        except ValueError:
            raise typer.BadParameter(f"--plane {spec!r}: expected 'lax' or 'cx,cy,cz;ux,uy,uz;vx,vy,vz'") from None
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
            cases: int = typer.Option(3, min=1, help="How many cases."),
            max_steps: int = typer.Option(500, min=0, help="Longest test-time fit on the Dice/PSNR curve."),
            device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Test-time fit figures (MetaSeg): Dice and PSNR against test-time steps (paper Fig. 2),
    image / prediction / ground-truth overlays, and the PCA of the fitted INR's features (Fig. 4)."""
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
