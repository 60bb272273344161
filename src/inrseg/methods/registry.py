"""The method registry: one entry per method, read by the CLI, ``bench``, the reports and the docs.

An entry names the method, its segmenter class and its config :class:`Recipe` (config class,
presets, the default preset for the data at hand, how a preset becomes a config), the
``name:variant`` grammar and a one-line summary; capabilities are read off the class
(:mod:`inrseg.methods.base`). Classes and recipes are imported on first use, so ``inrseg --help``
stays fast. :func:`resolve` is the one way a config is made from what a user typed: ``inrseg
train`` and ``inrseg bench`` both call it, so they build the same model for the same data.

Adding a method: a package under ``inrseg.methods`` with a :class:`~inrseg.methods.base.Segmenter`
subclass and a :class:`Recipe`, and one :class:`MethodEntry` in :data:`ENTRIES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from inrseg.core.errors import InputError
from inrseg.engine.checkpoints import read_metadata, validate_model_header
from inrseg.methods.base import (BatchPrediction, FitDiagnostics, HeldOutSlices, PlaneRendering, Segmenter, StepCurves,
                                 check_spatial_ndim)
from inrseg.methods.slicewise import SliceWise
from inrseg.methods.configs import Recipe, parse_set, read_override_file

__all__ = ["ENTRIES", "SLICEWISE_MODE", "MethodEntry", "MethodSpec", "Recipe", "build_model", "capabilities",
           "check_data_ndim", "chosen_preset", "entry", "load_segmenter", "parse_methods", "resolve",
           "segmenter_class"]

#: the ``@`` mode of a method spec that applies a 2D model to 3D volumes slice by slice
SLICEWISE_MODE = "2d"


@dataclass(frozen=True)
class MethodEntry:
    """One method.

    Args:
        name: the registry and checkpoint name (``inrseg train NAME``).
        summary: one line for ``--help``, ``inrseg methods`` and the docs.
        segmenter: ``"module:Class"`` of its :class:`~inrseg.methods.base.Segmenter`.
        recipe: ``"module:NAME"`` of its :class:`Recipe`.
        variant_fields: config fields that the ``:`` parts of ``name:a:b`` set, in order; empty:
            ``name:P`` selects preset ``P``.
        doc: its page under ``docs/methods/``.
    """

    name: str
    summary: str
    segmenter: str
    recipe: str
    variant_fields: tuple[str, ...] = ()
    doc: str = ""

    def _load(self, target: str) -> Any:
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def cls(self) -> type[Segmenter]:
        return self._load(self.segmenter)

    @property
    def config_recipe(self) -> Recipe:
        return self._load(self.recipe)

    @property
    def grammar(self) -> str:
        """The ``--methods`` spelling, e.g. ``morse[:variant[:backbone]]`` or ``unet[:preset]``."""
        parts = self.variant_fields or ("preset",)
        return self.name + "".join(f"[:{p}" for p in parts) + "]" * len(parts)


#: every method, in the order the docs list them
ENTRIES: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("unet", "MONAI U-Net (2D / 3D), DiceCE, patch training: the supervised reference",
                "inrseg.methods.unet:UNetSegmenter", "inrseg.methods.unet:UNET_RECIPE", doc="docs/methods/unet.md"),
    MethodEntry("segresnet", "MONAI SegResNet (the MetaSeg paper's 3D baseline), the U-Net's trainer",
                "inrseg.methods.unet:SegResNetSegmenter", "inrseg.methods.unet:SEGRESNET_RECIPE",
                doc="docs/methods/unet.md"),
    MethodEntry("morse", "MORSE: stochastic mixture of decoder experts + implicit rendering of uncertain "
                         "points on a U-Net / TransUNet / 3D U-Net / UNETR backbone (and its ablations)",
                "inrseg.methods.morse:MORSE", "inrseg.methods.morse:RECIPE", ("variant", "backbone"),
                doc="docs/methods/morse.md"),
    MethodEntry("metaseg", "MetaSeg: a meta-learned SIREN fitted to each test image; a head reads labels off "
                           "its features", "inrseg.methods.metaseg:MetaSeg", "inrseg.methods.metaseg:RECIPE",
                doc="docs/methods/metaseg.md"),
    MethodEntry("nisf", "NISF: an auto-decoder Gabor-wavelet prior; at test time only a latent is fitted "
                        "(labels at any resolution, held-out slices, other planes)",
                "inrseg.methods.nisf:NISF", "inrseg.methods.nisf:RECIPE", doc="docs/methods/nisf.md"),
    MethodEntry("nnunet", "nnU-Net v2 (2d / 3d_fullres; CPU plans *-cpu) through its Python API: its planning, "
                          "preprocessing, training and prediction on inrseg's split and budget (extra: "
                          "inrseg[nnunet])", "inrseg.methods.nnunet:NNUNet", "inrseg.methods.nnunet:RECIPE",
                doc="docs/methods/nnunet.md"),
)}


def entry(name: str, path: Path | None = None) -> MethodEntry:
    """The entry of ``name``; an :class:`InputError` listing the known methods otherwise."""
    if name not in ENTRIES:
        raise InputError(path, f"method {name!r} is not available in this version of inrseg "
                               f"(known: {', '.join(ENTRIES)})")
    return ENTRIES[name]


def segmenter_class(method: str, path: Path | None = None) -> type[Segmenter]:
    """The class registered for ``method``."""
    return entry(method, path).cls


def capabilities(cls: type) -> list[str]:
    """What a segmenter class can do beyond the base interface (for ``--help`` and the docs)."""
    caps = [("held-out slices", HeldOutSlices), ("planes", PlaneRendering), ("step curves", StepCurves),
            ("batched prediction", BatchPrediction), ("fit diagnostics", FitDiagnostics)]
    out = [name for name, proto in caps if all(callable(getattr(cls, m, None)) for m in _members(proto))]
    if getattr(cls, "input_grid_only", False):
        out.append("labels on the input grid only (--scale 1)")
    elif getattr(cls, "continuous_scale", False):
        out.append("--scale on the continuous field")
    else:
        out.append("--scale by interpolating logits")
    return out


def _members(proto: type) -> list[str]:
    return [k for k in vars(proto) if not k.startswith("_") and callable(vars(proto)[k])]


# ============================================================================================
# what the user typed -> a config
# ============================================================================================

@dataclass(frozen=True)
class MethodSpec:
    """One method as written on a command line: ``name[:a[:b]]`` (see :attr:`MethodEntry.grammar`)."""

    text: str
    method: str
    parts: tuple[str, ...] = ()
    slicewise: bool = False  # ``name...@2d``: the 2D model on 3D volumes, slice by slice

    def config_ndim(self, data_ndim: int) -> int:
        """The grid dimensionality the method's config is resolved for: 2 for ``@2d``."""
        return 2 if self.slicewise else data_ndim

    @property
    def label(self) -> str:
        return self.text

    @property
    def entry(self) -> MethodEntry:
        return ENTRIES[self.method]


