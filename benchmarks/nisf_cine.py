"""NISF on the real Sunnybrook cine, the U-Net and MetaSeg side by side (issue 11, item 3).

    python benchmarks/nisf_cine.py --minutes 35 --baseline-minutes 8 --metaseg-minutes 12 --threads 2

One process, one split, methods one after the other (never two CPU-heavy jobs at once):

* **Split.** ``cardiac-sunnybrook-cine``: train scd01-03, test scd04 (the dataset's split). One
  of the three training patients is the validation patient (``--val-patient``, default scd03);
  everything that is chosen (NISF's inference steps, the U-Net's best weights, MetaSeg's
  meta-parameters, T_f and head) is chosen on it, never on the test patient. The 2D methods use
  ``cardiac2d-sunnybrook`` (the same annotated end-diastolic slices as 2D images), split by the
  same patients.
* **NISF** (``--preset``, default ``nisf-cpu-small``): prior training on the two remaining cines
  (all 20 frames: the reconstruction loss on every frame drawn, the segmentation loss only at
  the labelled voxels, ``annotated_frame_fraction`` of the frame draws among the annotated
  frames), then the validation steps curve; ``--minutes`` is the engine's Budget of the whole
  ``NISF.fit`` (prior + curve). Inference: one latent fitted to the test patient's whole cine
  (all frames), labels read on the whole 4D grid.
* **Scores.** The project's one 4D metric (:func:`inrseg.metrics.score_case`: the 3D metrics of
  each annotated frame, ignored voxels skipped, mean over annotated frames; here the one ED
  frame, at its annotated slices), for NISF and for the 2D methods' slice predictions placed
  back into the cine grid (a 2D case ``scdNN_sZZ_fTT`` is slice ZZ, frame TT of the cine).
  Beside it, the per-slice 2D metrics (mean over the test slices, as
  ``benchmarks/baselines.py`` reports them) for all three. LV blood pool and myocardium Dice and
  HD95 (mm). The paper's protocol (UK Biobank) also counts the RV blood pool; Sunnybrook has no
  RV label, so no RV is counted: the mean foreground Dice is over LV blood pool and myocardium.
* **Held-out annotated slices**: the test latent is fitted without every second annotated slice
  (the 2nd, 4th, ... along axis 2, the short-axis slice axis; the first and last annotated slices
  stay observed) - ``NISF.predict_heldout`` - and scored on the held-out and on the observed
  annotated slices, beside the same slices from the fit that saw every slice.
* **Figures** (``benchmarks/results/<date>-nisf-cine-*.png``): a long-axis plane through the
  centre of the short-axis grid (along its x and slice axes, as ``inrseg segment --plane lax``)
  rendered from the fitted latent at end-diastole and end-systole, beside the short-axis stack
  resampled nearest-neighbour on the same plane; the segmentation of the unlabelled end-systolic
  frame (``dataset.json`` ``es_frames_i_contour_only``) beside the labelled end-diastolic one;
  NISF's validation Dice against inference steps.

Written to ``benchmarks/results/<date>-nisf-cine.md`` (``INRSEG_RESULTS`` to write elsewhere).

Smoke test (well under 2 minutes on one core)::

    INRSEG_RESULTS=/tmp/nisfcine python benchmarks/nisf_cine.py --minutes 0.1 --baseline-minutes 0.05 \\
        --metaseg-minutes 0.1 --threads 1 --set infer_max_steps=10 --set curve_every=5 \\
        --meta-set tf_candidates=5,10 --meta-set val_every=5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from harness import RESULTS, SHARED_DATA, markdown_table, num_params, parse_overrides, write_results
from inrseg.data.io import Volume, label_array
from inrseg.data.layouts import Case, open_dataset
from inrseg.data.planes import PlaneView, plane_points
from inrseg.metrics import CaseMetrics, score_case, summarize
from inrseg.methods.nisf import NISF, NISFConfig, config_from_preset
from inrseg.eval.evaluate import save_plane_png
from inrseg.engine import Budget, resolve_device
from nisf_bench import plot_val_curve

CINE = "cardiac-sunnybrook-cine"
SLICES = "cardiac2d-sunnybrook"
RV_NOTE = ("The NISF paper's protocol (UK Biobank) also scores the RV blood pool; Sunnybrook has no "
           "RV label, so no RV is counted here: mean foreground Dice and HD95 are over LV blood pool "
           "and LV myocardium only.")
_CASE_2D = re.compile(r"^(?P<subject>.+)_s(?P<z>\d+)_f(?P<t>\d+)$")


# ------------------------------------------------------------------------------ small helpers
def by_patient(cases: list[Case], val_patient: str) -> tuple[list[Case], list[Case]]:
    """Training cases split into (train, val) by patient: ``val_patient``'s cases are validation."""
    train = [c for c in cases if c.subject_id != val_patient]
    val = [c for c in cases if c.subject_id == val_patient]
    if not val:
        raise SystemExit(f"--val-patient {val_patient}: not a training patient "
                         f"({', '.join(sorted({c.subject_id for c in cases}))})")
    return train, val


