"""The runs of ``inrseg bench`` as jobs: one (method, seed, fold) each, run in this process, side
by side on one machine (``--jobs N``) or on a cluster through submitit (``--scheduler slurm``).

A :class:`BenchJob` names everything a run needs by value (the dataset folder, the case ids of
its split, the spec text...), so that it can run in a fresh process: :func:`execute_job` opens the
dataset again and calls :func:`inrseg.eval.bench.run_one`. Results come back in the jobs' order
whatever order they finish in, and the probabilities that the seed ensembles need come back
with them, to be added in that same order: a parallel bench writes the results a serial one
would (training itself is deterministic for a fixed number of steps; a wall-time budget makes
the number of steps depend on the machine's speed, serial or not).

Why submitit: SLURM is what university and hospital clusters run, submitit (Meta's, maintained)
submits a Python function with its arguments as a SLURM job array and hands the return value
back, and its ``local`` backend runs the very same path as subprocesses, which is what the tests
and CI use. Ray would need a Ray cluster beside SLURM. The extra ``inrseg[cluster]`` installs it.

Devices: ``--jobs N`` on a CPU gives each job ``threads`` (default 1) torch threads; on CUDA job
``k`` uses GPU ``k mod (number of GPUs)``.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from inrseg.core.environ import environment
from inrseg.core.errors import InputError

__all__ = ["SCHEDULERS", "BenchJob", "JobOutput", "execute_job", "run_jobs"]

#: where jobs run: ``none`` (this machine: in process, or ``--jobs`` worker processes), submitit
#: ``local`` (subprocesses through submitit, as a cluster would run them) or ``slurm``
SCHEDULERS = ("none", "local", "slurm")


@dataclass(frozen=True)
class BenchJob:
    """One (method, seed, fold) run of a bench, by value (picklable)."""

    data: str
    splits_file: str | None
    spec: str
    seed: int | str                  # "2" or, with folds, "2.f1"
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    budget_minutes: float | None
    device: str
    threads: int | None
    log_path: str
    regions: str | None
    keep_dir: str | None
    tta: bool
    ensemble: bool
    examples: bool
    score_val: bool
    steps: int | None = None


class _Collect:
    """Stands in for a :class:`~inrseg.eval.ensemble.SeedEnsemble` in a job: keeps what it is
    given, in order, to be added to the real one by the bench."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, np.ndarray]] = []

    def keep(self, which: str, case_id: str, probabilities: np.ndarray) -> None:
        self.items.append((which, case_id, np.asarray(probabilities, np.float32)))


@dataclass
class JobOutput:
    """What a job returns: its rows, the example predictions, the ensemble contributions."""

    result: Any
    tta: Any
    held_out: Any
    predictions: dict
    ensemble_items: list = field(default_factory=list)


def execute_job(job: BenchJob) -> JobOutput:
    """Run one job (in this process or a fresh one)."""
    from inrseg.data.layouts import open_dataset
    from inrseg.engine import resolve_device
    from inrseg.eval.bench import run_one
    from inrseg.methods.registry import parse_spec
    from inrseg.metrics import REGION_SETS

    if job.threads is not None:
        torch.set_num_threads(job.threads)
    ds = open_dataset(Path(job.data), splits_file=Path(job.splits_file) if job.splits_file else None)
    by_id = {c.case_id: c for c in [*ds.train, *ds.test]}
    cases = [[by_id[i] for i in ids] for ids in (job.train_ids, job.val_ids, job.test_ids)]
    collect = _Collect() if job.ensemble else None
    out = run_one(parse_spec(job.spec), ds, *cases, job.seed, job.budget_minutes, resolve_device(job.device),
                  Path(job.log_path), REGION_SETS[job.regions] if job.regions else None, job.examples,
                  ensemble=collect, tta=job.tta, keep_dir=Path(job.keep_dir) if job.keep_dir else None,
                  score_val=job.score_val, steps=job.steps)
    return JobOutput(out.result, out.tta, out.held_out, out.predictions, collect.items if collect else [])


def _device_of(job: BenchJob, k: int) -> BenchJob:
    """Job ``k`` on GPU ``k mod n`` when the bench runs on CUDA with several jobs."""
    if job.device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        from dataclasses import replace
        return replace(job, device=f"cuda:{k % torch.cuda.device_count()}")
    return job


def run_jobs(jobs: Sequence[BenchJob], n_jobs: int = 1, scheduler: str = "none",
             scheduler_folder: Path | None = None, slurm: dict | None = None) -> list[JobOutput]:
    """Run ``jobs`` and return their outputs in the jobs' order.

    ``scheduler`` ``none``: in this process one after another (``n_jobs`` 1), or in ``n_jobs``
    worker processes (spawned: every job starts from a clean interpreter); ``local`` / ``slurm``:
    through submitit, its logs under ``scheduler_folder``, ``slurm`` its parameters
    (``partition``, ``gpus_per_node``, ``cpus_per_task``, ``timeout_min``; at most ``n_jobs`` at a time).
    """
    if scheduler not in SCHEDULERS:
        raise InputError(None, f"--scheduler {scheduler!r}: one of {', '.join(SCHEDULERS)}")
    jobs = [_device_of(j, k) for k, j in enumerate(jobs)]
    if scheduler != "none":
        return _submitit(jobs, n_jobs, scheduler, scheduler_folder, slurm or {})
    if n_jobs <= 1 or len(jobs) <= 1:
        return [execute_job(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs)), mp_context=ctx) as pool:
        return list(pool.map(execute_job, jobs))


def _submitit(jobs: Sequence[BenchJob], n_jobs: int, scheduler: str, folder: Path | None,
              slurm: dict) -> list[JobOutput]:
    try:
        import submitit
    except ImportError:
        raise InputError(None, f"--scheduler {scheduler} needs submitit: pip install 'inrseg[cluster]'") from None
    if folder is None:
        raise ValueError("a scheduler needs a folder for its logs")
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if scheduler == "local" else "slurm")
    params: dict[str, Any] = {"timeout_min": int(slurm.get("timeout_min", 24 * 60)),
                              "slurm_array_parallelism": max(1, n_jobs)} if scheduler == "slurm" else {
                                  "timeout_min": int(slurm.get("timeout_min", 24 * 60))}
    if scheduler == "slurm":
        for key in ("partition", "gpus_per_node", "cpus_per_task"):
            if slurm.get(key) is not None:
                params[f"slurm_{key}"] = slurm[key]
    executor.update_parameters(**params)
    env = {"OMP_NUM_THREADS": "1"} if all(j.threads in (None, 1) for j in jobs) else {}
    with environment(env):
        if scheduler == "local":  # submitit's local backend: at most n_jobs subprocesses at a time
            out: list[JobOutput] = []
            for start in range(0, len(jobs), max(1, n_jobs)):
                batch = [executor.submit(execute_job, j) for j in jobs[start:start + max(1, n_jobs)]]
                out += [b.result() for b in batch]
            return out
        return [j.result() for j in executor.map_array(execute_job, list(jobs))]