def parse_spec(text: str) -> MethodSpec:
    """``"morse:pointrend:unet3d"`` -> a :class:`MethodSpec`; unknown names and presets are errors.
    A trailing ``@2d`` (``unet@2d``, ``morse:pointrend:unet@2d``) asks for the 2D model on 3D
    volumes, slice by slice (:class:`~inrseg.methods.slicewise.SliceWise`)."""
    body, at, mode = text.strip().partition("@")
    if at and mode.strip() != SLICEWISE_MODE:
        raise InputError(None, f"{text!r}: unknown mode {'@' + mode!r} (@{SLICEWISE_MODE}: a 2D method on 3D "
                               f"volumes, slice by slice)")
    method, *parts = [p.strip() for p in body.strip().split(":")]
    e = entry(method)
    n = max(1, len(e.variant_fields))
    if len(parts) > n:
        raise InputError(None, f"{text!r} has too many ':' parts (expected {e.grammar})")
    if parts and not e.variant_fields and parts[0] not in e.config_recipe.presets:
        raise InputError(None, f"{text!r}: unknown {method} preset {parts[0]!r} "
                               f"({', '.join(e.config_recipe.presets)})")
    spec = MethodSpec(text.strip(), method, tuple(parts), bool(at))
    if spec.slicewise and 2 not in e.cls.spatial_ndims:
        raise InputError(None, f"{text!r}: {method} has no 2D model to apply slice by slice")
    return spec


