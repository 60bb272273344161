"""MORSE and its ablation variants per backbone, the structure of the paper's Tables 1-2 (issue: MORSE).

Reduced CPU settings (about 1 hour per dataset on 2 cores, nothing else running; ``--minutes``
is the budget of the most expensive variant, the cheaper ones finish sooner, so a backbone's five
variants take about 3-3.5 x M plus testing):

    python benchmarks/morse_bench.py --dataset brats2d      --minutes 8  --threads 2   # unet, transunet
    python benchmarks/morse_bench.py --dataset brain2d-seg4 --minutes 8  --threads 2   # unet, transunet
    python benchmarks/morse_bench.py --dataset brats3d      --minutes 15 --threads 2   # unet3d, 64^3 crops

Paper settings, for a GPU: ``--preset paper --steps 30000`` (AdamW 5e-4, polynomial decay,
batch 4 slices in 2D / 2 crops in 3D, ``--patch 96`` in 3D, SMoE / point-head widths 256 / 512,
TransUNet at ViT-B size but trained from scratch) - 10 models per 2D dataset.

For each backbone (``--backbones``; default ``unet,transunet`` in 2D, ``unet3d`` in 3D) the five
variants (``--variants``; baseline, + PointRend, + SMoE, + IAR, MORSE) are trained one after the
other in this process on the same split (validation: 20 % of the training subjects, by subject,
seed 0; the best validation checkpoint is kept) and scored on the test cases: DSC (mean
foreground Dice), Jaccard, HD95 and ASD in mm (the paper reports voxels; BraTS is 1 mm
isotropic), parameters, inference seconds per case (median; a case is a slice in 2D, a volume in
3D, sliding windows over volumes larger than the crop) and training seconds. One table per
backbone, the variants as rows, and a row MORSE - baseline.

Training length. ``T`` (``--steps``) sets the L_rend schedule (off until T/2) and the
learning-rate decay, so a run stopped early by a time limit would leave the point head of
PointRend / IAR / MORSE untrained. All variants of a backbone train for the same T (the paper
compares at equal iterations). With ``--minutes M`` and no ``--steps``, T is calibrated per
backbone on its most expensive variant chosen (MORSE when included): a throwaway copy times 3
training steps (L_rend on) and one validation prediction, and T is what fits into M minutes with
``--validations`` validation passes; M x 1.5 is then a hard stop per model. Calibration time is
not counted in ``train s``. The table shows T, the steps actually run and the steps with L_rend
active, so an incomplete schedule is visible.

CPU-sized settings (documented in the results file): backbone / head widths ``--preset cpu``
(U-Net 16-256, TransUNet 4 layers x 128, SMoE D = gate = 32, point head 256), 2D whole slices
in batches of 4, 3D ``--patch 64`` crops in batches of 2 (paper: 96^3), Bernoulli expert dropout
with alpha = 0.7 (the paper's; ``--expert-dropout none`` may suit very short CPU runs, where
dropping 70 % of the experts slows convergence), all other MORSE hyper-parameters as published.

Smoke test (seconds): ``--steps 4 --max-test 1 --backbones unet --set val_every=2 --max-val 1``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import numpy as np
import torch
from monai.losses import DiceCELoss

from harness import SHARED_DATA, markdown_table, parse_overrides, run_method, write_results
from inrseg.data.layouts import open_dataset, split_by_subject
from inrseg.data.sampling import PatchSampler
from inrseg.methods.morse import MORSE, VARIANTS, MorseConfig, morse_config, rend_weight

LABEL = {"baseline": "baseline", "pointrend": "+ PointRend", "smoe": "+ SMoE", "iar": "+ IAR",
         "morse": "MORSE"}


def calibrate(model: MORSE, train, val, n_validations: int, minutes: float) -> tuple[int, int, dict]:
    """Steps T (and the validation interval) that fit ``minutes`` for this model, timed on a copy."""
    cfg = model.config
    probe = copy.copy(model)
    probe.net = copy.deepcopy(model.net)
    imgs, labs = [], []
    for case in train[: max(1, min(len(train), cfg.batch_size))]:
        img, lab = case.load()
        imgs.append(probe._prepare(img))
        labs.append(torch.from_numpy(lab.data.astype(np.int64)))
    patch = probe._patch_size(np.max([x.shape[1:] for x in imgs], axis=0))
    sampler = PatchSampler(imgs, labs, patch, cfg.foreground_fraction, cfg.augment, cfg.seed)
    opt = torch.optim.AdamW(probe.net.parameters(), lr=cfg.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    times = []
    for k in range(4):                     # step 0 is a warm-up
        t0 = time.perf_counter()
        probe.net.train()
        x, y = sampler.batch(k, range(cfg.batch_size), probe.device)
        loss, _ = probe._losses(probe.net, x, y, rend_weight(cfg.steps, cfg.steps, cfg.lambda_rend), loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[1:]))
    val_s = 0.0
    if val:
        image, _ = val[0].load()
        probe.rend_steps = 1               # time the refined prediction (and the coarse one)
        t0 = time.perf_counter()
        probe.predict(image)
        one = time.perf_counter() - t0
        val_s = one * len(val) * (2 if cfg.uses_points else 1)
    budget = 60 * minutes - n_validations * val_s
    steps = max(10, int(budget / step_s))
    info = {"calib s/step": step_s, "calib s/validation": val_s}
    return steps, max(1, steps // max(1, n_validations)), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brats2d", help="a folder of ../shared/data (brats2d, brats3d, "
                                                         "brain2d-seg4, ...)")
    ap.add_argument("--backbones", default=None, help="comma list (default: unet,transunet in 2D; unet3d in 3D)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--minutes", type=float, default=None,
                    help="budget of the most expensive variant; without --steps, T is calibrated to fit it "
                         "(default 8 / 15 min in 2D / 3D)")
    ap.add_argument("--steps", type=int, default=None, help="T (the schedule's length); --minutes then only caps")
    ap.add_argument("--validations", type=int, default=None, help="validation passes per model "
                                                                  "(default 8 in 2D, 3 in 3D)")
    ap.add_argument("--preset", default="cpu", choices=("cpu", "paper"))
    ap.add_argument("--expert-dropout", default="bernoulli", choices=("bernoulli", "count", "none"))
    ap.add_argument("--patch", type=int, default=64, help="3D crop edge (paper: 96)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 4 (2D) / 2 (3D)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a MorseConfig field (repeatable)")
    ap.add_argument("--max-test", type=int, default=None, help="score only the first N test cases")
    ap.add_argument("--max-val", type=int, default=None, help="smoke tests: fewer validation cases")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ds = open_dataset(SHARED_DATA / args.dataset)
    nd = ds.spatial_ndim
    train, val = split_by_subject(ds.train, 0.2, seed=0)
    if args.max_val:
        val = val[: args.max_val]
    test = ds.test[: args.max_test] if args.max_test else ds.test
    backbones = (args.backbones or ("unet,transunet" if nd == 2 else "unet3d")).split(",")
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad} ({', '.join(VARIANTS)})")
    minutes = args.minutes if args.minutes is not None else (8.0 if nd == 2 else 15.0)
    n_valid = args.validations or (8 if nd == 2 else 3)
    over = parse_overrides(MorseConfig, args.set)
    if nd == 3:
        over.setdefault("patch_size", (args.patch,) * 3)
    if args.batch_size:
        over["batch_size"] = args.batch_size
    print(f"{ds.name}: {len(train)} train / {len(val)} val / {len(test)} test cases; backbones {backbones}",
          flush=True)

    sections, configs, verdicts, calib_notes = {}, {}, [], []
    for bb in backbones:
        rows, per_class = [], []
        if args.steps is None:
            # one T for every variant of a backbone (the paper compares at equal iterations),
            # calibrated on the most expensive variant chosen
            ref = next(v for v in ("morse", "smoe", "iar", "pointrend", "baseline") if v in variants)
            rcfg = morse_config(bb, ref, nd, args.preset, expert_dropout=args.expert_dropout, **over)
            probe = MORSE(ds.label_names, nd, len(ds.channel_names), rcfg)
            steps, every, info = calibrate(probe, train, val, n_valid, minutes)
            del probe
            cap = 1.5 * minutes
            calib_notes.append(f"{bb}: T = {steps} calibrated on `{ref}` ({info['calib s/step']:.3f} s/step, "
                               f"{info['calib s/validation']:.1f} s/validation pass)")
            print(calib_notes[-1], flush=True)
        else:
            steps, every, cap = args.steps, max(1, args.steps // n_valid), args.minutes
        for variant in variants:
            base = morse_config(bb, variant, nd, args.preset, expert_dropout=args.expert_dropout, **over)
            cfg = dataclasses.replace(base, steps=steps, budget_minutes=cap,
                                      val_every=over.get("val_every", every))
            configs[f"{bb}/{variant}"] = dataclasses.asdict(cfg)
            print(f"{bb}/{variant}: T = {cfg.steps}, validation every {cfg.val_every} steps", flush=True)

            def make(d, cfg=cfg):
                return MORSE(d.label_names, nd, len(d.channel_names), cfg)

            model, res = run_method(f"{bb} {LABEL[variant]}", make, ds, train, val, test, device=args.device)
            hist = model.history
            row = {"variant": LABEL[variant], "DSC": res.summary["mean_foreground_dice"],
                   "Jaccard": res.summary["jaccard"], "HD95 mm": res.summary["hd95_mm"],
                   "ASD mm": res.summary["asd_mm"], "params": model.num_params,
                   "infer s/case": res.infer_seconds_median, "train s": res.train_seconds,
                   "T": model.config.steps, "steps run": hist[-1]["step"] if hist else 0,
                   "rend steps": model.rend_steps, "best step": model.best_step}
            rows.append(row)
            per_class.append({"variant": LABEL[variant],
                              **{n: v["dice"] for n, v in res.summary["per_class"].items()
                                 if n != ds.label_names[0]}})
            print(markdown_table([row]), flush=True)
        by = {r["variant"]: r for r in rows}
        if "baseline" in by and "MORSE" in by:
            b, m = by["baseline"], by["MORSE"]
            rows.append({"variant": "MORSE - baseline",
                         **{k: m[k] - b[k] for k in ("DSC", "Jaccard", "HD95 mm", "ASD mm")},
                         "params": m["params"] - b["params"]})
            verdicts.append(f"{bb}: MORSE - baseline DSC {m['DSC'] - b['DSC']:+.4f}, HD95 "
                            f"{m['HD95 mm'] - b['HD95 mm']:+.2f} mm -> MORSE "
                            + ("beats" if m["DSC"] > b["DSC"] and m["HD95 mm"] < b["HD95 mm"] else "does not beat")
                            + " the baseline in both")
        sections[f"{ds.name}, backbone {bb}"] = markdown_table(rows)
        sections[f"{ds.name}, backbone {bb}: per-class DSC"] = markdown_table(per_class)
        print(sections[f"{ds.name}, backbone {bb}"], flush=True)

    if verdicts:
        sections["MORSE against the plain backbone (test DSC and HD95)"] = "\n".join(f"- {v}" for v in verdicts)
        print("\n".join(verdicts))
    sections["Configurations"] = "\n".join(f"- `{k}`: `{json.dumps(v)}`" for k, v in configs.items())
    if args.steps is None:
        how = (f"T calibrated per backbone so that its most expensive variant fits {minutes:g} min with "
               f"{n_valid} validation passes (hard stop {1.5 * minutes:g} min per model; "
               + "; ".join(calib_notes) + ")")
    else:
        how = f"T = {args.steps} steps" + (f", stop at {args.minutes:g} min" if args.minutes else "")
    notes = (f"CPU-sized settings: preset `{args.preset}`, expert dropout `{args.expert_dropout}`, {how}; "
             + (f"3D crops {over['patch_size']}, " if nd == 3 else "2D whole slices, ")
             + f"batch {base.batch_size}. Validation: 20 % of the training subjects, by subject (seed 0), "
             f"best validation checkpoint kept; {len(train)} train / {len(val)} val / {len(test)} test cases. "
             f"DSC / Jaccard / HD95 / ASD: means over foreground classes of per-class means over test cases "
             f"(HD95 / ASD in mm). Inference seconds per case (median). Total wall time "
             f"{time.perf_counter() - t_start:.0f} s.")
    path = write_results(f"morse-{args.dataset}", sections, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