def slice_of(case_id: str) -> tuple[str, int, int]:
    """``scdNN_sZZ_fTT`` -> ``(scdNN, ZZ, TT)``: the cine slice and frame a 2D case is."""
    m = _CASE_2D.match(case_id)
    if m is None:
        raise SystemExit(f"2D case {case_id!r} is not named <patient>_s<slice>_f<frame>")
    return m["subject"], int(m["z"]), int(m["t"])


def annotated_frames(gt: np.ndarray, ignore: int) -> list[int]:
    return [int(t) for t in np.flatnonzero((gt != ignore).reshape(-1, gt.shape[3]).any(0))]


def annotated_slices(gt: np.ndarray, ignore: int) -> list[int]:
    """Slices (axis 2) holding an annotated voxel in any frame."""
    return [int(z) for z in np.flatnonzero((np.moveaxis(gt, 2, 0) != ignore).reshape(gt.shape[2], -1).any(1))]


def slice_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing, ignore: int) -> list[CaseMetrics]:
    """2D metrics of every annotated ``(z, t)`` slice of a cine prediction (one case each)."""
    out = []
    for t in annotated_frames(gt, ignore):
        for z in range(gt.shape[2]):
            g = gt[:, :, z, t]
            if (g != ignore).any():
                out.append(score_case(pred[:, :, z, t], g, num_classes, spacing[:2], True, ignore))
    return out


def metric_row(method: str, m: dict, names: list[str], **extra) -> dict:
    """A table row of a :func:`summarize` dict: per-class Dice and HD95 of the foreground."""
    row = {"method": method}
    for n in names[1:]:
        row[f"{n} Dice"] = m["per_class"][n]["dice"]
    row["mean fg Dice"] = m["mean_foreground_dice"]
    for n in names[1:]:
        row[f"{n} HD95 mm"] = m["per_class"][n]["hd95_mm"]
    row["mean HD95 mm"] = m["hd95_mm"]
    row.update(extra)
    return row


def lv_volume_ml(labels: np.ndarray, voxel_mm3: float, slices: list[int] | None = None) -> np.ndarray:
    """LV blood pool (label 1) volume in mL per frame of a ``(X, Y, Z, T)`` map (optionally only
    the given slices)."""
    lab = labels if slices is None else labels[:, :, slices]
    return (lab == 1).sum((0, 1, 2)) * voxel_mm3 / 1000.0


