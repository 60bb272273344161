"""``inrseg bench``: several methods x several seeds on one dataset, one split, one report.

One split by subject (the validation subjects carved from the training subjects with
``split_seed``, the test subjects untouched), the same for every method and seed. Each
(method, seed) run trains with its own wall-time :class:`~inrseg.engine.Budget` of
``budget_minutes`` that covers the whole ``fit``: training, MetaSeg's phase 2 and T_f choice,
NISF's steps curve. Everything a method chooses, it chooses on the validation subjects. Then
every test case is predicted (timed) and scored with :func:`inrseg.metrics.score_case`, the
project's one metric definition (the one ``inrseg evaluate`` uses).

Results: a new folder per run, ``OUT/<UTC date-time>-<dataset>/``, filled in
``<that>.partial/`` while it runs and renamed when done (a crashed run leaves the ``.partial``
folder with the runs it finished, never a folder that looks complete), holding

* ``results.json``: provenance, the split, each method's mean +- sd over seeds, per-seed
  summaries, per-case metrics, the paired Wilcoxon tests, the curves;
* ``results.csv``: one row per (method, seed, test case), for paired comparisons elsewhere;
* ``results.md``: the tables;
* ``report.html``: the self-contained report (:mod:`inrseg.viz.html_report`);
* ``logs/<method>-seed<k>.metrics.jsonl``: each run's per-step metrics log.

Statistics: a method's figure is the mean +- sample sd over seeds of its per-seed mean over
test cases. The paired test compares each method with the first on the per-case mean
foreground Dice averaged over seeds (one pair per test case; scipy's Wilcoxon signed-rank,
two-sided).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from inrseg.data.layouts import Case, Dataset
from inrseg.core.errors import InputError
from inrseg.metrics import CaseMetrics, region_metrics, score_case, summarize, summarize_regions
from inrseg.core.progress import status
from inrseg.eval.evaluate import json_safe

#: method name -> what ``name:VARIANT`` selects, and its default
VARIANT_OF = {"unet": "preset (unet-small, unet-paper)", "segresnet": "none",
              "metaseg": "preset (2d-seg4, 2d-seg24, 3d-seg4; default 2d-seg4 / 3d-seg4 by the data)",
              "nisf": "preset (nisf-cpu-small, nisf-cpu, nisf-paper)",
              "morse": "variant (morse, baseline, pointrend, smoe, iar), then optionally :backbone"}


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--methods``: ``method[:variant[:backbone]]`` (backbone: MORSE only)."""

    text: str
    method: str
    variant: str | None = None
    backbone: str | None = None

    @property
    def label(self) -> str:
        return self.text


def parse_methods(text: str) -> list[MethodSpec]:
    """``"unet,morse:pointrend,metaseg"`` -> specs; unknown names and variants are errors."""
    from inrseg.methods.metaseg import PRESETS as META
    from inrseg.methods.morse import BACKBONES, VARIANTS
    from inrseg.methods.nisf import PRESETS as NISF_PRESETS
    from inrseg.methods.supervised import PRESETS as SUP

    allowed = {"unet": [p for p in SUP if p.startswith("unet")], "segresnet": [], "metaseg": list(META),
               "nisf": list(NISF_PRESETS), "morse": list(VARIANTS)}
    specs = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        parts = item.split(":")
        method = parts[0]
        if method not in allowed:
            raise ValueError(f"--methods: unknown method {method!r} ({', '.join(allowed)})")
        if len(parts) > (3 if method == "morse" else 2):
            raise ValueError(f"--methods: {item!r} has too many ':' parts ({method}: {VARIANT_OF[method]})")
        variant = parts[1] if len(parts) > 1 else None
        if variant is not None and variant not in allowed[method]:
            raise ValueError(f"--methods: {item!r}: unknown {method} variant {variant!r} "
                             f"({', '.join(allowed[method]) or 'none'})")
        backbone = parts[2] if len(parts) > 2 else None
        if backbone is not None and backbone not in BACKBONES:
            raise ValueError(f"--methods: {item!r}: unknown backbone {backbone!r} ({', '.join(BACKBONES)})")
        specs.append(MethodSpec(item, method, variant, backbone))
    if not specs:
        raise ValueError("--methods: no method given")
    if len({s.text for s in specs}) != len(specs):
        raise ValueError(f"--methods: {text!r} names a method twice")
    return specs


