"""NISF prior study (issue 11, item 4): test Dice against prior-training time, from one run.

    python benchmarks/nisf_prior_study.py --preset nisf-cpu-small --minutes 6,20,60 --threads 1
    python benchmarks/nisf_prior_study.py --preset nisf-cpu-small --minutes 6,20 --augment 3 --tag aug3
    python benchmarks/nisf_prior_study.py --preset nisf-cpu-small --minutes 6,20 --set s0=1 --tag s0-1
    python benchmarks/nisf_prior_study.py --preset nisf-cpu-small --minutes 21 --set lr_schedule=cosine \
        --set steps=N --tag cosine     # N: the steps the constant-lr run made in 20 minutes

NISF's prior training has no learning-rate schedule (constant Adam lr), so training for 6 minutes,
stopping, and continuing from the saved training state to 20 and then 60 minutes is the same
training as three separate runs of 6, 20 and 60 minutes (the resume restores the network, the
latents, both Adam states and the step counter; the per-step random draws are indexed by step).
At each checkpoint, with the network frozen:

* the validation steps curve (Dice against latent-fitting steps on the validation subjects) is
  run and its best step chosen, as ``NISF.fit`` does; its step-0 point is the **step-0 Dice**:
  the prior's labels under the inference initialisation ``h ~ N(0, 1e-4)``, before any fitting;
* the test subjects are scored with the chosen steps (**fitted Dice**) and with 0 steps;
* 3 training subjects are scored under their trained latents (**own latent**: what the prior
  holds) and under latents fitted afresh to their images (**refitted**: what inference recovers
  of a subject the prior has seen).

The minutes are prior-training wall time only; the curve and the test scoring at each
checkpoint are timed apart and not counted. With ``--set steps=N`` a mark may end sooner, at
step N (``this leg s`` says when); with ``lr_schedule=cosine`` the lr reaches 0 at step N, so
use one mark. ``--augment K`` sets ``NISFConfig.augment``: K augmented copies of every
training volume (``inrseg.data.augment``: small random affine - rotation up to ``--aug-rotate``
rad, scaling up to ``--aug-scale``, labels nearest - plus random intensity scaling and gamma),
each with its own latent. ``NISF.fit`` makes them inside its budget, so each leg's minutes
include making them.

One split (validation: 20 % of the training subjects, by subject, seed 0), one seed. Results:
``benchmarks/results/<date>-nisf-prior-<dataset>-<preset>[-tag].md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import SHARED_DATA, evaluate_cases, markdown_table, parse_overrides, write_results
from inrseg.data.layouts import open_dataset, split_by_subject
from inrseg.methods.nisf import NISF, NISFConfig, config_from_preset
from inrseg.engine import OPEN_ENDED_STEPS, Budget


def train_diagnostic(model: NISF, pairs: list, k: int = 3) -> tuple[float, float]:
    """Mean foreground Dice on the first ``k`` training subjects ``(image, labels)``: under the
    latent the prior trained for each (what the prior holds: capacity), and under a latent
    fitted afresh to the image alone, as at test time, for the chosen steps (what inference
    recovers of a subject the prior knows). Test << refitted points at generalisation; refitted
    << own latent at the fit (reconstruction does not pin the labels)."""
    pairs = pairs[:k]
    subs = [model._prepare(img, lab) for img, lab in pairs]
    gts = [s.labels.numpy().reshape(s.shape) for s in subs]
    own = model._curve_scores(subs, gts, model.train_latents[: len(pairs)])
    fits = model.fit_latents([img for img, _ in pairs])
    refit = model._curve_scores(subs, gts, torch.stack([f.latent for f in fits]))
    return float(np.mean(own)), float(np.mean(refit))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brain3d-seg4")
    ap.add_argument("--preset", default="nisf-cpu-small")
    ap.add_argument("--minutes", default="6,20,60", help="cumulative prior-training minutes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an NISFConfig field (repeatable)")
    ap.add_argument("--augment", type=int, default=0, help="augmented copies per training volume")
    ap.add_argument("--aug-rotate", type=float, default=0.1, help="max rotation per axis (rad)")
    ap.add_argument("--aug-scale", type=float, default=0.1, help="max relative scaling")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    marks = [float(m) for m in args.minutes.split(",")]
    if any(b <= a for a, b in zip(marks, marks[1:])) or marks[0] <= 0:
        raise SystemExit("--minutes must be increasing positive numbers")
    t_start = time.perf_counter()

    ds = open_dataset(SHARED_DATA / args.dataset)
    train, val = split_by_subject(ds.train, 0.2, seed=0)
    test = ds.test
    over = parse_overrides(NISFConfig, args.set)
    if args.augment:
        over.update(augment=args.augment, augment_rotate=args.aug_rotate, augment_scale=args.aug_scale)
    cfg = config_from_preset(args.preset, **{"steps": OPEN_ENDED_STEPS, "save_every": 200, **over})
    device = torch.device(args.device)
    model = NISF(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg).to(device)
    val_pairs = [c.load() for c in val]
    train_pairs = [c.load() for c in train[:3]]

    train_items: list = list(train)
    print(f"{ds.name}: {len(train)} train ({len(train) * (1 + cfg.augment)} volumes with augmentation) / "
          f"{len(val)} val / {len(test)} test; NISF {args.preset} {over}", flush=True)

    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="nisf-prior-") as tmp:
        state = Path(tmp) / "state.safetensors"
        done_min = 0.0
        for m in marks:
            t0 = time.perf_counter()
            model.fit(train_items, None, state_path=state, budget=Budget(m - done_min))
            prior_s = time.perf_counter() - t0
            done_min = m
            steps = model.history[-1]["step"] if model.history else 0
            t0 = time.perf_counter()
            model.infer_steps, model.val_curve = model.select_infer_steps(val_pairs)
            curve_s = time.perf_counter() - t0
            curves[m] = model.val_curve
            fitted, secs = evaluate_cases(model, test, ds.num_classes)
            chosen = model.infer_steps
            model.infer_steps = 0
            step0, _ = evaluate_cases(model, test, ds.num_classes, distances=False)
            model.infer_steps = chosen
            train_own, train_refit = train_diagnostic(model, train_pairs)
            row = {"prior min": m, "prior steps": str(steps), "this leg s": round(prior_s),
                   "val Dice step 0": model.val_curve[0]["dice"],
                   "val Dice best": max(c["dice"] for c in model.val_curve),
                   "infer steps": chosen,
                   "train Dice own latent": train_own, "train Dice refitted": train_refit,
                   "test Dice step 0": step0["mean_foreground_dice"],
                   "test Dice fitted": fitted["mean_foreground_dice"],
                   "test HD95 mm": fitted["hd95_mm"],
                   **{f"{ds.label_names[int(k[1:])]}": v["dice"] for k, v in fitted["per_class"].items()
                      if int(k[1:]) > 0},
                   "curve s": round(curve_s), "infer s/case": float(np.median(secs))}
            rows.append(row)
            print(markdown_table([row]), flush=True)

    curve_rows = []
    for m, curve in curves.items():
        curve_rows.append({"prior min": m, **{f"step {c['step']}": c["dice"] for c in curve}})
    tag = f"-{args.tag}" if args.tag else ""
    notes = (f"Data: {SHARED_DATA / args.dataset}; {len(train)} train / {len(val)} val / {len(test)} test "
             f"subjects (validation: 20 % of the training subjects, by subject, seed 0). NISF preset "
             f"`{args.preset}`, overrides `{json.dumps(over)}`, augmentation: {args.augment} copies per "
             f"training volume (rotate {cfg.augment_rotate} rad, scale {cfg.augment_scale}; made inside "
             f"each leg's minutes). Prior training is resumed from its saved state at each mark, so a row is "
             f"the prior after that many minutes of training (constant lr: the same as a run of that "
             f"length). `prior min` counts prior training only; the validation steps curve (`curve s`) and "
             f"test scoring are apart. Device {device}, {torch.get_num_threads()} torch threads. Config "
             f"`{json.dumps(dataclasses.asdict(cfg))}`. Total wall time {time.perf_counter() - t_start:.0f} s.")
    sections = {"Test Dice against prior-training minutes": markdown_table(rows),
                "Validation Dice against inference steps, at each mark": markdown_table(curve_rows)}
    path = write_results(f"nisf-prior-{args.dataset}-{args.preset}{tag}", sections, notes)
    print(markdown_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
