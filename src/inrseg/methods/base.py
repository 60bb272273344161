"""The base class every method derives from, and the capability interfaces of some methods.

Every method turns a training set of (image, label map) pairs into a model that labels a new
image; they differ only in the per-image work at test time. :class:`Segmenter` holds the shared
plumbing: the device, ``to``, the parameter count, the training history, one checkpoint format
with one config policy, and ``predict`` / ``predict_probabilities`` built on the method's
:meth:`Segmenter.logits`. What only some methods can do is a capability interface
(:class:`HeldOutSlices`, :class:`PlaneRendering`, :class:`StepCurves`, :class:`BatchPrediction`):
the CLI asks ``isinstance(model, HeldOutSlices)``, never for a method name. Test-time
augmentation is one hook, :meth:`Segmenter.tta_members` (:class:`TTAMember`; default: mirrors of
:meth:`Segmenter.logits`), combined by :func:`inrseg.methods.tta.tta_probabilities`.

Shapes: an image is a :class:`~inrseg.data.volume.Volume` of ``(C, *S)``; a label map ``(*S,)``;
logits and probabilities ``(K, *S')`` with ``K`` classes and ``S' = round(S * scale)``.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from inrseg.core.errors import InputError
from inrseg.data.volume import Volume
from inrseg.data.cases import Case
from inrseg.data.postprocess import check_postprocessing
from inrseg.engine import Budget, resolve_device
from inrseg.engine.checkpoints import load_checkpoint, save_checkpoint
from inrseg.methods.configs import config_from_dict, config_to_dict

__all__ = ["BatchPrediction", "FitDiagnostics", "HeldOutSlices", "PlaneRendering", "Segmenter", "StepCurves",
           "TTAMember", "check_spatial_ndim"]

_KIND = {2: "2D", 3: "3D", 4: "3D+t"}


def check_spatial_ndim(cls: type, spatial_ndim: int, path: Path | None = None) -> None:
    """Refuse, in one line, data whose grid dimensionality the method ``cls`` does not segment."""
    if spatial_ndim not in cls.spatial_ndims:
        what = " or ".join(_KIND[n] for n in cls.spatial_ndims)
        raise InputError(path, f"{_KIND.get(spatial_ndim, f'{spatial_ndim}D')} data: {cls.method} segments "
                               f"{what} images" + ("" if spatial_ndim != 4 else " (nisf segments 3D+t cines)"))


#: a member's logits: ``(image (C, *S), scale) -> (logits (K, *S') tensor, affine (4, 4))``
LogitsFn = Callable[[Volume, float | Sequence[float]], tuple[torch.Tensor, np.ndarray]]


@dataclass(frozen=True)
class TTAMember:
    """One member of test-time augmentation (``segment --tta``).

    Attributes:
        name: what it is, e.g. ``"identity"``, ``"mirror 0,1"``, ``"refit seed 3, 25 steps"``.
        logits: ``(image, scale) -> (logits (K, *S'), affine)`` on the grid and with the affine
            of :meth:`Segmenter.logits`, already mapped back onto that grid (a mirrored member
            flips its output back).
    """

    name: str
    logits: LogitsFn


def _mirrored_logits(logits: LogitsFn, axes: tuple[int, ...], image: Volume,
                     scale: float | Sequence[float] = 1.0) -> tuple[torch.Tensor, np.ndarray]:
    """``logits`` of ``image`` mirrored along the grid ``axes``, its output mirrored back (the
    affine is that of the unmirrored grid: mirroring keeps the shape)."""
    if not axes:
        return logits(image, scale)
    dims = [1 + a for a in axes]                                     # the channel axis comes first
    out, affine = logits(image.with_data(np.ascontiguousarray(np.flip(image.data, dims))), scale)
    return torch.flip(out, dims), affine


class Segmenter:
    """A trainable segmentation model.

    A method sets the class attributes, builds its networks in ``__init__`` (after calling this
    one) and implements :meth:`fit`, :meth:`logits`, :meth:`state_tensors` and
    :meth:`load_state_tensors`; the rest is shared.

    Args:
        label_names: class names indexed by label value (``K = len(label_names)``).
        spatial_ndim: grid axes of the images it labels (2, 3, or 4 for 3D + t).
        in_channels: image channels ``C``.
        config: the method's config dataclass (an instance of :attr:`config_class`).
        device: where its networks live (``"cpu"``, ``"cuda:0"``, ``"auto"``...).

    Attributes:
        history: one entry per validation of the last :meth:`fit` (step, loss, metrics).
        best_step: the step whose state was kept (best on validation), or ``None``.
    """

    #: registry name, stored in checkpoints (``"unet"``, ``"metaseg"``...)
    method: ClassVar[str]
    #: the grid dimensionalities it segments (2, 3, 4 = 3D + t)
    spatial_ndims: ClassVar[tuple[int, ...]] = (2, 3)
    #: the config dataclass it is built from
    config_class: ClassVar[type]
    #: bf16 autocast keeps its accuracy (``--precision auto`` uses it on CUDA)
    bf16_safe: ClassVar[bool] = False
    #: checkpoint header keys :meth:`load` restores as attributes, with their defaults; a
    #: subclass's own dict is merged over this one (:meth:`__init_subclass__`): every method
    #: saves ``postprocessing``, the spec chosen on validation (:mod:`inrseg.data.postprocess`), and
    #: ``slice_axis`` (a 2D model that segments 3D volumes slice by slice, or ``None``)
    saved_attributes: ClassVar[dict[str, Any]] = {"postprocessing": None, "slice_axis": None}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.saved_attributes = {**Segmenter.saved_attributes, **cls.saved_attributes}

    def __init__(self, label_names: Sequence[str], spatial_ndim: int, in_channels: int = 1,
                 config: Any = None, device: str | torch.device = "cpu") -> None:
        check_spatial_ndim(type(self), spatial_ndim)
        self.config = config if config is not None else self.config_class()
        self.label_names = list(label_names)
        self.spatial_ndim = spatial_ndim
        self.in_channels = in_channels
        self.device = resolve_device(device)
        self.history: list[dict] = []
        self.best_step: int | None = None
        #: post-processing chosen on validation (``{"keep_largest": [class ids]}``), or None
        self.postprocessing: dict[str, list[int]] | None = None
        #: a 2D model of 3D volumes: the axis it segments them along (:mod:`inrseg.methods.slicewise`)
        self.slice_axis: int | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def modules(self) -> list[torch.nn.Module]:
        """The networks whose parameters :attr:`num_params` counts and :meth:`to` moves."""
        return [m for m in vars(self).values() if isinstance(m, torch.nn.Module)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Loose trained tensors (not in a module) that :meth:`to` moves: override where a
        method keeps its weights as a dict of tensors."""
        return {}

    def to(self, device: str | torch.device) -> "Segmenter":
        """Move the model to ``device``; returns ``self``."""
        self.device = resolve_device(device)
        for m in self.modules():
            m.to(self.device)
        self._moved()
        return self

    def _moved(self) -> None:
        """Hook after :meth:`to`: move loose tensors to :attr:`device`."""

    @property
    def num_params(self) -> int:
        """Trainable numbers the model stores (every module's parameters plus loose tensors)."""
        return (sum(p.numel() for m in self.modules() for p in m.parameters())
                + sum(t.numel() for t in self.tensors().values()))

    # ------------------------------------------------------------------ training
    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Train on ``train``; select models / step counts on ``val`` (never on test data).

        ``state_path``: where a resumable training state is written periodically; if the file
        exists, training continues from it. ``budget``: the wall-time deadline of the whole
        call, every phase included (default: the config's ``budget_minutes`` from now).
        ``log_path``: per-step metrics log (JSON lines). ``precision``: ``auto`` (bf16 autocast
        on CUDA where the method allows it), ``fp32`` or ``bf16``. Under torchrun every rank
        calls it; the engine (:mod:`inrseg.engine`) splits the work.
        """
        raise NotImplementedError

    def check_image_size(self, shape: Sequence[int], path: Path | None = None) -> None:
        """Raise :class:`InputError` naming ``path`` if an image of grid ``shape`` is smaller than
        the model's networks take, saying the smallest size they take. Called wherever images
        are prepared for training or prediction, and by ``segment`` on every input before it
        writes anything. Default: any size (a method with a limit overrides it)."""

    def check_case_sizes(self, cases: Sequence[Case]) -> None:
        """:meth:`check_image_size` of every case, from its first image file's header alone."""
        for case in cases:
            self.check_image_size(case.grid_shape(), case.image_paths[0])

    # ------------------------------------------------------------------ inference
    def logits(self, image: Volume, scale: float | Sequence[float] = 1.0) -> tuple[torch.Tensor, np.ndarray]:
        """Class logits ``(K, *S')`` of ``image`` (``(C, *S)``) on the grid of ``scale`` and that
        grid's 4 x 4 affine. ``scale`` != 1: a finer / coarser grid of the same field of view."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map ``(*S',)`` int64 of ``image``, with an affine that overlays it."""
        logits, affine = self.logits(image, scale)
        labels = logits.argmax(0).cpu().numpy().astype(np.int64)
        return Volume(labels, affine, self.spatial_ndim, image.time_step, path=image.path)

    def tta_members(self, n: int | None = None) -> list[TTAMember]:
        """The members of test-time augmentation, averaged by
        :func:`inrseg.methods.tta.tta_probabilities`; the first is :meth:`logits` itself.

        Default (the CNN methods): mirroring over every subset of the grid axes, one forward
        pass each: 2D 4 members, 3D 8; the identity first, then one axis, two axes... (axes in
        order); ``n``: the first ``n`` of them (``None``: all). The INR methods override it with
        repeated test-time fits (:func:`inrseg.methods.tta.refit_members`).

        Raises:
            ValueError: ``n`` outside 1 .. 2^d.
        """
        d = self.spatial_ndim
        subsets = [a for r in range(d + 1) for a in itertools.combinations(range(d), r)]
        if n is not None and not 1 <= n <= len(subsets):
            raise ValueError(f"{n} test-time members asked for: mirroring a {_KIND.get(d, d)} image gives 1 to "
                             f"{len(subsets)}")
        return [TTAMember("mirror " + ",".join(map(str, a)) if a else "identity",
                          functools.partial(_mirrored_logits, self.logits, a)) for a in subsets[:n]]

    @torch.no_grad()
    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Class probabilities ``(K, *S')`` float32 (summing to 1 per voxel) on the grid of
        :meth:`predict`, whose labels are their argmax; ``inrseg segment --save-probabilities``."""
        logits, affine = self.logits(image, scale)
        probs = torch.softmax(logits.float(), 0).cpu().numpy().astype(np.float32)
        return Volume(probs, affine, self.spatial_ndim, image.time_step, path=image.path)

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a checkpoint stores, by name."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
        """Put :meth:`state_tensors` back (raise :class:`InputError` naming ``path`` if they do not
        fit the config)."""
        raise NotImplementedError

    def state_meta(self) -> dict[str, Any]:
        """Header fields beyond the shared ones: :attr:`saved_attributes` by default."""
        return {k: getattr(self, k) for k in self.saved_attributes}

    def save(self, path: str | Path) -> None:
        """Write a checkpoint (safetensors + JSON header with the resolved config), atomically."""
        save_checkpoint(path, self.method, self.state_tensors(), {
            "config": config_to_dict(self.config), "label_names": self.label_names,
            "spatial_ndim": self.spatial_ndim, "in_channels": self.in_channels,
            "best_step": self.best_step, "history": self.history, "num_params": self.num_params,
            **self.state_meta()})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Segmenter":
        """Read a checkpoint written by :meth:`save` of this method onto ``device``."""
        tensors, meta = load_checkpoint(path, cls.method)
        cfg = config_from_dict(cls.config_class, meta["config"], Path(path))
        obj = cls(meta["label_names"], meta["spatial_ndim"], meta["in_channels"], cfg, device=device)
        try:
            obj.load_state_tensors({k: v.to(obj.device) for k, v in tensors.items()}, Path(path))
        except RuntimeError as exc:  # torch's load_state_dict on mismatched shapes or names
            raise InputError(path, f"checkpoint header does not match its weights "
                                   f"({str(exc).splitlines()[0][:160]})") from None
        obj.best_step, obj.history = meta.get("best_step"), list(meta.get("history", []))
        for key, default in cls.saved_attributes.items():
            setattr(obj, key, meta.get(key, default(obj) if callable(default) else default))
        obj.postprocessing = check_postprocessing(obj.postprocessing, obj.num_classes, Path(path))
        return obj

    def chosen_settings(self) -> dict[str, Any]:
        """What training chose on validation (best step; methods add T_f, inference steps...)."""
        return {"best_step": self.best_step} if self.best_step is not None else {}


# ============================================================================================
# capabilities: what only some methods can do
# ============================================================================================

@runtime_checkable
class HeldOutSlices(Protocol):
    """Labels slices the model did not see: fits on the other slices, predicts the held-out ones
    (``segment --heldout AXIS:i,j``). Returns an object whose ``labels`` is the ``(*S,)`` label
    map Volume of the whole grid."""

    def predict_heldout(self, image: Volume, axis: int, indices: Sequence[int],
                        labels: Volume | None = None, steps: int | None = None) -> Any: ...


@runtime_checkable
class PlaneRendering(Protocol):
    """Renders labels on any plane through the fitted continuous field (``segment --plane``).

    ``centre_mm``, ``u``, ``v``: the plane's centre and in-plane axes in world mm (RAS, the
    image affine's frame); ``size``: ``(NU, NV)`` pixels of ``pixel_mm``; ``frame``: the time
    frame of a 3D + t image. Returns a :class:`~inrseg.data.planes.PlaneView`."""

    def render_plane_of(self, image: Volume, centre_mm: Sequence[float], u: Sequence[float],
                        v: Sequence[float], size: tuple[int, int], pixel_mm: float, frame: float = 0.0) -> Any: ...


@runtime_checkable
class StepCurves(Protocol):
    """Chose a test-time step count on validation and keeps the curve it chose it from:
    ``[(steps, validation mean foreground Dice)]`` in step order."""

    def steps_curve(self) -> list[tuple[int, float]]: ...


@runtime_checkable
class BatchPrediction(Protocol):
    """Predicts several images in one batch (cheaper than one by one)."""

    def predict_batch(self, images: Sequence[Volume], scale: float | Sequence[float] = 1.0) -> list[Volume]: ...


@runtime_checkable
class FitDiagnostics(Protocol):
    """A test-time fit that can be watched (``inrseg figures``): the data of the figures; the
    plots are :mod:`inrseg.viz.figures`'.

    * ``step_curve``: ``[{"step", "dice", "psnr_db"}]`` after each of ``steps`` fit steps;
    * ``feature_components``: ``(rgb (*S, 3) in [0, 1], labels (*S,))``: the first three principal
      components of the fitted features, and the labels;
    * ``diagnostic``: ``{head: [{"step", "dice", "per_class"}]}`` on labelled (validation) pairs.
    """

    def step_curve(self, image: Volume, labels: Volume, steps: Sequence[int]) -> list[dict]: ...

    def feature_components(self, image: Volume, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def diagnostic(self, pairs: Sequence[tuple[Volume, Volume]], steps: Sequence[int]) -> dict[str, list[dict]]: ...
