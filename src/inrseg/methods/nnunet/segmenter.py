""":class:`NNUNet`: nnU-Net v2 trained and run through its Python API, as an inrseg segmenter.

``fit`` writes the training and validation cases as an nnU-Net raw dataset in a temporary
folder, runs nnU-Net's fingerprint, planning (its default planner) and preprocessing, adds the
CPU plan where asked (:func:`~inrseg.methods.nnunet.workspace.cpu_plan`), writes inrseg's split
as nnU-Net's fold 0 and trains nnU-Net's trainer within the budget
(:func:`~inrseg.methods.nnunet.trainer.train_nnunet`); everything counts in the budget. The model
is then the network weights of the best EMA validation pseudo-Dice (nnU-Net's
``checkpoint_best``) with nnU-Net's plans and dataset description: an inrseg checkpoint
(safetensors + JSON), from which nnU-Net's predictor is rebuilt
(``nnUNetPredictor.manual_initialization``). Prediction is nnU-Net's: its preprocessing of the
image, Gaussian-weighted sliding windows, mirroring (``use_mirroring``, its default), resampling
back to the input grid.

Shapes: an image ``(C, *S)`` Volume (2D or 3D); probabilities ``(K, *S)``; ``scale`` must be 1
(nnU-Net predicts on the input grid).
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.core.progress import status
from inrseg.data.cases import Case
from inrseg.data.volume import Volume
from inrseg.engine import Budget, as_budget, world
from inrseg.methods.base import Segmenter, TTAMember
from inrseg.methods.nnunet.config import NNUNetConfig

__all__ = ["NNUNet", "nnunet_available"]

_PREFIX = "network."


def _unique_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each tensor once: nnU-Net's decoder holds its encoder,
    so ``state_dict`` names shared tensors twice (safetensors stores each tensor once)."""
    return {**dict(net.named_parameters()), **dict(net.named_buffers())}


def nnunet_available() -> bool:
    """Whether ``nnunetv2`` imports (the ``inrseg[nnunet]`` extra)."""
    try:
        import nnunetv2
    except ImportError:
        return False
    return nnunetv2 is not None


def _require_nnunet() -> None:
    if not nnunet_available():
        raise InputError(None, "nnunet needs nnU-Net v2: pip install 'inrseg[nnunet]' (nnunetv2 with "
                               "torchvision==0.28.* beside torch 2.13)")


