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

import contextlib
import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from inrseg.errors import InputError
from inrseg.progress import progress, status

# ============================================================================================
# devices
# ============================================================================================

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` for a ``--device`` value.

    ``"auto"`` (or ``None``) picks CUDA when present, else the CPU. ``"cuda"`` without an index
    means this process's GPU: ``cuda:LOCAL_RANK`` under torchrun, else the current one.

    Raises:
        InputError: unknown spelling, or a device this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(None, f"--device {spec!r}: expected {DEVICE_CHOICES}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {spec}: no CUDA device is available on this machine")
        index = dev.index if dev.index is not None else (
            local_rank() if is_distributed_env() else torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise InputError(None, f"--device {spec}: this machine has {torch.cuda.device_count()} "
                                   f"CUDA device(s)")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(None, f"--device {spec}: MPS is not available on this machine")
        return dev
    if dev.type != "cpu":
        raise InputError(None, f"--device {spec!r}: expected {DEVICE_CHOICES}")
    return dev


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def use_bf16(device: torch.device, precision: str = "auto", method_allows: bool = True) -> bool:
    """Whether to train under bf16 autocast.

    ``precision``: ``"fp32"``, ``"bf16"`` or ``"auto"`` - bf16 on a CUDA device that supports
    it, when the method allows it (INRs with sine / Gabor activations at w0 = 10-30 do not:
    bf16 keeps 8 bits of mantissa, so ``sin(30 x)`` loses its phase); fp32 on the CPU, where
    bf16 is rarely faster.
    """
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if precision != "auto":
        raise InputError(None, f"--precision {precision!r}: expected auto, fp32 or bf16")
    return bool(method_allows and device.type == "cuda" and torch.cuda.is_bf16_supported())


# ============================================================================================
# torch.distributed (torchrun)
# ============================================================================================

def is_distributed_env() -> bool:
    """Whether this process was launched by torchrun (or another launcher) with > 1 ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or not distributed): the process that writes files and prints progress."""
    return world()[0] == 0


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    NCCL for CUDA devices, gloo otherwise. A no-op (returns ``False``) for a single process or
    when the group exists already. The timeout is generous: rank 0 validates while the others
    wait.
    """
    if not is_distributed_env() or not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return True


#: the step count of a run that trains until its time budget ends (a trainer given a budget
#: and no step count sets it; the loop shows such a run's progress as a count, not a fraction)
OPEN_ENDED_STEPS = 10**9


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def leave_distributed(clean: bool = True) -> None:
    """Leave the process group, if this process is in one.

    ``clean`` (the command ended normally): wait for every rank first and let garbage (DDP
    reducers, finished gloo work holding tensors) go before the group does. Without the
    barrier, a rank that leaves while another still writes its files tore gloo down under
    live work now and then (``terminate called without an active exception``, SIGABRT on a
    2-core CI machine). After an error there is no barrier: the other ranks may never come.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
        import gc

        gc.collect()
    dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable Python objects: metrics, flags)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device(device: torch.device) -> torch.device:
    """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over ranks, in place (one flat bucket, one collective)."""
    _, n = world()
    tensors = [t for t in tensors if t is not None]
    if n == 1 or not tensors:
        return
    dev = tensors[0].device
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device(dev))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(dev) / n
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if world()[1] > 1:
        buf = tensor.to(_comm_device(tensor.device))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        tensor.copy_(buf.to(tensor.device))
    return tensor


def shard(items: Sequence, rank: int | None = None, size: int | None = None) -> list:
    """This rank's share ``items[rank::size]`` (round-robin, so shares differ by at most one)."""
    r, n = world()
    r = r if rank is None else rank
    n = n if size is None else size
    return list(items[r::n])


# ============================================================================================
# seeding
# ============================================================================================

def step_rng(seed: int, step: int, *index: int) -> np.random.Generator:
    """The NumPy generator of the random draws of optimiser step ``step`` (item ``index``).

    A pure function of its arguments: resuming at step ``s`` draws what an uninterrupted run
    drew, and item ``j`` of a global batch is the same whichever rank draws it.
    """
    return np.random.default_rng([int(seed), int(step), *(int(i) for i in index)])


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded :class:`torch.Generator` on an explicit device."""
    return torch.Generator(device=device).manual_seed(int(seed) % (2 ** 63))


# ============================================================================================
# budgets
# ============================================================================================

def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int = 3) -> float:
    """Mean wall time of ``fn()`` over ``calls`` calls on ``device``, after one untimed warm-up
    call (allocations, kernel choice); waits for queued CUDA work before reading the clock."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


#: key of a fitted schedule's length T in a task's weights dict (best and resume states carry
#: it, so a resumed run keeps the schedule it started with)
SCHEDULE_STEPS_KEY = "__schedule_steps__"
#: share of the time left that a schedule fitted to a budget plans to fill (the last validation,
#: the choice of the best state and timing noise take the rest)
SCHEDULE_MARGIN = 0.9


def steps_that_fit(budget: "Budget", steps: int, seconds_per_step: float, name: str,
                   what: str = "the lr schedule runs") -> int:
    """The length T of a schedule (lr warm-up and decay, ...) fitted to ``budget``: ``steps``, or
    fewer where ``SCHEDULE_MARGIN`` of the time left holds only that many steps of
    ``seconds_per_step`` (measured by the caller, validation included). Without a time limit,
    ``steps``. A schedule cut off by the budget would end at a high learning rate."""
    if not budget.limited or steps <= 0:
        return steps
    total = max(1, min(steps, int(SCHEDULE_MARGIN * budget.remaining_s() / max(seconds_per_step, 1e-9))))
    if total < steps:
        status(f"{name}: about {seconds_per_step:.2f} s per step: {what} over T = {total} steps, "
               f"which fit the {budget.remaining_s() / 60:.1f} minutes left, not {steps}")
    return total


def timed_schedule_steps(budget: "Budget", steps: int, net: nn.Module,
                         optimizer: Callable[[Any], torch.optim.Optimizer],
                         loss_of: Callable[[nn.Module, int], torch.Tensor], device: torch.device,
                         predict: Callable[[Any], object] | None = None, val: Sequence[Any] | None = None,
                         val_every: int = 1, name: str = "training", what: str = "the lr schedule runs") -> int:
    """:func:`steps_that_fit` with the step timed here: rank 0 times two training steps (after
    an untimed warm-up one) on a throwaway copy of ``net`` with its own ``optimizer(params)``,
    ``loss_of(net, i)`` giving step ``i``'s loss, plus the validation's share of a step:
    ``predict(image)`` of the first of the ``val`` cases x ``len(val) / val_every``. Every rank
    gets rank 0's T. Without a time limit, ``steps``."""
    import copy

    if not budget.limited:
        return steps
    total = steps
    if world()[0] == 0:
        twin = copy.deepcopy(net).train()
        opt = optimizer(twin.parameters())
        calls = iter(range(10))

        def one_step() -> None:
            loss = loss_of(twin, next(calls))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        per_step = seconds_per_call(one_step, device, calls=2)
        del twin, opt
        if predict is not None and val:
            image = val[0].load_image()
            per_step += seconds_per_call(lambda: predict(image), device, calls=1) * len(val) / max(1, val_every)
        total = steps_that_fit(budget, steps, per_step, name, what)
    if world()[1] > 1:
        total = broadcast_object(total)
    return total


class Budget:
    """A wall-time deadline shared by every phase of one command.

    Created once (the CLI creates it when the command starts, so loading data counts too) and
    handed to every phase. ``Budget(None)`` never expires.

    Args:
        minutes: the whole budget in minutes (``None``: unlimited).
        start: :func:`time.perf_counter` value the budget counts from (default: now).
    """

    def __init__(self, minutes: float | None, start: float | None = None) -> None:
        if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
            raise InputError(None, f"--budget-minutes must be a positive number, not {minutes}")
        self.minutes = minutes
        self.start = time.perf_counter() if start is None else start
        self.deadline = math.inf if minutes is None else self.start + 60.0 * minutes

    @property
    def limited(self) -> bool:
        return math.isfinite(self.deadline)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def remaining_s(self) -> float:
        return self.deadline - time.perf_counter()

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    def share(self, fraction: float) -> "Budget":
        """A budget that ends after ``fraction`` of the time now remaining (for an early phase
        that must leave time to later ones); unlimited stays unlimited."""
        sub = Budget(None)
        if self.limited:
            sub.deadline = time.perf_counter() + max(0.0, fraction * self.remaining_s())
            sub.minutes = (sub.deadline - sub.start) / 60.0
        return sub

    def __repr__(self) -> str:
        return "Budget(unlimited)" if not self.limited else f"Budget({self.remaining_s():.0f} s left)"


def as_budget(budget: Budget | None, minutes: float | None) -> Budget:
    """``budget`` if given, else a new one of ``minutes`` starting now."""
    return budget if budget is not None else Budget(minutes)


# ============================================================================================
# the engine
# ============================================================================================

StepOutput = tuple[torch.Tensor, dict[str, float]]


@dataclass
class TrainTask:
    """What a method hands :func:`run_training`.

    Attributes:
        name: label of the progress bar and the log (``"unet"``, ``"metaseg meta-training"``).
        method: checkpoint method name of the resume state (``"unet"``, ``"nisf"``...).
        step: ``step(i) -> (loss, parts)``: the forward pass of optimiser step ``i`` (0-based);
            ``loss`` a scalar tensor with its graph, ``parts`` floats for the log. Run under
            autocast; the engine does ``backward`` and the optimiser steps.
        optimizers: stepped after every backward (and saved in the resume state).
        params: the trainable tensors: clipped, and averaged across ranks when ``grad_sync``
            is ``"allreduce"``.
        weights: ``() -> {name: tensor}``: what best-on-validation keeps (detached copies are
            taken); called on every rank (it may gather across ranks).
        load_weights: puts such a dict back.
        validate: ``() -> metrics`` with the key ``score_key``; run on rank 0 only, result
            broadcast. ``None``: the last state is kept.
        modules: set to ``train()`` before each step.
        schedulers: stepped after the optimisers (and saved).
        grad_sync: ``"ddp"`` (the method trains through :func:`wrap_ddp`), ``"allreduce"``
            (mean of ``params``' gradients over ranks, by hand) or ``"none"``.
        grad_clip: gradient-norm clip of ``params`` (``None``: off).
        extra_state / load_extra_state: method counters and rank-sharded state for the
            resume file (called on every rank; may gather).
        bf16: train under bf16 autocast.
    """

    name: str
    method: str
    step: Callable[[int], StepOutput]
    optimizers: Sequence[torch.optim.Optimizer]
    params: Sequence[torch.Tensor]
    weights: Callable[[], dict[str, torch.Tensor]]
    load_weights: Callable[[dict[str, torch.Tensor]], None]
    validate: Callable[[], dict[str, float]] | None = None
    modules: Sequence[nn.Module] = ()
    schedulers: Sequence[Any] = ()
    grad_sync: str = "ddp"
    grad_clip: float | None = None
    extra_state: Callable[[], dict[str, Any]] | None = None
    load_extra_state: Callable[[dict[str, Any]], None] | None = None
    bf16: bool = False


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


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` under DistributedDataParallel when running with > 1 ranks, else ``module``.

    Train through the returned module; save and validate with ``module`` itself.
    """
    if world()[1] == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                               find_unused_parameters=find_unused_parameters)


def _snapshot(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in weights.items()}


def _resume_state(task: TrainTask, step: int, best: dict | None, best_score: float,
                  best_step: int | None, history: list[dict]) -> dict[str, Any]:
    return {"weights": _snapshot(task.weights()),
            "optimizers": [o.state_dict() for o in task.optimizers],
            "schedulers": [s.state_dict() for s in task.schedulers],
            "extra": task.extra_state() if task.extra_state is not None else {},
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
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

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
    from inrseg.checkpoints import load_train_state, save_train_state

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
        if task.load_extra_state is not None:
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
                if task.validate is not None:
                    metrics = task.validate() if loop.solo or is_main() else None
                    if not loop.solo:
                        metrics = broadcast_object(metrics)
                    score = float(metrics[loop.score_key])
                else:
                    metrics, score = {}, -loss_value
                entry.update(metrics)
                history.append(dict(entry))
                if task.validate is not None and (score > best_score or best is None):
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
    if task.validate is not None and best is not None:
        task.load_weights(best)
    return LoopResult(history, best_step, best_score, start, done, stopped, time.perf_counter() - t0)
