"""The wall-time budget of a whole command, and learning-rate schedules fitted to it."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from inrseg.core.errors import InputError
from inrseg.core.progress import status
from inrseg.engine.distributed import broadcast_object, world
#: the step count of a run that trains until its time budget ends (a trainer given a budget
#: and no step count sets it; the loop shows such a run's progress as a count, not a fraction)
OPEN_ENDED_STEPS = 10**9


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

