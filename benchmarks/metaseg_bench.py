"""MetaSeg against its supervised baseline on the shared data, in one run (issue: MetaSeg).

    python benchmarks/metaseg_bench.py --dataset brain2d-seg4 --meta-minutes 15 --unet-minutes 5 \\
        [--ablation] [--lowres] [--meta-sgd] [--threads 1] [--set key=value ...]

For the dataset: trains the baseline (a 6.5M-parameter MONAI U-Net in 2D, close to the paper's
7.7M; SegResNet 4.7M in 3D) and MetaSeg (the dataset's preset) on the training subjects, with
the validation subjects carved out by subject; scores both on the test subjects: mean
foreground Dice, generalized Dice, HD95 (mm), parameters, test-time seconds per image (median,
time.perf_counter), training wall time, and MetaSeg's chosen T_f.

``--ablation``: random initialisation vs meta-learned at the chosen T_f (random SIREN with the
meta-learned head; and random SIREN with a head retrained on its fitted features).
``--lowres``: fit / run on the 2x-downsampled image (2x2 mean pooling), predict at full
resolution (MetaSeg: query the fitted INR on the full grid; U-Net: upsample its logits), Dice
against the full-resolution labels.
``--meta-sgd``: also train MetaSeg with learned per-parameter inner learning rates and report
the Dice after 5 / 10 / 20 test-time steps against the plain model's at its T_f.

The figures are written to benchmarks/results/<date>-metaseg-<dataset>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import replace

import torch

from baselines import supervised_factory
from harness import SHARED_DATA, evaluate_cases, lowres_dice, markdown_table, run_method, write_results
from inrseg.data.layouts import open_dataset, split_by_subject
from inrseg.methods.metaseg import PRESETS, MetaSeg, MetaSegConfig
from inrseg.metrics import case_metrics, summarize

PRESET_OF = {"brain2d-seg4": "2d-seg4", "brain2d-seg24": "2d-seg24", "brain3d-seg4": "3d-seg4"}


def parse_sets(items: list[str]) -> dict:
    fields = {f.name: f for f in dataclasses.fields(MetaSegConfig)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown MetaSegConfig field {key!r}")
        if value.lower() in ("none", "true", "false"):
            out[key] = {"none": None, "true": True, "false": False}[value.lower()]
        elif "," in value:
            out[key] = tuple(int(v) for v in value.split(",") if v)
        else:
            out[key] = float(value) if any(c in value for c in ".e") else int(value)
    return out


def dice_at_steps(model: MetaSeg, cases, steps, num_classes: int) -> dict[int, float]:
    """Mean foreground Dice (mean over classes of per-class means) after each of ``steps``."""
    per_step = {t: [] for t in steps}
    for case in cases:
        image, labels = case.load()
        prepared = model._prepare(image)
        for t, theta in model.fit_theta([prepared], max(steps), snapshots=steps):
            pred = model.logits(theta, prepared.coords)[0].argmax(-1).reshape(image.shape).numpy()
            per_step[t].append(case_metrics(pred, labels.data, num_classes, distances=False))
    names = [f"c{i}" for i in range(num_classes)]
    return {t: summarize(m, names)["mean_foreground_dice"] for t, m in per_step.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brain2d-seg4", choices=sorted(PRESET_OF))
    ap.add_argument("--meta-minutes", type=float, default=15.0, help="MetaSeg meta-training budget")
    ap.add_argument("--unet-minutes", type=float, default=5.0, help="baseline training budget")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--lowres", action="store_true")
    ap.add_argument("--meta-sgd", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a MetaSegConfig field (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = open_dataset(SHARED_DATA / args.dataset)
    train, val = split_by_subject(ds.train, 0.2, seed=0)
    preset = PRESET_OF[args.dataset]
    cfg = MetaSegConfig(**{**PRESETS[preset], **parse_sets(args.set)}, budget_minutes=args.meta_minutes)
    print(f"{ds.name}: {len(train)} train / {len(val)} val / {len(ds.test)} test cases", flush=True)

    rows, sections, t_start = [], {}, time.perf_counter()
    base_name = "unet-paper" if ds.spatial_ndim == 2 else "segresnet"
    unet, res = run_method(base_name, supervised_factory(base_name, args.unet_minutes), ds, train, val)
    rows.append(res.row())
    print(markdown_table(rows), flush=True)

    def make_metaseg(d, c=cfg):
        return MetaSeg(d.label_names, d.spatial_ndim, len(d.channel_names), c)

    meta, res = run_method(f"metaseg {preset}", make_metaseg, ds, train, val)
    res.extra = {"T_f": meta.t_f, "meta steps": len(meta.history) and meta.history[-1].get("step")}
    rows.append(res.row())
    print(markdown_table(rows), flush=True)
    sections[f"{ds.name}: test subjects"] = markdown_table(rows)
    sections["MetaSeg: T_f selection on validation"] = markdown_table(meta.tf_curve)

    if args.ablation:
        abl = []
        rand = make_metaseg(ds)
        rand.t_f = meta.t_f
        head = {k: v for k, v in meta.params.items() if k.startswith("g.")}
        rand.params.update({k: v.clone() for k, v in head.items()})
        s, _ = evaluate_cases(rand, ds.test, ds.num_classes, distances=False)
        abl.append({"initialisation": "random SIREN, meta-learned head", "T_f": meta.t_f,
                    "mean fg Dice": s["mean_foreground_dice"]})
        rand2 = make_metaseg(ds, replace(cfg, tf_candidates=(meta.t_f,)))
        rand2.select_tf_and_head([rand2._prepare(*c.load()) for c in train],
                                 [rand2._prepare(*c.load()) for c in val])
        s, _ = evaluate_cases(rand2, ds.test, ds.num_classes, distances=False)
        abl.append({"initialisation": "random SIREN, head retrained on its fitted features (phase 2)",
                    "T_f": meta.t_f, "mean fg Dice": s["mean_foreground_dice"]})
        abl.append({"initialisation": "meta-learned (MetaSeg)", "T_f": meta.t_f,
                    "mean fg Dice": rows[-1]["mean fg Dice"]})
        sections["Ablation: initialisation at the chosen T_f"] = markdown_table(abl)
        print(sections["Ablation: initialisation at the chosen T_f"], flush=True)

    if args.lowres:
        lr_rows = [{"method": base_name, "fit on": "2x-downsampled", "scored at": "full resolution",
                    "mean fg Dice": lowres_dice(unet, ds.test, ds.num_classes)},
                   {"method": f"metaseg {preset}", "fit on": "2x-downsampled", "scored at": "full resolution",
                    "mean fg Dice": lowres_dice(meta, ds.test, ds.num_classes)}]
        sections["Low-resolution fit, full-resolution labels"] = markdown_table(lr_rows)
        print(sections["Low-resolution fit, full-resolution labels"], flush=True)

    if args.meta_sgd:
        msgd = make_metaseg(ds, replace(cfg, meta_sgd=True))
        t0 = time.perf_counter()
        msgd.fit(train, val)
        train_s = time.perf_counter() - t0
        steps = sorted({5, 10, 20, meta.t_f})
        d_sgd = dice_at_steps(msgd, ds.test, steps, ds.num_classes)
        d_plain = dice_at_steps(meta, ds.test, steps, ds.num_classes)
        sections["Meta-SGD: test Dice against test-time steps"] = markdown_table(
            [{"model": "MetaSeg", **{f"{t} steps": d_plain[t] for t in steps}},
             {"model": f"MetaSeg + Meta-SGD (train {train_s:.0f} s)", **{f"{t} steps": d_sgd[t] for t in steps}}])
        print(sections["Meta-SGD: test Dice against test-time steps"], flush=True)

    notes = (f"Reduced CPU settings: MetaSeg preset `{preset}`, meta-training budget {args.meta_minutes} min, "
             f"full config `{json.dumps(dataclasses.asdict(cfg))}`; baseline {base_name} trained for "
             f"{args.unet_minutes} min. Validation: 20 % of the training subjects, by subject. "
             f"Total wall time {time.perf_counter() - t_start:.0f} s.")
    path = write_results(f"metaseg-{args.dataset}", sections, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
