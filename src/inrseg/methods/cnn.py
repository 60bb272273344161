"""The one patch trainer and sliding-window inference under the CNN methods (U-Net, SegResNet, MORSE).

:class:`CNNSegmenter` holds what they share: image preparation, training crops
(:class:`~inrseg.data.sampling.PatchSampler`: whole slices in 2D, foreground-oversampled crops in
3D, intensity augmentation), the loss (:class:`~inrseg.losses.DiceCELoss`, ignored voxels count
nowhere), the learning-rate schedule over ``T`` steps, fitted to a time budget by timing a step
with the optimiser the method trains with (:func:`~inrseg.engine.timed_schedule_steps`),
validation (mean foreground Dice on the validation cases), and inference: the whole image padded
to the network's multiple, or Gaussian-weighted sliding windows of the training crop for 3D
volumes larger than it (and for fixed-size networks). :class:`CNNTrainTask` is the engine's hook
object (:class:`~inrseg.engine.TrainTask`) over them.

A method subclasses :class:`CNNSegmenter` and overrides named hooks: :meth:`~CNNSegmenter.build_network`
and :attr:`~CNNSegmenter.divisor` (required), and where it differs :meth:`~CNNSegmenter.make_optimizer`,
:meth:`~CNNSegmenter.lr_factor`, :meth:`~CNNSegmenter.make_loss`, :meth:`~CNNSegmenter.train_loss`,
:meth:`~CNNSegmenter.timing_loss`, :meth:`~CNNSegmenter.network_logits` (inference refinement),
:meth:`~CNNSegmenter.validation_metrics`, :meth:`~CNNSegmenter.extra_weights` /
:meth:`~CNNSegmenter.load_extra_weights`.

Shapes: a training batch is ``x`` ``(B, C_in, *P)`` float and ``y`` ``(B, 1, *P)`` int64 on the
model's device (``P`` the training crop); logits ``(B, K, *S)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from inrseg.core.errors import InputError
from inrseg.data.cases import Case
from inrseg.data.grids import resampled_affine, resampled_shape
from inrseg.data.preprocess import check_input, normalize
from inrseg.data.sampling import (PatchSampler, has_ignored, load_training_tensors, pad_to_multiple, plain,
                                  training_patch)
from inrseg.data.volume import Volume
from inrseg.engine import (SCHEDULE_STEPS_KEY, Budget, LoopSettings, StepOutput, TrainTask, as_budget,
                           run_training, timed_schedule_steps, use_bf16, world, wrap_ddp)
from inrseg.data.volume import IGNORE
from inrseg.losses import DiceCELoss
from inrseg.methods.base import Segmenter
from inrseg.metrics import case_metrics
from inrseg.nn.backbones import upsample

__all__ = ["CNNSegmenter", "CNNTrainTask", "TrainBatch", "cnn_config"]

#: normalisation layers that need more than one voxel per channel (torch raises otherwise)
_INSTANCE_NORMS = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)


def cnn_config(config_class: type, fields: Mapping[str, Any], spatial_ndim: int,
               overrides: Mapping[str, Any]) -> Any:
    """``config_class(**fields, **overrides)`` with the CNN trainers' default for the data: batches
    of 2 crops on 3D data (``overrides`` win)."""
    base = dict(fields)
    if spatial_ndim == 3:
        base["batch_size"] = 2
    return config_class(**{**base, **overrides})


@dataclass(frozen=True)
class TrainBatch:
    """The batch of optimiser step ``step`` (0-based): ``x`` ``(B, C_in, *P)``, ``y``
    ``(B, 1, *P)`` int64, and ``items``, the indices of its items in the step's global batch."""

    x: torch.Tensor
    y: torch.Tensor
    step: int
    items: Sequence[int]


