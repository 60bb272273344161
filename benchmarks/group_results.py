"""Per-group tables of a bench run's ``results.csv``: cases grouped by a regular expression on the
case id (ACDC: ``_(ed|es)$`` gives end-diastole and end-systole apart).

    python benchmarks/group_results.py RUN/results.csv --group '_(ed|es)$' [--metrics dice,hd95_mm]

For each method and group: every class's Dice (and HD95 in mm), the mean over the group's cases
of each seed, then mean ± sd over seeds, as ``results.md`` computes its rows (a method's figure is
the mean over seeds of its per-seed mean over cases). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
from collections import defaultdict


def _mean_sd(values: list[float]) -> str:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return "n/a"
    return f"{statistics.fmean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--group", required=True, help="regular expression; its first group names the case's group")
    ap.add_argument("--metrics", default="dice,hd95_mm", help="per-class metric column prefixes")
    args = ap.parse_args()
    rows = list(csv.DictReader(open(args.csv, encoding="utf-8")))
    metrics = args.metrics.split(",")
    classes = [c[len("dice_"):] for c in rows[0] if c.startswith("dice_") and c != "dice_background"]
    pattern = re.compile(args.group)
    acc: dict = defaultdict(lambda: defaultdict(list))  # (method, group, column) -> seed -> values
    for r in rows:
        m = pattern.search(r["case"])
        if not m:
            continue
        for metric in metrics:
            for c in classes:
                acc[(r["method"], m.group(1), f"{metric}_{c}")][r["seed"]].append(float(r[f"{metric}_{c}"]))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = sorted({k[1] for k in acc})
    cols = [f"{metric}_{c}" for metric in metrics for c in classes]
    print("| method | group | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for method in methods:
        for g in groups:
            cells = [_mean_sd([statistics.fmean(v) for v in acc[(method, g, col)].values()]) for col in cols]
            print(f"| {method} | {g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