class NNUNet(Segmenter):
    """nnU-Net v2 (``2d`` or ``3d_fullres``; default or CPU plan) inside inrseg.

    Attributes (saved in the checkpoint): ``nnunet_plans`` (nnU-Net's plans, the CPU
    configuration added), ``nnunet_configuration`` (the configuration trained, e.g.
    ``2d_cpu``), ``nnunet_dataset`` (its dataset.json), ``mirror_axes`` (the axes nnU-Net allows
    to mirror at inference), ``epochs_trained``, ``iterations_trained``.
    """

    method: ClassVar[str] = "nnunet"
    spatial_ndims: ClassVar[tuple[int, ...]] = (2, 3)
    config_class: ClassVar[type] = NNUNetConfig
    #: nnU-Net predicts on the input grid (``scale`` must be 1)
    input_grid_only: ClassVar[bool] = True
    saved_attributes: ClassVar[dict[str, Any]] = {"nnunet_plans": None, "nnunet_configuration": None,
                                                  "nnunet_dataset": None, "mirror_axes": None,
                                                  "epochs_trained": 0, "iterations_trained": 0}

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: NNUNetConfig | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(label_names, spatial_ndim, in_channels, config, device)
        for key, default in self.saved_attributes.items():
            if key != "postprocessing":
                setattr(self, key, default)
        self.network: torch.nn.Module | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self._predictors: dict[bool, Any] = {}  # nnU-Net predictors, with / without mirroring

    # ------------------------------------------------------------------ training
    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None, state_path: Path | None = None, *,
            budget: Budget | None = None, log_path: Path | None = None, precision: str = "auto") -> None:
        """nnU-Net's planning, preprocessing and training on ``train``, its best EMA pseudo-Dice
        on ``val`` kept (see the module doc). ``state_path`` is not used: an interrupted nnU-Net
        fit starts over (nnU-Net's own resumable checkpoints are pickles). Not under torchrun."""
        _require_nnunet()
        from inrseg.methods.nnunet.trainer import train_nnunet
        from inrseg.methods.nnunet.workspace import (case_key, cpu_plan, nnunet_environment, plan_and_preprocess,
                                                     write_raw_dataset, write_split)
        if world()[1] > 1:
            raise InputError(None, "nnunet under torchrun: run one process per model (bench --jobs)")
        cfg = self.config
        budget = as_budget(budget, cfg.budget_minutes)
        val = list(val or [])
        if not val:
            raise InputError(None, "nnunet needs validation cases (its best checkpoint is chosen on them)")
        workers = cfg.data_workers if cfg.data_workers >= 0 else (0 if self.device.type == "cpu" else 8)
        with nnunet_environment(workers) as base:
            keys = write_raw_dataset(base, list(train) + val, self.label_names, self.in_channels, cfg.channel_kinds)
            status(f"nnunet: planning and preprocessing {len(keys)} cases ({cfg.configuration})")
            plans, dataset_json = plan_and_preprocess(cfg.configuration)
            configuration = cfg.configuration
            if cfg.plan == "cpu":
                plans, configuration = cpu_plan(plans, cfg.configuration, cfg.cpu_batch_size, cfg.cpu_width_divisor)
                self._write_plans(plans)
            write_split([case_key(i) for i in range(len(train))],
                        [case_key(len(train) + i) for i in range(len(val))])
            status(f"nnunet: {cfg.plan_name}; planned in {budget.elapsed_s():.0f} s")
            result = train_nnunet(plans, configuration, dataset_json, cfg, self.device, budget, log_path)
        self.nnunet_plans, self.nnunet_configuration, self.nnunet_dataset = plans, configuration, dataset_json
        self.mirror_axes = result.mirror_axes
        self.epochs_trained, self.iterations_trained = result.epochs, result.iterations
        self.history = result.history
        self.best_step = (result.history[result.best_epoch]["step"]
                          if result.best_epoch is not None and result.best_epoch < len(result.history) else None)
        self._weights = result.weights
        self._build()

    @staticmethod
    def _write_plans(plans: dict) -> None:
        import json
        import os
        from inrseg.methods.nnunet.workspace import DATASET_NAME
        path = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME / "nnUNetPlans.json"
        path.write_text(json.dumps(plans, indent=2), encoding="utf-8")

    def chosen_settings(self) -> dict[str, Any]:
        out = super().chosen_settings()
        out["epochs"] = self.epochs_trained
        out["iterations"] = self.iterations_trained
        return out

    # ------------------------------------------------------------------ the network and nnU-Net's predictor
    def _managers(self) -> tuple[Any, Any]:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        plans = PlansManager(self.nnunet_plans)
        return plans, plans.get_configuration(self.nnunet_configuration)

    def _build(self) -> None:
        """nnU-Net's network of the saved plans (no deep supervision), the kept weights in it."""
        _require_nnunet()
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        plans, conf = self._managers()
        n_in = determine_num_input_channels(plans, conf, self.nnunet_dataset)
        n_out = plans.get_label_manager(self.nnunet_dataset).num_segmentation_heads
        net = nnUNetTrainer.build_network_architecture(plans, conf, n_in, n_out, enable_deep_supervision=False)
        if self._weights is not None:
            missing = set(_unique_tensors(net)) - set(self._weights)
            unexpected = set(self._weights) - set(net.state_dict())
            if missing or unexpected:
                raise RuntimeError(f"weights missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
            net.load_state_dict(self._weights, strict=False)  # the aliases of shared tensors are not stored
        self.network = net.to(self.device).eval()

    def _predictor(self, mirroring: bool) -> Any:
        if self.network is None:
            raise RuntimeError("nnunet: predict before fit or load")
        if mirroring not in self._predictors:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
            plans, conf = self._managers()
            with contextlib.redirect_stdout(io.StringIO()):  # it prints about the device
                p = nnUNetPredictor(tile_step_size=float(self.config.tile_step_size), use_gaussian=True,
                                    use_mirroring=mirroring, perform_everything_on_device=self.device.type == "cuda",
                                    device=self.device, verbose=False, verbose_preprocessing=False,
                                    allow_tqdm=False)
            p.manual_initialization(self.network, plans, conf, [self.network.state_dict()], self.nnunet_dataset,
                                    "nnUNetTrainer", None if self.mirror_axes is None else tuple(self.mirror_axes))
            self._predictors[mirroring] = p
        return self._predictors[mirroring]

    def _moved(self) -> None:
        self._predictors.clear()

    # ------------------------------------------------------------------ inference
    def probabilities(self, image: Volume, mirroring: bool | None = None) -> np.ndarray:
        """nnU-Net's class probabilities ``(K, *S)`` float32 of ``image`` (``(C, *S)``)."""
        from inrseg.methods.nnunet.workspace import from_nnunet, to_nnunet
        if image.data.shape[0] != self.in_channels:
            raise InputError(image.path, f"has {image.data.shape[0]} channels, the model takes {self.in_channels}")
        data, props = to_nnunet(image)
        mirroring = self.config.use_mirroring if mirroring is None else mirroring
        with torch.no_grad():
            _, probs = self._predictor(mirroring).predict_single_npy_array(data, props, None, None, True)
        return from_nnunet(np.asarray(probs, np.float32), self.spatial_ndim)

    def logits(self, image: Volume, scale: float | Sequence[float] = 1.0) -> tuple[torch.Tensor, np.ndarray]:
        """Log-probabilities ``(K, *S)`` (softmax of them = nnU-Net's probabilities) and the
        image's affine; ``scale`` must be 1."""
        scales = [scale] if np.isscalar(scale) else list(scale)
        if any(not math.isclose(float(s), 1.0) for s in scales):
            raise InputError(image.path, "nnunet predicts on the input grid only (--scale 1)")
        probs = torch.from_numpy(self.probabilities(image)).to(self.device)
        return torch.log(probs.clamp_min(1e-12)), image.affine.copy()

    def tta_members(self, n: int | None = None) -> list[TTAMember]:
        """nnU-Net's own test-time augmentation: one member, its prediction with mirroring
        over the axes it allows (its default; ``n`` must be 1 or ``None``)."""
        if n is not None and n != 1:
            raise ValueError(f"{n} test-time members asked for: nnunet mirrors inside its predictor (1 member)")

        def mirrored(image: Volume, scale: float | Sequence[float] = 1.0) -> tuple[torch.Tensor, np.ndarray]:
            probs = torch.from_numpy(self.probabilities(image, mirroring=True)).to(self.device)
            return torch.log(probs.clamp_min(1e-12)), image.affine.copy()
        return [TTAMember("nnU-Net mirroring", mirrored)]

    # ------------------------------------------------------------------ checkpoints
    def modules(self) -> list[torch.nn.Module]:
        return [self.network] if self.network is not None else []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.network is None:
            raise RuntimeError("nnunet: save before fit")
        return {_PREFIX + k: v.detach().cpu() for k, v in _unique_tensors(self.network).items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
        if any(not k.startswith(_PREFIX) for k in tensors):
            raise InputError(path, "is not an nnunet checkpoint (tensors outside 'network.')")
        self._weights = {k[len(_PREFIX):]: v.cpu() for k, v in tensors.items()}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "NNUNet":
        """Read a checkpoint and rebuild nnU-Net's network from its saved plans."""
        obj = super().load(path, device=device)
        if not isinstance(obj.nnunet_plans, dict) or not isinstance(obj.nnunet_dataset, dict):
            raise InputError(path, "nnunet checkpoint without nnU-Net's plans")
        try:
            obj._build()
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(path, f"nnU-Net's plans do not match the weights ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:160]})") from None
        return obj
