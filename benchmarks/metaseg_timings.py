"""MetaSeg test-time and validation timings on a trained model, each path beside its reference.

* Test time per image (median of ``--cases`` test images): the whole ``predict`` (prepare, T_f
  test-time steps, the head on every voxel), and its two parts: the test-time fit
  (:meth:`~inrseg.methods.metaseg.fitting.TestTimeFit.fitted_theta`), and the head on every
  voxel two ways - :meth:`~inrseg.methods.metaseg.fitting.TestTimeFit.point_logits` at every
  voxel's coordinates (a context head evaluates the INR at 1 + 2d points per voxel) and
  :meth:`~inrseg.methods.metaseg.fitting.TestTimeFit.image_logits` (features once on the padded
  grid, neighbours sliced out of it), with the largest logit difference and the number of voxels
  whose label differs between the two.
* With ``--val``: meta-training's validation (:func:`~inrseg.methods.metaseg.meta.validation_dice`,
  ``val_fit_steps`` test-time steps per image) on the validation split, scored on whole images
  and on ``val_max_voxels`` fixed random voxels, for a fresh model of ``--val-preset``.

    python benchmarks/metaseg_timings.py --model MODEL --data DATA --threads 2 --cases 10
    python benchmarks/metaseg_timings.py --val DATA3D --val-preset 3d-seg4 --threads 1

Writes ``benchmarks/results/<date>-metaseg-timings[-tag][-k].md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from inrseg.data.layouts import open_dataset
from inrseg.data.splits import split_by_subject
from inrseg.eval.provenance import write_result_file
from inrseg.methods.metaseg import MetaSeg
from inrseg.methods.metaseg.meta import validation_dice
from inrseg.methods.registry import resolve

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn):
    """``(result, seconds)`` of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def table(rows: list[dict]) -> str:
    """Rows of dicts -> a markdown table (floats to 4 decimals)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = (lambda v: ("nan" if not np.isfinite(v) else f"{v:.4f}") if isinstance(v, float) else str(v))
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def test_time(model: MetaSeg, data: Path, cases: int) -> tuple[dict[str, str], str]:
    """Per-image test-time timings of ``model`` on the first ``cases`` test images of ``data``."""
    ds = open_dataset(data)
    rows = []
    for case in ds.test[:cases]:
        image, _ = case.load()
        _, whole = timed(lambda: model.predict(image))
        prep = model.prepare(image)
        theta, fit_s = timed(lambda: model.fitted_theta([prep], model.t_f))
        pointwise, point_s = timed(lambda: model.point_logits(theta, prep.coords, step=prep.step))
        grid, grid_s = timed(lambda: model.image_logits(theta, prep))
        rows.append({"case": case.case_id, "predict s": whole, "fit s": fit_s,
                     "head, pointwise s": point_s, "head, padded grid s": grid_s,
                     "max abs logit diff": float((pointwise - grid).abs().max()),
                     "labels that differ": int((pointwise.argmax(-1) != grid.argmax(-1)).sum())})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith(" s")}
    sections = {"Test time per image (median)": table(
        [{"images": len(rows), "T_f": model.t_f, "head context": model.config.head_context, **med,
          "head speed-up": med["head, pointwise s"] / med["head, padded grid s"]}]),
        "Per image": table(rows)}
    return sections, (f"Data `{data.name}` (test images, shape {tuple(prep.shape)}). `predict s` is the whole "
                      f"command's per-image work after loading.")


def validation(data: Path, preset: str) -> tuple[dict[str, str], str]:
    """Meta-training's validation on ``data``'s validation split, whole images and sampled voxels."""
    ds = open_dataset(data)
    _, val = split_by_subject(ds.train, 0.2, seed=0)
    _, cfg = resolve("metaseg", ds.spatial_ndim, preset=preset)
    rows = []
    for cap in (None, cfg.val_max_voxels):
        model = MetaSeg(ds.label_names, ds.spatial_ndim, len(ds.channel_names),
                        dataclasses.replace(cfg, val_max_voxels=cap))
        vs = [model.prepare(*c.load()) for c in val[:cfg.val_max_cases]]
        dice, secs = timed(lambda: validation_dice(model, vs, cfg.val_fit_steps))
        rows.append({"voxels scored": "all" if cap is None else cap, "images": len(vs),
                     "shape": "x".join(map(str, vs[0].shape)), "fit steps": cfg.val_fit_steps,
                     "seconds": secs, "val Dice (fresh model)": dice})
    return {"Meta-training validation": table(rows)}, f"Validation: `{data.name}`, preset `{preset}`, an untrained model."


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
    if (args.model is None) != (args.data is None) or (args.model is None and args.val is None):
        ap.error("give --model and --data, or --val (or all three)")
    torch.set_num_threads(args.threads)
    sections, notes = {}, []
    if args.model is not None:
        part, note = test_time(MetaSeg.load(args.model), args.data, args.cases)
        sections.update(part)
        notes.append(f"Model `{args.model.name}`. {note}")
    if args.val is not None:
        part, note = validation(args.val, args.val_preset)
        sections.update(part)
        notes.append(note)
    path = write_result_file(RESULTS, "metaseg-timings" + (f"-{args.tag}" if args.tag else ""), " ".join(notes), sections)
    print(path.read_text())


if __name__ == "__main__":
    main()
