"""The ``inrseg`` command line.

    inrseg data phantom --kind brain2d --n 6 --out X      # embedded synthetic datasets
    inrseg data check DIR                                 # validate a dataset, print a summary
    inrseg train unet --data DIR --out model.safetensors  # train a method
    inrseg segment --model model.safetensors --input DIR --output PRED
    inrseg evaluate --pred PRED --gt DIR/labelsTs --out REPORT   # or --gt a folder of UK Biobank subjects
    inrseg info model.safetensors
    inrseg demo

Errors about the user's files are one line (``error: <file>: <problem>``), exit code 2, no
traceback unless ``--debug``. ``--quiet`` silences progress bars and status lines.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import shutil
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from inrseg import __version__
from inrseg.core.errors import InputError, InrsegError
from inrseg.core.progress import Heartbeat, last_status, progress, set_budget, set_quiet, status

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Medical image segmentation with implicit neural representations.")
data_app = typer.Typer(no_args_is_help=True, help="Make and check datasets.")
train_app = typer.Typer(no_args_is_help=True, help="Train a method on a dataset.")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")

_state = {"debug": False}


def _positive(value: Optional[float]) -> Optional[float]:
    """Option callback: a positive finite number (``None`` passes)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a positive finite number, not {value}")
    return value


def _fraction(value: float) -> float:
    """Option callback: a fraction in [0, 1)."""
    if not (math.isfinite(value) and 0 <= value < 1):
        raise typer.BadParameter(f"must be a fraction in [0, 1), not {value}")
    return value


def _version(value: bool) -> None:
    if value:
        print(f"inrseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines."),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for PyTorch (default: all)."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    set_quiet(quiet)
    _state["debug"] = debug
    if threads:
        import torch

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- data
class PhantomKind(str, Enum):
    brain2d = "brain2d"
    brain3d = "brain3d"
    cardiac = "cardiac"


class Layout(str, Enum):
    nnunet = "nnunet"
    ukbb = "ukbb"


def _parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape like 160,192") from None
    if any(v < 4 for v in shape):
        raise typer.BadParameter("every axis needs at least 4 voxels")
    return shape


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
    from inrseg.data.phantoms import write_phantom_dataset

    if layout is Layout.ukbb and kind is not PhantomKind.cardiac:
        raise InputError(out, "--layout ukbb is for --kind cardiac only")
    _check_output_dir(out, force)
    write_phantom_dataset(kind.value, out, n_train=n, n_test=n_test, seed=seed, layout=layout.value,
                          shape=_parse_shape(shape), frames=frames)
    status(f"wrote {n} training + {n_test} test {kind.value} phantoms to {out} ({layout.value} layout)")


def _check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise InputError(out, "exists and is not empty (use --force to replace it)")


@data_app.command("check")
def data_check(root: Path = typer.Argument(..., help="Dataset directory."),
               layout: str = typer.Option("auto", help="auto, nnunet, oasis or ukbb."),
               splits: Optional[Path] = typer.Option(None, help="Splits JSON (subjects / train / val / test).")) -> None:
    """Load every case of a dataset, validate it (readable, finite, matching grids, known label
    values, the ignore value of dataset.json accepted) and print a summary; with an ignore
    value, also how much of the data is annotated."""
    from inrseg.data.layouts import open_dataset
    from inrseg.metrics import annotation_stats

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


# ----------------------------------------------------------------------------------- evaluate
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
    from inrseg.eval.evaluate import evaluate_dirs, format_table, write_report

    from inrseg.data.io import atomic_dir

    from inrseg.metrics import REGION_SETS

    if regions is not None and regions not in REGION_SETS:
        raise typer.BadParameter(f"unknown region set {regions!r} ({', '.join(REGION_SETS)})", param_hint="'--regions'")
    _check_output_dir(out, force)
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
    import datetime as _dt

    from inrseg.eval.bench import library_versions
    from inrseg.viz.html_report import evaluation_report
    from inrseg.eval.evaluate import find_images, find_label_info, label_files

    ids = [cid for cid, _ in per_case]
    _, ignore = find_label_info(gt, labels)
    prov = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "predictions": str(pred.resolve()), "ground truth": str(gt.resolve()),
            "command": _state.get("command") or shlex.join(["inrseg", *sys.argv[1:]]),
            "libraries": library_versions()}
    page = evaluation_report(per_case, summary, names, label_files(pred, "prediction"),
                             label_files(gt, "ground-truth"), find_images(gt, ids, images), prov, ignore)
    path.write_text(page)
    return path


