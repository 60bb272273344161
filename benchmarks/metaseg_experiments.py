"""MetaSeg controlled experiments (issue 10): one named recipe per run, with the diagnostic.

Each run trains MetaSeg on a dataset (by default brain2d-seg4 down-sampled 2x to 80 x 96, where
the paper's whole-image recipe fits a CPU: image 2 x 2 mean, labels every second pixel, voxel
spacing doubled), chooses everything on the validation subjects, and reports:

* the diagnostic: validation Dice against test-time steps T in {0, 2, 5, 10, 25, 50, 100, 200}
  for the meta-learned head and for the phase-2 head (figure + table), and the per-class
  "atlas Dice" at T = 0 and 2;
* the meta-training validation curve and the T_f selection;
* the test subjects' Dice (mean foreground, per class) at the chosen T_f and the time per slice.

    python benchmarks/metaseg_experiments.py --experiment a-paper --steps 2000 --budget-minutes 14
    python benchmarks/metaseg_experiments.py --list

Writes ``benchmarks/results/<date>-metaseg-exp-<name>.md`` and ``...-diagnostic.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import RESULTS, SHARED_DATA, evaluate_cases, markdown_table, write_results  # noqa: E402

#: name -> (description, overrides of metaseg_config("2d-seg4", paper=...))
EXPERIMENTS: dict[str, tuple[str, dict]] = {
    "cpu-default": ("the CPU defaults of the preset: the paper's joint inner loop and lr 1e-4 on "
                    "2,048-pixel subsets, cosine outer lr with warm-up, 4,096-pixel test-time steps, "
                    "T_f among 25 / 50 / 100; 2d-seg4 (3d-seg4 since f606f96) since 2026-12-05: a phase-2 "
                    "head with 4-voxel context, trained at lr 1e-3 for 500 steps, on every training image", dict(paper=False)),
    "f-more-signal": ("the CPU defaults with a less noisy meta-gradient: 4,096-pixel subsets and 2 tasks per "
                      "outer step (4x the step cost)", dict(paper=False, points_per_task=4096, meta_batch=2)),
    "old-cpu-default": ("the CPU defaults before 2026-11-22: 2,048-pixel subsets, pixels-only inner loop, "
                        "inner / test / phase-2 lr 1e-3, constant outer lr 1e-4, T_f among 50-300",
                        dict(paper=False, inner_loss="pixels", inner_lr=1e-3, phase2_lr=1e-3,
                             outer_schedule="constant", outer_warmup=0, val_every=50,
                             tf_candidates=(50, 100, 200, 300))),
    "a-paper": ("the paper's recipe: whole images, lr 1e-4 inside and out, 2 inner steps, the joint "
                "(label-informed) inner loop, T_f 100", dict(paper=True, tf_candidates=(100,))),
    "b-matched": ("(a) with test-time movement matched to meta-training: T_f chosen among 2, 5, 10 "
                  "(the inner loop takes 2 steps)", dict(paper=True, tf_candidates=(2, 5, 10))),
    "c-metasgd": ("(a) with an SGD inner loop and learned per-parameter learning rates (Meta-SGD, "
                  "init 1e-2), SGD with those rates at test time",
                  dict(paper=True, meta_sgd=True, inner_optimizer="sgd", inner_lr=1e-2,
                       tf_candidates=(2, 5, 10, 25, 50, 100))),
    "d-same-pixels": ("(a) on 2,048-pixel subsets, the outer loss on the same pixels as the first "
                      "inner step", dict(paper=True, points_per_task=2048, query_pixels="same")),
    "d-fresh-pixels": ("(a) on 2,048-pixel subsets, the outer loss on fresh pixels",
                       dict(paper=True, points_per_task=2048, query_pixels="fresh")),
    "e-cosine": ("(a) with the outer lr warmed up over 5 % of the steps, then cosine-decayed",
                 dict(paper=True, outer_schedule="cosine", outer_warmup=-1)),
}


def downsample_dataset(src: Path, dst: Path, factor: int) -> Path:
    """An nnU-Net copy of 2D dataset ``src`` at 1/``factor`` resolution: image ``factor^2`` mean,
    labels every ``factor``-th pixel, voxel spacing x ``factor``."""
    from inrseg.data.io import Volume, save_image, save_labels
    from inrseg.data.layouts import open_dataset

    ds = open_dataset(src)
    for cases, part in ((ds.train, "Tr"), (ds.test, "Ts")):
        for case in cases:
            image, labels = case.load()
            c, h, w = image.data.shape
            h2, w2 = h // factor, w // factor
            img = image.data[:, :h2 * factor, :w2 * factor].reshape(c, h2, factor, w2, factor).mean((2, 4))
            lab = labels.data[:h2 * factor:factor, :w2 * factor:factor]
            affine = np.array(image.affine, float)
            affine[:3, :2] *= factor
            like = Volume(lab, affine, 2)
            for ch in range(c):
                save_image(img[ch].astype(np.float32), dst / f"images{part}" / f"{case.case_id}_{ch:04d}.nii.gz",
                           like=like)
            save_labels(lab, dst / f"labels{part}" / f"{case.case_id}.nii.gz", like=like)
    meta = json.loads((src / "dataset.json").read_text())
    meta["name"] = f"{meta.get('name', src.name)}-x{factor}"
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="a-paper", help="one of --list")
    ap.add_argument("--list", action="store_true", help="print the experiments and exit")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "brain2d-seg4")
    ap.add_argument("--downsample", type=int, default=2, help="1 keeps the full resolution")
    ap.add_argument("--steps", type=int, default=None,
                    help="outer steps (the schedules' length; default: the config's)")
    ap.add_argument("--preset", default="2d-seg4", help="MetaSeg preset (2d-seg4, 2d-seg24, 3d-seg4)")
    ap.add_argument("--unet-minutes", type=float, default=0.0,
                    help="also train the U-Net (unet-small) for this many minutes on the same split "
                         "and score it on the same test subjects, in the same run")
    ap.add_argument("--budget-minutes", type=float, default=None, help="bounds the whole fit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a MetaSegConfig field (repeatable; values parsed as JSON, "
                         "else kept as strings; lists become tuples)")
    ap.add_argument("--tag", default=None, help="suffix of the result file's name")
    ap.add_argument("--save", type=Path, default=None,
                    help="also save the trained model (a checkpoint that inrseg segment reads)")
    ap.add_argument("--load", type=Path, default=None,
                    help="score a model saved by --save (same data, split and config) instead of training one; "
                         "its training time is the one stored in it")
    ap.add_argument("--redo-phase2", action="store_true",
                    help="with --load: keep the meta-learned SIREN and head, redo phase 2 and the choice of "
                         "T_f with this experiment's config (--set phase2_...); training time = stored "
                         "meta-training + the new phase 2")
    args = ap.parse_args()
    if args.list:
        for name, (desc, over) in EXPERIMENTS.items():
            print(f"{name:16s} {desc}\n{'':16s} {over}")
        return
    from inrseg.methods.metaseg import metaseg_config
    from inrseg.data.layouts import open_dataset, split_by_subject
    from inrseg.viz.figures import DIAGNOSTIC_STEPS, metaseg_diagnostic, plot_diagnostic
    from inrseg.methods.metaseg import MetaSeg
    from inrseg.engine import Budget, resolve_device

    torch.set_num_threads(args.threads)
    desc, over = EXPERIMENTS[args.experiment]
    over = dict(over)
    paper = over.pop("paper")
    if args.steps is not None:
        over["steps"] = args.steps
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        over[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data if args.downsample == 1 else downsample_dataset(args.data, Path(tmp) / "ds", args.downsample)
        ds = open_dataset(data)
        names0 = ds.label_names
        train, val = split_by_subject(ds.train, 0.2, seed=0)
        test = ds.test[:args.max_test] if args.max_test else ds.test
        cfg = metaseg_config(args.preset, paper=paper, seed=args.seed, **over)
        if cfg.outer_warmup == -1:
            cfg = dataclasses.replace(cfg, outer_warmup=max(1, cfg.steps // 20))
        dev = resolve_device(args.device)
        model = MetaSeg(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg, device=dev)
        shape = ds.train[0].load_image().shape
        print(f"{args.experiment}: {desc}\n{ds.name} {shape}: {len(train)} train / {len(val)} val / "
              f"{len(test)} test", flush=True)
        if args.load is not None:
            model = MetaSeg.load(args.load, device=dev)
            phase2 = {"phase2_", "head_context", "tf_candidates", "val_points"}
            differs = {k for k in vars(cfg) if getattr(cfg, k) != getattr(model.config, k)}
            if differs and not (args.redo_phase2 and all(k.startswith(tuple(phase2)) for k in differs)):
                raise SystemExit(f"{args.load}: its config differs from this experiment's in {sorted(differs)}")
            if args.redo_phase2:
                model.config = cfg
                model.params.update(model.meta_head)
                t0 = time.perf_counter()
                model.select_tf_and_head([model._prepare(*c.load()) for c in train],
                                         [model._prepare(*c.load()) for c in val])
                model.timings["phase2_and_tf_s"] = time.perf_counter() - t0
            train_s = model.timings["meta_train_s"] + model.timings["phase2_and_tf_s"]
        else:
            t0 = time.perf_counter()
            model.fit(train, val, budget=Budget(args.budget_minutes))
            train_s = time.perf_counter() - t0
        if args.save is not None:
            model.save(args.save)
        val_pairs = [c.load() for c in val]
        t1 = time.perf_counter()
        diag = metaseg_diagnostic(model, val_pairs, DIAGNOSTIC_STEPS)
        diag_s = time.perf_counter() - t1
        summary, secs = evaluate_cases(model, test, ds.num_classes)
        unet_row = None
        if args.unet_minutes > 0:
            from harness import run_method, supervised_factory

            _, res = run_method("unet-small", supervised_factory("unet-small", args.unet_minutes, seed=args.seed),
                                ds, train, val, test=test, device=args.device)
            unet_row = {"method": f"U-Net (unet-small, {args.unet_minutes:g} min)",
                        "mean fg Dice": res.summary["mean_foreground_dice"],
                        "gen. Dice": res.summary["generalized_dice"], "HD95 mm": res.summary["hd95_mm"],
                        **{n: v["dice"] for n, v in res.summary["per_class"].items() if n != names0[0]},
                        "T_f": None, "s / slice (median)": res.infer_seconds_median,
                        "train s": res.train_seconds}
    names = ds.label_names
    steps_run = model.history[-1]["step"] if model.history else 0
    rows = [{"T": t, **{f"{h} head": diag[h][i]["dice"] for h in diag}} for i, t in enumerate(DIAGNOSTIC_STEPS)]
    atlas = [{"head": h, "T": c["step"], **{n: c["per_class"][k] for k, n in enumerate(names) if k > 0}}
             for h in diag for c in diag[h] if c["step"] in (0, 2)]
    per_class = summary["per_class"]
    test_row = {"method": f"MetaSeg {args.experiment}", "mean fg Dice": summary["mean_foreground_dice"], "gen. Dice": summary["generalized_dice"],
                "HD95 mm": summary["hd95_mm"],
                **{names[int(k[1:])]: v["dice"] for k, v in per_class.items() if int(k[1:]) > 0},
                "T_f": model.t_f, "s / slice (median)": statistics.median(secs), "train s": train_s}
    meta_curve = [{"step": h["step"], "outer loss": h["loss"], "val Dice (T=val_fit_steps)": h["val_dice"],
                   "time s": h.get("time_s")} for h in model.history]
    every = max(1, len(meta_curve) // 12)
    sections = {
        "Test subjects": markdown_table([test_row] + ([unet_row] if unet_row else [])),
        "Diagnostic: validation Dice against test-time steps T": markdown_table(rows),
        "Atlas Dice per class (validation, T = 0 and 2)": markdown_table(atlas),
        "T_f selection (validation)": markdown_table(model.tf_curve),
        "Meta-training validation (every few entries)": markdown_table(
            meta_curve[::every] + ([meta_curve[-1]] if (len(meta_curve) - 1) % every else [])),
    }
    res_txt = "at full resolution" if args.downsample == 1 else f"down-sampled {args.downsample}x"
    notes = (f"Experiment `{args.experiment}`: {desc}.\n\nData: `{args.data.name}` {res_txt}, "
             f"{' x '.join(map(str, shape))} ({len(train)} train / {len(val)} validation / "
             f"{len(test)} test {'slices' if len(shape) == 2 else 'images'}, split by subject, validation seed 0); device {dev}; "
             f"{args.threads} torch threads; seed {args.seed}. Training (meta-training + phase 2 + T_f) "
             f"{train_s:.0f} s, {steps_run} outer steps; diagnostic {diag_s:.0f} s. Everything chosen on "
             f"validation. Overrides: `{' '.join('--set ' + x for x in args.set) or 'none'}`. Config: `{json.dumps({k: v for k, v in vars(cfg).items()}, default=str)}`")
    tag = args.experiment + ("" if args.data.name == "brain2d-seg4" else f"-{args.data.name}") + \
        ("" if args.downsample == 2 else f"-x{args.downsample}") + (f"-{args.tag}" if args.tag else "")
    path = write_results(f"metaseg-exp-{tag}", sections, notes)
    png = plot_diagnostic(diag, RESULTS / f"{path.stem}-diagnostic.png",
                          title=f"MetaSeg {args.experiment} ({'x'.join(map(str, shape))})", t_f=model.t_f)
    with open(path, "a") as f:
        f.write(f"\n![diagnostic]({png.name})\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
