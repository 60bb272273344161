"""Where a MORSE training step spends its time on the CPU (the cost behind docs/findings/morse.md).

    python benchmarks/profile_morse_step.py [--moe-dim 32] [--variant smoe] [--threads 1]

One AdamW step on 4 random 160 x 192 slices (brain2d-seg4's size), 5 classes, the ``cpu``
backbone, after one warm-up step, under ``torch.profiler``; also the median seconds per step of
the variant and of the plain backbone over 3 timed steps. Written to
``benchmarks/results/<date>-morse-step-profile.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from harness import write_results
from inrseg.methods.morse import MORSE, morse_config


def _model(variant: str, moe_dim: int) -> MORSE:
    cfg = morse_config("unet", variant, 2, "cpu", moe_dim=moe_dim, gate_dim=moe_dim)
    return MORSE(["bg", "a", "b", "c", "d"], 2, 1, cfg, device=torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="smoe")
    ap.add_argument("--moe-dim", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 160, 192, generator=gen)
    y = torch.randint(0, 5, (4, 160, 192), generator=gen)
    rows = []
    steps = {}
    for variant in ("baseline", args.variant):
        model = _model(variant, args.moe_dim)
        net = model.net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(net(x).coarse, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

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
    path = write_results("morse-step-profile", {"Seconds per training step and profile": body},
                         f"4 slices of 160 x 192, 5 classes, `cpu` backbone, {args.threads} thread(s); random data "
                         "(the cost does not depend on the values).")
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
