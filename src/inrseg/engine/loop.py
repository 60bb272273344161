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
* an atomic resume state, rank 0 only, validated before it loads (schema, its step within the
  run, the names and shapes of the task's weights);
* progress bars and a per-step metrics log (JSON lines next to the checkpoint), rank 0 only,
  flushed before every resume state is written and cut back to the resumed step, so that a
  killed and resumed run's log holds each step once.

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

from inrseg.core.errors import InputError
from inrseg.core.progress import progress, status
from inrseg.engine.budget import OPEN_ENDED_STEPS, Budget
from inrseg.engine.checkpoints import check_train_state, load_train_state, save_train_state
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


def _log_prefix(data: bytes, steps: int) -> tuple[int, int]:
    """``(bytes, last step)`` of the part of a metrics log that holds steps ``1, 2, ...`` up to at
    most ``steps``, one whole JSON line each: what a run resumed at ``steps`` keeps."""
    end = last = 0
    while last < steps:
        nl = data.find(b"\n", end)
        if nl < 0:
            break
        try:
            entry = json.loads(data[end:nl])
        except (ValueError, RecursionError):
            break
        if not isinstance(entry, dict) or entry.get("step") != last + 1:
            break
        end, last = nl + 1, last + 1
    return end, last


class MetricsLog:
    """Per-step metrics as JSON lines (rank 0 only; a resumed run continues it).

    Args:
        path: the log (``None``: no log).
        start: the step the run starts after (a resumed state's step, else 0): the log keeps
            its lines of steps ``1..start`` and loses any after them (lines a killed run wrote
            after its last state, or a half-written line), so that each step is in it once.
    """

    def __init__(self, path: Path | None, start: int = 0) -> None:
        self._f = None
        if path is not None and is_main():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "ab+")
            self._f.seek(0)
            data = self._f.read()
            end, last = _log_prefix(data, start)
            if end < len(data):
                self._f.truncate(end)
                status(f"{path}: removed its lines after step {last}, which the run starting at step {start} "
                       f"writes anew")
            if last < start:
                status(f"{path}: steps {last + 1}-{start} of the resumed state are missing from it (a log "
                       f"written before they were flushed with each state, or edited)")

    def write(self, entry: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write((json.dumps(entry) + "\n").encode("utf-8"))

    def flush(self) -> None:
        """Hand the lines written so far to the operating system (they survive a SIGKILL)."""
        if self._f is not None:
            self._f.flush()

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


def _check_weights(path: Path, what: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """``found`` names the tensors of ``expected``, each of the same shape (the task's network)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        which = f"lack {missing[0]!r}" if missing else f"hold {extra[0]!r}, which this run's network has not"
        raise InputError(path, f"training state of another network: its {what} {which} ({len(missing)} "
                               f"missing, {len(extra)} unknown)")
    for name, t in expected.items():
        if tuple(found[name].shape) != tuple(t.shape):
            raise InputError(path, f"training state of another network: its {what} {name!r} is "
                                   f"{tuple(found[name].shape)}, this run's {tuple(t.shape)}")


def _check_fits(path: Path, st: dict[str, Any], task: TrainTask, steps: int) -> None:
    """A valid resume state (:func:`check_train_state`) that this run can continue: its step
    within ``0..steps``, its best step within it, the task's weights by name and shape, as many
    optimisers and schedulers as the task has."""
    check_train_state(path, st)
    step, best_step = st["step"], st["best_step"]
    if step > steps:
        raise InputError(path, f"training state is at step {step}, beyond the {steps} steps of this run: "
                               f"resume with the steps of the run that wrote it, or --force to start over")
    if best_step is not None and not 0 < best_step <= step:
        raise InputError(path, f"not a valid training state (best step {best_step} at step {step})")
    expected = task.weights()
    _check_weights(path, "weights", st["weights"], expected)
    if st["best"] is not None:
        _check_weights(path, "best weights", st["best"], expected)
    for key, have in (("optimizers", task.optimizers), ("schedulers", task.schedulers)):
        if len(st[key]) != len(have):
            raise InputError(path, f"training state of another run: {len(st[key])} {key}, this run has {len(have)}")


def _resume(task: TrainTask, loop: LoopSettings) -> tuple[int, float, int | None, dict | None, list[dict]]:
    """Load ``loop.state_path`` into ``task`` once it is checked (:func:`_check_fits`); returns
    ``(step, best score, best step, best weights, history)``."""
    path = Path(loop.state_path)
    st = load_train_state(path, task.method)
    _check_fits(path, st, task, loop.steps)
    try:
        task.load_weights(st["weights"])
        for o, s in zip(task.optimizers, st["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(task.schedulers, st["schedulers"]):
            sch.load_state_dict(s)
        task.load_extra_state(st["extra"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(path, f"training state does not fit this run ({type(exc).__name__}: {msg[:160]})") from None
    return st["step"], float(st["best_score"]), st["best_step"], st["best"], list(st["history"])


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
    weights without validation). Resumes from ``loop.state_path`` when it exists, after checking
    it (:func:`~inrseg.engine.checkpoints.load_train_state` verifies the file, then its schema,
    a step within ``0..loop.steps`` and the task's weights by name and shape); the metrics log
    is cut back to the steps the state covers and flushed before every state is written.

    Raises:
        InputError: naming the state file, for a state that is damaged, edited or of another
            run (another network, more steps than this run has).
    """
    rank, size = world()
    torch.manual_seed(loop.seed + rank)
    start, best_score, best_step, best, history = 0, -math.inf, None, None, []
    if loop.state_path is not None and Path(loop.state_path).exists():
        start, best_score, best_step, best, history = _resume(task, loop)
        torch.manual_seed(loop.seed + rank + 7919 * start)
        if is_main():
            status(f"{task.name}: resuming from step {start} ({loop.state_path})")
    log = MetricsLog(loop.log_path, start)
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
            # interrupted (code 2): save the state now, validate after --resume
            validation = code != 2 and ((step + 1) % max(1, loop.val_every) == 0 or last)
            if validation:
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
            log.write(entry)
            if (validation or code == 2) and loop.state_path is not None:
                log.flush()  # the state covers this step's line: it must not be lost to a kill
                state = _resume_state(task, step + 1, best, best_score, best_step, history)
                if is_main():
                    save_train_state(loop.state_path, task.method, state)
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