# ----------------------------------------------------------------------------------- segment
@app.command()
def segment(model: Path = typer.Option(..., help="Checkpoint (.safetensors) of any method."),
            input: Path = typer.Option(..., "--input", help="A NIfTI file or a directory of them "
                                                           "(nnU-Net channel files are grouped), or UK "
                                                           "Biobank subject folder(s): <subject>/sa.nii.gz "
                                                           "-> OUTPUT/<subject>.nii.gz."),
            output: Path = typer.Option(..., help="Output directory for the label maps."),
            scale: float = typer.Option(1.0, callback=_positive, help="Resolution factor of the output grid (2 = twice as fine)."),
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
            plane_mm: float = typer.Option(1.0, callback=_positive, help="Plane pixel size in mm."),
            frame: float = typer.Option(0.0, min=0.0, help="3D+t: time frame of the plane."),
            device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps."),
            force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder.")) -> None:
    """Label images with a trained model; label maps carry the input's affine (or its resampled
    version for --scale != 1). NISF models can also predict held-out slices and render planes.
    Under torchrun the inputs are split across the ranks; each output is written once."""
    from inrseg.data.io import atomic_dir, load_image
    from inrseg.data.layouts import image_files
    from inrseg.methods.base import load_segmenter
    from inrseg.engine import broadcast_object, is_main

    _check_output_dir(output, force)
    with _run_on(device) as dev:
        seg = load_segmenter(model, method, device=dev)
        for flag, needed in (("--heldout", heldout and "predict_heldout"), ("--plane", plane and "render_plane")):
            if needed and not hasattr(seg, needed):
                raise InputError(model, f"{flag} needs an implicit model that supports it (NISF); "
                                        f"this is a {seg.method!r} checkpoint")
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
    from inrseg.data.io import check_memory

    voxels = math.prod(max(1, round(n * scale)) for n in shape[:3]) * math.prod(shape[3:])
    check_memory(path, voxels * (8 * num_classes + 8 + 4 * len(shape)),
                 f"--scale {scale:g} (an output grid of {voxels:.3g} voxels)")


def _segment_into(output: Path, seg, groups, scale: float, heldout_spec, plane, plane_size: str,
                  plane_mm: float, frame: float, overlays: bool, dev, save_probabilities: bool = False) -> None:
    """Segment every input group into ``output``; under torchrun each rank segments its share
    of the inputs and writes only those. With ``save_probabilities`` the labels are the argmax
    of the probabilities written beside them (one test-time fit for the INR methods)."""
    import numpy as np

    from inrseg.data.io import Volume, atomic_path, load_image, save_labels
    from inrseg.data.layouts import case_id_of
    from inrseg.viz.overlays import save_overlay
    from inrseg.engine import barrier, shard

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
            _render_plane(seg, image, plane, _parse_shape(plane_size), plane_mm, frame, output / cid)
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
    """Fit the latent once, render the plane, write ``<stem>_plane.nii.gz`` (labels),
    ``<stem>_plane_image.nii.gz`` and ``<stem>_plane.png``."""
    import numpy as np

    from inrseg.data.io import save_image, save_labels
    from inrseg.viz.overlays import save_plane_png

    if spec == "lax":
        axes = image.affine[:3, :3]
        centre = image.affine[:3, :3] @ ((np.asarray(image.shape[:3]) - 1) / 2) + image.affine[:3, 3]
        u, v = axes[:, 0], axes[:, 2]
    else:
        try:
            centre, u, v = ([float(x) for x in part.split(",")] for part in spec.split(";"))
        except ValueError:
            raise typer.BadParameter(f"--plane {spec!r}: expected 'lax' or 'cx,cy,cz;ux,uy,uz;vx,vy,vz'") from None
    fit = seg.fit_latents([image])[0]
    view = seg.render_plane(fit, centre, u, v, size, pixel_mm, frame)
    img_vol, lab_vol = view.as_volumes()
    save_labels(lab_vol.data, f"{stem}_plane.nii.gz", like=lab_vol)
    save_image(img_vol, f"{stem}_plane_image.nii.gz")
    save_plane_png(view, f"{stem}_plane.png")


@app.command()
def info(model: Path = typer.Argument(..., help="Checkpoint file.")) -> None:
    """Print a checkpoint's JSON description (method, version, config, classes, step counts)."""
    from inrseg.engine.checkpoints import read_metadata

    meta = read_metadata(model)
    meta.pop("history", None)
    print(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------------- train
def _open_train_data(data: Path, splits: Optional[Path], val_fraction: float, seed: int,
                     method: Optional[str] = None):
    from inrseg.data.layouts import open_dataset, split_by_subject
    from inrseg.methods.base import check_spatial_ndim, segmenter_class

    ds = open_dataset(data, splits_file=splits)
    if method is not None:
        check_spatial_ndim(segmenter_class(method), ds.spatial_ndim, data)
    train, val = split_by_subject(ds.train, val_fraction, seed, splits)
    status(f"{ds.name}: {len(train)} training cases, {len(val)} validation cases "
           f"({len({c.subject_id for c in val})} subjects), {len(ds.test)} test cases untouched")
    return ds, train, val


def _state_file(out: Path) -> Path:
    """Where an interrupted ``train`` keeps its resumable state: ``OUT.train-state``."""
    return out.with_name(out.name + ".train-state")


def _check_train_out(out: Path, resume: bool, force: bool) -> None:
    """Before any data is read: ``--out`` must be writable, and an interrupted run's state is
    never overwritten without ``--resume`` (continue it) or ``--force`` (start over)."""
    from inrseg.data.io import check_writable

    check_writable(out, "checkpoint")
    state = _state_file(out)
    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other")
    if state.exists() and not (resume or force):
        raise InputError(state, "holds the state of an interrupted run: add --resume to continue it, "
                                "or --force to start over")


def _state_path(out: Path, resume: bool) -> Path:
    """``OUT.train-state``; without ``--resume`` (that is, with ``--force``) a stale one and its
    metrics log are removed by rank 0 before any rank looks for it."""
    from inrseg.engine import barrier, is_main

    state = _state_file(out)
    if not resume and is_main():
        for stale in (state, _log_path(out)):
            if stale.exists():
                stale.unlink()
    barrier()
    return state


def _log_path(out: Path) -> Path:
    """The per-step metrics log next to the checkpoint: ``OUT.metrics.jsonl``."""
    return out.with_name(out.name + ".metrics.jsonl")


def _check_device(device: str) -> None:
    """Refuse a bad ``--device`` before any data is read."""
    from inrseg.engine import resolve_device

    resolve_device(device)


@contextlib.contextmanager
def _run_on(device: str):
    """Resolve ``--device`` and, under torchrun, join the process group for the command
    (NCCL on GPUs, gloo on CPUs); leaves it at the end. Yields the :class:`torch.device`."""
    from inrseg.engine import init_distributed, leave_distributed, resolve_device

    dev = resolve_device(device)
    joined = init_distributed(dev)
    clean = False
    try:
        yield dev
        clean = True
    finally:
        if joined:
            leave_distributed(clean)


def _fit_and_save(model, train, val, out: Path, resume: bool, budget, precision: str,
                  force: bool = False) -> None:
    """Train (every rank) and write the checkpoint (rank 0), atomically, holding a lock on
    ``out`` so that two runs never write the same checkpoint; temporary files that a killed
    run left next to it are removed (and named). The resumable state is deleted once the
    checkpoint is written: it exists only while a run is unfinished or was interrupted."""
    from inrseg.data.io import exclusive_lock, remove_stale_temporaries
    from inrseg.engine import barrier, is_main

    state = _state_file(out)
    made = out.parent
    while not made.parent.exists() and made != made.parent:  # the first folder this run creates
        made = made.parent
    made = None if made.exists() else made
    with exclusive_lock(out) if is_main() else contextlib.nullcontext():
        if is_main():
            for stale in remove_stale_temporaries(out) + remove_stale_temporaries(state):
                status(f"removed {stale}: a temporary file an interrupted run left behind")
        try:
            model.fit(train, val, state_path=_state_path(out, resume), budget=budget,
                      log_path=_log_path(out), precision=precision)
            if is_main():
                model.save(out)
                state.unlink(missing_ok=True)
        except (InrsegError, OSError):
            # a bad case found mid-training, or a full disk: leave no trace of this run (an
            # interrupted run's state and log, kept for --resume, stay as they were)
            if is_main() and not resume:
                state.unlink(missing_ok=True)
                _log_path(out).unlink(missing_ok=True)
            if is_main() and made is not None:
                shutil.rmtree(made, ignore_errors=True)
            raise
        barrier()


def _train_supervised(method: str, data: Path, out: Path, preset: str, steps: Optional[int],
                      batch_size: Optional[int], budget_minutes: Optional[float], val_fraction: float,
                      splits: Optional[Path], seed: int, resume: bool, patch: Optional[str] = None,
                      foreground_fraction: Optional[float] = None, device: str = "cpu",
                      precision: str = "auto", force: bool = False) -> None:
    from inrseg.methods.supervised import PRESETS, supervised_config
    from inrseg.methods.base import segmenter_class
    from inrseg.engine import Budget

    budget = Budget(budget_minutes)
    set_budget(budget)
    _check_device(device)
    _check_train_out(out, resume, force)
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    ds, train, val = _open_train_data(data, splits, val_fraction, seed, method)
    overrides = {k: v for k, v in dict(steps=steps, batch_size=batch_size, patch_size=_patch(patch),
                                       foreground_fraction=foreground_fraction).items() if v is not None}
    cfg = supervised_config(preset, ds.spatial_ndim, seed=seed, budget_minutes=budget_minutes, **overrides)
    cls = segmenter_class(method)
    with _run_on(device) as dev:
        model = cls(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg, device=dev)
        status(f"{method}: {model.num_params / 1e6:.2f}M parameters on {dev}")
        _fit_and_save(model, train, val, out, resume, budget, precision, force)
    status(f"saved {out} (best validation step {model.best_step})")


_DATA = typer.Option(..., help="Dataset directory (nnU-Net, neurite-OASIS or UK Biobank layout).")
_OUT = typer.Option(..., help="Checkpoint to write (.safetensors).")
_VAL = typer.Option(0.2, callback=_fraction, help="Fraction of training subjects held out for validation.")
_SPLITS = typer.Option(None, help="Splits JSON overriding subjects / validation split.")
_RESUME = typer.Option(False, help="Continue from OUT.train-state if an interrupted run left one.")
_FORCE = typer.Option(False, "--force", help="Start over even if an interrupted run left OUT.train-state.")
_BUDGET = typer.Option(None, callback=_positive, help="Stop training after this many minutes (best-on-validation kept).")
_PATCH = typer.Option(None, help="3D training crop in voxels: one edge (64) or three (96,96,64); "
                                 "default 96^3, capped at the volume.")
_FG = typer.Option(None, min=0.0, max=1.0, help="Share of 3D crops forced to contain foreground "
                                                 "(default 0.33, as nnU-Net).")
_DEVICE = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps. Under torchrun "
                                    "'cuda' means each rank's own GPU (LOCAL_RANK).")
_PRECISION = typer.Option("auto", help="auto (bf16 autocast on CUDA for the CNN methods), fp32 or bf16.")


def _patch(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"64"`` -> (64, 64, 64); ``"96,96,64"`` -> (96, 96, 64); None stays None."""
    if text is None:
        return None
    try:
        edges = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--patch {text!r}: expected N or N,N,N") from None
    if len(edges) not in (1, 3) or min(edges) < 8:
        raise typer.BadParameter(f"--patch {text!r}: expected N or N,N,N with edges >= 8")
    return edges * 3 if len(edges) == 1 else edges


@train_app.command("unet")
def train_unet(data: Path = _DATA, out: Path = _OUT,
               preset: str = typer.Option("unet-small", help="unet-small (1.6M) or unet-paper (6.5M)."),
               steps: Optional[int] = typer.Option(None, min=1, help="Optimiser steps (default 2000)."),
               batch_size: Optional[int] = typer.Option(None, min=1, help="Slices / patches per step."),
               patch: Optional[str] = _PATCH, foreground_fraction: Optional[float] = _FG,
               budget_minutes: Optional[float] = _BUDGET, val_fraction: float = _VAL,
               splits: Optional[Path] = _SPLITS, seed: int = 0, resume: bool = _RESUME, force: bool = _FORCE,
               device: str = _DEVICE, precision: str = _PRECISION) -> None:
    """Train the MONAI U-Net baseline (2D or 3D, from the data)."""
    _train_supervised("unet", data, out, preset, steps, batch_size, budget_minutes, val_fraction,
                      splits, seed, resume, patch, foreground_fraction, device, precision, force)


@train_app.command("segresnet")
def train_segresnet(data: Path = _DATA, out: Path = _OUT,
                    steps: Optional[int] = typer.Option(None, min=1, help="Optimiser steps (default 2000)."),
                    batch_size: Optional[int] = typer.Option(None, min=1, help="Slices / patches per step."),
                    patch: Optional[str] = _PATCH, foreground_fraction: Optional[float] = _FG,
                    budget_minutes: Optional[float] = _BUDGET, val_fraction: float = _VAL,
                    splits: Optional[Path] = _SPLITS, seed: int = 0, resume: bool = _RESUME, force: bool = _FORCE,
                    device: str = _DEVICE, precision: str = _PRECISION) -> None:
    """Train the MONAI SegResNet baseline (4.7M parameters)."""
    _train_supervised("segresnet", data, out, "segresnet", steps, batch_size, budget_minutes,
                      val_fraction, splits, seed, resume, patch, foreground_fraction, device, precision, force)


@train_app.command("metaseg")
def train_metaseg(data: Path = _DATA, out: Path = _OUT,
                  preset: str = typer.Option("2d-seg4", help="2d-seg4 (6 x 128), 2d-seg24 (5 x 512) or "
                                                             "3d-seg4 (6 x 256)."),
                  steps: Optional[int] = typer.Option(None, min=1, help="Outer (meta) steps."),
                  inner_steps: Optional[int] = typer.Option(None, min=1, help="Inner Adam steps per task."),
                  meta_sgd: bool = typer.Option(False, help="Learn per-parameter inner learning rates."),
                  first_order: bool = typer.Option(False, help="First-order MAML (cheaper)."),
                  meta_batch: Optional[int] = typer.Option(None, min=1, help="Tasks (images) per outer step "
                                                                             "and rank (default 1)."),
                  paper: bool = typer.Option(False, help="The paper's full settings (all pixels per step, "
                                                         "lr 1e-4, joint inner loss, 5000 steps): for GPUs."),
                  head_context: Optional[float] = typer.Option(None, min=0.0, help="The phase-2 head also reads "
                                                               "the features this many voxels away along each "
                                                               "axis (2d-seg4, 3d-seg4: 4; 0: the paper's per-point head)."),
                  budget_minutes: Optional[float] = _BUDGET, val_fraction: float = _VAL,
                  splits: Optional[Path] = _SPLITS, seed: int = 0, resume: bool = _RESUME, force: bool = _FORCE,
                  device: str = _DEVICE, precision: str = _PRECISION) -> None:
    """Train MetaSeg: meta-learn a SIREN + segmentation head, retrain the head on fitted
    features (phase 2) and choose the test-time step count T_f on the validation subjects.
    Under torchrun the meta-batch (--meta-batch tasks per rank) is split across ranks."""
    overrides = {k: v for k, v in dict(steps=steps, inner_steps=inner_steps, meta_batch=meta_batch,
                                       head_context=head_context).items() if v is not None}
    _train_metaseg(data, out, preset, paper, budget_minutes, val_fraction, splits, seed, resume,
                   device=device, precision=precision, force=force, meta_sgd=meta_sgd, first_order=first_order,
                   **overrides)


def _train_metaseg(data: Path, out: Path, preset: str, paper: bool, budget_minutes: Optional[float],
                   val_fraction: float, splits: Optional[Path], seed: int, resume: bool,
                   device: str = "cpu", precision: str = "auto", force: bool = False, **overrides) -> None:
    from inrseg.methods.metaseg import MetaSeg, metaseg_config
    from inrseg.engine import Budget

    budget = Budget(budget_minutes)
    set_budget(budget)
    _check_device(device)
    _check_train_out(out, resume, force)
    ds, train, val = _open_train_data(data, splits, val_fraction, seed, "metaseg")
    try:
        cfg = metaseg_config(preset, paper=paper, seed=seed, budget_minutes=budget_minutes, **overrides)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    with _run_on(device) as dev:
        model = MetaSeg(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg, device=dev)
        status(f"metaseg ({preset}): {model.num_params / 1e6:.3f}M parameters on {dev}")
        _fit_and_save(model, train, val, out, resume, budget, precision, force)
    status(f"saved {out} (T_f = {model.t_f} test-time steps, chosen on validation)")


@train_app.command("nisf")
def train_nisf(data: Path = _DATA, out: Path = _OUT,
               preset: str = typer.Option("nisf-cpu-small", help="nisf-cpu-small (4 x 64, the CPU default), "
                                                                 "nisf-cpu (8 x 128) or nisf-paper (8 x 128, "
                                                                 "GPU-sized)."),
               steps: Optional[int] = typer.Option(None, min=1, help="Prior-training steps (CPU presets: 3,000, "
                                                   "or with --budget-minutes until the budget ends)."),
               activation: Optional[str] = typer.Option(None, help="gabor (default), sine or relu (ablation)."),
               infer_max_steps: Optional[int] = typer.Option(None, min=1, help="Longest latent fit tried on the "
                                                                       "validation cases when choosing the step count."),
               augment: Optional[int] = typer.Option(None, min=0, help="Augmented copies of every training case "
                                                     "(small affine + intensity), each with its own latent."),
               augment_translate: Optional[float] = typer.Option(None, min=0.0, max=0.99, help="With --augment: "
                                                                 "shift copies by up to this fraction of the grid."),
               augment_elastic: Optional[float] = typer.Option(None, min=0.0, help="With --augment: a smooth random "
                                                               "deformation of each copy, RMS displacement in voxels "
                                                               "(in plane for thick slices)."),
               budget_minutes: Optional[float] = _BUDGET, val_fraction: float = _VAL,
               splits: Optional[Path] = _SPLITS, seed: int = 0, resume: bool = _RESUME, force: bool = _FORCE,
               device: str = _DEVICE, precision: str = _PRECISION) -> None:
    """Train NISF: an auto-decoder prior (network + one latent per training case); the number of
    latent-fitting steps used at inference is chosen on the validation subjects. Under torchrun
    the network trains under DDP and each rank owns the latents of its share of the subjects."""
    from inrseg.methods.nisf import NISF, PRESETS, config_from_preset
    from inrseg.engine import Budget

    budget = Budget(budget_minutes)
    set_budget(budget)
    _check_device(device)
    _check_train_out(out, resume, force)
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    ds, train, val = _open_train_data(data, splits, val_fraction, seed, "nisf")
    overrides = {k: v for k, v in dict(steps=steps, activation=activation,
                                       infer_max_steps=infer_max_steps, augment=augment,
                                       augment_translate=augment_translate,
                                       augment_elastic=augment_elastic).items()
                 if v is not None}
    cfg = config_from_preset(preset, seed=seed, budget_minutes=budget_minutes, **overrides)
    with _run_on(device) as dev:
        model = NISF(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg, device=dev)
        status(f"nisf: {model.num_params / 1e6:.3f}M parameters ({cfg.activation}, {cfg.depth} x {cfg.width}) "
               f"on {dev}")
        _fit_and_save(model, train, val, out, resume, budget, precision, force)
    status(f"saved {out} (inference steps chosen on validation: {model.infer_steps})")


class Backbone(str, Enum):
    unet = "unet"
    transunet = "transunet"
    unet3d = "unet3d"
    unetr = "unetr"


class MorseVariant(str, Enum):
    baseline = "baseline"
    pointrend = "pointrend"
    smoe = "smoe"
    iar = "iar"
    morse = "morse"


@train_app.command("morse")
def train_morse(data: Path = _DATA, out: Path = _OUT,
                backbone: Backbone = typer.Option(Backbone.unet, help="Segmentation backbone (unet3d for 3D data; "
                                                                      "unet and unetr work in 2D and 3D)."),
                variant: MorseVariant = typer.Option(MorseVariant.morse, help="baseline, pointrend, smoe (experts "
                                                                              "only), iar (rendering only) or morse."),
                preset: str = typer.Option("cpu", help="Widths: cpu (minutes on a CPU) or paper."),
                steps: Optional[int] = typer.Option(None, min=1, help="Optimiser steps T (the L_rend schedule uses T)."),
                batch_size: Optional[int] = typer.Option(None, min=1, help="Slices / crops per step."),
                lr: Optional[float] = typer.Option(None, callback=_positive, help="Initial learning rate (AdamW, default 5e-4)."),
                expert_dropout: Optional[str] = typer.Option(None, help="bernoulli (paper, alpha 0.7), count "
                                                                        "(official code) or none."),
                dropout_warmup_steps: Optional[int] = typer.Option(None, min=0,
                                                                   help="Expert-dropout warm-up: the drop rate "
                                                                        "rises from 0 to full over this many steps "
                                                                        "(cpu preset 5000; paper preset 0: full "
                                                                        "from step 0)."),
                patch: Optional[str] = _PATCH, foreground_fraction: Optional[float] = _FG,
                budget_minutes: Optional[float] = _BUDGET, val_fraction: float = _VAL,
                splits: Optional[Path] = _SPLITS, seed: int = 0, resume: bool = _RESUME, force: bool = _FORCE,
                device: str = _DEVICE, precision: str = _PRECISION) -> None:
    """Train MORSE or one of its ablation variants on a backbone (DDP under torchrun)."""
    from inrseg.methods.morse import MORSE, morse_config
    from inrseg.engine import Budget

    budget = Budget(budget_minutes)
    set_budget(budget)
    _check_device(device)
    _check_train_out(out, resume, force)
    ds, train, val = _open_train_data(data, splits, val_fraction, seed, "morse")
    overrides = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr,
                                       expert_dropout=expert_dropout, dropout_warmup_steps=dropout_warmup_steps,
                                       patch_size=_patch(patch),
                                       foreground_fraction=foreground_fraction).items() if v is not None}
    try:
        cfg = morse_config(backbone.value, variant.value, ds.spatial_ndim, preset, seed=seed,
                           budget_minutes=budget_minutes, **overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    with _run_on(device) as dev:
        model = MORSE(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg, device=dev)
        status(f"morse ({backbone.value}, {variant.value}): {model.num_params / 1e6:.2f}M parameters on {dev}")
        _fit_and_save(model, train, val, out, resume, budget, precision, force)
    status(f"saved {out} (best validation step {model.best_step})")


# ----------------------------------------------------------------------------------- bench
@app.command()
def bench(data: Path = typer.Option(..., help="Dataset directory (nnU-Net, neurite-OASIS or UK Biobank layout)."),
          methods: str = typer.Option(..., help="Comma-separated: unet[:unet-paper], segresnet, metaseg[:PRESET], "
                                               "nisf[:PRESET], morse[:VARIANT[:BACKBONE]]. The first is the "
                                               "reference of the paired tests."),
          budget_minutes: Optional[float] = typer.Option(None, callback=_positive,
                                                         help="Wall time of each method's whole fit, per seed "
                                                              "(training, phase 2, step selection)."),
          seeds: int = typer.Option(3, min=1, help="Seeds 0..N-1 for every method."),
          out: Path = typer.Option(Path("bench-runs"), help="Parent folder; each run writes a new "
                                                            "<date-time>-<dataset> folder in it."),
          device: str = _DEVICE,
          threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: torch's)."),
          val_fraction: float = _VAL,
          split_seed: int = typer.Option(0, help="Seed of the validation split (the same for every method and seed)."),
          regions: Optional[str] = typer.Option(None, help="Also score label unions: 'brats'."),
          allow_dirty: bool = typer.Option(False, "--allow-dirty", help="Run from a checkout with uncommitted "
                                                                         "changes (recorded as dirty)."),
          html: bool = typer.Option(True, help="Write report.html.")) -> None:
    """Benchmark methods side by side: one split by subject, the same budget per method, N seeds;
    mean +- sd, paired Wilcoxon tests, results.json / .csv / .md and report.html in a new folder."""
    from inrseg.eval.bench import run_bench

    _check_device(device)
    command = _state.get("command") or shlex.join(["inrseg", *sys.argv[1:]])
    try:
        run = run_bench(data, methods, budget_minutes, list(range(seeds)), out, device=device,
                        allow_dirty=allow_dirty, val_fraction=val_fraction, split_seed=split_seed,
                        threads=threads, regions=regions, command=command, html=html)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    md = (run / "results.md").read_text()
    print(md.split("## Per seed")[0].strip())  # the headline and per-class tables


# ----------------------------------------------------------------------------------- demo
@app.command()
def figures(model: Path = typer.Option(..., help="A MetaSeg checkpoint."),
            data: Path = typer.Option(..., help="Dataset whose test cases (else training cases) are shown."),
            out: Path = typer.Option(..., help="Output directory for the PNGs."),
            cases: int = typer.Option(3, min=1, help="How many cases."),
            max_steps: int = typer.Option(500, min=0, help="Longest test-time fit on the Dice/PSNR curve."),
            device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")) -> None:
    """MetaSeg figures: Dice and PSNR against test-time steps (paper Fig. 2), image / prediction /
    ground-truth overlays, and the PCA of the fitted INR's features (Fig. 4)."""
    from inrseg.data.layouts import open_dataset
    from inrseg.viz.figures import feature_pca_png, metaseg_step_curve, plot_step_curves
    from inrseg.viz.overlays import save_overlay
    from inrseg.methods.base import load_segmenter
    from inrseg.engine import resolve_device

    seg = load_segmenter(model, "metaseg", device=resolve_device(device))
    ds = open_dataset(data)
    chosen = (ds.test or ds.train)[:cases]
    curves = {}
    steps = [s for s in (0, 1, 2, 5, 10, 25, 50, 100, 200, 300, 500, 1000, 2000) if s <= max_steps]
    for case in progress(chosen, desc="figures"):
        image, labels = case.load()
        curves[case.case_id] = metaseg_step_curve(seg, image, labels, steps)
        save_overlay(image, seg.predict(image).data, out / f"{case.case_id}_overlay.png", gt=labels.data,
                     names=seg.label_names,
                     title=f"{case.case_id} (MetaSeg, T_f = {seg.t_f})")
        feature_pca_png(seg, image, out / f"{case.case_id}_features_pca.png")
    plot_step_curves(curves, out / "dice_psnr_vs_steps.png", t_f=seg.t_f)
    from inrseg.eval.evaluate import write_json

    write_json(curves, out / "dice_psnr_vs_steps.json")
    status(f"wrote figures for {len(chosen)} cases to {out}")


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), help="Where everything is written."),
         minutes: float = typer.Option(4.0, callback=_positive, help="MetaSeg training budget in minutes: meta-training, "
                                                 "phase 2 and the choice of T_f."),
         force: bool = typer.Option(True, help="Replace an earlier demo's output."),
         device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")) -> None:
    """The whole MetaSeg pipeline on embedded data, on the CPU in a few minutes: brain phantoms
    -> meta-training -> test-time fitting of each test image -> NIfTI label maps, PNG overlays,
    a Dice table and the Dice/PSNR-vs-steps figure."""
    from inrseg.data.io import save_labels
    from inrseg.data.layouts import open_dataset
    from inrseg.data.phantoms import write_phantom_dataset
    from inrseg.viz.figures import metaseg_step_curve, plot_step_curves
    from inrseg.eval.evaluate import evaluate_dirs, format_table, write_report
    from inrseg.viz.overlays import save_overlay
    from inrseg.methods.base import load_segmenter
    from inrseg.engine import resolve_device

    if out.exists() and force:
        shutil.rmtree(out)
    _check_output_dir(out, False)
    data = out / "data"
    status("1/4 writing a brain2d phantom dataset (16 training + 4 test subjects, 96 x 112)")
    write_phantom_dataset("brain2d", data, n_train=16, n_test=4, seed=0, shape=(96, 112))
    status(f"2/4 meta-training MetaSeg (2d-seg4 preset, {minutes} min budget), phase 2, T_f on validation")
    ckpt = out / "metaseg.safetensors"
    # demo-sized phase 2 and T_f search: 8 training images, three candidate step counts
    _train_metaseg(data, ckpt, "2d-seg4", False, minutes, 0.25, None, 0, False, device=device,
                   phase2_max_cases=8, tf_candidates=(25, 50, 100))
    status("3/4 fitting and segmenting the test images")
    seg = load_segmenter(ckpt, device=resolve_device(device))
    pred_dir = out / "predictions"
    curves = {}
    for i, case in enumerate(progress(open_dataset(data).test, desc="segmenting")):
        image, labels = case.load()
        pred = seg.predict(image)
        save_labels(pred.data, pred_dir / f"{case.case_id}.nii.gz", like=pred)
        save_overlay(image, pred.data, out / "overlays" / f"{case.case_id}.png", gt=labels.data,
                     names=seg.label_names,
                     title=f"{case.case_id}: MetaSeg after T_f = {seg.t_f} steps")
        if i < 2:
            curves[case.case_id] = metaseg_step_curve(seg, image, labels, (0, 1, 5, 10, 25, 50, 100, 200))
    plot_step_curves(curves, out / "dice_psnr_vs_steps.png", t_f=seg.t_f)
    status("4/4 evaluating")
    per_case, summary, names = evaluate_dirs(pred_dir, data / "labelsTs")
    write_report(out / "report", per_case, summary, names)
    print(format_table(summary))
    status(f"demo finished: {out}/ (predictions/*.nii.gz, overlays/*.png, dice_psnr_vs_steps.png, "
           f"report/, metaseg.safetensors)")


