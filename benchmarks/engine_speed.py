"""Training throughput of every trainer: 1 process x 2 threads against 2 processes x 1 thread.

Both layouts train the same global batch per optimiser step (the U-Net's 8 slices, MetaSeg's 2
tasks, NISF's 2 subjects): 1 process draws all of it, or torchrun runs 2 gloo ranks that draw
half each and average their gradients (DDP; by hand for MetaSeg's second-order meta-gradient).
Steps per second are the median over the per-step times of the engine's metrics log (the
first steps, which warm up allocators, are dropped). The two layouts of a method run back to
back, one at a time, so they share the machine's state.

    python benchmarks/engine_speed.py --data DATA/brain2d-seg4 --steps 40
    python benchmarks/engine_speed.py --data DATA/brain2d-seg4 --methods unet,metaseg --device cuda

Each method is built by the registry (``inrseg.methods.registry.resolve``) with its default preset
for the data, as ``inrseg train`` builds it, with the batch and step count set here.

Writes ``benchmarks/results/<date>-engine-speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from inrseg.data.layouts import open_dataset
from inrseg.engine import init_distributed, resolve_device, world
from inrseg.eval.provenance import write_result_file
from inrseg.methods.registry import ENTRIES, resolve

METHODS = tuple(ENTRIES)
RESULTS = Path(__file__).resolve().parent / "results"


def build(method: str, ds, per_rank: int, steps: int, device):
    """The default model of ``method`` for ``ds`` (the registry's), with a per-rank batch of
    ``per_rank`` items (x the method's items per task) and no validation inside the timed steps."""
    big = 10 ** 6
    per_item = {"unet": 4, "segresnet": 2, "morse": 2}
    sets = {"unet": ["val_every=%d" % big], "segresnet": ["val_every=%d" % big], "morse": ["val_every=%d" % big],
            "nisf": [f"subjects_per_step={per_rank}", f"save_every={big}"],
            "metaseg": [f"meta_batch={per_rank}", f"val_every={big}", "phase2_steps=0"]}[method]
    options = {"steps": steps}
    if method in per_item:
        options["batch_size"] = per_item[method] * per_rank
    e, cfg = resolve(method, ds.spatial_ndim, preset="nisf-cpu" if method == "nisf" else None, sets=sets,
                     options=options)
    return e.cls(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg, device=device)


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys as a markdown table (floats to 4 significant digits)."""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def worker(args: argparse.Namespace) -> None:
    """One training run (a torchrun rank, or the single process); metrics log to ``args.log``."""
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    init_distributed(dev)
    _, size = world()
    ds = open_dataset(args.data)
    model = build(args.method, ds, 2 // size, args.steps, dev)
    model.fit(ds.train, None, log_path=Path(args.jsonl))
    if size > 1:
        torch.distributed.destroy_process_group()


def steps_per_second(log: Path, skip: int) -> float:
    times = [json.loads(line)["time_s"] for line in log.read_text().splitlines()]
    dts = [b - a for a, b in zip(times[skip:], times[skip + 1:])]
    return 1.0 / statistics.median(dts)


def run_layout(method: str, procs: int, threads: int, args: argparse.Namespace, tmp: Path) -> float:
    log = tmp / f"{method}-{procs}x{threads}.jsonl"
    common = [__file__, "--worker", "--method", method, "--data", str(args.data), "--steps", str(args.steps),
              "--threads", str(threads), "--device", args.device, "--jsonl", str(log)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), INRSEG_QUIET="1")
    if procs == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *common]
    subprocess.run(cmd, check=True, env=env)
    return steps_per_second(log, args.skip)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a dataset folder (e.g. brain2d-seg4)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the median")
    ap.add_argument("--repeats", type=int, default=3, help="runs per layout, alternating; the median "
                                                        "of the runs' figures is reported")
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            ones, twos = [], []
            for _ in range(args.repeats):  # alternate, so drifts of a shared machine hit both
                ones.append(run_layout(method, 1, 2, args, Path(tmp)))
                twos.append(run_layout(method, 2, 1, args, Path(tmp)))
            one, two = statistics.median(ones), statistics.median(twos)
            ratios = sorted(b / a for a, b in zip(ones, twos))
            rows.append({"trainer": method, "1 proc x 2 threads (steps/s)": one,
                         "2 procs x 1 thread, gloo (steps/s)": two,
                         "ratio 2x1 / 1x2 (median)": statistics.median(ratios),
                         "ratio range": f"{ratios[0]:.3f}-{ratios[-1]:.3f}",
                         "faster": "2 x 1" if two > one else "1 x 2"})
            print(markdown_table(rows[-1:]), flush=True)
    notes = (f"Data `{args.data.name}`, {args.steps} steps per run, median step time after the first "
             f"{args.skip}; {args.repeats} runs per layout, alternating, median of the runs; the same global batch per step in both layouts (U-Net 8 slices, SegResNet 4, "
             f"MORSE 4, NISF 2 subjects x 8,192 voxels, MetaSeg 2 tasks). Device {args.device}.")
    path = write_result_file(RESULTS, "engine-speed", notes, {"Steps per second": markdown_table(rows)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
