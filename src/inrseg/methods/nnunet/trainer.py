"""nnU-Net's trainer inside inrseg's budget: the epoch loop of ``nnUNetTrainer.run_training``
with a deadline, the poly schedule fitted to it, and the best-on-validation weights kept.

:func:`train_nnunet` subclasses nnU-Net's own ``nnUNetTrainer`` (its data loading, augmentation,
deep-supervised Dice + CE loss, SGD with Nesterov momentum and poly learning rate, its EMA of the
validation pseudo-Dice) and changes only what the budget needs:

* the epoch loop checks the deadline before every iteration; after the first iterations, with
  ``fit_schedule_to_budget``, the poly schedule runs over the epochs that fit what is left
  (nnU-Net's own ``num_epochs`` otherwise);
* where nnU-Net writes ``checkpoint_best.pth`` (the best EMA pseudo-Dice), the weights are kept in
  memory instead: nothing is pickled; the adapter saves them as an inrseg checkpoint;
* nnU-Net's final validation and its own post-processing search are skipped: inrseg chooses
  post-processing on the validation cases for every method alike.
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inrseg.core.progress import status
from inrseg.engine import Budget
from inrseg.engine.loop import MetricsLog
from inrseg.methods.nnunet.config import NNUNetConfig

__all__ = ["TrainedNNUNet", "train_nnunet"]


@dataclass
class TrainedNNUNet:
    """What a budgeted nnU-Net training returns: the kept weights (CPU tensors), its history."""

    weights: dict[str, torch.Tensor]
    best_epoch: int | None
    epochs: int
    iterations: int
    history: list[dict] = field(default_factory=list)
    mirror_axes: list[int] | None = None


#: iterations timed before the poly schedule is fitted to the budget
_TIMED_ITERATIONS = 3
#: a validation batch costs about this share of a training iteration (a forward pass, no backward)
_VAL_COST = 0.4


def _fit_schedule(trainer: Any, cfg: NNUNetConfig, budget: Budget, per_iteration: float) -> None:
    """Run the poly schedule over the epochs that fit what is left of ``budget`` at
    ``per_iteration`` seconds per training iteration (validation batches counted)."""
    per_epoch = per_iteration * (trainer.num_iterations_per_epoch + _VAL_COST * trainer.num_val_iterations_per_epoch)
    left = max(0.0, budget.remaining_s()) + per_iteration * _TIMED_ITERATIONS
    trainer.num_epochs = max(1, min(int(cfg.epochs), int(left // max(per_epoch, 1e-6))))
    trainer.lr_scheduler.max_steps = trainer.num_epochs
    if trainer.num_epochs < int(cfg.epochs):
        status(f"nnunet: about {per_iteration:.2f} s per iteration: the poly schedule runs over "
               f"{trainer.num_epochs} epochs of {trainer.num_iterations_per_epoch} iterations, which fit the "
               f"{budget.remaining_s() / 60:.1f} minutes left, not {cfg.epochs}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def train_nnunet(plans: dict, configuration: str, dataset_json: dict, cfg: NNUNetConfig, device: torch.device,
                 budget: Budget, log_path: Path | None = None) -> TrainedNNUNet:
    """Train nnU-Net's ``configuration`` of ``plans`` on fold 0 of the preprocessed dataset
    (:mod:`inrseg.methods.nnunet.workspace` made it) until ``cfg.epochs`` or the deadline."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class BudgetTrainer(nnUNetTrainer):
        """nnUNetTrainer with inrseg's deadline and in-memory best weights (see the module doc)."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(cfg.epochs)
            self.num_iterations_per_epoch = int(cfg.iterations_per_epoch)
            self.num_val_iterations_per_epoch = int(cfg.val_iterations_per_epoch)
            self.disable_checkpointing = True  # no pickles: the best weights stay in memory
            self.kept: dict[str, torch.Tensor] | None = None
            self.kept_epoch: int | None = None
            self.kept_ema: float | None = None

        def print_to_log_file(self, *args: Any, also_print_to_console: bool = False, add_timestamp: bool = True) -> None:
            super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)

        def plot_network_architecture(self) -> None:  # needs hiddenlayer / graphviz; nothing to draw here
            pass

        def net(self) -> torch.nn.Module:
            mod = self.network.module if self.is_ddp else self.network
            return getattr(mod, "_orig_mod", mod)

        def on_epoch_end(self) -> None:
            super().on_epoch_end()  # logs, the EMA pseudo-Dice, 'best' (its checkpoint write is disabled)
            ema = float(self.logger.get_value("ema_fg_dice", step=-1))
            # the best EMA pseudo-Dice as nnU-Net's checkpoint_best, but a tie goes to the later
            # weights (nnU-Net keeps the earlier): a run whose pseudo-Dice is still 0 keeps its last
            # weights, as nnU-Net's default checkpoint_final would, not its first epoch's
            if self.kept_ema is None or ema >= self.kept_ema:
                self.kept = {k: v.detach().to("cpu", copy=True) for k, v in self.net().state_dict().items()}
                self.kept_epoch, self.kept_ema = self.current_epoch - 1, ema

    plans = dict(plans)
    plans["continue_training"] = False  # nnUNetTrainer pops it (2.8)
    _seed_everything(cfg.seed)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints to stdout as it goes; its log file keeps it
        return _train(BudgetTrainer, plans, configuration, dataset_json, cfg, device, budget, log_path)


def _train(trainer_class: type, plans: dict, configuration: str, dataset_json: dict, cfg: NNUNetConfig,
           device: torch.device, budget: Budget, log_path: Path | None) -> TrainedNNUNet:
    trainer = trainer_class(plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json,
                            device=device)
    logger = MetricsLog(log_path)
    history: list[dict] = []
    iterations = 0
    try:
        trainer.on_train_start()
        epoch = 0
        t_first = time.perf_counter()
        while (epoch < trainer.num_epochs and not budget.expired()
               and (cfg.steps is None or iterations < cfg.steps)):
            trainer.on_epoch_start()
            trainer.on_train_epoch_start()
            outs = []
            for it in range(trainer.num_iterations_per_epoch):
                if budget.expired() or (cfg.steps is not None and iterations >= cfg.steps):
                    break
                outs.append(trainer.train_step(next(trainer.dataloader_train)))
                iterations += 1
                if epoch == 0 and it == _TIMED_ITERATIONS - 1 and cfg.fit_schedule_to_budget and budget.limited:
                    _fit_schedule(trainer, cfg, budget, (time.perf_counter() - t_first) / _TIMED_ITERATIONS)
            if not outs:
                break
            trainer.on_train_epoch_end(outs)
            with torch.no_grad():
                trainer.on_validation_epoch_start()
                vals = [trainer.validation_step(next(trainer.dataloader_val))
                        for _ in range(trainer.num_val_iterations_per_epoch)]
                trainer.on_validation_epoch_end(vals)
            trainer.on_epoch_end()
            lg = trainer.logger
            row = {"step": iterations, "epoch": epoch, "loss": float(lg.get_value("train_losses", step=-1)),
                   "val_loss": float(lg.get_value("val_losses", step=-1)),
                   "val_pseudo_dice": float(lg.get_value("mean_fg_dice", step=-1)),
                   "val_ema_pseudo_dice": float(lg.get_value("ema_fg_dice", step=-1)),
                   "lr": float(trainer.optimizer.param_groups[0]["lr"])}
            history.append(row)
            logger.write(row)
            logger.flush()
            epoch += 1
        if trainer.kept is None:  # stopped before one validation: the last weights
            trainer.kept = {k: v.detach().to("cpu", copy=True) for k, v in trainer.net().state_dict().items()}
        mirror = trainer.inference_allowed_mirroring_axes
        return TrainedNNUNet(trainer.kept, trainer.kept_epoch, epoch, iterations, history,
                             None if mirror is None else [int(a) for a in mirror])
    finally:
        logger.close()
        _shut_down(trainer)


def _shut_down(trainer: Any) -> None:
    """Stop nnU-Net's augmentation workers (its ``on_train_end`` without the checkpoint)."""
    for loader in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None)):
        finish = getattr(loader, "_finish", None)
        if callable(finish):
            finish()