# ----------------------------------------------------------------------------------- entry
#: click's base exception class, as typer vendors it (found through the MRO, not a private import)
_ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _os_error_line(exc: OSError) -> Optional[str]:
    """One line for an operating-system error the user can act on (disk full, no permission,
    read-only file system, quota), naming the file; ``None`` for any other."""
    import errno

    problems = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
                errno.EDQUOT: "disk quota exceeded"}
    if exc.errno not in problems:
        return None
    where = exc.filename if exc.filename is not None else "output"
    return f"{where}: {problems[exc.errno]}; nothing was left half-written"


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 failure, 2 bad input or usage,
    130 interrupted). Errors are one line on stderr; ``--debug`` shows the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in args
    _state["command"] = shlex.join(["inrseg", *args])  # recorded as provenance by bench / evaluate --html
    try:
        with Heartbeat():
            code = app(args=args, prog_name="inrseg", standalone_mode=False)
        if code == 130 and not last_status().startswith("interrupted"):  # typer turns Ctrl-C into 130
            print("interrupted", file=sys.stderr)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except _ClickError as exc:  # usage errors: bad option values, unknown commands
        if type(exc).__name__ == "NoArgsIsHelpError":
            ctx = getattr(exc, "ctx", None)
            print(ctx.get_help() if ctx is not None else exc.format_message())
            return 2
        if _state["debug"]:
            raise
        print(f"error: {exc.format_message()} (see --help)", file=sys.stderr)
        return exc.exit_code if isinstance(exc.exit_code, int) and exc.exit_code else 2
    except InrsegError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if _state["debug"]:
            raise
        print("error: out of memory (try a smaller --scale, patch or batch)", file=sys.stderr)
        return 1
    except OSError as exc:
        line = _os_error_line(exc)
        if line is None or _state["debug"]:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
