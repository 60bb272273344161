"""MORSE (and its ablation variants) on the shared CNN trainer (:mod:`inrseg.methods.cnn`).

The network (:class:`~inrseg.nn.morse.MorseNet`): a backbone (:mod:`inrseg.nn.backbones`),
optionally the stochastic mixture of its decoder experts making the coarse logits, optionally a
point head at points (implicit anatomical rendering where it also reads Fourier features of the
point's coordinate). What MORSE overrides of the CNN trainer:

* loss: ``L_sup`` (DiceCE) on the coarse logits ``+ lambda_t * L_rend`` at uncertainty-biased
  training points, ``lambda_t = lambda_rend * 1{t > T/2} * (t - T/2) / T``
  (:mod:`inrseg.methods.morse.losses`); the expert-dropout rate ramps up over
  ``dropout_warmup_steps``; an image's dropout and points are draws of ``(seed, step, item)``;
* optimiser: AdamW or SGD (momentum 0.9), polynomial decay ``(1 - t/T) ** poly_power``;
* inference refinement: once ``L_rend`` has trained (``rend_steps > 0``), the ``test_points``
  most uncertain voxels are re-predicted by the point head, PointRend-style, at the output
  grid's coordinates (``predict(scale=2)`` is one 2x subdivision step);
* validation: also the coarse prediction's Dice (``val_dice_coarse``);
* the ``rend_steps`` counter travels with the weights (best and resume state, checkpoint).

Point coordinates are ``[-1, 1]`` over the network's input frame (the padded slice, the
training crop or the sliding window), cell-centred (:mod:`inrseg.nn.point_sampling`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Sequence

import torch

from inrseg.core.errors import InputError
from inrseg.data.volume import Volume
from inrseg.engine import StepOutput, step_rng, torch_generator
from inrseg.methods.cnn import CNNSegmenter, TrainBatch
from inrseg.methods.morse.config import MorseConfig
from inrseg.methods.morse.losses import dropout_ramp, morse_losses, rend_weight
from inrseg.nn.backbones import build_backbone, upsample
from inrseg.nn.morse import MorseNet, MorseOutput

__all__ = ["MORSE"]

#: key of the rend_steps counter in the weights the engine keeps (best state, resume state)
_REND_STEPS = "__rend_steps__"


class MORSE(CNNSegmenter):
    """MORSE or one of its ablation variants (``config.variant``) on ``config.backbone``.
    Constructor arguments: :class:`~inrseg.methods.base.Segmenter`'s, ``config`` a :class:`MorseConfig`.

    Attributes:
        rend_steps: optimiser steps of the kept weights with ``L_rend`` on; the point head
            refines predictions only when it is > 0.
    """

    method: ClassVar[str] = "morse"
    config_class: ClassVar[type] = MorseConfig
    saved_attributes: ClassVar[dict[str, Any]] = {**CNNSegmenter.saved_attributes, "rend_steps": 0}
    ddp_find_unused: ClassVar[bool] = True  # the point head is unused in the first half of training
    schedule_what: ClassVar[str] = "the schedules (lr decay, L_rend from T/2) run"
    renders_at_scale: ClassVar[bool] = True

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: MorseConfig | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(label_names, spatial_ndim, in_channels, config, device)
        self.rend_steps = 0
        self._refine: bool | None = None

    # ------------------------------------------------------------------ network
    def build_network(self) -> MorseNet:
        cfg, nd = self.config, self.spatial_ndim
        try:
            backbone = build_backbone(cfg.backbone, nd, self.in_channels, self.num_classes,
                                      img_size=self._net_size(), preset=cfg.backbone_preset,
                                      **cfg.backbone_overrides)
        except (ValueError, TypeError) as exc:
            raise InputError(None, f"cannot build the {cfg.backbone} backbone for {nd}D images: {exc}") from None
        return MorseNet(backbone, self.num_classes, **cfg.network_args())

    def _net_size(self) -> tuple[int, ...] | None:
        """The input size of fixed-size backbones (UNETR), the nominal one of TransUNet."""
        cfg, nd = self.config, self.spatial_ndim
        if cfg.patch_size is not None:
            return cfg.patch_size
        if cfg.backbone == "unetr":
            return (192, 192) if nd == 2 else (96, 96, 96)
        return None

    @property
    def divisor(self) -> int:
        return self.net.backbone.divisor

    @property
    def fixed_size(self) -> tuple[int, ...] | None:
        return self.net.backbone.fixed_size

    @property
    def task_name(self) -> str:
        return f"{self.method}/{self.config.variant}"

    # ------------------------------------------------------------------ training
    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_factor(self, step: int, total: int) -> float:
        """``(1 - t/T) ** poly_power``, 0 from ``T`` on."""
        return max(0.0, 1 - min(step, total) / total) ** self.config.poly_power

    def generators(self, step: int, items: Sequence[int]) -> list[torch.Generator]:
        """One generator per item of step ``step`` for its expert dropout and training points: a
        stream of ``(seed, step, item)`` apart from the crop sampler's."""
        seed = self.config.seed
        return [torch_generator(int(step_rng(seed, step, j, 1).integers(2 ** 63)), self.device) for j in items]

    def losses(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, weight: float,
               loss_fn: torch.nn.Module, generators: Sequence[torch.Generator] | None = None) -> StepOutput:
        """Total loss of a batch ``x`` ``(B, C_in, *S)``, ``y`` ``(B, 1, *S)`` through ``net``
        (:attr:`net` or its DDP wrapper) with ``L_rend`` weighted by ``weight`` (0: the point
        head is not run), and its parts (:func:`~inrseg.methods.morse.losses.morse_losses`).
        ``generators``: one per image, for its random draws (``None``: the global RNG)."""
        rend_on = self.net.point_head is not None and weight > 0
        out = net(x, self.config.train_points if rend_on else 0, generators)
        return morse_losses(out, y, weight, loss_fn)

    def train_loss(self, net: torch.nn.Module, batch: TrainBatch, loss_fn: torch.nn.Module,
                   total: int) -> StepOutput:
        """:meth:`losses` at ``lambda_t`` of step ``batch.step + 1`` of ``total``, after setting the
        expert-dropout warm-up; counts the step in :attr:`rend_steps` where ``L_rend`` was on."""
        cfg = self.config
        if self.net.smoe is not None:  # the expert-dropout warm-up (1 = full rate)
            self.net.smoe.dropout_scale = dropout_ramp(batch.step, cfg.dropout_warmup_steps)
        loss, parts = self.losses(net, batch.x, batch.y, rend_weight(batch.step + 1, total, cfg.lambda_rend),
                                  loss_fn, self.generators(batch.step, batch.items))
        self.rend_steps += int("loss_rend" in parts)
        return loss, parts

    def timing_loss(self, net: torch.nn.Module, batch: TrainBatch, loss_fn: torch.nn.Module) -> torch.Tensor:
        """A step with the point head on (the dearest kind); the dropout warm-up does not follow T."""
        return self.losses(net, batch.x, batch.y, self.config.lambda_rend, loss_fn,
                           self.generators(batch.step, batch.items))[0]

    def extra_weights(self) -> dict[str, torch.Tensor]:
        return {_REND_STEPS: torch.tensor(self.rend_steps, dtype=torch.int64, device=self.device)}

    def load_extra_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.rend_steps = int(state.pop(_REND_STEPS))

    def validation_metrics(self, pairs: Sequence[tuple[Volume, Volume]]) -> dict[str, float]:
        """``val_dice`` of the final (refined) prediction and, with a point head,
        ``val_dice_coarse`` of the coarse one."""
        out = super().validation_metrics(pairs)
        if self.net.point_head is not None:
            out["val_dice_coarse"] = self.mean_dice(pairs, refine=False)
        return out

    # ------------------------------------------------------------------ inference
    def network_logits(self, x: torch.Tensor, shape: Sequence[int], crop: Sequence[slice] | None = None
                       ) -> torch.Tensor:
        """Coarse logits resampled to ``shape``, or, when refining, rendered there by the point
        head (the Fourier coordinates stay those of the whole input frame ``x``)."""
        out = self.net(x)
        scale = offset = None
        if crop is not None:
            sl = (slice(None), slice(None)) + tuple(crop)
            full = x.shape[2:]
            scale = torch.tensor([(c.stop - c.start) / n for c, n in zip(crop, full)], device=x.device)
            offset = torch.tensor([(c.stop + c.start) / n - 1 for c, n in zip(crop, full)], device=x.device)
            out = MorseOutput(out.coarse[sl], None if out.fine is None else out.fine[sl], None)
        refine = self.rend_steps > 0 if self._refine is None else self._refine
        if not refine or self.net.point_head is None:
            return upsample(out.coarse, shape)
        return self.net.render(out, shape, self.config.test_points, scale, offset)

    @contextmanager
    def _refining(self, refine: bool | None) -> Iterator[None]:
        old, self._refine = self._refine, refine
        try:
            yield
        finally:
            self._refine = old

    def logits(self, image: Volume, scale: float | Sequence[float] = 1.0,
               refine: bool | None = None) -> tuple[torch.Tensor, Any]:
        """Class logits ``(K, *S')`` and affine of the grid of ``scale``. ``refine``: use the point
        head (default: once it has trained, ``rend_steps > 0``); ``False``: the coarse prediction."""
        with self._refining(refine):
            return super().logits(image, scale)

    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0, refine: bool | None = None) -> Volume:
        """Label map ``(*S',)`` of ``image`` (``refine``: see :meth:`logits`)."""
        with self._refining(refine):
            return super().predict(image, scale)

    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0,
                              refine: bool | None = None) -> Volume:
        """Class probabilities ``(K, *S')`` on the grid of :meth:`predict` (``refine``: see :meth:`logits`)."""
        with self._refining(refine):
            return super().predict_probabilities(image, scale)
