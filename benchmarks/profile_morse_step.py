"""Where a MORSE training step spends its time on the CPU.

    python benchmarks/profile_morse_step.py [--moe-dim 32] [--variant smoe] [--threads 1]

One training step of the ``cpu`` preset on the ``unet`` backbone (the step the budget timing
measures: :meth:`~inrseg.methods.cnn.CNNSegmenter.timing_loss`, ``L_rend`` on where the variant
has a point head, with the optimiser the method trains with) on 4 random 160 x 192 slices,
5 classes, after one warm-up step, under ``torch.profiler``; also the median seconds per step of
the variant and of ``baseline`` (the plain backbone) over 3 timed steps. Written to
``benchmarks/results/<date>-morse-step-profile[-k].md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from inrseg.eval.provenance import write_result_file
from inrseg.methods.cnn import TrainBatch
from inrseg.methods.registry import resolve

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = ["bg", "a", "b", "c", "d"]


def timed_step(variant: str, moe_dim: int, x: torch.Tensor, y: torch.Tensor):
    """``(model, step)``: a MORSE model of ``variant`` and a function running one of its training
    steps on ``(x, y)``."""
    entry, cfg = resolve(f"morse:{variant}:unet", 2, preset="cpu", options=dict(moe_dim=moe_dim, gate_dim=moe_dim))
    model = entry.cls(NAMES, 2, 1, cfg, device="cpu")
    net = model.net.train()
    opt = model.make_optimizer(net.parameters())
    loss_fn = model.make_loss(ignore=False)
    calls = iter(range(10 ** 6))

    def step() -> None:
        loss = model.timing_loss(net, TrainBatch(x, y, next(calls), range(len(x))), loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="smoe")
    ap.add_argument("--moe-dim", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 160, 192, generator=gen)
    y = torch.randint(0, len(NAMES), (4, 1, 160, 192), generator=gen)
    rows, steps = [], {}
    for variant in ("baseline", args.variant):
        model, step = timed_step(variant, args.moe_dim, x, y)
        step()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        rows.append(f"| {variant} | {args.moe_dim if variant != 'baseline' else ''} | "
                    f"{statistics.median(times):.3f} | {model.num_params / 1e6:.3f}M |")
        steps[variant] = step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps[args.variant]()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    body = ("| variant | D | s per step (median of 3) | params |\n|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nProfile of one `{args.variant}` step:\n\n```\n{table}\n```")
    print(body)
    notes = (f"4 slices of 160 x 192, 5 classes, `cpu` preset, {args.threads} thread(s); random data "
             "(the cost does not depend on the values).")
    print(f"wrote {write_result_file(RESULTS, 'morse-step-profile', notes, {'Seconds per training step and profile': body})}")


if __name__ == "__main__":
    main()
