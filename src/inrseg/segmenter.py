"""The one interface every method implements, and the registry that finds a method by name.

Every method turns a training set of (image, label map) pairs into a model that labels a new
image; they differ only in the per-image work at test time (see ``shared/DESIGN.md``). The CLI,
the benchmark harness and the reports speak only this protocol.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import ClassVar, Protocol, Sequence, runtime_checkable

import torch

from inrseg.checkpoints import read_metadata, validate_model_header
from inrseg.data.io import Volume
from inrseg.data.layouts import Case
from inrseg.errors import InputError
from inrseg.training import Budget


@runtime_checkable
class Segmenter(Protocol):
    """A trainable segmentation model.

    Attributes:
        method: registry name, stored in checkpoints (``"unet"``, ``"metaseg"``...).
        label_names: class names indexed by label value.
        spatial_ndim: grid axes of the images it labels (2, 3 or 4 for 3D + t).
        device: where its network lives (constructors and ``load`` take ``device=``).
    """

    method: ClassVar[str]
    #: the grid dimensionalities it segments (2, 3, 4 = 3D + t)
    spatial_ndims: ClassVar[tuple[int, ...]]
    label_names: list[str]
    spatial_ndim: int

    device: torch.device

    def fit(self, train: Sequence[Case], val: Sequence[Case] | None = None,
            state_path: Path | None = None, *, budget: Budget | None = None,
            log_path: Path | None = None, precision: str = "auto") -> None:
        """Train on ``train``; select models / step counts on ``val`` (never on test data).

        ``state_path``: where a resumable training state is written periodically; if the file
        exists, training continues from it. ``budget``: the wall-time deadline of the whole
        call, every phase included (default: the config's ``budget_minutes`` from now).
        ``log_path``: per-step metrics log (JSON lines). ``precision``: ``auto`` (bf16 autocast
        on CUDA where the method allows it), ``fp32`` or ``bf16``. Under torchrun every rank
        calls it; the engine (:mod:`inrseg.training`) splits the work.
        """

    def to(self, device: str | torch.device) -> "Segmenter":
        """Move the model to ``device``."""

    def predict(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Label map ``(*S',)`` of ``image`` (``(C, *S)``) with an affine that overlays it.

        ``scale`` != 1 predicts on a finer/coarser grid of the same field of view
        (``S' = round(S * scale)``) where the method supports it.
        """

    def predict_probabilities(self, image: Volume, scale: float | Sequence[float] = 1.0) -> Volume:
        """Class probabilities ``(num_classes, *S')`` float32 (summing to 1 per voxel) on the grid
        of :meth:`predict`, whose labels are their argmax; ``inrseg segment --save-probabilities``."""

    def save(self, path: str | Path) -> None:
        """Write a checkpoint (safetensors + JSON header), atomically."""

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Segmenter":
        """Read a checkpoint written by :meth:`save` of this method onto ``device``."""


_KIND = {2: "2D", 3: "3D", 4: "3D+t"}


def check_spatial_ndim(cls, spatial_ndim: int, path: Path | None = None) -> None:
    """Refuse, in one line, data whose grid dimensionality the method ``cls`` does not segment."""
    if spatial_ndim not in cls.spatial_ndims:
        what = " or ".join(_KIND[n] for n in cls.spatial_ndims)
        raise InputError(path, f"{_KIND.get(spatial_ndim, f'{spatial_ndim}D')} data: {cls.method} segments "
                               f"{what} images" + ("" if spatial_ndim != 4 else " (nisf segments 3D+t cines)"))


#: method name -> "module:Class". Imported lazily so that `inrseg --help` stays fast.
REGISTRY: dict[str, str] = {
    "unet": "inrseg.methods.supervised:SupervisedSegmenter",
    "segresnet": "inrseg.methods.supervised:SegResNetSegmenter",
    "morse": "inrseg.methods.morse:MORSE",
    "nisf": "inrseg.methods.nisf:NISF",
    "metaseg": "inrseg.methods.metaseg:MetaSeg",
}


def segmenter_class(method: str, path: Path | None = None) -> type:
    """The class registered for ``method``."""
    target = REGISTRY.get(method)
    if target is None:
        raise InputError(path, f"method {method!r} is not available in this version of inrseg "
                               f"(known: {', '.join(sorted(REGISTRY))})")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def load_segmenter(path: str | Path, method: str | None = None,
                   device: str | torch.device = "cpu") -> Segmenter:
    """Load any inrseg checkpoint onto ``device``; with ``method``, refuse a checkpoint of
    another method. Checkpoints hold CPU tensors, so any checkpoint loads onto any device."""
    path = Path(path)
    meta = read_metadata(path)
    found = meta.get("method")
    if meta.get("kind") == "train-state":
        raise InputError(path, "is a training-state file, not a model checkpoint")
    if method is not None and found != method:
        raise InputError(path, f"is a {found!r} checkpoint, not {method!r}")
    cls = segmenter_class(found, path)
    validate_model_header(path, meta)
    try:
        return cls.load(path, device=device)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        # a header that is valid JSON but lies about the config, the classes or the channels
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"checkpoint header does not match its weights ({type(exc).__name__}: "
                               f"{msg[:160]})") from None