def parse_methods(text: str) -> list[MethodSpec]:
    """``"unet,morse:pointrend,metaseg"`` -> specs; names a method twice or none: an error."""
    specs = [parse_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise InputError(None, "--methods: no method given")
    if len({s.text for s in specs}) != len(specs):
        raise InputError(None, f"--methods: {text!r} names a method twice")
    return specs


def check_data_ndim(spec: MethodSpec, data_ndim: int, path: Path | None = None) -> None:
    """Refuse, in one line, data that ``spec`` does not segment (``@2d``: 3D volumes only)."""
    if spec.slicewise:
        if data_ndim != 3:
            raise InputError(path, f"{data_ndim}D data: {spec.text} segments 3D volumes slice by slice "
                                   f"(drop '@{SLICEWISE_MODE}' for {data_ndim}D data)")
        return
    check_spatial_ndim(spec.entry.cls, data_ndim, path)


def build_model(spec: MethodSpec, data_ndim: int, label_names: Sequence[str], in_channels: int, config: Any,
                device: str | torch.device = "cpu") -> Any:
    """The model ``spec`` names for data of ``data_ndim`` with ``config`` (from :func:`resolve`
    with :meth:`MethodSpec.config_ndim`): the method's segmenter, or for ``@2d`` its 2D model
    wrapped in :class:`~inrseg.methods.slicewise.SliceWise`. ``train`` and ``bench`` both call it."""
    check_data_ndim(spec, data_ndim)
    model = spec.entry.cls(label_names, spec.config_ndim(data_ndim), in_channels, config, device=device)
    return SliceWise(model) if spec.slicewise else model


def chosen_preset(spec: MethodSpec, spatial_ndim: int, preset: str | None = None,
                  file_preset: str | None = None) -> str:
    """The preset :func:`resolve` starts from (its step 1)."""
    spec_preset = spec.parts[0] if spec.parts and not spec.entry.variant_fields else None
    return preset or file_preset or spec_preset or spec.entry.config_recipe.default_preset(spatial_ndim)


def resolve(spec: str | MethodSpec, spatial_ndim: int, *, preset: str | None = None,
            config_file: Path | None = None, sets: Sequence[str] = (),
            options: Mapping[str, Any] | None = None) -> tuple[MethodEntry, Any]:
    """The config a user asked for on data of ``spatial_ndim`` (a ``@2d`` spec: the 2D config), in
    one order of precedence (later wins):

    1. the preset: ``preset``, else the override file's ``preset``, else a ``name:P`` spec's,
       else the entry's default for ``spatial_ndim``;
    2. the override file's fields (``--config FILE``);
    3. the ``:`` parts of a spec whose entry has ``variant_fields`` (``morse:pointrend:unet3d``);
    4. ``--set key=value`` items;
    5. ``options``: the CLI's shorthand flags (``--steps``, ``--budget-minutes``, ``seed``...),
       ``None`` values skipped. A flag the method's config has no field for is an error.

    Returns ``(entry, config)``.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    spatial_ndim = spec.config_ndim(spatial_ndim)
    e = spec.entry
    recipe = e.config_recipe
    cls = recipe.config_class
    file_preset, from_file = read_override_file(cls, config_file) if config_file is not None else (None, {})
    chosen = chosen_preset(spec, spatial_ndim, preset, file_preset)
    overrides: dict[str, Any] = dict(from_file)
    overrides.update(dict(zip(e.variant_fields, spec.parts)))
    overrides.update(parse_set(cls, sets))
    names = {f.name for f in fields(cls)}
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key not in names:
            raise InputError(None, f"--{key.replace('_', '-')}: {e.name} has no {key!r} setting "
                                   f"(`inrseg config {e.name}` lists them)")
        overrides[key] = value
    cfg = recipe.make(chosen, spatial_ndim, overrides)
    return e, cfg


# ============================================================================================
# checkpoints
# ============================================================================================

def load_segmenter(path: str | Path, method: str | None = None,
                   device: str | torch.device = "cpu") -> Segmenter:
    """Load any inrseg checkpoint onto ``device``; with ``method``, refuse a checkpoint of
    another method. Checkpoints hold CPU tensors, so any checkpoint loads onto any device. A 2D
    model saved with a ``slice_axis`` comes back as its :class:`~inrseg.methods.slicewise.SliceWise`."""
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
        model = cls.load(path, device=device)
        return SliceWise(model) if model.slice_axis is not None else model
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        # a header that is valid JSON but lies about the config, the classes or the channels
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"checkpoint header does not match its weights ({type(exc).__name__}: "
                               f"{msg[:160]})") from None