def build_segmenter(spec: MethodSpec, ds: Dataset, seed: int, budget_minutes: float | None,
                    device: torch.device):
    """The model ``inrseg train <method>`` would build with its defaults for ``ds``, seeded."""
    nd, classes, channels = ds.spatial_ndim, ds.label_names, len(ds.channel_names)
    common = dict(seed=seed, budget_minutes=budget_minutes)
    if spec.method in ("unet", "segresnet"):
        from inrseg.methods.supervised import supervised_config
        from inrseg.methods.base import segmenter_class

        preset = "segresnet" if spec.method == "segresnet" else (spec.variant or "unet-small")
        return segmenter_class(spec.method)(classes, nd, channels, supervised_config(preset, nd, **common),
                                            device=device)
    if spec.method == "metaseg":
        from inrseg.methods.metaseg import MetaSeg, metaseg_config

        # the presets of `inrseg train metaseg`: 2d-seg4 in 2D whatever the class count (at CPU
        # budgets it beats 2d-seg24 on 24 classes: benchmarks/results/bench/20261122-111507-brain2d-seg24)
        preset = spec.variant or ("3d-seg4" if nd >= 3 else "2d-seg4")
        return MetaSeg(classes, nd, channels, metaseg_config(preset, **common), device=device)
    if spec.method == "nisf":
        from inrseg.methods.nisf import DEFAULT_PRESET, NISF, config_from_preset

        return NISF(classes, nd, channels, config_from_preset(spec.variant or DEFAULT_PRESET, **common),
                    device=device)
    from inrseg.methods.morse import MORSE, morse_config

    backbone = spec.backbone or ("unet3d" if nd == 3 else "unet")
    cfg = morse_config(backbone, spec.variant or "morse", nd, "cpu", **common)
    return MORSE(classes, nd, channels, cfg, device=device)


# ----------------------------------------------------------------------------- provenance
def source_repo() -> Path:
    """The folder whose git state is recorded: the checkout the ``inrseg`` package runs from."""
    return Path(__file__).resolve().parent


def git_state(repo: Path) -> dict:
    """``{"commit", "dirty", "changed"}`` of the git work tree holding ``repo``; commit ``None``
    outside a git checkout (a pip-installed package: its version stands for the code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo, timeout=30,
                              check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        # porcelain lines are "XY path": the status letters may start with a space
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "changed": []}
    return {"commit": commit, "dirty": bool(changed), "changed": changed}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the figures depend on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("inrseg", "torch", "monai", "numpy", "scipy", "nibabel", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine_line(device: torch.device) -> str:
    """``"2 CPU cores (model), no GPU used"`` or with the CUDA device's name."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), {gpu}"


# ----------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    """One (method, seed): per-case metrics on the test cases, timings and curves."""

    method: str
    seed: int
    params: int
    train_s: float
    infer_s: list[float]
    cases: list[tuple[str, CaseMetrics]]
    regions: list[tuple[str, dict]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    steps_curve: list[tuple[int, float]] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)


def steps_curve(model) -> list[tuple[int, float]]:
    """The INR methods' validation Dice against test-time steps: MetaSeg's T_f curve (the
    phase-2 head's Dice where phase 2 ran) and NISF's inference-steps curve; ``[]`` otherwise."""
    if getattr(model, "tf_curve", None):
        return [(int(e["t_f"]), float(e.get("val_dice_phase2", e.get("val_dice_meta_head", math.nan))))
                for e in model.tf_curve]
    if getattr(model, "val_curve", None):
        return [(int(e["step"]), float(e["dice"])) for e in model.val_curve]
    return []


def chosen_settings(model) -> dict:
    """What the method chose on validation (best step, T_f, inference steps)."""
    return {k: getattr(model, k) for k in ("best_step", "t_f", "infer_steps")
            if isinstance(getattr(model, k, None), (int, float))}


