"""Benchmark harness: methods x datasets through the Segmenter protocol only.

A benchmark script builds models with factories and calls :func:`run_method` for each; the
harness trains on the training subjects (validation carved out by subject), times test-time
inference per case with ``time.perf_counter`` (median over cases), scores the test cases with
:mod:`inrseg.metrics`, and :func:`write_results` stores the markdown table under
``benchmarks/results/`` with date, commit, machine and command.

Run methods one after the other in one process (never two CPU-heavy jobs at once): the
machines are shared and noisy, so methods are compared side by side in one run.
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from inrseg.data.grids import resampled_affine
from inrseg.data.io import Volume
from inrseg.data.layouts import Case, Dataset
from inrseg.metrics import CaseMetrics, score_case, summarize
from inrseg.methods.supervised import PRESETS, SegResNetSegmenter, SupervisedConfig, SupervisedSegmenter

# INRSEG_RESULTS: write elsewhere (smoke tests), default benchmarks/results/
RESULTS = Path(os.environ.get("INRSEG_RESULTS", Path(__file__).resolve().parent / "results"))
SHARED_DATA = Path(os.environ.get("INRSEG_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


@dataclass
class MethodResult:
    """One row of a benchmark table."""

    method: str
    dataset: str
    summary: dict
    params: int
    train_seconds: float
    infer_seconds_median: float
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        s = self.summary
        return {"dataset": self.dataset, "method": self.method,
                "mean fg Dice": s["mean_foreground_dice"], "gen. Dice": s["generalized_dice"],
                "Jaccard": s["jaccard"], "HD95 mm": s["hd95_mm"], "ASD mm": s["asd_mm"],
                "params": self.params, "train s": self.train_seconds,
                "infer s/case": self.infer_seconds_median, **self.extra}


def num_params(model) -> int:
    """Parameters of a segmenter: its ``num_params`` when it reports one (MetaSeg keeps its
    weights in a dict), else the sum over its nn.Module attributes."""
    if hasattr(model, "num_params"):
        return int(model.num_params)
    seen, total = set(), 0
    for value in vars(model).values():
        if isinstance(value, torch.nn.Module):
            for p in value.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def frame_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                  spacing: Sequence[float] | None = None, distances: bool = True,
                  ignore_label: int | None = None) -> list[CaseMetrics]:
    """Metrics of one case as a one-entry list, ``[score_case(...)]``: the project's one
    definition (:func:`inrseg.metrics.score_case`), the one ``inrseg evaluate`` and NISF's step
    selection use. A 3D+t ``(X, Y, Z, T)`` case is one subject: the mean over its annotated
    frames of the 3D per-frame metrics (spatial ``spacing``, so HD95 / ASD stay physical
    distances). Voxels of ``gt`` equal to ``ignore_label`` are skipped."""
    return [score_case(pred, gt, num_classes, spacing, distances, ignore_label)]


def downsample2(image: Volume) -> Volume:
    """2x mean pooling of every spatial axis (axes of odd length lose their last voxel).

    3D+t images: the three spatial axes are pooled, time is kept (frame by frame)."""
    if image.spatial_ndim == 4:
        c, t = image.data.shape[0], image.data.shape[4]
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image.data, 4, 1)))  # (C, T, X, Y, Z)
        low = F.avg_pool3d(x.reshape(c * t, *x.shape[2:]), 2)
        low = np.moveaxis(low.reshape(c, t, *low.shape[1:]).numpy(), 1, 4)
        return Volume(np.ascontiguousarray(low), resampled_affine(image.affine, image.shape, low.shape[1:]),
                      4, image.time_step, path=image.path)
    x = torch.from_numpy(image.data)[None]
    pool = F.avg_pool2d if image.spatial_ndim == 2 else F.avg_pool3d
    low = pool(x, 2)[0].numpy()
    new_shape = low.shape[1:]
    return Volume(low, resampled_affine(image.affine, image.shape, new_shape), image.spatial_ndim,
                  path=image.path)


def lowres_dice(model, cases: Sequence[Case], num_classes: int) -> float:
    """Mean foreground Dice of predictions made from the 2x-downsampled image (:func:`downsample2`)
    at full resolution (``model.predict(low, scale=2)``; 3D+t: ``scale=(2, 2, 2, 1)``, time kept),
    against the full-resolution labels (cropped to the even part of odd axes)."""
    metrics = []
    for case in cases:
        image, labels = case.load()
        low = downsample2(image)
        if image.spatial_ndim == 4:
            pred = model.predict(low, scale=(2.0, 2.0, 2.0, 1.0))
            full = tuple(2 * n for n in low.shape[:3]) + (low.shape[3],)
        else:
            pred = model.predict(low, scale=2.0)
            full = tuple(2 * n for n in low.shape)
        gt = labels.data[tuple(slice(0, n) for n in full)]
        metrics += frame_metrics(pred.data, gt, num_classes, distances=False,
                                 ignore_label=labels.meta.get("ignore_label"))
    return summarize(metrics, [f"c{i}" for i in range(num_classes)])["mean_foreground_dice"]


def evaluate_cases(model, cases: Sequence[Case], num_classes: int, scale: float = 1.0,
                   distances: bool = True) -> tuple[dict, list[float]]:
    """Predict every case (timed) and score it; returns ``(summary, seconds_per_case)``.
    3D+t cases are one case per subject, the mean over annotated frames (:func:`frame_metrics`)."""
    metrics, seconds = [], []
    for case in cases:
        image, labels = case.load()
        t0 = time.perf_counter()
        pred = model.predict(image, scale=scale)
        seconds.append(time.perf_counter() - t0)
        metrics += frame_metrics(pred.data, labels.data, num_classes, labels.spacing, distances,
                                 labels.meta.get("ignore_label"))
    names = [f"c{i}" for i in range(num_classes)]
    return summarize(metrics, names), seconds


def run_method(name: str, make_model: Callable[[Dataset], object], ds: Dataset, train: Sequence[Case],
               val: Sequence[Case], test: Sequence[Case] | None = None,
               state_path: Path | None = None, device: str = "cpu") -> tuple[object, MethodResult]:
    """Train ``make_model(ds)`` on ``device`` on ``train`` (selecting on ``val``) and score it on
    ``test``."""
    from inrseg.engine import resolve_device

    model = make_model(ds).to(resolve_device(device))
    t0 = time.perf_counter()
    model.fit(train, val, state_path=state_path)
    train_s = time.perf_counter() - t0
    summary, secs = evaluate_cases(model, test if test is not None else ds.test, ds.num_classes)
    summary["per_class"] = {ds.label_names[int(k[1:])]: v for k, v in summary["per_class"].items()}
    return model, MethodResult(name, ds.name, summary, num_params(model), train_s, statistics.median(secs))


def supervised_factory(preset: str, minutes: float, steps: int = 100_000, seed: int = 0):
    """A factory ``ds -> segmenter`` for a preset, trained for ``minutes`` (or ``steps``)."""

    def make(ds):
        cfg = SupervisedConfig(**PRESETS[preset], steps=steps, budget_minutes=minutes, seed=seed,
                               val_every=50 if ds.spatial_ndim == 2 else 25)
        if ds.spatial_ndim == 3:
            cfg = replace(cfg, batch_size=2, patch_size=(64, 64, 64))
        cls = SegResNetSegmenter if cfg.arch == "segresnet" else SupervisedSegmenter
        return cls(ds.label_names, ds.spatial_ndim, len(ds.channel_names), cfg)

    return make


def machine() -> str:
    """A one-line description of the machine the figures were measured on."""
    from inrseg.eval.bench import cpu_model

    cpu = cpu_model()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {dev}")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# the commit the run started from (a long run's results must not name a later commit)
START_COMMIT = commit()


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows of dicts -> a GitHub markdown table (floats to 4 significant decimals)."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def fmt(v):
        if isinstance(v, float):
            return "nan" if not np.isfinite(v) else (f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}")
        if isinstance(v, int) and v >= 10000:
            return f"{v / 1e6:.3f}M"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, sections: dict[str, str], notes: str = "") -> Path:
    """Write ``benchmarks/results/<date>-<name>.md`` with header (date, commit, machine, command)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    path = RESULTS / f"{now:%Y-%m-%d}-{name}.md"
    k = 1
    while path.exists():  # a second run the same day never overwrites the first
        k += 1
        path = RESULTS / f"{now:%Y-%m-%d}-{name}-{k}.md"
    body = [f"# {name}", "", f"- date: {now:%Y-%m-%d %H:%M} UTC", f"- commit: {START_COMMIT}",
            f"- machine: {machine()}", f"- command: `{' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`", ""]
    if notes:
        body += [notes, ""]
    for title, table in sections.items():
        body += [f"## {title}", "", table, ""]
    path.write_text("\n".join(body))
    return path


def parse_overrides(config_cls, items: Sequence[str]) -> dict:
    """``["key=value", ...]`` -> keyword overrides for the dataclass ``config_cls``.

    Values: ``none`` / ``true`` / ``false``; ``a,b,c`` -> a tuple of ints (or floats); numbers
    with ``.`` or ``e`` -> float, other numbers -> int; anything else stays a string."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_cls)}

    def scalar(v: str):
        low = v.lower()
        if low in ("none", "true", "false"):
            return {"none": None, "true": True, "false": False}[low]
        try:
            return float(v) if any(c in low for c in ".e") and not low.isalpha() else int(v)
        except ValueError:
            return v

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: not KEY=VALUE with a field of {config_cls.__name__}")
        out[key] = tuple(scalar(v) for v in value.split(",") if v) if "," in value else scalar(value)
    return out
