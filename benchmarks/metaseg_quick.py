"""Quick MetaSeg benchmark on brain2d-seg4 (or any 2D/3D nnU-Net dataset) under a CPU budget.

Trains on the training subjects (validation subjects carved out by subject with
``split_by_subject``), tests on ``ds.test``, and prints mean foreground Dice, generalized Dice,
HD95 (mm), the parameter count, test-time seconds per image (median, one image at a time and
batched) and the chosen T_f.

    python benchmarks/metaseg_quick.py --budget-minutes 6 --threads 2 \\
        [--preset 2d-seg4] [--set inner_lr=1e-3 --set phase2_steps=300 ...] [--json out.json]

``--budget-minutes`` bounds the meta-training loop; phase 2, the choice of T_f and the test
set come on top (their times are printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from inrseg.data.layouts import open_dataset, split_by_subject
from inrseg.methods.metaseg import PRESETS, MetaSeg, MetaSegConfig
from inrseg.metrics import case_metrics, summarize

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain2d-seg4"


def parse_value(field: dataclasses.Field, text: str):
    """Convert ``text`` to the type of a config field (ints, floats, bools, None, tuples)."""
    if text.lower() == "none":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "," in text or str(field.type).startswith("tuple"):
        return tuple(int(v) for v in text.split(",") if v)
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--budget-minutes", type=float, default=6.0, help="meta-training wall time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="2d-seg4", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a MetaSegConfig field (repeatable)")
    ap.add_argument("--max-test", type=int, default=None, help="score only the first N test cases")
    ap.add_argument("--save", type=Path, default=None, help="write the checkpoint here")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    fields = {f.name: f for f in dataclasses.fields(MetaSegConfig)}
    overrides = dict(PRESETS[args.preset])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown config field {key!r}")
        overrides[key] = parse_value(fields[key], value)
    cfg = MetaSegConfig(**{**overrides, "budget_minutes": args.budget_minutes})

    ds = open_dataset(args.data)
    train, val = split_by_subject(ds.train, val_fraction=0.2, seed=cfg.seed)
    test = ds.test[: args.max_test] if args.max_test else ds.test
    print(f"{ds.name}: {len(train)} train / {len(val)} val / {len(test)} test cases; config {overrides}")

    model = MetaSeg(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg)
    t0 = time.perf_counter()
    model.fit(train, val)
    fit_s = time.perf_counter() - t0
    if args.save:
        model.save(args.save)

    per_case, times = [], []
    loaded = [c.load() for c in test]
    for image, labels in loaded:
        t = time.perf_counter()
        pred = model.predict(image)
        times.append(time.perf_counter() - t)
        per_case.append(case_metrics(pred.data, labels.data, ds.num_classes, spacing=image.spacing))
    summary = summarize(per_case, ds.label_names)
    # batched test-time fitting throughput (same predictions, several images per fit)
    nb = min(cfg.fit_batch, len(loaded))
    t = time.perf_counter()
    model.predict_batch([im for im, _ in loaded[:nb]])
    batched_s = (time.perf_counter() - t) / nb

    figures = {
        "dataset": ds.name, "threads": args.threads, "budget_minutes": args.budget_minutes,
        "config": dataclasses.asdict(cfg), "params": model.num_params, "t_f": model.t_f,
        "meta_steps_done": model.history[-1]["step"] if model.history else 0,
        "best_meta_step": model.best_step, "fit_seconds": fit_s, "timings": model.timings,
        "mean_foreground_dice": summary["mean_foreground_dice"],
        "generalized_dice": summary["generalized_dice"], "hd95_mm": summary["hd95_mm"],
        "per_class_dice": {k: v["dice"] for k, v in summary["per_class"].items()},
        "test_seconds_per_image_median": statistics.median(times),
        "test_seconds_per_image_batched": batched_s, "fit_batch": nb,
        "tf_curve": model.tf_curve, "history": model.history,
    }
    print(json.dumps({k: v for k, v in figures.items() if k not in ("config", "history")}, indent=1))
    print(f"RESULT mean_fg_dice={figures['mean_foreground_dice']:.4f} "
          f"generalized_dice={figures['generalized_dice']:.4f} hd95_mm={figures['hd95_mm']:.2f} "
          f"params={model.num_params} T_f={model.t_f} test_s/img={figures['test_seconds_per_image_median']:.2f} "
          f"(batched {batched_s:.2f}) fit_s={fit_s:.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1, default=float))


if __name__ == "__main__":
    main()
