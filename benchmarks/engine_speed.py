"""Training throughput of every trainer: 1 process x 2 threads against 2 processes x 1 thread.

Both layouts train the same global batch per optimiser step (the U-Net's 8 slices, MetaSeg's 2
tasks, NISF's 2 subjects): 1 process draws all of it, or torchrun runs 2 gloo ranks that draw
half each and average their gradients (DDP; by hand for MetaSeg's second-order meta-gradient).
Steps per second are the median over the per-step times of the engine's metrics log (the
first steps, which warm up allocators, are dropped). The two layouts of a method run back to
back, one at a time, so they share the machine's state.

    python benchmarks/engine_speed.py --data ../shared/data/brain2d-seg4 --steps 40
    python benchmarks/engine_speed.py --methods unet,metaseg --device cuda   # on a GPU machine

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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import SHARED_DATA, markdown_table, write_results  # noqa: E402

METHODS = ("unet", "segresnet", "morse", "nisf", "metaseg")


def build(method: str, ds, per_rank: int, steps: int, device: str):
    """A CPU-default model of ``method`` whose per-rank batch is ``per_rank`` items."""
    from inrseg.methods.metaseg import MetaSeg, MetaSegConfig
    from inrseg.methods.morse import MORSE, morse_config
    from inrseg.methods.nisf import NISF, config_from_preset
    from inrseg.methods.supervised import (PRESETS, SegResNetSegmenter, SupervisedConfig,
                                           SupervisedSegmenter)

    nd, c, names = ds.spatial_ndim, len(ds.channel_names), ds.label_names
    big = 10 ** 6  # no validation inside the timed steps
    if method == "unet":
        cfg = SupervisedConfig(**PRESETS["unet-small"], batch_size=4 * per_rank, steps=steps, val_every=big)
        return SupervisedSegmenter(names, nd, c, cfg, device=device)
    if method == "segresnet":
        cfg = SupervisedConfig(**PRESETS["segresnet"], batch_size=2 * per_rank, steps=steps, val_every=big)
        return SegResNetSegmenter(names, nd, c, cfg, device=device)
    if method == "morse":
        cfg = morse_config("unet", "morse", nd, "cpu", batch_size=2 * per_rank, steps=steps, val_every=big)
        return MORSE(names, nd, c, cfg, device=device)
    if method == "nisf":
        cfg = config_from_preset("nisf-cpu", subjects_per_step=per_rank, steps=steps, save_every=big)
        return NISF(names, nd, c, cfg, device=device)
    if method == "metaseg":
        cfg = MetaSegConfig(meta_batch=per_rank, steps=steps, val_every=big, phase2_steps=0)
        return MetaSeg(names, nd, c, cfg, device=device)
    raise SystemExit(f"unknown method {method!r} ({', '.join(METHODS)})")


def worker(args: argparse.Namespace) -> None:
    """One training run (a torchrun rank, or the single process); metrics log to ``args.log``."""
    import torch

    from inrseg.data.layouts import open_dataset
    from inrseg.engine import init_distributed, resolve_device, world

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
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "brain2d-seg4")
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
    path = write_results("engine-speed", {"Steps per second": markdown_table(rows)}, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
