"""Statistics of a benchmark: mean +- sd over seeds, paired Wilcoxon tests, per-method aggregates."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.stats import wilcoxon as _scipy_wilcoxon

from inrseg.metrics import CaseMetrics, summarize, summarize_regions

__all__ = ["RunResult", "aggregate", "mean_sd", "wilcoxon"]


@dataclass
class RunResult:
    """One (method, seed): per-case metrics on the test cases, timings and curves."""

    method: str
    seed: int | str  # an ensemble's row: its members' seeds, "0+1+2"
    params: int
    train_s: float
    infer_s: list[float]
    cases: list[tuple[str, CaseMetrics]]
    regions: list[tuple[str, dict]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    steps_curve: list[tuple[int, float]] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (``nan`` sd for one value) of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else math.nan)


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired samples ``a`` vs ``b`` (scipy), with the
    median difference ``a - b``; ``p = nan`` where it is undefined (fewer than 2 pairs, or all
    differences zero)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    diff = a - b
    out = {"n": int(diff.size), "median_difference": float(np.median(diff)) if diff.size else math.nan,
           "statistic": math.nan, "p": math.nan}
    if diff.size >= 2 and np.any(diff != 0):
        r = _scipy_wilcoxon(a, b)
        out.update(statistic=float(r.statistic), p=float(r.pvalue))
    return out


def aggregate(runs: list[RunResult], names: Sequence[str], methods: Sequence[str]) -> dict:
    """Per method: per-seed summaries, mean +- sd over seeds, per-case Dice averaged over seeds,
    and the paired test against the first method."""
    out: dict = {}
    per_case_mean: dict[str, dict[str, float]] = {}
    for m in methods:
        mine = [r for r in runs if r.method == m]
        if not mine:
            continue
        seeds = []
        for r in mine:
            s = summarize([cm for _, cm in r.cases], names)
            if r.regions:
                s["regions"] = summarize_regions(r.regions)
            s.update(seed=r.seed, train_s=r.train_s, infer_s_median=statistics.median(r.infer_s) if r.infer_s else math.nan,
                     params=r.params, chosen=r.chosen)
            seeds.append(s)
        agg = {}
        for key in ("mean_foreground_dice", "generalized_dice", "jaccard", "hd95_mm", "asd_mm", "train_s",
                    "infer_s_median"):
            agg[key] = mean_sd([s[key] for s in seeds])
        agg["per_class_dice"] = {n: mean_sd([s["per_class"][n]["dice"] for s in seeds]) for n in names[1:]}
        if seeds[0].get("regions"):
            agg["regions_dice"] = {r: mean_sd([s["regions"][r]["dice"] for s in seeds]) for r in seeds[0]["regions"]}
        case_ids = [cid for cid, _ in mine[0].cases]
        per_case_mean[m] = {cid: statistics.fmean([dict(r.cases)[cid].mean_foreground_dice for r in mine])
                            for cid in case_ids}
        out[m] = {"params": mine[0].params, "seeds": [r.seed for r in mine], "summary": agg, "per_seed": seeds,
                  "per_case_mean_foreground_dice": per_case_mean[m]}
    first = methods[0]
    for m in methods[1:]:
        if m in out and first in out:
            ids = sorted(set(per_case_mean[m]) & set(per_case_mean[first]))
            out[m]["wilcoxon_vs_first"] = {"against": first, **wilcoxon([per_case_mean[m][i] for i in ids],
                                                                         [per_case_mean[first][i] for i in ids])}
    return out
