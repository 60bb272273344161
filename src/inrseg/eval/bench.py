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
* ``logs/<method>-seed<k>.metrics.jsonl``: each run's per-step metrics log (:func:`run_file_stem`);
* ``models/<method>-seed<k>/``: each run's checkpoint and test predictions (unless ``keep=False``).

Statistics: a method's figure is the mean +- sample sd over seeds of its per-seed mean over
test cases. The paired test compares each method with the first on the per-case mean
foreground Dice averaged over seeds (one pair per test case; scipy's Wilcoxon signed-rank,
two-sided).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.core.files import first_missing_ancestor, refuse_overlap, remove_made_folders, write_text
from inrseg.core.progress import status
from inrseg.data.cases import Case, Dataset
from inrseg.data.layouts import open_dataset
from inrseg.data.postprocess import apply_postprocessing
from inrseg.data.nifti import save_labels
from inrseg.data.volume import Volume
from inrseg.data.splits import fold_splits, split_by_subject
from inrseg.engine import Budget, distributed_env, resolve_device
from inrseg.eval.ensemble import SeedEnsemble
from inrseg.eval.evaluate import json_safe
from inrseg.eval.jobs import BenchJob, execute_job, run_jobs
from inrseg.eval.provenance import git_state, library_versions, machine_line, source_repo, utc_now
from inrseg.eval.stats import RunResult, aggregate
from inrseg.eval.tables import results_markdown, run_dict, write_results_csv
from inrseg.methods.postprocess import choose_from_predictions, choose_postprocessing
from inrseg.methods.tta import tta_probabilities
from inrseg.methods.registry import MethodSpec, build_model, check_data_ndim, parse_methods, resolve
from inrseg.metrics import REGION_SETS, region_metrics, score_case, summarize

__all__ = ["OUT_OF_FOLD", "ReportHook", "RunOutput", "build_segmenter", "ensemble_run", "new_run_dir", "run_bench",
           "run_file_stem", "run_one"]

#: the suffix of a method's out-of-fold row under ``--folds``
OUT_OF_FOLD = "out-of-fold"

#: ``report(result, runs, examples, test_cases, logs_dir) -> HTML``: writes ``report.html``
ReportHook = Callable[[dict, list, dict, Sequence[Case], Path], str]


def build_segmenter(spec: MethodSpec, ds: Dataset, seed: int, budget_minutes: float | None,
                    device: torch.device, steps: int | None = None):
    """The model ``inrseg train METHOD`` builds for ``ds`` with the same options: both resolve
    the config with :func:`inrseg.methods.registry.resolve`. ``steps``: a fixed number of
    optimiser steps (``train --steps``) instead of the method's own."""
    _, cfg = resolve(spec, ds.spatial_ndim, options={"seed": seed, "budget_minutes": budget_minutes,
                                                     "steps": steps})
    return build_model(spec, ds.spatial_ndim, ds.label_names, len(ds.channel_names), cfg, device=device)


class RunOutput(NamedTuple):
    """What :func:`run_one` returns."""

    result: RunResult                  # the test cases' scores
    predictions: dict                  # {case_id: (*S,) label map} when asked for (the report's examples)
    model: object                      # the trained model
    tta: RunResult | None              # the "+tta" row, or None
    held_out: RunResult | None         # the validation cases' scores (score_val: out-of-fold), or None


