"""``report.html``: one self-contained, offline page of a benchmark or an evaluation.

Every figure is a PNG inlined as a ``data:`` URI; the only script is the slice slider of 3D
cases (inline, no library); nothing is fetched from a network. Written by ``inrseg bench``
(:func:`bench_report`) and ``inrseg evaluate --html`` (:func:`evaluation_report`).

Contents: the results table (mean +- sd over seeds), per-class Dice bars, Dice against
test-time steps for the INR methods, training curves from the metrics logs, for each method
the best, median and worst test case as image | prediction | ground truth overlays with a
class legend (3D: a slider over the slices that hold labels), and the provenance.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from inrseg.data.nifti import load_image, load_labels
from inrseg.data.volume import Volume
from inrseg.eval.bench import run_file_stem
from inrseg.viz.figures import plt
from inrseg.viz.overlays import overlay_figure

#: 3D cases: at most this many slices in a slider (evenly spaced among those with labels)
MAX_SLIDER_SLICES = 12

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.prov td{text-align:left;word-break:break-word}
img{max-width:100%}section{overflow-x:auto}.cases{display:flex;flex-direction:column;gap:.8em}
.case{border:1px solid #e2e2e2;padding:.4em;border-radius:4px}.case p{margin:.2em 0;font-size:.9em}
.slider input{width:60%}.muted{color:#666;font-size:.9em}code{background:#f5f5f5;padding:0 .2em}
"""

_SLIDER_JS = """
document.querySelectorAll('.slider').forEach(function(box){
  var frames=JSON.parse(box.querySelector('script[type="application/json"]').textContent);
  var img=box.querySelector('img'),input=box.querySelector('input'),out=box.querySelector('output');
  input.addEventListener('input',function(){img.src=frames[input.value].src;out.textContent=frames[input.value].label;});
});
"""


def png_uri(fig, dpi: int = 90) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(mean: float, sd: float = math.nan, nd: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "nan"
    return f"{mean:.{nd}f} ± {sd:.{nd}f}" if sd is not None and math.isfinite(sd) else f"{mean:.{nd}f}"


# ----------------------------------------------------------------------------- figures
def method_colours(methods: Sequence[str]) -> dict[str, tuple]:
    """One colour per method (tab10, in the order the methods were given): every plot of a
    report draws a method in its colour."""
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def class_bars(per_method: dict[str, dict[str, tuple[float, float]]], names: Sequence[str],
               colours: dict[str, tuple] | None = None) -> str:
    """Grouped bars: per-class Dice (mean, sd error bars) of each method, in ``colours``."""
    methods = list(per_method)
    colours = colours or method_colours(methods)
    x = np.arange(len(names))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(min(13.0, max(6.0, 0.45 * len(names) * max(1, len(methods)) ** 0.5 + 2)),
                                    3.4 if len(names) <= 5 else 4.2))
    for i, m in enumerate(methods):
        means = [per_method[m][n][0] for n in names]
        sds = [per_method[m][n][1] if math.isfinite(per_method[m][n][1]) else 0.0 for n in names]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=sds, capsize=2, label=m,
               color=colours[m])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center",
                       fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(methods), 4), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return png_uri(fig)


