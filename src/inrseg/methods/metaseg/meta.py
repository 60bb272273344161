"""MetaSeg's meta-training: second-order MAML over the training images, as an engine task.

Per task (one training image) the inner loop (:func:`~inrseg.methods.metaseg.inner.inner_adapt`)
adapts the network for ``inner_steps`` steps on random pixel subsets; the outer Adam minimises
the MSE + focal loss after adaptation (:func:`~inrseg.methods.metaseg.inner.meta_loss`).
:class:`MetaTrainingTask` is that outer loop's step, its validation (the test-time fit of the
validation images, head frozen, and their Dice) and its state; :func:`inrseg.engine.run_training`
runs it (budget, validation cadence, best state, resume state, metrics log). Under torchrun
every rank computes its share of each meta-batch and the engine averages the meta-gradients by
hand (``grad_sync="allreduce"``: DDP has no double backward).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from inrseg.core.seeding import step_rng, torch_generator
from inrseg.data.volume import IGNORE
from inrseg.engine import SCHEDULE_STEPS_KEY, Budget, StepOutput, TrainTask, seconds_per_call, steps_that_fit, world
from inrseg.methods.metaseg.fitting import PreparedImage
from inrseg.methods.metaseg.inner import meta_loss
from inrseg.metrics import case_metrics

if TYPE_CHECKING:
    from inrseg.methods.metaseg.segmenter import MetaSeg

__all__ = ["VAL_VOXELS_SEED", "MetaTrainingTask", "planned_outer_steps", "validation_dice"]

#: seed offset of the fixed voxels that score a large validation image (``val_max_voxels``)
VAL_VOXELS_SEED = 23


class MetaTrainingTask(TrainTask):
    """The MAML outer loop of ``model`` over ``total`` outer steps (default ``config.steps``: the
    length of the outer lr schedule, whose warm-up scales with it; the length travels with the
    weights under ``SCHEDULE_STEPS_KEY``, so a resumed run keeps it).

    Makes ``model.params`` (and ``model.lrs`` with ``meta_sgd``) leaf tensors that the task trains
    in place. The global meta-batch of step ``s`` holds ``world_size x meta_batch`` tasks; task
    ``j`` (its training image and pixel subsets) is drawn from ``step_rng(seed, s, j)``, and rank
    ``r`` computes tasks ``r * meta_batch`` to ``(r + 1) * meta_batch - 1``. The step's loss is the
    mean meta-loss of this rank's tasks; the engine averages the meta-gradients, the learned
    learning rates' included, over ranks: the mean over the global meta-batch.

    Args:
        model: the MetaSeg model whose meta-parameters are trained.
        train: prepared, labelled training images.
        val: prepared, labelled validation images (empty: no validation, the last state is kept).
        bf16: train under bf16 autocast.
        total: outer steps the lr schedule plans for.

    Attributes:
        schedule_steps: the schedule's length ``T``.
        meta_params, meta_lrs: the trained leaf tensors (also ``model.params`` / ``model.lrs``).
    """

    def __init__(self, model: "MetaSeg", train: Sequence[PreparedImage], val: Sequence[PreparedImage],
                 bf16: bool = False, total: int | None = None) -> None:
        cfg = model.config
        self.model, self.cfg, self.train, self.val = model, cfg, list(train), list(val)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in model.params.items()}
        lrs = None if model.lrs is None else {k: v.detach().clone().requires_grad_(True) for k, v in model.lrs.items()}
        model.params, model.lrs = params, lrs
        self.meta_params, self.meta_lrs = params, lrs
        self.trained = {**params, **{f"lr.{k}": v for k, v in (lrs or {}).items()}}
        self.schedule_steps = max(1, cfg.steps if total is None else total)
        rank, _ = world()
        self.mine = range(rank * cfg.meta_batch, (rank + 1) * cfg.meta_batch)
        opt = torch.optim.Adam(self.trained.values(), lr=cfg.outer_lr)
        super().__init__(name="metaseg meta-training", method=model.method, optimizers=[opt],
                         schedulers=[torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.lr_factor(s))],
                         params=list(self.trained.values()), grad_sync="allreduce", grad_clip=cfg.grad_clip,
                         bf16=bf16, validates=bool(self.val))

    def lr_factor(self, s: int) -> float:
        """The outer lr at step ``s`` over ``outer_lr``: linear warm-up over ``outer_warmup x T /
        steps`` steps, then constant or a cosine decay to 0 at ``T`` (:attr:`schedule_steps`)."""
        cfg, T = self.cfg, self.schedule_steps
        warm = max(0, round(cfg.outer_warmup * min(1.0, T / max(1, cfg.steps))))
        if s < warm:
            return (s + 1) / warm
        if cfg.outer_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, T - warm))))
        return 1.0

    def step(self, i: int) -> StepOutput:
        """Mean meta-loss of this rank's tasks of outer step ``i`` (first order while
        ``i < first_order_steps`` or with ``first_order``)."""
        cfg = self.cfg
        first_order = cfg.first_order or i < cfg.first_order_steps
        losses = []
        for j in self.mine:
            rng = step_rng(cfg.seed, i, j)
            task = self.train[int(rng.integers(len(self.train)))].task()
            support = [task.subset(cfg.points_per_task, rng) for _ in range(cfg.inner_steps)]
            query = support[0] if cfg.query_pixels == "same" else task.subset(cfg.points_per_task, rng)
            losses.append(meta_loss(self.meta_params, support, query, cfg, self.meta_lrs,
                                    create_graph=not first_order))
        return torch.stack(losses).mean(), {}

    def validate(self) -> dict[str, float]:
        """``{"val_dice"}``: :func:`validation_dice` after ``val_fit_steps`` test-time steps."""
        return {"val_dice": validation_dice(self.model, self.val, self.cfg.val_fit_steps)}

    def weights(self) -> dict[str, torch.Tensor]:
        """The meta-parameters (``lr.*``: the learned learning rates) and the schedule length."""
        return {**self.trained, SCHEDULE_STEPS_KEY: torch.tensor(self.schedule_steps, dtype=torch.int64,
                                                                 device=self.model.device)}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        if SCHEDULE_STEPS_KEY in state:
            self.schedule_steps = int(state[SCHEDULE_STEPS_KEY])
        with torch.no_grad():
            for k, v in self.trained.items():
                v.copy_(state[k])


def validation_dice(model: "MetaSeg", images: Sequence[PreparedImage], steps: int) -> float:
    """Mean over ``images`` (labelled) of the mean foreground Dice after fitting ``theta`` for
    ``steps`` test-time steps (head frozen), ``fit_batch`` images at a time, on the full grids;
    an image of more than ``val_max_voxels`` voxels on that many fixed random voxels (the same
    at every call). Unlabelled voxels are skipped."""
    scores = []
    nb, cap = model.config.fit_batch, model.config.val_max_voxels
    for s in range(0, len(images), nb):
        block = images[s:s + nb]
        theta = model.fitted_theta(block, steps)
        N = block[0].coords.shape[0]
        if cap is None or N <= cap:
            pred = model.image_logits(theta, block[0]).argmax(-1).cpu()                   # (B, N)
            truth = [im.labels.reshape(im.shape).cpu().numpy() for im in block]
            pred = [p.reshape(block[0].shape).numpy() for p in pred]
        else:
            gen = torch_generator(model.config.seed + VAL_VOXELS_SEED, model.device)
            idx = torch.randperm(N, generator=gen, device=model.device)[:cap]             # (cap,)
            # (cap, 1): case_metrics takes 2D or 3D maps, and Dice only counts voxels
            pred = list(model.point_logits(theta, block[0].coords[idx], step=block[0].step).argmax(-1)
                        .reshape(-1, cap, 1).cpu().numpy())
            truth = [im.labels[idx].reshape(cap, 1).cpu().numpy() for im in block]
        for p, t in zip(pred, truth):
            scores.append(case_metrics(p, t, len(model.label_names), distances=False,
                                       ignore_label=IGNORE).mean_foreground_dice)
    return float(np.nanmean(scores))


def planned_outer_steps(model: "MetaSeg", train: Sequence[PreparedImage], val: Sequence[PreparedImage],
                        budget: Budget) -> int:
    """The outer steps ``T`` that meta-training plans for: ``config.steps``, or fewer where
    ``budget`` (meta-training's share) would stop it sooner, so that the outer lr's warm-up and
    cosine decay run their whole course within the budget. Timed here: two tasks of a meta-batch
    (after a warm-up one) on a throwaway copy of the parameters, plus one validation per
    ``val_every`` steps (:func:`inrseg.engine.steps_that_fit` plans the time)."""
    cfg = model.config
    if not budget.limited or cfg.steps <= 0:
        return cfg.steps
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.params.items()}
    lrs = None if model.lrs is None else {k: v.detach().clone().requires_grad_(True) for k, v in model.lrs.items()}
    draws = iter(range(10))

    def one_task() -> None:
        rng = step_rng(cfg.seed, 2 ** 31 - 1, next(draws))           # a step no run reaches
        task = train[int(rng.integers(len(train)))].task()
        support = [task.subset(cfg.points_per_task, rng) for _ in range(cfg.inner_steps)]
        query = task.subset(cfg.points_per_task, rng)
        loss = meta_loss(params, support, query, cfg, lrs, create_graph=not cfg.first_order)
        torch.autograd.grad(loss, list(params.values()) + list((lrs or {}).values()))

    per_step = seconds_per_call(one_task, model.device, calls=2) * cfg.meta_batch
    if val:
        per_step += seconds_per_call(lambda: validation_dice(model, val, cfg.val_fit_steps), model.device,
                                     calls=1) / max(1, cfg.val_every)
    return steps_that_fit(budget, cfg.steps, per_step, "metaseg meta-training", "the outer lr schedule runs")