def run_one(spec: MethodSpec, ds: Dataset, train: Sequence[Case], val: Sequence[Case], test: Sequence[Case],
            seed: int, budget_minutes: float | None, device: torch.device, log_path: Path,
            regions: dict | None, keep_predictions: bool) -> tuple[RunResult, dict[str, np.ndarray], object]:
    """Train ``spec`` with ``seed`` under its own budget, then predict and score every test case.

    Returns the result, the predictions ``{case_id: (*S,) label map}`` (when
    ``keep_predictions``) and the model."""
    from inrseg.engine import Budget

    budget = Budget(budget_minutes)  # starts before the model is built: all of fit counts
    model = build_segmenter(spec, ds, seed, budget_minutes, device)
    t0 = time.perf_counter()
    model.fit(list(train), list(val), budget=budget, log_path=log_path)
    train_s = time.perf_counter() - t0
    cases, region_rows, seconds, preds = [], [], [], {}
    for case in test:
        image, labels = case.load()
        t1 = time.perf_counter()
        pred = model.predict(image)
        seconds.append(time.perf_counter() - t1)
        ignore = labels.meta.get("ignore_label")
        cases.append((case.case_id, score_case(pred.data, labels.data, ds.num_classes, labels.spacing,
                                               True, ignore)))
        if regions:
            region_rows.append((case.case_id, region_metrics(pred.data, labels.data, regions, labels.spacing,
                                                             True, ignore)))
        if keep_predictions:
            preds[case.case_id] = np.asarray(pred.data)
    res = RunResult(spec.label, seed, int(model.num_params), train_s, seconds, cases, region_rows,
                    list(getattr(model, "history", []) or []), steps_curve(model), chosen_settings(model))
    return res, preds, model


# ----------------------------------------------------------------------------- statistics
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
    from scipy.stats import wilcoxon as _w

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    diff = a - b
    out = {"n": int(diff.size), "median_difference": float(np.median(diff)) if diff.size else math.nan,
           "statistic": math.nan, "p": math.nan}
    if diff.size >= 2 and np.any(diff != 0):
        r = _w(a, b)
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


