"""MetaSeg against its supervised baselines, in one run: a thin caller of ``inrseg bench``.

    python benchmarks/metaseg_bench.py --dataset brain2d-seg4 --minutes 15 --seeds 3 [--threads 2]

Methods: the U-Net (2D; 3D: and SegResNet, the paper's 3D baseline) and MetaSeg with the
dataset's preset (``2d-seg4``, ``2d-seg24``, ``3d-seg4``), each with the same ``--minutes``
per seed, covering MetaSeg's meta-training, phase 2 and T_f choice. The MetaSeg diagnostic
(Dice against test-time steps for both heads, atlas Dice) is ``metaseg_experiments.py``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from harness import RESULTS, SHARED_DATA
from inrseg.eval.bench import run_bench

PRESET_OF = {"brain2d-seg4": "2d-seg4", "brain2d-seg24": "2d-seg24", "brain3d-seg4": "3d-seg4",
             "cardiac2d-sunnybrook": "2d-seg4"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brain2d-seg4", choices=sorted(PRESET_OF))
    ap.add_argument("--minutes", type=float, default=15.0, help="budget per method and seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    base = "unet,segresnet" if args.dataset.startswith("brain3d") else "unet"
    run_bench(SHARED_DATA / args.dataset, f"{base},metaseg:{PRESET_OF[args.dataset]}", args.minutes,
              list(range(args.seeds)), RESULTS / "bench", device=args.device, allow_dirty=args.allow_dirty,
              threads=args.threads, command=shlex.join(["python", "benchmarks/metaseg_bench.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
