"""The one training engine under every trainer, and the device / torchrun plumbing around it.

Every method's training (U-Net / SegResNet, MORSE, the NISF prior, MetaSeg meta-training and
MetaSeg's phase-2 head) is :func:`run_training` over a :class:`TrainTask`. A method keeps only
what is its own: ``step(i) -> (loss, parts)`` (the forward pass of optimiser step ``i``) and
``validate() -> metrics``. The engine owns, top to bottom in one loop:

* seeding (per-step random draws are a pure function of ``(seed, step, index)``, see
  :func:`step_rng`, so a resumed run draws what an uninterrupted one would, and ranks of a
  distributed run draw disjoint, reproducible batches);
* device placement and mixed precision (bf16 autocast where the device supports it and the
  method allows it; off on CPU);
* backward, gradient synchronisation across ranks (DDP, or a hand-written all-reduce for
  MAML's second-order meta-gradients, which DDP does not support), clipping, optimiser and
  scheduler steps;
* the wall-time budget (:class:`Budget`, one deadline for the whole command) and the step
  budget, stopping all ranks at the same step;
* validation cadence and the best-on-validation state;
* an atomic resume state, rank 0 only;
* progress bars and a per-step metrics log (JSON lines next to the checkpoint), rank 0 only.

Scale-out is PyTorch's own: launch with ``torchrun`` (NCCL on GPUs, gloo on CPUs);
:func:`init_distributed` reads the environment torchrun sets.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from inrseg.core.progress import progress, status
from inrseg.engine.budget import OPEN_ENDED_STEPS, Budget
from inrseg.engine.checkpoints import load_train_state, save_train_state
from inrseg.engine.devices import autocast
from inrseg.engine.distributed import _comm_device, all_reduce_mean_, broadcast_object, is_main, world

StepOutput = tuple[torch.Tensor, dict[str, float]]


class TrainTask:
    """What a method hands :func:`run_training`: an object with named hooks.

    A method subclasses it and overrides :meth:`step` and :meth:`weights` / :meth:`load_weights`,
    and, where it has them, :meth:`validate` (setting :attr:`validates`), :meth:`extra_state` /
    :meth:`load_extra_state`. Each hook can be called alone (a test can run one step). The engine
    does everything else: autocast, ``backward``, gradient synchronisation and clipping, the
    optimiser and scheduler steps, the budget, validation cadence, best state and resume.

    Args:
        name: label of the progress bar and the log (``"unet"``, ``"metaseg meta-training"``).
        method: checkpoint method name of the resume state (``"unet"``, ``"nisf"``...).
        optimizers: stepped after every backward (and saved in the resume state).
        params: the trainable tensors: clipped, and averaged across ranks when ``grad_sync``
            is ``"allreduce"``.
        schedulers: stepped after the optimisers (and saved).
        modules: set to ``train()`` before each step.
        grad_sync: ``"ddp"`` (the method trains through :func:`~inrseg.engine.distributed.wrap_ddp`),
            ``"allreduce"`` (mean of ``params``' gradients over ranks, by hand) or ``"none"``.
        grad_clip: gradient-norm clip of ``params`` (``None``: off).
        bf16: train under bf16 autocast.
        validates: whether :meth:`validate` runs (``False``: the last state is kept).
    """

    def __init__(self, *, name: str, method: str, optimizers: Sequence[torch.optim.Optimizer],
                 params: Sequence[torch.Tensor], schedulers: Sequence[Any] = (), modules: Sequence[nn.Module] = (),
                 grad_sync: str = "ddp", grad_clip: float | None = None, bf16: bool = False,
                 validates: bool = False) -> None:
        self.name, self.method = name, method
        self.optimizers, self.params = list(optimizers), list(params)
        self.schedulers, self.modules = list(schedulers), list(modules)
        self.grad_sync, self.grad_clip, self.bf16, self.validates = grad_sync, grad_clip, bf16, validates

    def step(self, i: int) -> StepOutput:
        """The forward pass of optimiser step ``i`` (0-based): ``(loss, parts)``, ``loss`` a scalar
        tensor with its graph, ``parts`` floats for the log. Runs under autocast."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Metrics with the loop's ``score_key``; rank 0 only (the engine broadcasts them)."""
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        """What best-on-validation keeps and the resume state holds (the engine takes detached
        copies); called on every rank (it may gather across ranks)."""
        raise NotImplementedError

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Put a dict of :meth:`weights` back."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Method counters and rank-sharded state for the resume file (every rank; may gather)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Put :meth:`extra_state` back."""


@dataclass
class LoopSettings:
    """When to stop, validate and save.

    Attributes:
        steps: optimiser steps in all (a resumed run continues up to this).
        val_every: validation (and resume-state) interval in steps; also at the last step.
        budget: wall-time deadline (the engine stops every rank at the same step when it passes).
        seed: seeds the global torch RNG (``seed + rank``) for what a method draws from it.
        state_path: resume file (``None``: not resumable); if it exists, training continues.
        log_path: per-step metrics log (JSON lines, appended; ``None``: no log).
        device: where collectives' tensors and the loss live.
        solo: this process trains alone, without collectives (no gradient all-reduce; the budget
            check and validation are its own): for work one rank does while the others wait,
            e.g. MetaSeg's phase 2 on rank 0. Files are still written by rank 0 only.
    """

    steps: int
    val_every: int
    budget: Budget = field(default_factory=lambda: Budget(None))
    seed: int = 0
    state_path: Path | None = None
    log_path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    score_key: str = "val_dice"
    solo: bool = False


@dataclass
class LoopResult:
    """What a training loop did: ``history`` (one entry per validation), the best step and score,
    the step it started from (after a resume) and the last step it ran."""

    history: list[dict]
    best_step: int | None
    best_score: float
    start_step: int
    last_step: int
    stopped_by_budget: bool
    seconds: float



def _snapshot(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in weights.items()}


def _resume_state(task: TrainTask, step: int, best: dict | None, best_score: float,
                  best_step: int | None, history: list[dict]) -> dict[str, Any]:
    return {"weights": _snapshot(task.weights()),
            "optimizers": [o.state_dict() for o in task.optimizers],
            "schedulers": [s.state_dict() for s in task.schedulers],
            "extra": task.extra_state(),
            "step": step, "best": best, "best_score": best_score, "best_step": best_step,
            "history": history}


class MetricsLog:
    """Per-step metrics as JSON lines (rank 0 only; appended, so a resumed run continues it)."""

    def __init__(self, path: Path | None) -> None:
        self._f = None
        if path is not None and is_main():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")

    def write(self, entry: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _DeferredInterrupt:
    """Within the block, a first Ctrl-C (SIGINT) only sets :attr:`hit`, so that the current
    step ends cleanly and its state can be saved; a second one interrupts at once. Only the
    main thread can install signal handlers; elsewhere the block changes nothing."""

    def __init__(self) -> None:
        self.hit = False
        self._old = None

    def _handler(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt("interrupted again: stopped without saving")
        self.hit = True
        status("interrupt: finishing this step and saving the training state (Ctrl-C again to stop "
               "at once)")

    def __enter__(self) -> "_DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _stop_code(expired: bool, interrupted: bool, device: torch.device, solo: bool) -> int:
    """0 go on, 1 budget reached, 2 interrupted: the largest over ranks, so all ranks agree."""
    code = 2 if interrupted else 1 if expired else 0
    if solo or world()[1] == 1:
        return code
    t = torch.tensor([float(code)], device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_training(task: TrainTask, loop: LoopSettings) -> LoopResult:
    """Train ``task`` for ``loop.steps`` optimiser steps or until ``loop.budget`` expires.

    Keeps the best weights on validation (``task.validate``) and loads them at the end (the last
    weights without validation). Resumes from ``loop.state_path`` when it exists.
    """
    rank, size = world()
    torch.manual_seed(loop.seed + rank)
    start, best_score, best_step, best, history = 0, -math.inf, None, None, []
    if loop.state_path is not None and Path(loop.state_path).exists():
        st = load_train_state(loop.state_path, task.method)
        task.load_weights(st["weights"])
        for o, s in zip(task.optimizers, st["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(task.schedulers, st["schedulers"]):
            sch.load_state_dict(s)
        task.load_extra_state(st["extra"])
        start, best_step, best, history = int(st["step"]), st["best_step"], st["best"], list(st["history"])
        best_score = float(st["best_score"])
        torch.manual_seed(loop.seed + rank + 7919 * start)
        if is_main():
            status(f"{task.name}: resuming from step {start} ({loop.state_path})")
    log = MetricsLog(loop.log_path)
    t0 = time.perf_counter()
    # "until the budget ends": a bar that counts steps, with no total and no ETA of years
    open_ended = loop.budget is not None and loop.budget.limited and loop.steps >= OPEN_ENDED_STEPS
    bar = progress(total=None if open_ended else loop.steps, desc=f"training {task.name}",
                   initial=start) if is_main() else None
    done, stopped = start, False
    sigint = _DeferredInterrupt()
    try:
        sigint.__enter__()
        for step in range(start, loop.steps):
            for m in task.modules:
                m.train()
            for o in task.optimizers:
                o.zero_grad(set_to_none=True)
            with autocast(loop.device, task.bf16):
                loss, parts = task.step(step)
            loss.backward()
            if task.grad_sync == "allreduce" and size > 1 and not loop.solo:
                grads = [p.grad for p in task.params if p.grad is not None]
                all_reduce_mean_(grads)
            if task.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(task.params), task.grad_clip)
            for o in task.optimizers:
                o.step()
            for sch in task.schedulers:
                sch.step()
            loss_value = float(loss.detach())
            lr = task.optimizers[0].param_groups[0]["lr"] if task.optimizers else float("nan")
            entry = {"step": step + 1, "time_s": round(time.perf_counter() - t0, 4), "loss": loss_value,
                     **{k: float(v) for k, v in parts.items()}, "lr": lr}
            code = _stop_code(loop.budget.expired(), sigint.hit, loop.device, loop.solo)
            stopped = code > 0
            last = step + 1 == loop.steps or stopped
            if code == 2:  # interrupted: save the state now, validate after --resume
                if loop.state_path is not None:
                    state = _resume_state(task, step + 1, best, best_score, best_step, history)
                    if is_main():
                        save_train_state(loop.state_path, task.method, state)
            elif (step + 1) % max(1, loop.val_every) == 0 or last:
                if task.validates:
                    metrics = task.validate() if loop.solo or is_main() else None
                    if not loop.solo:
                        metrics = broadcast_object(metrics)
                    score = float(metrics[loop.score_key])
                else:
                    metrics, score = {}, -loss_value
                entry.update(metrics)
                history.append(dict(entry))
                if task.validates and (score > best_score or best is None):
                    best_score, best_step = score, step + 1
                    best = _snapshot(task.weights())
                if loop.state_path is not None:
                    state = _resume_state(task, step + 1, best, best_score, best_step, history)
                    if is_main():
                        save_train_state(loop.state_path, task.method, state)
            log.write(entry)
            done = step + 1
            if bar is not None:
                bar.update(1)
                left = {"budget left": f"{loop.budget.remaining_s() / 60:.1f} min"} if loop.budget.limited else {}
                bar.set_postfix(loss=f"{loss_value:.4f}", **left)
            if code == 2:
                where = (f"the state is saved in {loop.state_path}: run the same command with --resume to "
                         f"continue" if loop.state_path is not None else "no training state was kept")
                message = f"{task.name} stopped after step {step + 1}; {where}"
                status(f"interrupted: {message}")
                raise KeyboardInterrupt(message)
            if stopped:
                if is_main():
                    status(f"{task.name}: time budget reached at step {step + 1}")
                break
    finally:
        sigint.__exit__()
        if bar is not None:
            bar.close()
        log.close()
    if task.validates and best is not None:
        task.load_weights(best)
    return LoopResult(history, best_step, best_score, start, done, stopped, time.perf_counter() - t0)