# ------------------------------------------------------------------------------ figures
def _colours(n: int):
    """Label ``c`` in tab10's colour ``c``, as :func:`inrseg.eval.evaluate.save_plane_png` draws it, so
    every figure of this benchmark colours a class alike (background masked)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    base = plt.get_cmap("tab10")
    return ListedColormap([base(c % 10) for c in range(max(n, 2))])


def save_frames_png(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, ignore: int, z: int,
                    ed: int, es: int, path: Path, title: str) -> Path:
    """Mid slice ``z``: end-diastole (image | NISF | ground truth) and the unlabelled
    end-systole (image | NISF)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = _colours(3)
    g = gt[:, :, z, ed]
    panels = [(0, f"ED (frame {ed}) image", image[:, :, z, ed], None),
              (0, "ED NISF", image[:, :, z, ed], pred[:, :, z, ed]),
              (0, "ED ground truth", image[:, :, z, ed], np.where(g == ignore, 0, g)),
              (1, f"ES (frame {es}, unlabelled) image", image[:, :, z, es], None),
              (1, "ES NISF", image[:, :, z, es], pred[:, :, z, es])]
    fig, axes = plt.subplots(2, 3, figsize=(9.6, 6.6))
    col = [0, 0]
    for row, name, img, lab in panels:
        ax = axes[row, col[row]]
        col[row] += 1
        ax.imshow(img.T, cmap="gray", origin="lower", vmin=0, vmax=float(np.percentile(image, 99.5)))
        if lab is not None:
            ax.imshow(np.ma.masked_equal(lab, 0).T, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=0.5,
                      origin="lower", interpolation="nearest")
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def lax_geometry(image: Volume, pixel_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """The ``--plane lax`` plane of ``inrseg segment``: through the grid centre, along the grid's
    x and slice axes; the size covers the field of view at ``pixel_mm``."""
    axes = image.affine[:3, :3]
    centre = axes @ ((np.asarray(image.shape[:3]) - 1) / 2) + image.affine[:3, 3]
    sp = image.spacing
    size = (int(np.ceil(image.shape[0] * sp[0] / pixel_mm)), int(np.ceil(image.shape[2] * sp[2] / pixel_mm)))
    return centre, axes[:, 0], axes[:, 2], size


def stack_on_plane(image: Volume, labels: np.ndarray, centre, u, v, size, pixel_mm: float,
                   frame: int) -> PlaneView:
    """The short-axis stack (image, normalised like NISF's [0, 1], and a label map) sampled
    nearest-neighbour on a plane: what the slices alone show there."""
    pts, affine = plane_points(centre, u, v, size, pixel_mm)
    inv = np.linalg.inv(image.affine)
    vox = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    vox = np.clip(vox, 0, np.asarray(image.shape[:3]) - 1)
    img = image.data[0][vox[:, 0], vox[:, 1], vox[:, 2], frame]
    lo, hi = float(image.data.min()), float(image.data.max())
    lab = labels[vox[:, 0], vox[:, 1], vox[:, 2], frame]
    return PlaneView(((img - lo) / max(hi - lo, 1e-12)).reshape(size), lab.reshape(size), affine, float(frame))


# ------------------------------------------------------------------------------ the methods
def run_nisf(args, cine, train, val, device) -> tuple[NISF, dict]:
    over = parse_overrides(NISFConfig, args.set)
    over.setdefault("steps", args.steps)
    cfg = config_from_preset(args.preset, budget_minutes=args.minutes, **over)
    model = NISF(cine.label_names, 4, len(cine.channel_names), cfg, device=device)
    print(f"NISF {args.preset}: {model.num_params} parameters on {model.device}; prior training on "
          f"{[c.case_id for c in train]}, validation {[c.case_id for c in val]}, budget {args.minutes} min",
          flush=True)
    t0 = time.perf_counter()
    model.fit(train, val, budget=Budget(args.minutes))       # the whole fit: prior + steps curve
    fit_s = time.perf_counter() - t0
    last = model.history[-1] if model.history else {}
    best = max(model.val_curve, key=lambda c: c["dice"]) if model.val_curve else {}
    info = {"fit_s": fit_s, "prior_steps": int(last.get("step", 0)), "prior_s": float(last.get("time_s", 0.0)),
            "infer_steps": model.infer_steps, "val_dice": float(best.get("dice", float("nan"))),
            "config": dataclasses.asdict(cfg)}
    return model, info


def train_2d(kind: str, args, ds2, train2, val2, device):
    """The U-Net (``unet-small``) or MetaSeg (``--metaseg-preset``) on the 2D slices."""
    t0 = time.perf_counter()
    if kind == "unet":
        from harness import supervised_factory

        model = supervised_factory(args.unet_preset, args.baseline_minutes)(ds2).to(device)
        model.fit(train2, val2)
        vals = [h["val_dice"] for h in model.history if "val_dice" in h]
        chosen = {"best val Dice": max(vals) if vals else float("nan"), "chosen": f"step {model.best_step}"}
    else:
        from inrseg.methods.metaseg import PRESETS as META_PRESETS
        from inrseg.methods.metaseg import MetaSeg, MetaSegConfig

        mcfg = MetaSegConfig(**{**META_PRESETS[args.metaseg_preset],
                                **parse_overrides(MetaSegConfig, args.meta_set)},
                             budget_minutes=args.metaseg_minutes)
        model = MetaSeg(ds2.label_names, 2, len(ds2.channel_names), mcfg, device=device)
        model.fit(train2, val2)
        curve = [max(e.get("val_dice_phase2", -1), e.get("val_dice_meta_head", -1)) for e in model.tf_curve]
        chosen = {"best val Dice": max(curve) if curve else float("nan"), "chosen": f"T_f {model.t_f}"}
    return model, time.perf_counter() - t0, chosen


def predict_2d(model, test2: list[Case], cine_shape, patient: str, num_classes: int):
    """Predict every 2D test slice of ``patient``: per-slice metrics, the predictions placed in
    the cine grid (0 elsewhere: not annotated, so never scored), seconds per slice."""
    pred4 = np.zeros(cine_shape, np.int64)
    per_slice, secs = [], []
    for case in test2:
        subject, z, t = slice_of(case.case_id)
        if subject != patient:
            continue
        image, labels = case.load()
        t0 = time.perf_counter()
        pred = model.predict(image).data
        secs.append(time.perf_counter() - t0)
        pred4[:, :, z, t] = pred
        per_slice.append(score_case(pred, labels.data, num_classes, labels.spacing[:2], True,
                                    labels.meta.get("ignore_label")))
    return per_slice, pred4, secs


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cine", type=Path, default=SHARED_DATA / CINE, help="UK Biobank cine set")
    ap.add_argument("--slices", type=Path, default=SHARED_DATA / SLICES, help="the same slices as a 2D set")
    ap.add_argument("--val-patient", default="scd03", help="the training patient used for validation")
    ap.add_argument("--preset", default="nisf-cpu-small", help="NISF preset")
    ap.add_argument("--minutes", type=float, default=35.0, help="NISF budget: the whole fit (prior + steps curve)")
    ap.add_argument("--steps", type=int, default=1_000_000,
                    help="NISF prior steps (default: so many that the budget ends training)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="NISFConfig override")
    ap.add_argument("--unet-preset", default="unet-small")
    ap.add_argument("--baseline-minutes", type=float, default=8.0, help="U-Net training budget")
    ap.add_argument("--metaseg-preset", default="2d-seg4")
    ap.add_argument("--metaseg-minutes", type=float, default=12.0, help="MetaSeg budget (meta-training + phase 2)")
    ap.add_argument("--meta-set", action="append", default=[], metavar="KEY=VALUE", help="MetaSegConfig override")
    ap.add_argument("--no-unet", action="store_true")
    ap.add_argument("--no-metaseg", action="store_true")
    ap.add_argument("--plane-mm", type=float, default=1.0, help="pixel size of the long-axis plane")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t_start = time.perf_counter()
    stamp = f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}-nisf-cine"

    cine = open_dataset(args.cine)
    ignore = cine.ignore_label
    if ignore is None:
        raise SystemExit(f"{args.cine}: dataset.json declares no ignore label")
    meta = json.loads((args.cine / "dataset.json").read_text()) if (args.cine / "dataset.json").is_file() else {}
    patients = meta.get("patients", {})
    names = cine.label_names
    C = len(names)
    train, val = by_patient(cine.train, args.val_patient)
    print(f"{cine.name}: train {[c.case_id for c in train]}, val {[c.case_id for c in val]}, "
          f"test {[c.case_id for c in cine.test]}; device {device}, {torch.get_num_threads()} threads", flush=True)

    # ---------------------------------------------------------------- NISF
    model, info = run_nisf(args, cine, train, val, device)
    print(f"NISF fit {info['fit_s']:.0f} s: {info['prior_steps']} prior steps, {info['infer_steps']} "
          f"inference steps chosen (validation Dice {info['val_dice']:.4f})", flush=True)
    curve_png = plot_val_curve(model, RESULTS / f"{stamp}-val-curve.png",
                               f"NISF {args.preset} on {cine.name}: validation ({args.val_patient}) Dice vs steps")

    cine_rows, slice_rows, heldout_rows, volume_rows, figures = [], [], [], [], []
    nisf_cine, nisf_slices, nisf_secs, gts = [], [], [], {}
    for case in cine.test:
        image, labels = case.load()
        gt = labels.data
        gts[case.subject_id] = (image, gt, labels.spacing)
        t0 = time.perf_counter()
        fit = model.fit_latents([image])[0]                 # one latent, the whole cine (all frames)
        pred = model.segment(fit).data
        nisf_secs.append(time.perf_counter() - t0)
        nisf_cine.append(score_case(pred, gt, C, labels.spacing, True, ignore))
        nisf_slices += slice_metrics(pred, gt, C, labels.spacing, ignore)

        # held-out annotated slices (axis 2): every second one, the first and last stay observed
        ann = annotated_slices(gt, ignore)
        held = [z for z in ann[1::2] if z != ann[-1]]
        if not held:
            raise SystemExit(f"{case.case_id}: too few annotated slices ({ann}) to hold some out")
        t0 = time.perf_counter()
        r = model.predict_heldout(image, 2, held, labels, steps=model.infer_steps)
        ho_s = time.perf_counter() - t0
        gl = label_array(labels)
        full_dice, full_mean = _dice_on(pred, gl, held, C)
        row = {"case": case.case_id, "held-out slices (axis 2)": ",".join(map(str, held)),
               "observed annotated": ",".join(str(z) for z in ann if z not in held),
               "held-out Dice": r.heldout_mean_foreground_dice,
               "observed Dice": r.observed_mean_foreground_dice,
               "gap (observed - held-out)": r.observed_mean_foreground_dice - r.heldout_mean_foreground_dice}
        for c in range(1, C):
            row[f"held-out {names[c]}"] = float(r.heldout_dice[c])
        row["same slices, fit on all slices"] = full_mean
        row["s"] = ho_s
        heldout_rows.append(row)

        # the unlabelled end-systolic frame and the labelled end-diastolic one
        ed_frames = annotated_frames(gt, ignore)
        ed = ed_frames[0]
        vox = float(np.prod(labels.spacing[:3]))
        vol_all = lv_volume_ml(pred, vox)
        es_listed = patients.get(case.subject_id, {}).get("es_frames_i_contour_only", [])
        es = int(es_listed[0]) if es_listed else int(np.argmin(vol_all))
        z_mid = ann[len(ann) // 2]
        figures.append(save_frames_png(image.data[0], pred, gt, ignore, z_mid, ed, es,
                                       RESULTS / f"{stamp}-{case.subject_id}-ed-es.png",
                                       f"{case.subject_id}, slice {z_mid}: NISF at end-diastole (labelled) "
                                       f"and end-systole (no labels)"))
        vol_ann = lv_volume_ml(pred, vox, ann)
        gt_edv = float(((gt[:, :, ann, ed] == 1).sum()) * vox / 1000.0)
        volume_rows.append({"case": case.subject_id, "ED frame": ed, "ES frame (dataset.json)": es,
                            "smallest predicted LV frame": int(np.argmin(vol_ann)),
                            "GT LV blood pool, ED, annotated slices mL": gt_edv,
                            "NISF ED mL": float(vol_ann[ed]), "NISF ES mL": float(vol_ann[es]),
                            "NISF EF (annotated slices)": float((vol_ann[ed] - vol_ann[es]) / max(vol_ann[ed], 1e-9))})

        # long-axis plane from the short-axis fit, at ED and ES, beside the stack on that plane
        centre, u, v, size = lax_geometry(image, args.plane_mm)
        for tag, fr in (("ed", ed), ("es", es)):
            view = model.render_plane(fit, centre, u, v, size, args.plane_mm, frame=fr)
            figures.append(save_plane_png(view, RESULTS / f"{stamp}-{case.subject_id}-lax-{tag}.png",
                                          title=f"{case.subject_id} long axis, NISF, frame {fr} ({tag.upper()})"))
            stack = stack_on_plane(image, pred, centre, u, v, size, args.plane_mm, fr)
            figures.append(save_plane_png(stack, RESULTS / f"{stamp}-{case.subject_id}-lax-{tag}-stack.png",
                                          title=f"{case.subject_id} long axis, SAX stack, frame {fr} ({tag.upper()})"))
    test_ids = sorted(gts)
    nisf_extra = {"params": model.num_params, "train s": info["fit_s"], "infer s/case": statistics.median(nisf_secs),
                  "chosen on validation": f"{info['infer_steps']} inference steps (val Dice {info['val_dice']:.4f})"}
    cine_rows.append(metric_row(f"NISF {args.preset} (whole cine, one latent)",
                                summarize(nisf_cine, names), names, **nisf_extra))
    slice_rows.append(metric_row(f"NISF {args.preset}", summarize(nisf_slices, names), names))
    print(markdown_table(cine_rows), flush=True)

    # ---------------------------------------------------------------- 2D methods on the same split
    ds2 = None
    kinds = [k for k, skip in (("unet", args.no_unet), ("metaseg", args.no_metaseg)) if not skip]
    if kinds:
        ds2 = open_dataset(args.slices)
        train2, val2 = by_patient(ds2.train, args.val_patient)
        if sorted({c.subject_id for c in train2}) != sorted({c.subject_id for c in train}):
            raise SystemExit("the 2D set's training patients differ from the cine's")
        _check_slices_match(ds2.test, gts)
    for kind in kinds:
        label = f"U-Net {args.unet_preset}" if kind == "unet" else f"MetaSeg {args.metaseg_preset}"
        print(f"{label}: training on {len(train2)} slices, validation {len(val2)} slices", flush=True)
        m2, train_s, chosen = train_2d(kind, args, ds2, train2, val2, device)
        per_cine, per_slice, secs = [], [], []
        for pid in test_ids:
            image, gt, spacing = gts[pid]
            ps, pred4, s = predict_2d(m2, ds2.test, gt.shape, pid, C)
            per_slice += ps
            secs += s
            per_cine.append(score_case(pred4, gt, C, spacing, True, ignore))
        extra = {"params": num_params(m2), "train s": train_s,
                 "infer s/case": float(sum(secs)) / max(len(test_ids), 1),
                 "chosen on validation": f"{chosen['chosen']} (val Dice {chosen['best val Dice']:.4f})"}
        cine_rows.append(metric_row(f"{label} (2D slices placed in the cine)", summarize(per_cine, names),
                                    names, **extra))
        slice_rows.append(metric_row(label, summarize(per_slice, names), names))
        print(markdown_table(cine_rows[-1:]), flush=True)

    # ---------------------------------------------------------------- results
    ann_note = "; ".join(f"{pid}: frame(s) {annotated_frames(gts[pid][1], ignore)}, slices "
                         f"{annotated_slices(gts[pid][1], ignore)}" for pid in test_ids)
    sections = {
        f"Test patient {', '.join(test_ids)}: the one 4D metric (3D per annotated frame, annotated slices only)":
            RV_NOTE + "\n\n" + markdown_table(cine_rows)
            + f"\n\nScored voxels: {ann_note}. `infer s/case`: NISF = fitting the latent to the whole cine "
              "(all frames) + labelling the 4D grid; 2D methods = the sum over the patient's annotated slices.",
        "Per 2D slice (mean over the test patient's annotated slices)":
            markdown_table(slice_rows) + "\n\nThe per-slice convention of `benchmarks/baselines.py` "
                                         "(earlier 2D measurements of the issue use it). " + RV_NOTE,
        "NISF: held-out annotated slices (latent fitted without them)":
            markdown_table(heldout_rows) + "\n\nDice on held-out and observed slices are the 4D metric "
            "restricted to those slices; `same slices, fit on all slices` is the test fit that saw them.",
        "NISF: the unlabelled end-systolic frame":
            markdown_table(volume_rows) + "\n\nLV blood pool volumes of the NISF prediction over the "
            "annotated slices (no ground truth exists at ES in this set; a plausibility check: ES should "
            "be the smallest). " + " ".join(f"![{p.stem}]({p.name})" for p in figures if "ed-es" in p.name),
        "NISF: long-axis plane rendered from the short-axis fit":
            "Plane through the centre of the short-axis grid along its x and slice axes (`inrseg segment "
            f"--plane lax`), {args.plane_mm} mm pixels; first the NISF rendering (image | labels), then "
            "the same plane sampled nearest-neighbour from the short-axis stack and NISF's grid labels. "
            "Colours in every figure: LV blood pool orange, LV myocardium green.\n\n"
            + "\n".join(f"![{p.stem}]({p.name})" for p in figures if "lax" in p.name),
        "NISF: validation Dice against inference steps":
            f"![val curve]({curve_png.name})\n\n"
            + markdown_table([{"step": c["step"], "val Dice": c["dice"]} for c in model.val_curve]),
    }
    notes = (f"Data: {args.cine} (NISF) and {args.slices} (2D methods), split by patient: train "
             f"{', '.join(sorted({c.subject_id for c in train}))}, validation {args.val_patient} (everything "
             f"chosen on it), test {', '.join(test_ids)}. Device {device}, {torch.get_num_threads()} threads. "
             f"NISF `{args.preset}`, budget {args.minutes} min for the whole fit ({info['prior_steps']} prior "
             f"steps in {info['prior_s']:.0f} s, then the steps curve; fit {info['fit_s']:.0f} s); config "
             f"`{json.dumps(info['config'])}`."
             + ("" if args.no_unet else f" U-Net `{args.unet_preset}`: {args.baseline_minutes} min.")
             + ("" if args.no_metaseg else f" MetaSeg `{args.metaseg_preset}`: {args.metaseg_minutes} min"
                                           f"{' (' + ', '.join(args.meta_set) + ')' if args.meta_set else ''}.")
             + f" Total wall time {time.perf_counter() - t_start:.0f} s.")
    path = write_results("nisf-cine", sections, notes)
    print(markdown_table(cine_rows))
    print(markdown_table(slice_rows))
    print(markdown_table(heldout_rows))
    print(markdown_table(volume_rows))
    print(f"wrote {path}, {curve_png.name} and {len(figures)} figures in {RESULTS}")


def _dice_on(pred: np.ndarray, gt: np.ndarray, slices: list[int], num_classes: int) -> tuple[np.ndarray, float]:
    """Per-class and mean foreground Dice of ``pred`` on the given slices (axis 2); ``gt`` holds
    :data:`~inrseg.data.io.IGNORE` where unlabelled (the same computation as ``predict_heldout``)."""
    from inrseg.data.io import IGNORE

    m = score_case(np.take(pred, slices, 2), np.take(gt, slices, 2), num_classes, distances=False,
                   ignore_label=IGNORE)
    return m.dice, m.mean_foreground_dice


def _check_slices_match(test2: list[Case], gts: dict) -> None:
    """A 2D test case ``scdNN_sZZ_fTT`` must be slice ZZ, frame TT of the cine (same labels)."""
    for case in test2:
        pid, z, t = slice_of(case.case_id)
        if pid not in gts:
            continue
        _, labels = case.load()
        gt = gts[pid][1][:, :, z, t]
        if labels.data.shape != gt.shape or not np.array_equal(labels.data, gt):
            raise SystemExit(f"2D case {case.case_id} does not match slice {z}, frame {t} of the {pid} cine")


if __name__ == "__main__":
    main()
