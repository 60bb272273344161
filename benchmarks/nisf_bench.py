"""NISF on the cardiac phantom (3D+t), brain3d-seg4 and brain2d-seg4 (issue: NISF).

Reduced CPU settings (about 1 hour per dataset on 2 cores, nothing else running):

    python benchmarks/nisf_bench.py --dataset cardiac      --preset nisf-cpu --minutes 40 --steps 20000 --threads 2
    python benchmarks/nisf_bench.py --dataset brain2d-seg4 --preset nisf-cpu --minutes 25 --steps 20000 --threads 2
    python benchmarks/nisf_bench.py --dataset brain3d-seg4 --preset nisf-cpu --minutes 15 --steps 20000 --threads 2 \\
        --compare --meta-minutes 12 --baseline-minutes 8

(``--steps 20000`` so that the time budget, not the preset's 3000 steps, ends the prior training;
after it come the validation steps curve, the test cases, held-out slices and super-resolution:
roughly 5 / 20 / 10 more minutes for cardiac / brain2d-seg4 / brain3d-seg4, and for
``--compare`` MetaSeg's phase 2, T_f search and test fits.)

(``--preset nisf-cpu-small``, 4 x 64, is ~10x cheaper per step and the fallback when a run has
to be shorter.) Paper settings, for a GPU: ``--preset nisf-paper --device cuda`` (8 x 128 Gabor
layers, whole frames per step, lr 1e-4, an inference curve up to 1000 steps) with a prior-training
budget of hours to days (the paper: 1000 epochs, 9 days on one A40) - ``--minutes`` only stops
the prior training; the steps curve and the test set come on top.

What is measured, all in one process, on one split (validation: 20 % of the training subjects,
by subject, seed 0; never the test set):

* test subjects: per-class and mean foreground Dice, Jaccard, HD95 / ASD (mm), parameters,
  prior-training wall time, time of the validation steps curve, inference seconds per case
  (median, ``time.perf_counter``; one case = one subject for the 3D / 3D+t sets, one slice for
  brain2d-seg4; a latent fit plus labelling the grid). 3D+t cases are scored frame by frame
  (3D metrics per frame with the spatial spacing, averaged over frames and subjects).
* Dice against inference steps on the validation subjects (``model.val_curve``; the paper's
  early-stopping figure), the chosen step marked: ``benchmarks/results/<date>-nisf-<dataset>-val-curve.png``.
* held-out slices: for each test case every ``--heldout-every``-th slice along
  ``--heldout-axis`` (default: axis 2 - the short-axis slice axis of the cine, the axis across
  the coronal slices in brain3d - and axis 1 for 2D images, where the "slices" are image
  rows) is held out, starting at ``every // 2`` and never the first or last slice (no
  extrapolation); the latent is fitted without them (``NISF.predict_heldout``) and Dice is
  reported on the held-out and on the observed slices.
* 2x super-resolution: the latent is fitted to the 2x-downsampled image
  (``harness.downsample2``: 2x2(x2) mean pooling; 3D+t: spatial axes only, time kept), the
  labels are read on the 2x finer grid (``segment(fit, scale=2)``) and scored against the
  full-resolution labels; for reference the same latent's labels on the coarse grid,
  nearest-neighbour up-sampled.
* ``--compare`` (brain2d-seg4 / brain3d-seg4): MetaSeg (preset 3d-seg4 / 2d-seg4) and the
  supervised baseline(s) (``--baselines``; default SegResNet in 3D, the 6.5M U-Net in 2D) via
  ``harness.supervised_factory``, same split, same run, one seed; their 2x super-resolution
  Dice with ``harness.lowres_dice``. This script measures what only NISF offers (held-out
  slices, super-resolution); multi-seed method comparisons are ``inrseg bench``.

Cardiac: no cardiac data is shared, so a UK-Biobank-layout phantom set is generated into a
temporary directory (``write_phantom_dataset``; default 16 training + 4 test subjects of
64 x 64 x 8 voxels x 12 frames, i.e. 2.7 x 2.7 x 10 mm, the default field of view; seed 0).

Smoke test (seconds): ``--minutes 0.05 --max-test 1 --set infer_max_steps=10 --set curve_every=5
--cardiac-shape 24,24,4 --cardiac-frames 3 --cardiac-subjects 4,1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import (RESULTS, SHARED_DATA, MethodResult, downsample2, evaluate_cases, frame_metrics,
                     lowres_dice, markdown_table, num_params, parse_overrides, run_method, write_results)
from inrseg.data.layouts import Dataset, load_ukbb, open_dataset, split_by_subject
from inrseg.data.phantoms import write_phantom_dataset
from inrseg.methods.nisf import NISF, NISFConfig, config_from_preset
from inrseg.metrics import summarize

DATASETS = ("cardiac", "brain2d-seg4", "brain3d-seg4")
META_PRESET = {"brain2d-seg4": "2d-seg4", "brain3d-seg4": "3d-seg4"}


def cardiac_dataset(root: Path, shape, frames: int, n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """Write a UK-Biobank-layout cardiac phantom set under ``root`` and open it (train + test)."""
    write_phantom_dataset("cardiac", root, n_train, n_test, seed=seed, layout="ukbb", shape=shape,
                          frames=frames)
    ds = load_ukbb(root / "train")
    ds.test = load_ukbb(root / "test").train
    ds.name = "cardiac-phantom"
    return ds


def heldout_indices(n: int, every: int) -> list[int]:
    """Every ``every``-th slice from ``every // 2``, without the first and the last slice."""
    idx = [i for i in range(every // 2, n, every) if 0 < i < n - 1]
    if not idx:
        raise SystemExit(f"no slice to hold out along an axis of {n} (every {every})")
    return idx


def plot_val_curve(model: NISF, path: Path, title: str) -> Path:
    """Validation mean foreground Dice against inference steps, the chosen step marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in model.val_curve]
    dice = [c["dice"] for c in model.val_curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    per_case = np.array([c["per_case"] for c in model.val_curve], float)
    for k in range(per_case.shape[1] if per_case.ndim == 2 else 0):
        ax.plot(steps, per_case[:, k], color="0.75", lw=0.8, label="validation cases" if k == 0 else None)
    ax.plot(steps, dice, "o-", color="C0", ms=3, label="mean")
    ax.axvline(model.infer_steps, color="C3", ls="--", label=f"chosen: {model.infer_steps} steps")
    ax.set_xlabel("inference steps (latent optimisation)")
    ax.set_ylabel("mean foreground Dice (validation)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_nisf(ds: Dataset, train, val, test, cfg: NISFConfig, device: str) -> tuple[NISF, MethodResult, float]:
    """Prior training (timed), the steps curve on ``val`` (timed apart), test scoring."""
    model = NISF(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg).to(device)
    t0 = time.perf_counter()
    model.fit(train, None)                        # prior only; the steps curve follows
    prior_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = [c.load() for c in val]
    model.infer_steps, model.val_curve = model.select_infer_steps(pairs)
    curve_s = time.perf_counter() - t0
    summary, secs = evaluate_cases(model, test, ds.num_classes)
    summary["per_class"] = {ds.label_names[int(k[1:])]: v for k, v in summary["per_class"].items()}
    res = MethodResult("nisf", ds.name, summary, num_params(model), prior_s, statistics.median(secs),
                       {"prior steps": model.history[-1]["step"] if model.history else 0,
                        "curve s": curve_s, "infer steps": model.infer_steps})
    return model, res, curve_s


def heldout_table(model: NISF, test, axis: int, every: int, names: list[str]) -> tuple[dict, list[dict]]:
    """Held-out-slice Dice per test case, and the mean row."""
    rows, per_class = [], []
    for case in test:
        image, labels = case.load()
        idx = heldout_indices(image.shape[axis], every)
        t0 = time.perf_counter()
        r = model.predict_heldout(image, axis, idx, labels)
        shown = ",".join(map(str, idx)) if len(idx) <= 6 else f"{idx[0]},{idx[1]},...,{idx[-1]} ({len(idx)})"
        rows.append({"case": case.case_id, "held-out slices": shown,
                     "held-out Dice": r.heldout_mean_foreground_dice,
                     "observed Dice": r.observed_mean_foreground_dice, "s": time.perf_counter() - t0})
        per_class.append(r.heldout_dice)
    pc = np.nanmean(np.stack(per_class), 0)
    mean = {"case": f"mean of {len(rows)}", "held-out slices": f"axis {axis}, every {every}",
            "held-out Dice": float(np.nanmean([r["held-out Dice"] for r in rows])),
            "observed Dice": float(np.nanmean([r["observed Dice"] for r in rows])),
            **{f"held-out {n}": float(pc[c]) for c, n in enumerate(names) if c > 0}}
    return mean, rows


def superres_dice(model: NISF, test, num_classes: int) -> dict:
    """Fit on the 2x-downsampled image; Dice of the 2x-grid query and of nearest up-sampling."""
    query, nearest = [], []
    for case in test:
        image, labels = case.load()
        low = downsample2(image)
        fit = model.fit_latents([low])[0]
        nd = 3 if image.spatial_ndim == 4 else image.spatial_ndim
        scale = (2.0,) * nd + ((1.0,) if image.spatial_ndim == 4 else ())
        fine = model.segment(fit, scale).data
        coarse = model.segment(fit, 1.0).data
        for k in range(nd):
            coarse = np.repeat(coarse, 2, axis=k)
        full = fine.shape
        gt = labels.data[tuple(slice(0, n) for n in full)]
        query += frame_metrics(fine, gt, num_classes, distances=False)
        nearest += frame_metrics(coarse, gt, num_classes, distances=False)
    names = [f"c{i}" for i in range(num_classes)]
    return {"query 2x grid": summarize(query, names)["mean_foreground_dice"],
            "nearest up-sampling": summarize(nearest, names)["mean_foreground_dice"]}


def per_class_rows(results: list[MethodResult], names: list[str]) -> list[dict]:
    rows = []
    for r in results:
        row = {"method": r.method}
        for n in names[1:]:
            pc = r.summary["per_class"].get(n, {})
            row[f"{n} Dice"] = pc.get("dice", float("nan"))
            row[f"{n} HD95"] = pc.get("hd95_mm", float("nan"))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="cardiac", choices=DATASETS)
    ap.add_argument("--preset", default="nisf-cpu", help="NISF preset (nisf-cpu, nisf-cpu-small, nisf-paper)")
    ap.add_argument("--minutes", type=float, default=25.0, help="prior-training budget")
    ap.add_argument("--steps", type=int, default=None, help="prior-training steps (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an NISFConfig field (repeatable)")
    ap.add_argument("--device", default="cpu", help="NISF device (cuda for the paper settings)")
    ap.add_argument("--heldout-axis", type=int, default=None, help="default: 2 (3D, 3D+t), 1 (2D)")
    ap.add_argument("--heldout-every", type=int, default=4)
    ap.add_argument("--no-heldout", action="store_true")
    ap.add_argument("--no-superres", action="store_true")
    ap.add_argument("--compare", action="store_true", help="also MetaSeg and the supervised baseline(s)")
    ap.add_argument("--baselines", default=None, help="comma list of supervised presets for --compare "
                                                      "(default: segresnet in 3D, unet-paper in 2D)")
    ap.add_argument("--meta-minutes", type=float, default=12.0, help="MetaSeg meta-training budget")
    ap.add_argument("--baseline-minutes", type=float, default=8.0, help="supervised training budget")
    ap.add_argument("--meta-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a MetaSegConfig field (repeatable)")
    ap.add_argument("--max-test", type=int, default=None, help="score only the first N test cases")
    ap.add_argument("--max-train-subjects", type=int, default=None, help="smoke tests: fewer subjects")
    ap.add_argument("--cardiac-shape", default="64,64,8")
    ap.add_argument("--cardiac-frames", type=int, default=12)
    ap.add_argument("--cardiac-subjects", default="16,4", help="training,test subjects")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare and args.dataset not in META_PRESET:
        raise SystemExit("--compare is for brain2d-seg4 / brain3d-seg4")
    t_start = time.perf_counter()

    tmp = None
    if args.dataset == "cardiac":
        tmp = tempfile.TemporaryDirectory(prefix="nisf-bench-")
        shape = tuple(int(v) for v in args.cardiac_shape.split(","))
        n_tr, n_te = (int(v) for v in args.cardiac_subjects.split(","))
        ds = cardiac_dataset(Path(tmp.name) / "cardiac", shape, args.cardiac_frames, n_tr, n_te)
        data_note = (f"Cardiac phantom (UK Biobank layout, generated for this run): {n_tr} training + {n_te} "
                     f"test subjects, {shape} voxels x {args.cardiac_frames} frames, seed 0.")
    else:
        ds = open_dataset(SHARED_DATA / args.dataset)
        data_note = f"Data: {SHARED_DATA / args.dataset}."
    cases = ds.train
    if args.max_train_subjects:
        keep = sorted({c.subject_id for c in cases})[: args.max_train_subjects]
        cases = [c for c in cases if c.subject_id in keep]
    train, val = split_by_subject(cases, 0.2, seed=0)
    test = ds.test[: args.max_test] if args.max_test else ds.test
    over = parse_overrides(NISFConfig, args.set)
    if args.steps:
        over["steps"] = args.steps
    cfg = config_from_preset(args.preset, budget_minutes=args.minutes, **over)
    print(f"{ds.name}: {len(train)} train / {len(val)} val / {len(test)} test cases; NISF {args.preset}",
          flush=True)

    results, sections = [], {}
    model, res, _ = run_nisf(ds, train, val, test, cfg, args.device)
    results.append(res)
    print(markdown_table([res.row()]), flush=True)

    now = _dt.datetime.now(_dt.timezone.utc)
    png = plot_val_curve(model, RESULTS / f"{now:%Y-%m-%d}-nisf-{args.dataset}-val-curve.png",
                         f"NISF {args.preset} on {ds.name}: validation Dice vs steps")
    curve_rows = [{"step": c["step"], "val mean fg Dice": c["dice"]} for c in model.val_curve]

    extra_rows = {}
    if args.compare:
        from harness import supervised_factory
        from inrseg.methods.metaseg import PRESETS as META_PRESETS
        from inrseg.methods.metaseg import MetaSeg, MetaSegConfig

        mp = META_PRESET[args.dataset]
        mcfg = MetaSegConfig(**{**META_PRESETS[mp], **parse_overrides(MetaSegConfig, args.meta_set)},
                             budget_minutes=args.meta_minutes)
        meta, mres = run_method(f"metaseg {mp}", lambda d: MetaSeg(d.label_names, d.spatial_ndim,
                                                                    len(d.channel_names), mcfg),
                                ds, train, val, test)
        mres.extra = {"T_f": meta.t_f}
        mres.params = meta.num_params             # harness.num_params misses MetaSeg's dict of tensors
        results.append(mres)
        extra_rows[mres.method] = meta
        print(markdown_table([mres.row()]), flush=True)
        bases = (args.baselines or ("segresnet" if ds.spatial_ndim == 3 else "unet-paper")).split(",")
        for b in bases:
            bm, bres = run_method(b, supervised_factory(b, args.baseline_minutes), ds, train, val, test)
            results.append(bres)
            extra_rows[b] = bm
            print(markdown_table([bres.row()]), flush=True)

    sections[f"{ds.name}: test cases ({len(test)})"] = markdown_table([r.row() for r in results])
    sections["Per class (test): Dice and HD95 (mm)"] = markdown_table(per_class_rows(results, ds.label_names))
    sections["Validation Dice against inference steps"] = (
        f"![Dice vs inference steps]({png.name})\n\n" + markdown_table(curve_rows))

    if not args.no_heldout:
        axis = args.heldout_axis if args.heldout_axis is not None else (1 if ds.spatial_ndim == 2 else 2)
        mean, rows = heldout_table(model, test, axis, args.heldout_every, ds.label_names)
        sections["Held-out slices (latent fitted without them), test cases"] = (
            markdown_table([mean]) + "\n\n" + markdown_table(rows))
        print(sections["Held-out slices (latent fitted without them), test cases"], flush=True)

    if not args.no_superres:
        sr = superres_dice(model, test, ds.num_classes)
        sr_rows = [{"method": "nisf", "labels from": "latent queried on the 2x grid",
                    "mean fg Dice": sr["query 2x grid"]},
                   {"method": "nisf", "labels from": "coarse-grid labels, nearest up-sampling",
                    "mean fg Dice": sr["nearest up-sampling"]}]
        for name, m in extra_rows.items():
            sr_rows.append({"method": name, "labels from": "predict(scale=2) on the low-res image",
                            "mean fg Dice": lowres_dice(m, test, ds.num_classes)})
        sections["2x super-resolution: fit on the 2x-downsampled image, full-resolution labels"] = \
            markdown_table(sr_rows)
        print(markdown_table(sr_rows), flush=True)

    notes = (f"{data_note} Validation: 20 % of the training subjects, by subject (seed 0); "
             f"{len(train)} train / {len(val)} val / {len(test)} test cases. NISF preset `{args.preset}`, "
             f"prior-training budget {args.minutes} min (`train s` = prior training only; `curve s` = the "
             f"validation steps curve that chooses `infer steps`), device {args.device}; config "
             f"`{json.dumps(dataclasses.asdict(cfg))}`."
             + (f" Compared: MetaSeg ({args.meta_minutes} min), supervised ({args.baseline_minutes} min)."
                if args.compare else "")
             + " Inference seconds are per case (median). 3D+t cases are scored per frame."
             f" Total wall time {time.perf_counter() - t_start:.0f} s.")
    path = write_results(f"nisf-{args.dataset}", sections, notes)
    print(markdown_table([r.row() for r in results]))
    print(f"wrote {path} and {png}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
