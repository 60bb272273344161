"""MetaSeg ("Fit Pixels, Get Labels"): a meta-learned SIREN and a segmentation head.

A SIREN ``f_theta`` maps coordinates to intensities; a shallow head ``g_phi`` reads labels off
``f``'s last sine-layer features (:mod:`inrseg.nn.siren`). :meth:`MetaSeg.fit`:

1. **meta-training** (:mod:`~inrseg.methods.metaseg.meta`): second-order MAML over the
   training images, validated by the test-time fit of the validation images;
2. **phase 2** (:mod:`~inrseg.methods.metaseg.phase2`): a head retrained per candidate
   test-time step count on fitted features, and the choice of ``T_f`` on validation;
3. **test time** (:mod:`~inrseg.methods.metaseg.fitting`): a copy of ``theta*`` fitted to the
   image's pixels for ``T_f`` steps (head frozen); labels = the head's argmax on any
   coordinates (the image grid, a finer / coarser grid, given points).

The wall-time budget bounds steps 1 and 2 together: meta-training stops early enough to leave
phase 2 its estimated time. Under torchrun every rank meta-trains its share of each meta-batch;
phase 2 runs on rank 0 and its result is broadcast.

Ignore label: unlabelled pixels keep their MSE term; the focal loss (inner ``joint`` loop, outer
loss, phase-2 head) is the mean over the labelled pixels only, phase 2 stores features at
labelled pixels, and the validation Dice skips unlabelled pixels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.core.progress import progress
from inrseg.core.seeding import torch_generator
from inrseg.data.grids import coordinate_grid, resampled_affine, resampled_shape
from inrseg.data.volume import Volume
from inrseg.data.cases import Case
from inrseg.engine import Budget, LoopSettings, as_budget, broadcast_object, run_training, use_bf16, world
from inrseg.methods.base import Segmenter, TTAMember
from inrseg.methods.metaseg.config import MetaSegConfig
from inrseg.methods.metaseg.diagnostics import Diagnostics
from inrseg.methods.metaseg.fitting import PreparedImage, TestTimeFit
from inrseg.methods.metaseg.meta import MetaTrainingTask, planned_outer_steps
from inrseg.methods.metaseg.phase2 import Phase2Result, meta_training_share, select_tf_and_head
from inrseg.methods.tta import refit_members
from inrseg.nn.siren import init_params

__all__ = ["MetaSeg"]


class MetaSeg(Diagnostics, TestTimeFit, Segmenter):
    """MetaSeg segmenter (2D and 3D).

    Args:
        label_names: class names indexed by label value (``K`` classes).
        spatial_ndim: grid axes of the images (2 or 3).
        in_channels: image channels ``C``.
        config: hyper-parameters (default :class:`MetaSegConfig`).
        device: where the parameters live and every fit runs (``"cpu"``, ``"cuda:0"``, ``"auto"``...).

    Attributes:
        params: the flat parameter dict of :mod:`inrseg.nn.siren`: ``f.*`` = ``theta*``,
            ``g.*`` = the head used at test time.
        lrs: Meta-SGD's learned learning rates (keys of ``params``), or ``None``.
        t_f: test-time steps.
        tf_curve: the choice of ``T_f``: ``[{"t_f", "val_dice_meta_head", "val_dice_phase2"}]``.
        meta_head: the meta-learned head (``g.*``) that phase 2 replaced, or ``None``.
        start_step: outer step the last :meth:`fit` started from (after a resume).
        timings: seconds of meta-training and phase 2, meta-training's budget share, the
            outer schedule's length.
    """

    method: ClassVar[str] = "metaseg"
    spatial_ndims: ClassVar[tuple[int, ...]] = (2, 3)
    config_class: ClassVar[type] = MetaSegConfig
    #: sines at w0 = 30 lose their phase in bf16: fp32 unless ``precision="bf16"`` is asked for
    bf16_safe: ClassVar[bool] = False
    #: labels on any grid are read off the continuous field (``scale``)
    continuous_scale: ClassVar[bool] = True
    saved_attributes: ClassVar[dict[str, Any]] = {
        "t_f": lambda obj: obj.config.default_tf, "tf_curve": lambda obj: [], "timings": lambda obj: {}}

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: MetaSegConfig | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(label_names, spatial_ndim, in_channels, config, device)
        cfg = self.config
        self.params: dict[str, torch.Tensor] = init_params(
            spatial_ndim, in_channels, cfg.hidden, cfg.layers, len(self.label_names), cfg.w0,
            torch_generator(cfg.seed), head_hidden=cfg.head_hidden, head_layers=cfg.head_layers,
            device=self.device)
        self.lrs: dict[str, torch.Tensor] | None = (
            {k: torch.full_like(v, cfg.inner_lr) for k, v in self.params.items()} if cfg.meta_sgd else None)
        self.t_f: int = cfg.default_tf
        self.tf_curve: list[dict] = []
        self.meta_head: dict[str, torch.Tensor] | None = None
        self.start_step: int = 0
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ plumbing
    def tensors(self) -> dict[str, torch.Tensor]:
        """The parameters of ``f`` and the head (learned learning rates not counted)."""
        return self.params

    def _moved(self) -> None:
        move = (lambda d: None if d is None else {k: v.to(self.device) for k, v in d.items()})
        self.params, self.lrs, self.meta_head = move(self.params), move(self.lrs), move(self.meta_head)

    # ------------------------------------------------------------------ training
    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Meta-train on ``train``; choose the meta-parameters, ``T_f`` and the retrained head
        on ``val`` (never on test data).

        ``budget`` (default: ``config.budget_minutes`` from now) bounds the whole call, phase 2
        included. ``state_path``: resumable meta-training state (phase 2 is redone after a
        resume); ``log_path``: meta-training's per-step metrics. ``precision``: fp32 unless
        ``"bf16"``. Under torchrun every rank meta-trains its share of each meta-batch
        (``meta_batch`` tasks per rank); phase 2 and the choice of ``T_f`` run on rank 0 and
        every rank ends with its result.
        """
        cfg = self.config
        budget = as_budget(budget, cfg.budget_minutes)
        rank, size = world()
        train_s = [self.prepare(*c.load()) for c in progress(train, desc="loading training cases")]
        val_s = [self.prepare(*c.load()) for c in (val or [])]
        bf16 = use_bf16(self.device, precision, self.bf16_safe)
        share = broadcast_object(meta_training_share(self, train_s, val_s, budget) if rank == 0 else None)
        meta_budget = budget.share(share)
        total = cfg.steps  # a resumed run gets its schedule back with its state
        if cfg.fit_schedule_to_budget and not (state_path is not None and Path(state_path).exists()):
            total = broadcast_object(planned_outer_steps(self, train_s, val_s[:cfg.val_max_cases], meta_budget)
                                     if rank == 0 else None)
        t0 = time.perf_counter()
        task = MetaTrainingTask(self, train_s, val_s[:cfg.val_max_cases], bf16, total)
        res = run_training(task, LoopSettings(steps=total, val_every=cfg.val_every, budget=meta_budget,
                                              seed=cfg.seed, state_path=state_path, log_path=log_path,
                                              device=self.device))
        self.params = {k: v.detach() for k, v in self.params.items()}
        if self.lrs is not None:
            self.lrs = {k: v.detach() for k, v in self.lrs.items()}
        self.history, self.best_step, self.start_step = res.history, res.best_step, res.start_step
        t1 = time.perf_counter()
        if rank == 0:
            self.select_tf_and_head(train_s, val_s, budget, bf16)
        if size > 1:  # rank 0's T_f, heads and T_f curve on every rank
            heads = None
            if rank == 0:
                heads = ({k: v.cpu() for k, v in self.params.items() if k.startswith("g.")},
                         None if self.meta_head is None else {k: v.cpu() for k, v in self.meta_head.items()})
            self.t_f, heads, self.tf_curve = broadcast_object((self.t_f, heads, self.tf_curve) if rank == 0 else None)
            self.params.update({k: v.to(self.device) for k, v in heads[0].items()})
            self.meta_head = None if heads[1] is None else {k: v.to(self.device) for k, v in heads[1].items()}
        self.timings = {"meta_train_s": t1 - t0, "phase2_and_tf_s": time.perf_counter() - t1,
                        "meta_share": share, "schedule_steps": task.schedule_steps}

    def select_tf_and_head(self, train: Sequence[PreparedImage], val: Sequence[PreparedImage],
                           budget: Budget | None = None, bf16: bool = False) -> Phase2Result:
        """Phase 2 on prepared, labelled images (:func:`~inrseg.methods.metaseg.phase2.select_tf_and_head`)
        and its result applied: :attr:`t_f`, the head in :attr:`params` (``theta*`` untouched),
        :attr:`meta_head` and :attr:`tf_curve`. Returns the result."""
        result = select_tf_and_head(self, train, val, budget, bf16)
        self.t_f = result.t_f
        if result.meta_head is not None:
            self.meta_head = result.meta_head
        if result.tf_curve is not None:
            self.tf_curve = result.tf_curve
        if result.head is not None:
            self.params.update(result.head)
        return result

    # ------------------------------------------------------------------ inference
    def _grid(self, image: Volume, scale: float | Sequence[float]) -> tuple[tuple[int, ...], np.ndarray,
                                                                            torch.Tensor | None]:
        """The grid ``S'`` of ``image`` resampled by ``scale``, its affine, and its coordinates
        ``(M, d)`` on the device (``None`` for the image's own grid: :meth:`image_logits` reads
        it faster)."""
        shape = resampled_shape(image.shape, scale)
        if shape == tuple(image.shape):
            return shape, np.asarray(image.affine, float), None
        coords = coordinate_grid(image.shape, image.spacing, self.config.keep_aspect, scale=scale, device=self.device)
        return shape, np.asarray(resampled_affine(image.affine, image.shape, shape), float), coords

    def fit_logits(self, images: Sequence[Volume], queries: Sequence[torch.Tensor | None], *,
                   steps: int | None = None, seed: int | None = None) -> list[torch.Tensor]:
        """Class logits ``(M_i, K)`` (on the device) at ``queries[i]`` ``(M_i, d)`` (``None``: every
        voxel of the image's own grid, C order) after fitting each image for ``steps`` (default
        ``T_f``) steps whose random voxels are drawn from ``seed`` (default ``config.seed``);
        images of one shape are fitted together, ``fit_batch`` at a time."""
        prepared = [self.prepare(im) for im in images]
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.shape, []).append(i)
        for idxs in groups.values():
            for s in range(0, len(idxs), self.config.fit_batch):
                block = idxs[s:s + self.config.fit_batch]
                theta = self.fitted_theta([prepared[i] for i in block], self.t_f if steps is None else steps,
                                          gen=None if seed is None else torch_generator(seed))
                for j, i in enumerate(block):
                    one = {k: v[j:j + 1] for k, v in theta.items()}
                    out[i] = (self.image_logits(one, prepared[i]) if queries[i] is None
                              else self.point_logits(one, queries[i], step=prepared[i].step))[0]
        return out  # type: ignore[return-value]

    def logits(self, image: Volume, scale: float | Sequence[float] = 1.0, *, steps: int | None = None,
               seed: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Class logits ``(K, *S')`` of ``image`` (``(C, *S)``) after the test-time fit (``steps``,
        ``seed``: :meth:`fit_logits`'), ``S' = round(S * scale)``, and the affine of that grid."""
        shape, affine, coords = self._grid(image, scale)
        logits = self.fit_logits([image], [coords], steps=steps, seed=seed)[0]   # (M, K)
        return logits.T.reshape((len(self.label_names),) + shape), affine

    def tta_members(self, n: int | None = None) -> list[TTAMember]:
        """Test-time augmentation by ``n`` (default 4) repeated test-time fits: seeds ``seed + k``
        (the random voxels of each step), ``T_f`` x (1, 0.75, 1.25, 1.5) steps
        (:func:`~inrseg.methods.tta.refit_members`); the first is the plain prediction."""
        return refit_members(self.logits, self.t_f, self.config.seed, n)

    def predict_batch(self, images: Sequence[Volume], scale: float | Sequence[float] = 1.0) -> list[Volume]:
        """:meth:`predict` of several images, fitted together (stacked parameters)."""
        grids = [self._grid(im, scale) for im in images]
        logits = self.fit_logits(images, [g[2] for g in grids])
        return [Volume(lg.argmax(-1).reshape(shape).cpu().numpy().astype(np.int64), affine, self.spatial_ndim,
                       im.time_step, path=im.path) for im, lg, (shape, affine, _) in zip(images, logits, grids)]

    def predict_points(self, image: Volume, coords: torch.Tensor | np.ndarray) -> np.ndarray:
        """Labels ``(N,)`` int64 at continuous coordinates ``(N, d)`` (the convention of
        :mod:`inrseg.data.grids`: cell-centred, [-1, 1] per axis) after fitting ``image``."""
        q = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
        if q.dim() != 2 or q.shape[1] != self.spatial_ndim:
            raise ValueError(f"coords must be (N, {self.spatial_ndim}), got {tuple(q.shape)}")
        return self.fit_logits([image], [q])[0].argmax(-1).cpu().numpy().astype(np.int64)

    # ------------------------------------------------------------------ what training chose
    def steps_curve(self) -> list[tuple[int, float]]:
        """The T_f curve: ``[(t_f, validation Dice)]`` of the phase-2 head where phase 2 ran,
        else of the meta-learned head (NaN without validation), in step order."""
        return [(int(e["t_f"]), float(e.get("val_dice_phase2", e.get("val_dice_meta_head", float("nan")))))
                for e in self.tf_curve]

    def chosen_settings(self) -> dict[str, Any]:
        """The best meta-training step and ``t_f``."""
        return {**super().chosen_settings(), "t_f": self.t_f}

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``params`` under their names, ``meta_head.*`` and (Meta-SGD) ``lr.*``."""
        tensors = dict(self.params)
        tensors.update({f"meta_head.{k}": v for k, v in (self.meta_head or {}).items()})
        if self.lrs is not None:
            tensors.update({f"lr.{k}": v for k, v in self.lrs.items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
        """Put :meth:`state_tensors` back; a phase-2 head with context (``g.0.weight`` of
        ``(hidden, P * hidden)``) is accepted where the config has ``head_context``."""
        params = {k: v.to(self.device) for k, v in tensors.items() if not k.startswith(("lr.", "meta_head."))}
        want = {k: tuple(v.shape) for k, v in self.params.items()}
        got = {k: tuple(v.shape) for k, v in params.items()}
        if self.context_points > 1 and got.get("g.0.weight") == (want["g.0.weight"][0],
                                                                  want["g.0.weight"][1] * self.context_points):
            want["g.0.weight"] = got["g.0.weight"]         # phase 2 kept a context head
        if got != want:
            diff = sorted(set(want.items()) ^ set(got.items()))[:2]
            raise InputError(path, f"weights do not match the stored config (e.g. {diff})")
        self.params = params
        self.meta_head = {k[len("meta_head."):]: v.to(self.device) for k, v in tensors.items()
                          if k.startswith("meta_head.")} or None
        self.lrs = {k[3:]: v.to(self.device) for k, v in tensors.items() if k.startswith("lr.")} or None
