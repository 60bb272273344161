"""Supervised baselines on the shared benchmark data: U-Net (2D/3D) and SegResNet (3D).

    python benchmarks/baselines.py --dataset brain2d-seg4 --minutes 5 [--preset unet-small]

Prints the table and writes it to benchmarks/results/. The factories here are reused by the
method benchmarks so that every comparison trains its baseline the same way, in the same run.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from harness import SHARED_DATA, markdown_table, run_method, write_results
from inrseg.data.layouts import open_dataset, split_by_subject
from inrseg.methods.supervised import PRESETS, SegResNetSegmenter, SupervisedConfig, SupervisedSegmenter


def supervised_factory(preset: str, minutes: float, steps: int = 100_000, seed: int = 0):
    """A factory ``ds -> segmenter`` for a preset, trained for ``minutes`` (or ``steps``)."""

    def make(ds):
        cfg = SupervisedConfig(**PRESETS[preset], steps=steps, budget_minutes=minutes, seed=seed,
                               val_every=50 if ds.spatial_ndim == 2 else 25)
        if ds.spatial_ndim == 3:
            cfg = replace(cfg, batch_size=2, patch_size=(64, 64, 64))
        cls = SegResNetSegmenter if cfg.arch == "segresnet" else SupervisedSegmenter
        return cls(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg)

    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brain2d-seg4")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per model")
    ap.add_argument("--presets", default=None, help="comma list (default: unet-small for 2D, "
                                                   "unet-small,segresnet for 3D)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = open_dataset(SHARED_DATA / args.dataset)
    train, val = split_by_subject(ds.train, 0.2, seed=0)
    presets = (args.presets or ("unet-small" if ds.spatial_ndim == 2 else "unet-small,segresnet")).split(",")
    rows = []
    for p in presets:
        _, res = run_method(p, supervised_factory(p, args.minutes), ds, train, val, device=args.device)
        rows.append(res.row())
        print(markdown_table(rows[-1:]), flush=True)
    table = markdown_table(rows)
    print(table)
    path = write_results(f"baselines-{args.dataset}", {args.dataset: table},
                         f"Training budget {args.minutes} min per model; validation split: 20 % of the "
                         f"training subjects; scored on the {len(ds.test)} test cases.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