def curves_figure(series: dict[str, list[list[tuple[float, float]]]], xlabel: str, ylabel: str,
                  log_y: bool = False, colours: dict[str, tuple] | None = None) -> str:
    """One line per (method, seed), one colour per method (``colours``)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    colours = colours or method_colours(list(series))
    for m, lines in series.items():
        for k, pts in enumerate(lines):
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=colours[m], alpha=0.9 if k == 0 else 0.45, lw=1.3,
                        marker="o" if len(pts) < 30 else None, ms=3, label=m if k == 0 else None)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_uri(fig)


def read_log(path: Path, key: str = "loss") -> list[tuple[float, float]]:
    """``(step, value)`` pairs of a metrics log (JSON lines), thinned to at most 400 points."""
    pts = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if key in e and e[key] is not None and "step" in e:
                pts.append((float(e["step"]), float(e[key])))
    stride = max(1, len(pts) // 400)
    return pts[::stride]


def _slices_with_labels(gt: np.ndarray) -> list[int]:
    """Indices along the last spatial axis of a 3D label map that hold foreground, thinned to
    :data:`MAX_SLIDER_SLICES` evenly spaced ones (all slices where none has foreground)."""
    axes = tuple(range(gt.ndim - 1))
    has = np.flatnonzero((gt > 0).any(axis=axes))
    idx = has if has.size else np.arange(gt.shape[-1])
    if idx.size > MAX_SLIDER_SLICES:
        idx = idx[np.linspace(0, idx.size - 1, MAX_SLIDER_SLICES).round().astype(int)]
    return [int(i) for i in idx]


def case_panel(image: Volume, pred: np.ndarray, gt: np.ndarray, names: Sequence[str], title: str,
               ignore_label: int | None = None) -> str:
    """An overlay (image | prediction | ground truth, with a legend); for 3D, a slider over the
    slices that hold labels. Ignored ground-truth voxels are drawn as background."""
    gt = np.asarray(gt)
    if ignore_label is not None:
        gt = np.where(gt == ignore_label, 0, gt)
    gt = np.where(gt >= len(names), 0, gt)
    if image.spatial_ndim == 2:
        return f'<div class="case"><p>{html.escape(title)}</p>{_img(png_uri(overlay_figure(image, pred, gt, "", names), 70), title)}</div>'
    where = ""
    if image.spatial_ndim == 4:  # 3D + t: the first frame with labels (an annotated one), as 3D
        f = next((t for t in range(gt.shape[-1]) if (gt[..., t] > 0).any()), 0)
        image = Volume(np.ascontiguousarray(image.data[..., f]), image.affine, 3)
        pred, gt, where = np.asarray(pred)[..., f], gt[..., f], f"frame {f}, "
    n = gt.shape[-1]
    frames = [{"src": png_uri(overlay_figure(image, pred, gt, "", names, index=k), 60),
               "label": f"{where}slice {k} (0-{n - 1})"} for k in _slices_with_labels(gt)]
    mid = len(frames) // 2
    data = json.dumps(frames).replace("</", "<\\/")
    return (f'<div class="case slider"><p>{html.escape(title)}</p>{_img(frames[mid]["src"], title)}<br>'
            f'<input type="range" min="0" max="{len(frames) - 1}" value="{mid}" aria-label="slice"> '
            f'<output>{frames[mid]["label"]}</output><script type="application/json">{data}</script></div>')


def best_median_worst(dice: dict[str, float]) -> list[tuple[str, str, float]]:
    """``[(which, case, dice)]`` for the best, median and worst case by mean foreground Dice
    (NaN cases left out; fewer entries when there are fewer than 3 cases)."""
    ranked = sorted(((d, c) for c, d in dice.items() if d is not None and math.isfinite(d)), reverse=True)
    if not ranked:
        return []
    picks = [("best", 0), ("median", len(ranked) // 2), ("worst", len(ranked) - 1)]
    seen, out = set(), []
    for which, i in picks:
        if i not in seen:
            seen.add(i)
            out.append((which, ranked[i][1], ranked[i][0]))
    return out


def page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    """The whole HTML document."""
    body = "".join(f'<section><h2>{html.escape(h)}</h2>{content}</section>' for h, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>'
            f'<h1>{html.escape(title)}</h1><p class="muted">{html.escape(subtitle)}</p>{body}'
            f'<script>{_SLIDER_JS}</script></body></html>\n')


def provenance_table(p: dict) -> str:
    rows = [(k, v if not isinstance(v, (dict, list)) else json.dumps(v)) for k, v in p.items()]
    return _table(["", ""], rows).replace("<table>", '<table class="prov">', 1)


# ----------------------------------------------------------------------------- bench
def bench_report(result: dict, runs, examples: dict[str, dict[str, np.ndarray]], test_cases,
                 logs: Path) -> str:
    """The bench report from :func:`inrseg.eval.bench.run_bench`'s result, its runs, the first
    seed's test predictions per method and the folder of metrics logs."""
    names, agg = result["label_names"], result["methods"]
    colours = method_colours(list(agg))
    rows = []
    for m, a in agg.items():
        s, w = a["summary"], a.get("wilcoxon_vs_first")
        p = "" if w is None else ("nan" if w["p"] is None or not math.isfinite(w["p"]) else f"{w['p']:.3g}")
        rows.append([m, _fmt(*s["mean_foreground_dice"]), _fmt(*s["hd95_mm"], nd=2), _fmt(*s["asd_mm"], nd=2),
                     f"{a['params'] / 1e6:.3f}M", _fmt(*s["train_s"], nd=0), _fmt(*s["infer_s_median"]), p])
    table = _table(["method", "mean fg Dice", "HD95 mm", "ASD mm", "params", "train s", "infer s/case",
                    f"Wilcoxon p vs {next(iter(agg), '')}"], rows)
    per_class = {m: {n: tuple(a["summary"]["per_class_dice"][n]) for n in names[1:]} for m, a in agg.items()}
    if len(names) - 1 <= 6:
        pc_table = _table(["method"] + list(names[1:]), [[m] + [_fmt(*per_class[m][n]) for n in names[1:]] for m in agg])
    else:  # many classes: one row per class, one column per method (fits the page's width)
        pc_table = _table(["class"] + list(agg), [[n] + [_fmt(*per_class[m][n]) for m in agg] for n in names[1:]])
    sections = [("Results", f'<p class="muted">Mean ± sd over seeds {result["provenance"]["seeds"]} of the '
                            f'mean over {result["split"]["test"]} test cases; {result["budget_minutes"]} min '
                            f'per method and seed. Wilcoxon: paired, per test case, two-sided.</p>{table}'),
                ("Per-class Dice", _img(class_bars(per_class, names[1:], colours), "per-class Dice") + pc_table)]
    first = next(iter(agg.values()), None)
    if first and first["summary"].get("regions_dice"):
        regs = list(first["summary"]["regions_dice"])
        sections.append(("Regions", _table(["method"] + regs, [[m] + [_fmt(*a["summary"]["regions_dice"][r])
                                                                    for r in regs] for m, a in agg.items()])))
    curves = {m: [r.steps_curve for r in runs if r.method == m] for m in agg}
    curves = {m: c for m, c in curves.items() if any(c)}
    if curves:
        sections.append(("Dice against test-time steps (validation)",
                         _img(curves_figure(curves, "test-time steps", "validation mean fg Dice", colours=colours),
                              "steps curves")
                         + '<p class="muted">MetaSeg: the T_f candidates (phase-2 head); NISF: latent-fit '
                           'steps. The chosen step count is the best of each curve.</p>'))
    loss = {m: [read_log(logs / f"{run_file_stem(m, r.seed)}.metrics.jsonl") for r in runs if r.method == m]
            for m in agg}
    val = {m: [[(float(e["step"]), float(e["val_dice"])) for e in r.history if e.get("val_dice") is not None]
               for r in runs if r.method == m] for m in agg}
    train_figs = ""
    if any(any(v) for v in loss.values()):
        train_figs += _img(curves_figure(loss, "step", "training loss", log_y=True, colours=colours),
                           "training loss")
    if any(any(v) for v in val.values()):
        train_figs += _img(curves_figure(val, "step", "validation mean fg Dice", colours=colours),
                           "validation Dice")
    if train_figs:
        sections.append(("Training curves", train_figs))
    by_id = {c.case_id: c for c in test_cases}
    gallery = ""
    for m, preds in examples.items():
        seed0 = agg[m]["per_seed"][0]["seed"]
        run = next(r for r in runs if r.method == m and r.seed == seed0)
        dice = {cid: cm.mean_foreground_dice for cid, cm in run.cases}
        panels = []
        for which, cid, d in best_median_worst(dice):
            image, labels = by_id[cid].load()
            panels.append(case_panel(image, preds[cid], labels.data, names, f"{m}: {which} case {cid} "
                                     f"(mean fg Dice {d:.3f}, seed {seed0})", labels.meta.get("ignore_label")))
        gallery += f'<h3>{html.escape(m)}</h3><div class="cases">{"".join(panels)}</div>'
    if gallery:
        sections.append(("Best, median and worst test case", gallery))
    sections.append(("Provenance", provenance_table({**result["provenance"], "data": result["data"],
                                                     "split": result["split"]})))
    return page(f"inrseg bench: {result['dataset']}", sections,
                f"{', '.join(agg)}; {len(result['provenance']['seeds'])} seeds")