# ----------------------------------------------------------------------------- writing
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
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def new_run_dir(out: Path, dataset: str) -> tuple[Path, Path]:
    """``(final, partial)`` folder names of a new run under ``out``; the partial one is created
    exclusively, so two runs never share a folder and no earlier run is overwritten."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = utc_now().strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        name = f"{stamp}-{dataset}" + (f"-{k + 1}" if k else "")
        final, partial = out / name, out / f"{name}.partial"
        if final.exists():
            continue
        try:
            partial.mkdir()
        except FileExistsError:
            continue
        return final, partial
    raise InputError(out, "could not create a new run folder (1000 runs this second?)")


def run_bench(data: Path, methods: str, budget_minutes: float | None, seeds: Sequence[int], out: Path,
              device: str = "auto", allow_dirty: bool = False, val_fraction: float = 0.2, split_seed: int = 0,
              threads: int | None = None, regions: str | None = None, command: str | None = None,
              html: bool = True, max_test_cases: int | None = None) -> Path:
    """Run the benchmark (see the module docstring); returns the finished run folder."""
    from inrseg.data.layouts import open_dataset, split_by_subject
    from inrseg.metrics import REGION_SETS
    from inrseg.engine import resolve_device

    specs = parse_methods(methods)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("bench runs its methods one after another in one process: start it without "
                         "torchrun (--device cuda uses one GPU)")
    if regions is not None and regions not in REGION_SETS:
        raise ValueError(f"--regions: unknown region set {regions!r} ({', '.join(REGION_SETS)})")
    if not seeds:
        raise ValueError("--seeds: at least one seed")
    repo = source_repo()
    git = git_state(repo)
    if git["dirty"] and not allow_dirty:
        raise InputError(repo, f"has uncommitted changes ({', '.join(git['changed'][:3])}"
                               f"{', ...' if len(git['changed']) > 3 else ''}): commit them, or pass "
                               f"--allow-dirty to record a run that no commit reproduces")
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    ds = open_dataset(data)
    from inrseg.methods.base import check_spatial_ndim, segmenter_class

    for spec in specs:  # before any training: a method that cannot segment this data
        check_spatial_ndim(segmenter_class(spec.method), ds.spatial_ndim, data)
    train, val = split_by_subject(ds.train, val_fraction, split_seed)
    test = list(ds.test)
    if not test or any(c.label_path is None for c in test):
        raise InputError(data, "bench needs labelled test cases (labelsTs / test subjects with labels)")
    if max_test_cases is not None:
        test = test[:max_test_cases]
    final, partial = new_run_dir(out, ds.name)
    (partial / "logs").mkdir()
    provenance = {"date": utc_now().strftime("%Y-%m-%d %H:%M UTC"),
                  "commit": git["commit"], "dirty": git["dirty"], "changed": git["changed"],
                  "machine": machine_line(dev), "device": str(dev), "threads": torch.get_num_threads(),
                  "command": command or " ".join(sys.argv), "libraries": library_versions(),
                  "seeds": list(seeds)}
    n_runs = len(specs) * len(seeds)
    status(f"bench {ds.name}: {len(specs)} methods x {len(seeds)} seeds = {n_runs} runs of "
           f"{budget_minutes if budget_minutes else 'unlimited'} min each ({len(train)} train / {len(val)} val / "
           f"{len(test)} test cases); writing {partial}")
    region_set = REGION_SETS[regions] if regions else None
    runs: list[RunResult] = []
    examples: dict[str, dict] = {}
    t_start = time.perf_counter()
    try:
        for seed in seeds:
            for spec in specs:
                status(f"bench: {spec.label}, seed {seed}")
                log = partial / "logs" / f"{spec.label.replace(':', '-')}-seed{seed}.metrics.jsonl"
                res, preds, _ = run_one(spec, ds, train, val, test, seed, budget_minutes, dev, log, region_set,
                                        keep_predictions=html and seed == seeds[0])
                runs.append(res)
                if preds:
                    examples[spec.label] = preds
                with open(partial / "runs.jsonl", "a") as f:  # what a crashed run still has
                    f.write(json.dumps(json_safe(_run_dict(res, ds.label_names))) + "\n")
                # the table's definition: the mean over classes of each class's mean over cases
                status(f"bench: {spec.label}, seed {seed}: mean foreground Dice "
                       f"{summarize([m for _, m in res.cases], ds.label_names)['mean_foreground_dice']:.4f}")
        agg = aggregate(runs, ds.label_names, [s.label for s in specs])
        result = {"dataset": ds.name, "data": str(Path(data).resolve()), "label_names": ds.label_names,
                  "spatial_ndim": ds.spatial_ndim, "budget_minutes": budget_minutes,
                  "split": {"seed": split_seed, "val_fraction": val_fraction, "train": len(train), "val": len(val),
                            "test": len(test), "val_subjects": sorted({c.subject_id for c in val}),
                            "test_cases": [c.case_id for c in test]},
                  "provenance": provenance, "methods": agg, "runs": [_run_dict(r, ds.label_names) for r in runs],
                  "wall_s": time.perf_counter() - t_start}
        (partial / "results.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
        write_results_csv(partial / "results.csv", runs, ds.label_names)
        (partial / "results.md").write_text(results_markdown(result))
        if html:
            from inrseg.viz.html_report import bench_report

            (partial / "report.html").write_text(bench_report(result, runs, examples, test, partial / "logs"))
        (partial / "runs.jsonl").unlink()
        os.replace(partial, final)
    except BaseException:
        status(f"bench stopped: the runs it finished are in {partial}/runs.jsonl")
        raise
    status(f"bench: wrote {final} ({time.perf_counter() - t_start:.0f} s)")
    return final


def _run_dict(r: RunResult, names: Sequence[str]) -> dict:
    """A run as JSON: per-case rows (``CaseMetrics.to_row``), regions as their Dice / HD95."""
    return {"method": r.method, "seed": r.seed, "params": r.params, "train_s": r.train_s, "infer_s": r.infer_s,
            "chosen": r.chosen, "steps_curve": r.steps_curve, "history": r.history,
            "cases": [{"case": cid, **m.to_row(names)} for cid, m in r.cases],
            "regions": [{"case": cid, **{reg: {"dice": float(rm.dice[1]), "hd95_mm": float(rm.hd95_mm[1])}
                                         for reg, rm in v.items()}} for cid, v in r.regions]}
