"""Supervised baselines on a shared dataset: a thin caller of ``inrseg bench``.

    python benchmarks/baselines.py --dataset brain2d-seg4 --minutes 5 --seeds 3 [--threads 1]

2D: the U-Net (``unet-small``) and the 6.5M ``unet-paper``; 3D: the U-Net and SegResNet. One
split, ``--seeds`` seeds, ``--minutes`` per model and seed; the run folder (results.json / .csv
/ .md, report.html) is written under ``benchmarks/results/bench/``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from harness import RESULTS, SHARED_DATA
from inrseg.eval.bench import run_bench
from inrseg.data.layouts import open_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brain2d-seg4")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per model and seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    data = SHARED_DATA / args.dataset
    methods = "unet,segresnet" if open_dataset(data).spatial_ndim == 3 else "unet,unet:unet-paper"
    run_bench(data, methods, args.minutes, list(range(args.seeds)), RESULTS / "bench", device=args.device,
              allow_dirty=args.allow_dirty, threads=args.threads,
              command=shlex.join(["python", "benchmarks/baselines.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
