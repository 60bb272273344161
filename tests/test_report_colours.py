"""A method has one colour in every plot of report.html (bars, steps curves, training curves)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.axes

from inrseg.viz import html_report


def _result(methods, names):
    ms = (0.5, 0.1)
    summary = {"mean_foreground_dice": ms, "hd95_mm": ms, "asd_mm": ms, "train_s": ms, "infer_s_median": ms,
               "per_class_dice": {n: ms for n in names[1:]}}
    agg = {m: {"summary": summary, "params": 1000, "per_seed": [{"seed": 0}]} for m in methods}
    return {"label_names": names, "methods": agg, "provenance": {"seeds": [0], "date": "d"}, "split": {"test": 1},
            "budget_minutes": 1, "dataset": "ds", "data": "x"}


def test_same_colour_for_a_method_in_every_plot(tmp_path, monkeypatch):
    methods, names = ["unet", "morse", "metaseg"], ["bg", "a", "b"]
    runs = [SimpleNamespace(method="unet", seed=0, steps_curve=[], history=[{"step": 1, "val_dice": 0.4}]),
            SimpleNamespace(method="morse", seed=0, steps_curve=[], history=[{"step": 1, "val_dice": 0.5}]),
            # only the last method has a steps curve: the plot of curves holds it alone
            SimpleNamespace(method="metaseg", seed=0, steps_curve=[(10, 0.3), (20, 0.4)],
                            history=[{"step": 1, "val_dice": 0.6}])]
    seen: dict[str, set] = {}
    real_bar, real_plot = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.plot

    def bar(self, *args, label=None, color=None, **kw):
        seen.setdefault(label, set()).add(tuple(color))
        return real_bar(self, *args, label=label, color=color, **kw)

    def plot(self, *args, color=None, label=None, **kw):
        if label is not None:
            seen.setdefault(label, set()).add(tuple(color))
        return real_plot(self, *args, color=color, label=label, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    page = html_report.bench_report(_result(methods, names), runs, {}, [], tmp_path)
    assert "Dice against test-time steps" in page
    assert set(seen) == set(methods)
    assert all(len(c) == 1 for c in seen.values()), seen       # one colour per method across plots
    assert len({next(iter(c)) for c in seen.values()}) == 3    # and distinct methods differ