class CNNSegmenter(Segmenter):
    """A CNN trained on patches, predicting in one forward pass (sliding windows where needed).

    The config must have the fields ``steps``, ``batch_size``, ``patch_size``, ``lr``,
    ``weight_decay``, ``val_every``, ``budget_minutes``, ``fit_schedule_to_budget``, ``augment``,
    ``foreground_fraction``, ``normalization``, ``seed`` (and ``warmup`` for the default
    :meth:`lr_factor`). The network is :attr:`net`, built by :meth:`build_network` with the
    global RNG seeded by ``config.seed`` (the same initial weights on every rank), the RNG
    state outside left as it was.

    Attributes:
        schedule_steps: ``T`` of the last fit's learning-rate schedule (``config.steps``, or
            fewer where the budget allowed fewer).
    """

    bf16_safe: ClassVar[bool] = True
    saved_attributes: ClassVar[dict[str, Any]] = {"schedule_steps": lambda self: self.config.steps}
    #: DDP looks for parameters a step leaves unused (a head that trains only in some steps)
    ddp_find_unused: ClassVar[bool] = False
    #: what the budget-fitted schedule covers, for the status line
    schedule_what: ClassVar[str] = "the lr schedule runs"
    #: :meth:`network_logits` is asked for the output grid itself (a network that renders at any
    #: resolution); ``False``: for the input grid, then the logits are resampled (bi/trilinear)
    renders_at_scale: ClassVar[bool] = False

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: Any = None, device: str | torch.device = "cpu") -> None:
        super().__init__(label_names, spatial_ndim, in_channels, config, device)
        with torch.device(self.device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # the same initial weights on every rank
            self.net = self.build_network()
        self.schedule_steps = self.config.steps

    # ------------------------------------------------------------------ hooks: the network
    def build_network(self) -> torch.nn.Module:
        """The network, built on :attr:`device` from :attr:`config`."""
        raise NotImplementedError

    @property
    def divisor(self) -> int:
        """Network input sizes must be multiples of this (its total down-sampling)."""
        raise NotImplementedError

    @property
    def fixed_size(self) -> tuple[int, ...] | None:
        """The only input size the network takes (``None``: any multiple of :attr:`divisor`)."""
        return None

    @property
    def task_name(self) -> str:
        """Label of the training's progress bar and log."""
        return self.method

    # ------------------------------------------------------------------ data
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
        self.net.load_state_dict(tensors)

    def prepare(self, image: Volume) -> torch.Tensor:
        """Normalised ``(C, *S)`` float32 tensor of ``image`` on the CPU (refused, naming its file,
        unless the network takes it: :meth:`check_image_size`)."""
        check_input(image, self.in_channels, self.spatial_ndim)
        self.check_image_size(image.shape, image.path)
        return torch.from_numpy(normalize(image.data, self.config.normalization))

    def check_image_size(self, shape: Sequence[int], path: Path | None = None) -> None:
        """The network sees the image zero-padded to multiples of :attr:`divisor` (its training crop
        too), and its instance norm needs more than one voxel at the coarsest level, ``1 /
        divisor`` of that: so at least one edge must be longer than :attr:`divisor`. A fixed-size
        network (sliding windows pad any image) and one without instance norm take any size."""
        if self.fixed_size is not None or not any(isinstance(m, _INSTANCE_NORMS) for m in self.net.modules()):
            return
        d = self.divisor
        if math.prod(math.ceil(n / d) for n in shape) < 2:
            raise InputError(path, f"is {' x '.join(map(str, shape))} voxels, smaller than the {self.method} network "
                                   f"takes: it down-samples by {d} and needs more than one voxel at its coarsest "
                                   f"level, so the smallest image it takes has {d + 1} voxels along one axis")

    def patch_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Training crop (and sliding window) in voxels for images of grid ``shape``."""
        if self.fixed_size is not None:
            return self.fixed_size
        return training_patch(shape, self.config.patch_size, self.divisor)

    # ------------------------------------------------------------------ hooks: training
    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The optimiser of ``params`` (training, and the step timed for the budget): AdamW."""
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def lr_factor(self, step: int, total: int) -> float:
        """Learning rate / ``config.lr`` after ``step`` scheduler steps of a ``total``-step
        schedule: a linear warm-up over ``config.warmup`` steps and a cosine decay to 0 at ``total``."""
        warmup = self.config.warmup
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def make_loss(self, ignore: bool) -> torch.nn.Module:
        """``(logits (B, K, *P), y (B, 1, *P)) -> scalar``: DiceCE, without the voxels labelled
        :data:`~inrseg.losses.IGNORE` where ``ignore``."""
        return DiceCELoss(IGNORE if ignore else None)

    def train_loss(self, net: torch.nn.Module, batch: TrainBatch, loss_fn: torch.nn.Module,
                   total: int) -> StepOutput:
        """Loss of ``batch`` through ``net`` (:attr:`net` or its DDP wrapper) in a ``total``-step
        schedule, and its parts (floats) for the log."""
        logits = net(batch.x)
        with torch.device(self.device):  # MONAI's losses make tensors without a device
            return loss_fn(logits, batch.y), {}

    def timing_loss(self, net: torch.nn.Module, batch: TrainBatch, loss_fn: torch.nn.Module) -> torch.Tensor:
        """Loss of the dearest kind of training step, timed on a throwaway copy ``net`` to fit the
        schedule to a budget (must leave the model's state alone)."""
        return self.train_loss(net, batch, loss_fn, self.config.steps)[0]

    def extra_weights(self) -> dict[str, torch.Tensor]:
        """Counters that travel with the weights in the best and the resume state."""
        return {}

    def load_extra_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Pop :meth:`extra_weights`' entries from ``state`` and put them back."""

    def validation_metrics(self, pairs: Sequence[tuple[Volume, Volume]]) -> dict[str, float]:
        """``{"val_dice": mean foreground Dice}`` of :meth:`predict` on ``(image, labels)`` pairs."""
        return {"val_dice": self.mean_dice(pairs)}

    @torch.no_grad()
    def mean_dice(self, pairs: Sequence[tuple[Volume, Volume]], **predict_options: Any) -> float:
        """Mean over ``pairs`` of the mean foreground Dice of ``predict(image, **predict_options)``
        (cases without any foreground class present skipped: NaN-mean)."""
        scores = [case_metrics(self.predict(img, **predict_options).data, lab.data, self.num_classes,
                               distances=False, ignore_label=lab.meta.get("ignore_label")).mean_foreground_dice
                  for img, lab in pairs]
        return float(np.nanmean(scores))

    # ------------------------------------------------------------------ training
    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Train on ``train`` cases; keep the best weights on ``val`` (``val_dice``).

        Under torchrun each rank draws its own ``batch_size`` items of every step's global batch
        (``world_size x batch_size``; an item's crop is a draw of ``(seed, step, item)``) and
        DDP averages the gradients. ``budget`` bounds the whole call (default:
        ``config.budget_minutes`` from now); with ``fit_schedule_to_budget`` the schedule runs
        over the ``T`` steps that fit it, and training stops at ``T``.
        """
        cfg = self.config
        budget = as_budget(budget, cfg.budget_minutes)
        rank, _ = world()
        self.check_case_sizes(list(train) + list(val or []))  # before any case is loaded
        images, labels = load_training_tensors(train, self.prepare)
        patch = self.patch_size(np.max([x.shape[1:] for x in images], axis=0))
        ignore = has_ignored(labels)
        sampler = PatchSampler(images, labels, patch, cfg.foreground_fraction, cfg.augment, cfg.seed,
                               ignore=ignore, mirror=getattr(cfg, "mirror", False))
        loss_fn = self.make_loss(ignore)
        items = range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        resuming = state_path is not None and Path(state_path).exists()
        total = cfg.steps  # a resumed run's T comes back with its weights
        if cfg.fit_schedule_to_budget and budget.limited and not resuming:
            total = self.steps_within(budget, sampler, items, loss_fn, val)
        self.schedule_steps = total
        task = CNNTrainTask(self, sampler, loss_fn, items, val, use_bf16(self.device, precision, self.bf16_safe))
        res = run_training(task, LoopSettings(steps=total, val_every=cfg.val_every, budget=budget, seed=cfg.seed,
                                              state_path=state_path, log_path=log_path, device=self.device))
        self.history, self.best_step = res.history, res.best_step

    def steps_within(self, budget: Budget, sampler: PatchSampler, items: Sequence[int], loss_fn: torch.nn.Module,
                     val: Sequence[Case] | None) -> int:
        """The schedule length ``T`` that fits the time left in ``budget``: ``config.steps``, or
        fewer. Rank 0 times :meth:`timing_loss` steps with :meth:`make_optimizer` on a copy of the
        network, plus one validation prediction x the validation cases every ``val_every`` steps
        (:func:`~inrseg.engine.timed_schedule_steps`); every rank gets its ``T``."""
        def loss_of(net: torch.nn.Module, i: int) -> torch.Tensor:
            x, y = sampler.batch(i, items, self.device)
            return self.timing_loss(net, TrainBatch(x, y, i, items), loss_fn)

        cfg = self.config
        return timed_schedule_steps(budget, cfg.steps, self.net, self.make_optimizer, loss_of, self.device,
                                    self.predict, val, cfg.val_every, self.task_name, self.schedule_what)

    # ------------------------------------------------------------------ inference
    def network_logits(self, x: torch.Tensor, shape: Sequence[int], crop: Sequence[slice] | None = None
                       ) -> torch.Tensor:
        """Logits ``(B, K, *shape)`` of a network input ``x`` ``(B, C_in, *S)``, cropped to ``crop``
        (the un-padded image within ``S``) first. Default: the network's output, resampled."""
        logits = self.net(x)
        if crop is not None:
            logits = logits[(slice(None), slice(None)) + tuple(crop)]
        return upsample(logits, shape)

    @torch.no_grad()
    def image_logits(self, image: Volume, shape: Sequence[int]) -> torch.Tensor:
        """Class logits ``(K, *shape)`` of ``image`` ``(C, *S)`` on the model's device: one pass on
        the image padded to :attr:`divisor`, or sliding windows of :meth:`patch_size` (overlap
        0.25, Gaussian weights) for 3D volumes larger than it and for fixed-size networks."""
        self.net.eval()
        x = self.prepare(image)[None].to(self.device)
        size = tuple(image.shape)
        shape = tuple(int(n) for n in shape)
        target = shape if self.renders_at_scale else size
        patch = self.patch_size(size)
        if self.fixed_size is not None or (self.spatial_ndim == 3 and any(n > p for n, p in zip(size, patch))):
            zoom = [t / s for t, s in zip(target, size)]

            def predictor(w: torch.Tensor) -> torch.Tensor:
                return self.network_logits(w, [max(1, round(n * z)) for n, z in zip(w.shape[2:], zoom)])

            with torch.device(self.device):  # MONAI's inferer makes tensors without a device
                logits = sliding_window_inference(x, patch, sw_batch_size=1, predictor=predictor,
                                                  overlap=0.25, mode="gaussian")
        else:
            xp, crop = pad_to_multiple(x, self.divisor, self.spatial_ndim)
            logits = self.network_logits(xp, target, crop)
        return upsample(plain(logits), shape)[0]

    @torch.no_grad()
    def logits(self, image: Volume, scale: float | Sequence[float] = 1.0) -> tuple[torch.Tensor, np.ndarray]:
        """Class logits ``(K, *S')`` on the grid of ``scale`` (``S' = round(S * scale)``) and that
        grid's affine."""
        shape = tuple(image.shape)
        new_shape = resampled_shape(shape, scale)
        logits = self.image_logits(image, new_shape)
        affine = image.affine if new_shape == shape else resampled_affine(image.affine, image.shape, new_shape)
        return logits, affine


class CNNTrainTask(TrainTask):
    """The engine's hooks for training a :class:`CNNSegmenter` (:func:`~inrseg.engine.run_training`).

    Args:
        model: the segmenter; its hooks make the optimiser, schedule, loss and metrics.
        sampler: the training crops.
        loss_fn: :meth:`CNNSegmenter.make_loss`'s.
        items: this rank's indices in each step's global batch.
        val: validation cases (loaded at the first validation; ``None`` / empty: none).
        bf16: train under bf16 autocast.
    """

    def __init__(self, model: CNNSegmenter, sampler: PatchSampler, loss_fn: torch.nn.Module,
                 items: Sequence[int], val: Sequence[Case] | None, bf16: bool) -> None:
        self.model, self.sampler, self.loss_fn, self.items = model, sampler, loss_fn, items
        self.val, self.val_pairs = val, []
        params = list(model.net.parameters())
        opt = model.make_optimizer(model.net.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: model.lr_factor(s, model.schedule_steps))
        self.net = wrap_ddp(model.net, model.device, find_unused_parameters=model.ddp_find_unused)
        super().__init__(name=model.task_name, method=model.method, optimizers=[opt], schedulers=[sched],
                         params=params, modules=[model.net], grad_sync="ddp", bf16=bf16, validates=bool(val))

    def step(self, i: int) -> StepOutput:
        x, y = self.sampler.batch(i, self.items, self.model.device)
        return self.model.train_loss(self.net, TrainBatch(x, y, i, self.items), self.loss_fn,
                                     self.model.schedule_steps)

    def validate(self) -> dict[str, float]:
        if not self.val_pairs:
            self.val_pairs.extend(c.load() for c in self.val)
        return self.model.validation_metrics(self.val_pairs)

    def weights(self) -> dict[str, torch.Tensor]:
        """The network's state, the model's extra counters and ``T`` (a resumed run keeps its schedule)."""
        model = self.model
        return {**model.net.state_dict(), **model.extra_weights(),
                SCHEDULE_STEPS_KEY: torch.tensor(model.schedule_steps, dtype=torch.int64, device=model.device)}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.model.load_extra_weights(state)
        self.model.schedule_steps = int(state.pop(SCHEDULE_STEPS_KEY, self.model.schedule_steps))
        self.model.net.load_state_dict(state)