# ----------------------------------------------------------------------------- evaluate
def evaluation_report(per_case, summary: dict, names: Sequence[str], preds: dict[str, Path],
                      gts: dict[str, Path], images: dict[str, Path | None], provenance: dict,
                      ignore_label: int | None = None) -> str:
    """The report of ``inrseg evaluate --html``: the metrics table, per-class Dice bars and the
    best, median and worst case (overlays on the image where one was found, else on black)."""
    rows = [[n, _fmt(m["dice"]), _fmt(m["jaccard"]), _fmt(m["hd95_mm"], nd=2), _fmt(m["asd_mm"], nd=2),
             str(m["n_cases"])] for n, m in summary["per_class"].items()]
    rows.append(["mean foreground", _fmt(summary["mean_foreground_dice"]), _fmt(summary["jaccard"]),
                 _fmt(summary["hd95_mm"], nd=2), _fmt(summary["asd_mm"], nd=2), str(summary["n_cases"])])
    sections = [("Metrics", _table(["class", "Dice", "Jaccard", "HD95 mm", "ASD mm", "cases"], rows))]
    if summary.get("regions"):
        sections.append(("Regions", _table(["region", "Dice", "HD95 mm", "cases"],
                                           [[r, _fmt(m["dice"]), _fmt(m["hd95_mm"], nd=2), str(m["n_cases"])]
                                            for r, m in summary["regions"].items()])))
    per_class = {"predictions": {n: (summary["per_class"][n]["dice"] if summary["per_class"][n]["dice"] is not None
                                     else math.nan, math.nan) for n in names[1:]}}
    sections.append(("Per-class Dice", _img(class_bars(per_class, names[1:]), "per-class Dice")))
    dice = {cid: m.mean_foreground_dice for cid, m in per_case}
    panels = []
    for which, cid, d in best_median_worst(dice):
        gt = load_labels(gts[cid], ignore_label=ignore_label)
        pred = load_labels(preds[cid])
        if images.get(cid) is not None:
            image = load_image(images[cid])
        else:
            image = Volume(np.zeros((1, *gt.shape), np.float32), gt.affine, gt.spatial_ndim)
        panels.append(case_panel(image, pred.data, gt.data, names, f"{which} case {cid} (mean fg Dice {d:.3f})"
                                 + ("" if images.get(cid) is not None else " - no image found, drawn on black"),
                                 ignore_label))
    sections.append(("Best, median and worst case", f'<div class="cases">{"".join(panels)}</div>'))
    dices = [d for d in dice.values() if math.isfinite(d)]
    sections.append(("Provenance", provenance_table({**provenance, "cases": len(dice),
                                                     "median case Dice": round(statistics.median(dices), 4)
                                                     if dices else None})))
    return page("inrseg evaluate", sections, provenance.get("predictions", ""))