def run_one(spec: MethodSpec, ds: Dataset, train: Sequence[Case], val: Sequence[Case], test: Sequence[Case],
            seed: int | str, budget_minutes: float | None, device: torch.device, log_path: Path,
            regions: dict | None, keep_predictions: bool,
            ensemble: SeedEnsemble | None = None,
            tta: bool = False, keep_dir: Path | None = None, score_val: bool = False,
            steps: int | None = None) -> RunOutput:
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

    ``keep_dir``: the trained model is saved there (``model.safetensors``) with its post-processed
    test predictions (``predictions/<case>.nii.gz``, on each image's grid and affine).
    ``score_val``: the validation cases are scored too, post-processed like the test cases (the
    out-of-fold row of cross-validation), from the predictions the post-processing choice made.

    Returns a :class:`RunOutput`."""
    budget = Budget(budget_minutes)  # starts before the model is built: all of fit counts
    seed_int = int(str(seed).split(".")[0])
    model = build_segmenter(spec, ds, seed_int, budget_minutes, device, steps)
    t0 = time.perf_counter()
    model.fit(list(train), list(val), budget=budget, log_path=log_path)
    val_labels: dict[str, np.ndarray] = {}

    def keep_val(case_id: str, probs: np.ndarray) -> None:
        if score_val:
            val_labels[case_id] = np.asarray(probs).argmax(0)
        if ensemble is not None:
            ensemble.keep("val", case_id, probs)

    model.postprocessing = choose_postprocessing(model, list(val), keep_val if (score_val or ensemble is not None)
                                                 else None, budget=budget)
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
        if keep_dir is not None:
            save_labels(np.asarray(pred), keep_dir / "predictions" / f"{case.case_id}.nii.gz", image)
    if keep_dir is not None:
        model.save(keep_dir / "model.safetensors")
    held_out = _score_held_out(spec, model, val, val_labels, seed, train_s, ds, regions) if score_val else None
    res = RunResult(spec.label, seed, int(model.num_params), train_s, seconds, cases, region_rows,
                    list(model.history), model.steps_curve() if hasattr(model, "steps_curve") else [],
                    {**model.chosen_settings(), **model.postprocessing})
    tta_res = None
    if tta:
        members = len(model.tta_members())
        tta_res = RunResult(f"{spec.label} +tta", seed, res.params, train_s, tta_seconds, tta_cases, tta_regions,
                            chosen={"tta members": members, **model.postprocessing})
    return RunOutput(res, preds, model, tta_res, held_out)


def _score_held_out(spec: MethodSpec, model, val: Sequence[Case], labels_of: dict[str, np.ndarray], seed: int | str,
                    train_s: float, ds: Dataset, regions: dict | None) -> RunResult:
    """The validation cases scored like test cases (post-processed with the model's choice);
    ``labels_of`` holds the labels the post-processing choice already predicted."""
    cases, region_rows, seconds = [], [], []
    for case in val:
        image, labels = case.load()
        t1 = time.perf_counter()
        pred = labels_of.get(case.case_id)
        if pred is None:  # the choice was skipped (no budget left): predict now
            pred = model.predict(image).data
        pred = apply_postprocessing(pred, model.postprocessing)
        seconds.append(time.perf_counter() - t1)
        _score_into(cases, region_rows, case.case_id, pred, labels, ds.num_classes, regions)
    return RunResult(f"{spec.label} {OUT_OF_FOLD}", seed, int(model.num_params), train_s, seconds, cases,
                     region_rows, chosen=dict(model.postprocessing))


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




def run_file_stem(label: str, seed: int | str) -> str:
    """The file-name stem of a run's log and kept model: ``morse-baseline-unet-2d-seed0``
    (with folds ``...-seed0.f1``)."""
    return label.replace(":", "-").replace("@", "-").replace(" ", "_") + f"-seed{seed}"


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
              ensemble: bool | None = None, tta: bool = False, folds: int | None = None, keep: bool = True,
              jobs: int = 1, scheduler: str = "none", slurm: dict | None = None, steps: int | None = None) -> Path:
    """Run the benchmark (see the module docstring); returns the finished run folder. ``report``:
    the hook that renders ``report.html`` (``None``: no HTML report). ``ensemble``: also score
    each method's seed ensemble as the row ``"<method> ensemble"`` (:func:`ensemble_run`;
    ``None``: when there are several seeds). ``tta``: also score every run with test-time
    augmentation, as the row ``"<method> +tta"`` (:func:`run_one`).

    ``folds``: K-fold cross-validation by subject (:func:`~inrseg.data.splits.fold_splits`)
    instead of one validation split: each (method, seed) trains K models, fold ``f`` choosing on
    (and scoring) its held-out subjects; each fold's model also scores the test split (rows
    ``<method>``, one per seed and fold, seed ``"s.fF"``), and the held-out scores of the K folds
    make the row ``"<method> out-of-fold"`` (every training subject once per seed, paired against
    the first method's out-of-fold row). ``keep``: each run's checkpoint and test predictions
    under ``models/<method>-seed<s>[-fold<f>]/``. ``jobs`` / ``scheduler`` / ``slurm``: where the
    runs go (:func:`inrseg.eval.jobs.run_jobs`); the results do not depend on it. ``steps``: every
    method trains a fixed number of optimiser steps (reproducible to the bit; with or without a
    budget, which then still stops it)."""

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
        resolve(spec, ds.spatial_ndim, options={"steps": steps})
    status(f"bench {ds.name}: {ds.subject_rule}")
    if folds is not None:
        fold_sets = fold_splits(ds.train, folds, split_seed)
        train, val = fold_sets[0]
    else:
        train, val = split_by_subject(ds.train, val_fraction, split_seed)
        fold_sets = [(train, val)]
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
    n_runs = len(specs) * len(seeds) * len(fold_sets)
    where = (f"{jobs} at a time" if scheduler == "none" else f"through submitit ({scheduler}), {jobs} at a time")
    split_line = (f"{folds} folds of {len(ds.train)} training cases" if folds else
                  f"{len(train)} train / {len(val)} val")
    status(f"bench {ds.name}: {len(specs)} methods x {len(seeds)} seeds"
           f"{f' x {folds} folds' if folds else ''} = {n_runs} runs of "
           f"{budget_minutes if budget_minutes else 'unlimited'} min each, {where} ({split_line} / "
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

        with_ensembles = len(seeds) * len(fold_sets) > 1 if ensemble is None else ensemble
        ensembles = {s.label: SeedEnsemble() for s in specs} if with_ensembles else {}
        plan = []
        for seed in seeds:
            for spec in specs:
                for f, (tr, va) in enumerate(fold_sets):
                    run_seed = f"{seed}.f{f}" if folds else seed
                    name = run_file_stem(spec.label, run_seed)
                    plan.append((spec, seed, BenchJob(
                        str(data), None, spec.text, run_seed, tuple(c.case_id for c in tr),
                        tuple(c.case_id for c in va), tuple(c.case_id for c in test), budget_minutes, str(dev),
                        threads if jobs == 1 and scheduler == "none" else (threads or 1),
                        str(partial / "logs" / f"{name}.metrics.jsonl"), regions,
                        str(partial / "models" / name) if keep else None, tta, spec.label in ensembles,
                        report is not None and seed == seeds[0] and f == 0, bool(folds), steps)))
        if jobs == 1 and scheduler == "none":  # in this process, reporting each run as it ends
            outputs = []
            for spec, seed, job in plan:
                status(f"bench: {spec.label}, seed {job.seed}")
                outputs.append(execute_job(job))
                record(outputs[-1].result)
                if outputs[-1].tta is not None:
                    record(outputs[-1].tta)
        else:
            outputs = run_jobs([j for _, _, j in plan], jobs, scheduler, partial / "scheduler", slurm)
            for out in outputs:
                record(out.result)
                if out.tta is not None:
                    record(out.tta)
        held_out: dict[tuple[str, int], list[RunResult]] = {}
        for (spec, seed, job), out in zip(plan, outputs):  # in the plan's order: a serial run's sums
            for which, case_id, probs in out.ensemble_items:
                ensembles[spec.label].keep(which, case_id, probs)
            if out.predictions:
                examples[spec.label] = out.predictions
            if out.held_out is not None:
                held_out.setdefault((spec.label, seed), []).append(out.held_out)
        oof_labels = []
        for (label, seed), parts in held_out.items():
            record(RunResult(f"{label} {OUT_OF_FOLD}", seed, parts[0].params, sum(p.train_s for p in parts),
                             [t for p in parts for t in p.infer_s], [c for p in parts for c in p.cases],
                             [r for p in parts for r in p.regions], chosen={"folds": len(parts)}))
            if f"{label} {OUT_OF_FOLD}" not in oof_labels:
                oof_labels.append(f"{label} {OUT_OF_FOLD}")
        ens_val = list(ds.train) if folds else val
        for label, members in ensembles.items():
            record(ensemble_run(label, members, [r for r in runs if r.method == label], ds, ens_val, test,
                                region_set))
        labels = [s.label for s in specs] + ([f"{s.label} +tta" for s in specs] if tta else [])
        agg = aggregate(runs, ds.label_names, labels + [f"{k} ensemble" for k in ensembles])
        if oof_labels:  # out-of-fold rows are paired among themselves (other cases than the test rows)
            agg.update(aggregate(runs, ds.label_names, oof_labels))
        result = {"dataset": ds.name, "data": str(Path(data).resolve()), "label_names": ds.label_names,
                  "spatial_ndim": ds.spatial_ndim, "budget_minutes": budget_minutes,
                  "split": {"seed": split_seed, "val_fraction": None if folds else val_fraction,
                            "train": len(train), "val": len(val), "test": len(test),
                            "val_subjects": sorted({c.subject_id for c in val}),
                            "folds": folds, "fold_subjects": [sorted({c.subject_id for c in va})
                                                              for _, va in fold_sets] if folds else None,
                            "test_cases": [c.case_id for c in test]},
                  "kept_models": "models/" if keep else None,
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
