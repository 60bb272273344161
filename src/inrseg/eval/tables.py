"""A benchmark's tables: ``results.md`` and ``results.csv``; a run as JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from inrseg.core.files import atomic_path
from inrseg.eval.evaluate import write_csv
from inrseg.eval.stats import RunResult

__all__ = ["results_markdown", "run_dict", "write_results_csv"]


def _fmt(ms: tuple[float, float], nd: int = 3) -> str:
    mean, sd = ms
    if not math.isfinite(mean):
        return "nan"
    return f"{mean:.{nd}f} ± {sd:.{nd}f}" if math.isfinite(sd) else f"{mean:.{nd}f}"


def results_markdown(result: dict) -> str:
    """``results.md``: provenance, the headline table (mean +- sd over seeds), per-class Dice,
    regions, the paired tests."""
    p, agg, names = result["provenance"], result["methods"], result["label_names"]
    lines = [f"# inrseg bench: {result['dataset']}", "",
             f"- date: {p['date']}", f"- commit: {p['commit'] or 'not a git checkout'}"
             + (" (dirty: " + ", ".join(p["changed"]) + ")" if p["dirty"] else ""),
             f"- machine: {p['machine']}; device {p['device']}; {p['threads']} threads",
             f"- command: `{p['command']}`", f"- seeds: {', '.join(map(str, p['seeds']))}",
             f"- budget: {result['budget_minutes']} min per method and seed (the whole fit)",
             f"- split: {result['split']['train']} training / {result['split']['val']} validation / "
             f"{result['split']['test']} test cases, by subject (split seed {result['split']['seed']})",
             f"- libraries: {', '.join(f'{k} {v}' for k, v in p['libraries'].items())}", "",
             "Mean ± sd over seeds of the mean over test cases. HD95 / ASD in mm. Wilcoxon: two-sided "
             "signed-rank test against the first method on the per-case mean foreground Dice (averaged "
             "over seeds).", "",
             "| method | mean fg Dice | HD95 mm | ASD mm | params | train s | infer s/case | Wilcoxon p vs first |",
             "|---|---|---|---|---|---|---|---|"]
    for m, a in agg.items():
        s, w = a["summary"], a.get("wilcoxon_vs_first")
        wp = "" if w is None else ("nan" if not math.isfinite(w["p"]) else f"{w['p']:.3g} (Δ median {w['median_difference']:+.3f}, n={w['n']})")
        lines.append(f"| {m} | {_fmt(s['mean_foreground_dice'])} | {_fmt(s['hd95_mm'], 2)} | {_fmt(s['asd_mm'], 2)} | "
                     f"{a['params'] / 1e6:.3f}M | {_fmt(s['train_s'], 0)} | {_fmt(s['infer_s_median'], 3)} | {wp} |")
    lines += ["", "## Per-class Dice", "", "| method | " + " | ".join(names[1:]) + " |",
              "|---|" + "---|" * (len(names) - 1)]
    for m, a in agg.items():
        lines.append(f"| {m} | " + " | ".join(_fmt(a["summary"]["per_class_dice"][n]) for n in names[1:]) + " |")
    first = next(iter(agg.values()), None)
    if first and first["summary"].get("regions_dice"):
        regs = list(first["summary"]["regions_dice"])
        lines += ["", "## Regions", "", "| method | " + " | ".join(regs) + " |", "|---|" + "---|" * len(regs)]
        for m, a in agg.items():
            lines.append(f"| {m} | " + " | ".join(_fmt(a["summary"]["regions_dice"][r]) for r in regs) + " |")
    lines += ["", "## Per seed", "", "| method | seed | mean fg Dice | chosen on validation | train s |", "|---|---|---|---|---|"]
    for m, a in agg.items():
        for s in a["per_seed"]:
            chosen = ", ".join(f"{k} {v}" for k, v in s["chosen"].items())
            lines.append(f"| {m} | {s['seed']} | {s['mean_foreground_dice']:.4f} | {chosen} | {s['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def write_results_csv(path: Path, runs: list[RunResult], names: Sequence[str]) -> None:
    """One row per (method, seed, case): the per-class and headline metrics."""
    rows = []
    for r in runs:
        regions = dict(r.regions)
        for cid, m in r.cases:
            row = {"method": r.method, "seed": r.seed, "case": cid, **m.to_row(names)}
            for reg, rm in regions.get(cid, {}).items():
                row[f"dice_{reg.replace(' ', '_')}"] = float(rm.dice[1])
                row[f"hd95_mm_{reg.replace(' ', '_')}"] = float(rm.hd95_mm[1])
            rows.append(row)
    with atomic_path(path) as tmp:
        write_csv(tmp, rows)


def run_dict(r: RunResult, names: Sequence[str]) -> dict:
    """A run as JSON: per-case rows (``CaseMetrics.to_row``), regions as their Dice / HD95."""
    return {"method": r.method, "seed": r.seed, "params": r.params, "train_s": r.train_s, "infer_s": r.infer_s,
            "chosen": r.chosen, "steps_curve": r.steps_curve, "history": r.history,
            "cases": [{"case": cid, **m.to_row(names)} for cid, m in r.cases],
            "regions": [{"case": cid, **{reg: {"dice": float(rm.dice[1]), "hd95_mm": float(rm.hd95_mm[1])}
                                         for reg, rm in v.items()}} for cid, v in r.regions]}
