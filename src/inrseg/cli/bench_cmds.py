"""``inrseg bench`` (methods side by side) and ``inrseg demo`` (MetaSeg end to end on phantoms)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer

from inrseg.cli.app import (DEVICE_HELP, MAX_THREADS, SEED_MAX, SEED_MIN, app, budget_minutes_option, check_replaceable,
                            command_line, fraction)
from inrseg.cli.train import train_model
from inrseg.core.progress import progress, status
from inrseg.data.nifti import save_labels
from inrseg.data.layouts import open_dataset
from inrseg.data.phantoms.datasets import write_phantom_dataset
from inrseg.engine import resolve_device
from inrseg.eval.bench import run_bench
from inrseg.eval.evaluate import evaluate_dirs, format_table, write_report
from inrseg.methods.registry import ENTRIES, load_segmenter
from inrseg.viz.figures import plot_step_curves
from inrseg.viz.html_report import bench_report
from inrseg.viz.overlays import save_overlay

_GRAMMAR = ", ".join(e.grammar for e in ENTRIES.values())
#: the most seeds of one bench run
MAX_SEEDS = 1000
#: what ``inrseg demo`` writes into its folder (an earlier demo's output is replaced, nothing else)
DEMO_ENTRIES = {"data", "metaseg.safetensors", "metaseg.safetensors.metrics.jsonl", "metaseg.safetensors.train-state",
                "predictions", "overlays", "dice_psnr_vs_steps.png", "report"}


def demo_written(out: Path) -> bool:
    """Whether the folder ``out`` holds only what ``inrseg demo`` writes (and the hidden
    temporaries and locks of an interrupted demo)."""
    return all(p.name in DEMO_ENTRIES or any(p.name.startswith(f".{e}.") for e in DEMO_ENTRIES)
               for p in out.iterdir())

@app.command()
def bench(data: Path = typer.Option(..., help="Dataset directory (nnU-Net, neurite-OASIS or UK Biobank layout)."),
          methods: str = typer.Option(..., help=f"Comma-separated: {_GRAMMAR} (`inrseg methods`). The first "
                                               "is the reference of the paired tests."),
          budget_minutes: Optional[float] = typer.Option(None, callback=budget_minutes_option,
                                                         help="Wall time of each method's whole fit, per seed "
                                                              "(training, phase 2, step selection)."),
          seeds: int = typer.Option(3, min=1, max=MAX_SEEDS, help="Seeds 0..N-1 for every method."),
          out: Path = typer.Option(Path("bench-runs"), help="Parent folder; each run writes a new "
                                                            "<date-time>-<dataset> folder in it."),
          device: str = typer.Option("auto", help=DEVICE_HELP),
          threads: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS, help="torch CPU threads (default: "
                                                                                  "torch's)."),
          val_fraction: float = typer.Option(0.2, callback=fraction, help="Fraction of training subjects held out for validation."),
          split_seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX,
                                         help="Seed of the validation split (the same for every method and seed)."),
          regions: Optional[str] = typer.Option(None, help="Also score label unions: 'brats'."),
          allow_dirty: bool = typer.Option(False, "--allow-dirty", help="Run from a checkout with uncommitted "
                                                                         "changes (recorded as dirty)."),
          ensemble: Optional[bool] = typer.Option(None, "--ensemble/--no-ensemble", help="Also score each method's "
                                                  "seed ensemble (mean probabilities) as a row '<method> ensemble' "
                                                  "(default: on with --seeds > 1; keeps K x voxels float32 per "
                                                  "validation and test case in memory)."),
          tta: bool = typer.Option(False, "--tta", help="Also score every run with test-time augmentation as a row "
                                                        "'<method> +tta' (CNNs: 4 / 8 mirrored forward passes in "
                                                        "2D / 3D; MetaSeg, NISF: 4 test-time fits), timed apart."),
          max_test_cases: Optional[int] = typer.Option(None, min=1, max=100000,
                                                       help="Score only the first N test cases (a quicker run; "
                                                            "results.json lists the cases)."),
          folds: Optional[int] = typer.Option(None, min=2, max=100, help="K-fold cross-validation by subject "
                                              "instead of one validation split: every training subject scored "
                                              "out of fold (row '<method> out-of-fold'), the test split by each "
                                              "fold's model."),
          keep: bool = typer.Option(True, "--keep/--no-keep", help="Keep each run's checkpoint and test "
                                                                   "predictions under models/ in the run folder."),
          jobs: int = typer.Option(1, min=1, max=1024, help="Runs side by side: worker processes here (one "
                                                            "thread, or one GPU, each), or array tasks at a time "
                                                            "with --scheduler."),
          scheduler: str = typer.Option("none", help="none (this machine), local (submitit subprocesses) or "
                                                     "slurm (submitit job array; pip install 'inrseg[cluster]')."),
          slurm_partition: Optional[str] = typer.Option(None, help="SLURM partition (--scheduler slurm)."),
          slurm_gpus: Optional[int] = typer.Option(None, min=0, max=64, help="GPUs per SLURM task."),
          slurm_cpus: Optional[int] = typer.Option(None, min=1, max=1024, help="CPUs per SLURM task."),
          slurm_timeout_min: int = typer.Option(24 * 60, min=1, max=10 ** 6, help="SLURM time limit per task."),
          steps: Optional[int] = typer.Option(None, min=1, max=10 ** 9, help="Every method trains this many "
                                              "optimiser steps (iterations for nnunet), reproducibly, instead of "
                                              "its own (a budget still stops it)."),
          html: bool = typer.Option(True, help="Write report.html.")) -> None:
    """Benchmark methods side by side: one split by subject, the same budget per method, N seeds;
    mean +- sd, paired Wilcoxon tests, results.json / .csv / .md and report.html in a new folder."""
    resolve_device(device)
    run = run_bench(data, methods, budget_minutes, list(range(seeds)), out, device=device,
                    allow_dirty=allow_dirty, val_fraction=val_fraction, split_seed=split_seed,
                    threads=threads, regions=regions, command=command_line(),
                    report=bench_report if html else None, ensemble=ensemble, tta=tta,
                    max_test_cases=max_test_cases, folds=folds, keep=keep, jobs=jobs, scheduler=scheduler,
                    slurm={"partition": slurm_partition, "gpus_per_node": slurm_gpus, "cpus_per_task": slurm_cpus,
                           "timeout_min": slurm_timeout_min}, steps=steps)
    md = (run / "results.md").read_text(encoding="utf-8")
    print(md.split("## Per seed")[0].strip())  # the headline and per-class tables



@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), help="Where everything is written."),
         minutes: float = typer.Option(4.0, callback=budget_minutes_option,
                                       help="MetaSeg training budget in minutes: meta-training, phase 2 and the "
                                            "choice of T_f."),
         force: bool = typer.Option(True, help="Replace an earlier demo's output (never other files)."),
         device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """The whole MetaSeg pipeline on embedded data, on the CPU in a few minutes: brain phantoms
    -> meta-training -> test-time fitting of each test image -> NIfTI label maps, PNG overlays,
    a Dice table and the Dice/PSNR-vs-steps figure."""
    check_replaceable(out, force, demo_written, "inrseg demo")
    if out.is_dir() and force:
        shutil.rmtree(out)
    data = out / "data"
    status("1/4 writing a brain2d phantom dataset (16 training + 4 test subjects, 96 x 112)")
    write_phantom_dataset("brain2d", data, n_train=16, n_test=4, seed=0, shape=(96, 112))
    status(f"2/4 meta-training MetaSeg (2d-seg4 preset, {minutes} min budget), phase 2, T_f on validation")
    ckpt = out / "metaseg.safetensors"
    # demo-sized phase 2 and T_f search: 8 training images, three candidate step counts
    train_model("metaseg", data, ckpt, budget_minutes=minutes, val_fraction=0.25, device=device, preset="2d-seg4",
                sets=["phase2_max_cases=8", "tf_candidates=[25, 50, 100]"])
    status("3/4 fitting and segmenting the test images")
    seg = load_segmenter(ckpt, device=resolve_device(device))
    t_f = seg.chosen_settings().get("t_f")
    pred_dir = out / "predictions"
    curves = {}
    for i, case in enumerate(progress(open_dataset(data).test, desc="segmenting")):
        image, labels = case.load()
        pred = seg.predict(image)
        save_labels(pred.data, pred_dir / f"{case.case_id}.nii.gz", like=pred)
        save_overlay(image, pred.data, out / "overlays" / f"{case.case_id}.png", gt=labels.data,
                     names=seg.label_names,
                     title=f"{case.case_id}: MetaSeg after T_f = {t_f} steps")
        if i < 2:
            curves[case.case_id] = seg.step_curve(image, labels, (0, 1, 5, 10, 25, 50, 100, 200))
    plot_step_curves(curves, out / "dice_psnr_vs_steps.png", t_f=t_f)
    status("4/4 evaluating")
    per_case, summary, names = evaluate_dirs(pred_dir, data / "labelsTs")
    write_report(out / "report", per_case, summary, names)
    print(format_table(summary))
    status(f"demo finished: {out}/ (predictions/*.nii.gz, overlays/*.png, dice_psnr_vs_steps.png, "
           f"report/, metaseg.safetensors)")
