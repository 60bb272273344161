"""``inrseg bench``: several methods x several seeds on one dataset, one split, one report.

One split by subject (the validation subjects carved from the training subjects with
``split_seed``, the test subjects untouched), the same for every method and seed. Each
(method, seed) run trains with its own wall-time :class:`~inrseg.engine.Budget` of
``budget_minutes`` that covers the whole ``fit``: training, MetaSeg's phase 2 and T_f choice,
NISF's steps curve. Everything a method chooses, it chooses on the validation subjects, its
post-processing included (after ``fit``, as ``inrseg train`` does). Then every test case is
predicted and post-processed (timed) and scored with :func:`inrseg.metrics.score_case`, the
project's one metric definition (the one ``inrseg evaluate`` uses). With several seeds (or
``ensemble=True``) each method's seed ensemble is one more row, ``"<method> ensemble"``: the
argmax of its seeds' mean probabilities (:func:`ensemble_run`).

Results: a new folder per run, ``OUT/<UTC date-time>-<dataset>/``, filled in
``<that>.partial/`` while it runs and renamed when done (a crashed run leaves the ``.partial``
folder with the runs it finished, never a folder that looks complete; one that fails before any
run finished leaves nothing), holding

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

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.core.files import first_missing_ancestor, refuse_overlap, remove_made_folders, write_text
from inrseg.core.progress import status
from inrseg.data.cases import Case, Dataset
from inrseg.data.layouts import open_dataset
from inrseg.data.postprocess import apply_postprocessing
from inrseg.data.volume import Volume
from inrseg.data.splits import split_by_subject
from inrseg.engine import Budget, distributed_env, resolve_device
from inrseg.eval.ensemble import SeedEnsemble
from inrseg.eval.evaluate import json_safe
from inrseg.eval.provenance import git_state, library_versions, machine_line, source_repo, utc_now
from inrseg.eval.stats import RunResult, aggregate
from inrseg.eval.tables import results_markdown, run_dict, write_results_csv
from inrseg.methods.postprocess import choose_from_predictions, choose_postprocessing
from inrseg.methods.tta import tta_probabilities
from inrseg.methods.registry import MethodSpec, build_model, check_data_ndim, parse_methods, resolve
from inrseg.metrics import REGION_SETS, region_metrics, score_case, summarize

__all__ = ["ReportHook", "build_segmenter", "ensemble_run", "new_run_dir", "run_bench", "run_one"]

#: ``report(result, runs, examples, test_cases, logs_dir) -> HTML``: writes ``report.html``
ReportHook = Callable[[dict, list, dict, Sequence[Case], Path], str]


def build_segmenter(spec: MethodSpec, ds: Dataset, seed: int, budget_minutes: float | None,
                    device: torch.device):
    """The model ``inrseg train METHOD`` builds for ``ds`` with the same options: both resolve
    the config with :func:`inrseg.methods.registry.resolve`."""
    _, cfg = resolve(spec, ds.spatial_ndim, options={"seed": seed, "budget_minutes": budget_minutes})
    return build_model(spec, ds.spatial_ndim, ds.label_names, len(ds.channel_names), cfg, device=device)


def run_one(spec: MethodSpec, ds: Dataset, train: Sequence[Case], val: Sequence[Case], test: Sequence[Case],
            seed: int, budget_minutes: float | None, device: torch.device, log_path: Path,
            regions: dict | None, keep_predictions: bool,
            ensemble: SeedEnsemble | None = None,
            tta: bool = False) -> tuple[RunResult, dict[str, np.ndarray], object, RunResult | None]:
    """Train ``spec`` with ``seed`` under its own budget, choose its post-processing on the
    validation cases (:func:`~inrseg.methods.postprocess.choose_postprocessing`, as ``train``
    does; counted in ``train_s``), then predict, post-process and score every test case (the
    post-processing counted in the inference time). With ``ensemble``, the validation and test
    cases are predicted as probabilities (their argmax are ``predict``'s labels), which go to
    ``ensemble``.

    With ``tta``, every test case is also predicted with test-time augmentation
    (:func:`~inrseg.methods.tta.tta_probabilities`: mirrorings for the CNNs, repeated fits for
    MetaSeg and NISF), post-processed the same way, timed on its own and scored as the row
    ``"<method> +tta"``.

    Returns the result, the predictions ``{case_id: (*S,) label map}`` (when
    ``keep_predictions``), the model and the TTA row (``None`` without ``tta``)."""
    budget = Budget(budget_minutes)  # starts before the model is built: all of fit counts
    model = build_segmenter(spec, ds, seed, budget_minutes, device)
    t0 = time.perf_counter()
    model.fit(list(train), list(val), budget=budget, log_path=log_path)
    model.postprocessing = choose_postprocessing(model, list(val), functools.partial(ensemble.keep, "val")
                                                 if ensemble is not None else None, budget=budget)
    train_s = time.perf_counter() - t0
    cases, region_rows, seconds, preds = [], [], [], {}
    tta_cases, tta_regions, tta_seconds = [], [], []
    for case in test:
        image, labels = case.load()
        if tta:
            t1 = time.perf_counter()
            mean, _ = tta_probabilities(model, image)
            tta_pred = apply_postprocessing(mean.data.argmax(0), model.postprocessing)
            tta_seconds.append(time.perf_counter() - t1)
            _score_into(tta_cases, tta_regions, case.case_id, tta_pred, labels, ds.num_classes, regions)
        t1 = time.perf_counter()
        if ensemble is None:
            pred = model.predict(image).data
        else:
            probs = model.predict_probabilities(image).data
            pred = probs.argmax(0)
        pred = apply_postprocessing(pred, model.postprocessing)
        seconds.append(time.perf_counter() - t1)
        if ensemble is not None:
            ensemble.keep("test", case.case_id, probs)
        _score_into(cases, region_rows, case.case_id, pred, labels, ds.num_classes, regions)
        if keep_predictions:
            preds[case.case_id] = np.asarray(pred)
    res = RunResult(spec.label, seed, int(model.num_params), train_s, seconds, cases, region_rows,
                    list(model.history), model.steps_curve() if hasattr(model, "steps_curve") else [],
                    {**model.chosen_settings(), **model.postprocessing})
    tta_res = None
    if tta:
        members = len(model.tta_members())
        tta_res = RunResult(f"{spec.label} +tta", seed, res.params, train_s, tta_seconds, tta_cases, tta_regions,
                            chosen={"tta members": members, **model.postprocessing})
    return res, preds, model, tta_res


def _score_into(cases: list, region_rows: list, case_id: str, pred: np.ndarray, labels: Volume, num_classes: int,
                regions: dict | None) -> None:
    """Score one test case's label map ``pred`` against ``labels`` (:func:`score_case`, and the
    ``regions``' :func:`region_metrics`), appending to ``cases`` and ``region_rows``."""
    ignore = labels.meta.get("ignore_label")
    cases.append((case_id, score_case(pred, labels.data, num_classes, labels.spacing, True, ignore)))
    if regions:
        region_rows.append((case_id, region_metrics(pred, labels.data, regions, labels.spacing, True, ignore)))


def ensemble_run(label: str, ensemble: SeedEnsemble, members: Sequence[RunResult], ds: Dataset,
                 val: Sequence[Case], test: Sequence[Case], regions: dict | None) -> RunResult:
    """The row ``"<label> ensemble"``: the argmax of the mean probabilities of ``members`` (one
    run per seed), post-processed as chosen on the ensemble's own validation predictions, scored
    like any run. ``train_s``: the sum of the members'; per-case inference time: the sum of the
    members' (an ensemble runs every member); params: the sum (it stores every member)."""
    name = f"{label} ensemble"
    spec = choose_from_predictions(((ensemble.labels("val", c.case_id), c.load_labels()) for c in val),
                                   ds.label_names, name)
    cases, region_rows = [], []
    for case in test:
        pred = apply_postprocessing(ensemble.labels("test", case.case_id), spec)
        _score_into(cases, region_rows, case.case_id, pred, case.load_labels(), ds.num_classes, regions)
    seeds = [r.seed for r in members]
    return RunResult(name, "+".join(map(str, seeds)), sum(r.params for r in members),
                     sum(r.train_s for r in members), [sum(t) for t in zip(*(r.infer_s for r in members))],
                     cases, region_rows, chosen={"members": f"seeds {', '.join(map(str, seeds))}", **spec})




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
              report: ReportHook | None = None, max_test_cases: int | None = None,
              ensemble: bool | None = None, tta: bool = False) -> Path:
    """Run the benchmark (see the module docstring); returns the finished run folder. ``report``:
    the hook that renders ``report.html`` (``None``: no HTML report). ``ensemble``: also score
    each method's seed ensemble as the row ``"<method> ensemble"`` (:func:`ensemble_run`;
    ``None``: when there are several seeds). ``tta``: also score every run with test-time
    augmentation, as the row ``"<method> +tta"`` (:func:`run_one`)."""

    refuse_overlap({"--out": out}, {"--data": data}, contains=False)  # a run folder inside the dataset
    specs = parse_methods(methods)
    if distributed_env() is not None:
        raise InputError(None, "bench runs its methods one after another in one process: start it without "
                         "torchrun (--device cuda uses one GPU)")
    if regions is not None and regions not in REGION_SETS:
        raise InputError(None, f"--regions: unknown region set {regions!r} ({', '.join(REGION_SETS)})")
    if not seeds:
        raise InputError(None, "--seeds: at least one seed")
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
    for spec in specs:  # before any training: a method that cannot segment this data, a bad variant
        check_data_ndim(spec, ds.spatial_ndim, data)
        resolve(spec, ds.spatial_ndim)
    status(f"bench {ds.name}: {ds.subject_rule}")
    train, val = split_by_subject(ds.train, val_fraction, split_seed)
    test = list(ds.test)
    if not test or any(c.label_path is None for c in test):
        raise InputError(data, "bench needs labelled test cases (labelsTs / test subjects with labels)")
    if max_test_cases is not None:
        test = test[:max_test_cases]
    made = first_missing_ancestor(out / "run")
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
        def record(res: RunResult) -> None:
            runs.append(res)
            with open(partial / "runs.jsonl", "a", encoding="utf-8") as f:  # what a crashed run still has
                f.write(json.dumps(json_safe(run_dict(res, ds.label_names))) + "\n")
            # the table's definition: the mean over classes of each class's mean over cases
            status(f"bench: {res.method}, seed {res.seed}: mean foreground Dice "
                   f"{summarize([m for _, m in res.cases], ds.label_names)['mean_foreground_dice']:.4f}")

        with_ensembles = len(seeds) > 1 if ensemble is None else ensemble
        ensembles = {s.label: SeedEnsemble() for s in specs} if with_ensembles else {}
        for seed in seeds:
            for spec in specs:
                status(f"bench: {spec.label}, seed {seed}")
                log = partial / "logs" / f"{spec.label.replace(':', '-')}-seed{seed}.metrics.jsonl"
                res, preds, _, tta_res = run_one(spec, ds, train, val, test, seed, budget_minutes, dev, log,
                                                 region_set, keep_predictions=report is not None and seed == seeds[0],
                                                 ensemble=ensembles.get(spec.label), tta=tta)
                if preds:
                    examples[spec.label] = preds
                record(res)
                if tta_res is not None:
                    record(tta_res)
        for label, members in ensembles.items():
            record(ensemble_run(label, members, [r for r in runs if r.method == label], ds, val, test, region_set))
        labels = [s.label for s in specs] + ([f"{s.label} +tta" for s in specs] if tta else [])
        agg = aggregate(runs, ds.label_names, labels + [f"{k} ensemble" for k in ensembles])
        result = {"dataset": ds.name, "data": str(Path(data).resolve()), "label_names": ds.label_names,
                  "spatial_ndim": ds.spatial_ndim, "budget_minutes": budget_minutes,
                  "split": {"seed": split_seed, "val_fraction": val_fraction, "train": len(train), "val": len(val),
                            "test": len(test), "val_subjects": sorted({c.subject_id for c in val}),
                            "test_cases": [c.case_id for c in test]},
                  "provenance": provenance, "methods": agg, "runs": [run_dict(r, ds.label_names) for r in runs],
                  "wall_s": time.perf_counter() - t_start}
        write_text(partial / "results.json", json.dumps(json_safe(result), indent=1) + "\n")
        write_results_csv(partial / "results.csv", runs, ds.label_names)
        write_text(partial / "results.md", results_markdown(result))
        if report is not None:
            write_text(partial / "report.html", report(result, runs, examples, test, partial / "logs"))
        (partial / "runs.jsonl").unlink()
        os.replace(partial, final)
    except Exception:
        if not runs:  # a failure before any run finished: nothing worth keeping
            shutil.rmtree(partial, ignore_errors=True)
            remove_made_folders(made)
        else:
            status(f"bench stopped: the runs it finished are in {partial}/runs.jsonl")
        raise
    except BaseException:
        status(f"bench stopped: the runs it finished are in {partial}/runs.jsonl")
        raise
    status(f"bench: wrote {final} ({time.perf_counter() - t_start:.0f} s)")
    return final
