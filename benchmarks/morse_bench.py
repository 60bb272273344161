"""MORSE and its ablation variants on one backbone (the rows of the paper's Tables 1-2): a thin
caller of ``inrseg bench``.

    python benchmarks/morse_bench.py --dataset brats2d --minutes 4 --seeds 3 [--backbone unet]

The variants (``--variants``; baseline = the plain backbone, + PointRend, + SMoE, + IAR, MORSE)
train on one split with the same wall time each (``--minutes`` per variant and seed), the
``cpu`` widths and the CLI defaults (expert dropout warmed up over 5,000 steps). The
paper compares at equal iterations on a GPU (``inrseg train morse --preset paper --steps
30000``); at equal wall time on a CPU the SMoE variants run fewer steps than the baseline. BraTS
data get the region scores (whole tumour, tumour core, enhancing tumour).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from harness import RESULTS, SHARED_DATA
from inrseg.eval.bench import run_bench
from inrseg.data.layouts import open_dataset
from inrseg.methods.morse import VARIANTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="brats2d")
    ap.add_argument("--backbone", default=None, help="unet, transunet, unetr, unet3d (default: unet / unet3d)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--minutes", type=float, default=4.0, help="budget per variant and seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    data = SHARED_DATA / args.dataset
    backbone = args.backbone or ("unet3d" if open_dataset(data).spatial_ndim == 3 else "unet")
    methods = ",".join(f"morse:{v}:{backbone}" for v in args.variants.split(","))
    run_bench(data, methods, args.minutes, list(range(args.seeds)), RESULTS / "bench", device=args.device,
              allow_dirty=args.allow_dirty, threads=args.threads,
              regions="brats" if args.dataset.startswith("brats") else None,
              command=shlex.join(["python", "benchmarks/morse_bench.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
