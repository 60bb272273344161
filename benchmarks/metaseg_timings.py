"""MetaSeg test-time and validation timings on a trained model, each path beside its reference.

* Test time per image (median of ``--cases`` test images): the whole ``predict`` (prepare, T_f
  test-time steps, the head on every voxel), and its two parts: the test-time fit, and the head
  on every voxel two ways - :meth:`MetaSeg.logits` at every voxel's coordinates (a context head
  evaluates the INR at 1 + 2d points per voxel) and :meth:`MetaSeg.image_logits` (features once
  on the padded grid, neighbours sliced out of it), with the largest logit difference and the
  number of voxels whose label differs between the two.
* With ``--val``: meta-training's validation (:meth:`MetaSeg._val_dice`, ``val_fit_steps`` test-
  time steps per image) on the validation split, scored on whole images and on
  ``val_max_voxels`` fixed random voxels, for a fresh model of ``--val-preset``.

    python benchmarks/metaseg_timings.py --model MODEL --data DATA --threads 2 --cases 10
    python benchmarks/metaseg_timings.py --val DATA3D --val-preset 3d-seg4 --threads 1

Writes ``benchmarks/results/<date>-metaseg-timings[-tag].md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import markdown_table, write_results  # noqa: E402


def timed(fn):
    """``(result, seconds)`` of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a MetaSeg checkpoint trained on --data")
    ap.add_argument("--data", type=Path, help="its dataset (test images: imagesTs)")
    ap.add_argument("--cases", type=int, default=10, help="test images timed")
    ap.add_argument("--val", type=Path, help="a dataset whose validation split times meta-training's validation")
    ap.add_argument("--val-preset", default="3d-seg4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    if args.model is None and args.val is None:
        ap.error("give --model and --data, or --val")

    from inrseg.data.layouts import open_dataset, split_by_subject
    from inrseg.methods.metaseg import MetaSeg, metaseg_config

    torch.set_num_threads(args.threads)
    sections, notes = {}, [f"{args.threads} torch threads."]
    if args.model is not None:
        ds = open_dataset(args.data)
        model = MetaSeg.load(args.model)
        rows = []
        for case in ds.test[:args.cases]:
            image, _ = case.load()
            _, whole = timed(lambda: model.predict(image))
            prep = model._prepare(image)

            def fit():
                theta = None
                for _, theta in model.fit_theta([prep], model.t_f):
                    pass
                return theta

            theta, fit_s = timed(fit)
            pointwise, point_s = timed(lambda: model.logits(theta, prep.coords, step=prep.step))
            grid, grid_s = timed(lambda: model.image_logits(theta, prep))
            rows.append({"case": case.case_id, "predict s": whole, "fit s": fit_s,
                         "head, pointwise s": point_s, "head, padded grid s": grid_s,
                         "max |logit diff|": float((pointwise - grid).abs().max()),
                         "labels that differ": int((pointwise.argmax(-1) != grid.argmax(-1)).sum())})
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith(" s")}
        sections["Test time per image (median)"] = markdown_table(
            [{"images": len(rows), "T_f": model.t_f, "head context": model.config.head_context, **med,
              "head speed-up": med["head, pointwise s"] / med["head, padded grid s"]}])
        sections["Per image"] = markdown_table(rows)
        notes.append(f"Model `{args.model.name}`, data `{args.data.name}` (test images, shape "
                     f"{tuple(prep.shape)}). `predict s` is the whole command's per-image work after loading.")
    if args.val is not None:
        ds = open_dataset(args.val)
        _, val = split_by_subject(ds.train, 0.2, seed=0)
        cfg = metaseg_config(args.val_preset)
        rows = []
        for cap in (None, cfg.val_max_voxels):
            model = MetaSeg(ds.label_names, ds.spatial_ndim, len(ds.channel_names),
                            dataclasses.replace(cfg, val_max_voxels=cap))
            vs = [model._prepare(*c.load()) for c in val[:cfg.val_max_cases]]
            dice, secs = timed(lambda: model._val_dice(vs, cfg.val_fit_steps))
            rows.append({"voxels scored": "all" if cap is None else cap, "images": len(vs),
                         "shape": "x".join(map(str, vs[0].shape)), "fit steps": cfg.val_fit_steps,
                         "seconds": secs, "val Dice (fresh model)": dice})
        sections["Meta-training validation"] = markdown_table(rows)
        notes.append(f"Validation: `{args.val.name}`, preset `{args.val_preset}`, an untrained model.")
    path = write_results("metaseg-timings" + (f"-{args.tag}" if args.tag else ""), sections, " ".join(notes))
    print(path.read_text())


if __name__ == "__main__":
    main()
